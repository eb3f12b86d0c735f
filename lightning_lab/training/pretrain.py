"""Pretraining stage: the lab GPT (optionally with mHC) on packed token files.

    lab pretrain fit --config configs/pretrain/tiny.yaml
    lab pretrain fit --config configs/pretrain/tiny.yaml --ckpt_path last      # resume
    lab pretrain validate --config configs/pretrain/tiny.yaml --ckpt_path last
    lab pretrain predict --config configs/pretrain/tiny.yaml --ckpt_path last --data.prompts prompts.txt
    lab export --ckpt runs/pretrain/tiny/checkpoints/last.ckpt --out checkpoints/gpt_tiny

The config file's keys are LightningCLI's: ``model:`` (the arguments of `PretrainModule` below),
``data:`` (`PackedDataModule`), ``trainer:`` and ``run:`` (run directory, see training/common.py).

Optimisation: AdamW (weight decay on the Linear / Embedding weights only, not on norms or the mHC
logits and gates), linear warm-up (from 0) then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``
(transformers' `get_cosine_with_min_lr_schedule_with_warmup`, stepped every optimizer step). Gradient accumulation, clipping and precision are Trainer
arguments: ``trainer.accumulate_grad_batches``, ``trainer.gradient_clip_val``, and
``trainer.precision: bf16-mixed`` where bf16 matrix products are fast (CUDA with bf16; CPUs with
AVX512-BF16/AMX, where they run ~3-4x faster than fp32; decide with ``bench/pretrain.py``);
``32-true`` elsewhere (e.g. MPS, older laptop CPUs). Autocast keeps the norms, RoPE, softmax and
the loss in fp32.

Logged (to the CSV logger in the run dir, ``metrics.jsonl``, and any ``trainer.logger`` such as
TensorBoard or W&B): ``train_loss``, ``train_ppl``, ``lr`` every step and ``val_loss``,
``val_ppl`` (token-weighted over the validation batches: a torchmetrics ``MeanMetric``) each validation.
Both losses are the mean negative log-likelihood from the lab's teacher-forced scoring
(`models.scoring.score`; a window's first token is its prompt).

``lab pretrain predict`` writes continuations of the prompts in ``data.prompts`` (a text file, one
prompt per line) to ``<run>/<model.predict.output>`` (``predictions.jsonl``; never overwritten): a
header line (checkpoint, settings, the sampler's engine), then
``{"id", "prompt", "completions": [{"text", "finish_reason", "num_tokens"}]}`` per
prompt, decoded by the lab sampler without a chat template (``model.predict``: `PredictSettings`).

Written to the run directory (beside ``checkpoints/``): ``model_config.json`` (the LabGPTConfig,
which `load_causal_lm(<ckpt>)` reads), ``tokenizer/`` (a copy, so a checkpoint loads from any working
directory) and ``pretrain_config.json`` (this module's arguments).

Resume (``--ckpt_path last``) is exact: weights, optimizer, LR schedule and step from Lightning's
checkpoint, the batch order from `PackedDataModule`'s state, and the Python / NumPy / torch RNG
states from the ``rng_states`` entry the `ExactResume` callback (training/common.py) adds to every checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from torchmetrics import MeanMetric

from lightning_lab.data.io import JsonlWriter, read_yaml_or_json, write_json_atomic
from lightning_lab.data.packed import PackedDataModule
from lightning_lab.data.tokenizer import load_tokenizer
from lightning_lab.errors import ConfigError
from lightning_lab.loops import engine_info
from lightning_lab.models.gpt import LabGPTConfig, LabGPTForCausalLM
from lightning_lab.models.loading import LoadedModel
from lightning_lab.models.scoring import score
from lightning_lab.sampling.sampler import Sampler
from lightning_lab.training.common import (PredictSettings, completion_records, cosine_schedule, predictions_path,
                                           run_stage_cli)


def build_model_config(model_config: str | dict, tokenizer) -> LabGPTConfig:
    """A LabGPTConfig from a model yaml/json path or an inline dict; vocab size and special ids from `tokenizer`."""
    source = model_config if isinstance(model_config, str) else "model.model_config"
    fields = read_yaml_or_json(model_config) if isinstance(model_config, str) else dict(model_config)
    vocab_size = len(tokenizer)
    if fields.get("vocab_size", vocab_size) != vocab_size:
        raise ConfigError(f"{source}: vocab_size={fields['vocab_size']} but the tokenizer has {vocab_size} tokens; "
                         f"remove vocab_size (it is taken from the tokenizer) or use the matching tokenizer")
    fields.update(vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    try:
        return LabGPTConfig(**fields)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source}: {error}") from error


class PretrainModule(L.LightningModule):
    """Next-token prediction on packed (input_ids, labels) batches whose labels are already shifted.

    Args:
        model_config: a model yaml/json (configs/model/*.yaml) or its fields inline (LabGPTConfig);
            vocab_size and the bos/eos/pad ids come from the tokenizer.
        tokenizer: the tokenizer directory (`lab data tokenizer`); the same one the data was packed with.
        lr: peak learning rate, reached after `warmup_steps`.
        min_lr_ratio: the cosine ends at ``min_lr_ratio * lr``.
        weight_decay: AdamW decoupled weight decay on Linear / Embedding weights.
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: optimizer steps of linear warm-up.
        max_steps: length of the cosine in optimizer steps; None = ``trainer.max_steps``.
        predict: how ``lab pretrain predict`` decodes (`PredictSettings`; the output goes in the run directory).
    """

    def __init__(self, model_config: str | dict, tokenizer: str, lr: float = 3e-3, min_lr_ratio: float = 0.1,
                 weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 warmup_steps: int = 100, max_steps: int | None = None, predict: PredictSettings = PredictSettings()):
        super().__init__()
        self.predict_settings = predict
        # not the predict settings: LightningCLI lets a --ckpt_path's hyper-parameters override the command line
        self.save_hyperparameters(ignore=["predict"])
        self.tokenizer = load_tokenizer(tokenizer)
        self.model = LabGPTForCausalLM(build_model_config(model_config, self.tokenizer))
        self.val_loss = MeanMetric()  # token-weighted
        self.predictions: JsonlWriter | None = None
        self.predict_sampler: Sampler | None = None

    # ---- run directory -------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if stage == "predict":
            predictions_path(self.trainer, self.predict_settings)
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        data_tokenizer = getattr(datamodule, "tokenizer_path", None)
        if data_tokenizer is not None and Path(data_tokenizer).resolve() != Path(self.hparams.tokenizer).resolve():
            raise ConfigError(f"model.tokenizer={self.hparams.tokenizer} but data.tokenizer={data_tokenizer}: "
                             f"the model must use the tokenizer the data was packed with")
        if self.trainer.is_global_zero:
            run_dir = Path(self.trainer.default_root_dir)
            write_json_atomic(run_dir / "model_config.json", json.loads(self.model.config.to_json_string()))
            self.tokenizer.save_pretrained(run_dir / "tokenizer")  # the checkpoints load from any directory
            write_json_atomic(run_dir / "pretrain_config.json", {
                **self.hparams,
                "num_parameters": sum(p.numel() for p in self.model.parameters())})

    # ---- steps ---------------------------------------------------------------------------

    def loss(self, batch, grad: bool) -> tuple[torch.Tensor, int]:
        """Mean negative log-likelihood of the window's tokens after its first, and how many there were.
        (input_ids, labels) is a window of T + 1 tokens shifted by one: its first token and the T labels."""
        input_ids, labels = batch
        scores = score(self.model, input_ids[:, :1], labels, grad=grad)
        return scores.mean_nll(), labels.numel()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, _ = self.loss(batch, grad=True)
        logged = self.trainer.strategy.reduce(loss.detach(), reduce_op="mean")  # DDP: the mean over the ranks
        self.log("train_loss", logged, prog_bar=True)
        self.log("train_ppl", torch.exp(logged))
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, tokens = self.loss(batch, grad=False)
        self.val_loss.update(loss, weight=tokens)

    def on_validation_epoch_end(self) -> None:
        # compute() reduces across DDP ranks (which all validate the same batches: the mean is theirs)
        val_loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val_loss", val_loss, prog_bar=True)
        self.log("val_ppl", torch.exp(val_loss.clamp(max=80.0)))

    # ---- predict: continuations of prompts -----------------------------------------------

    def on_predict_start(self) -> None:
        loaded = LoadedModel(self.model, self.tokenizer, "pretrain", self.device, next(self.model.parameters()).dtype)
        self.predict_sampler = Sampler(loaded)  # the weights do not change while predicting
        self.predictions = JsonlWriter(predictions_path(self.trainer, self.predict_settings))
        self.predictions.write({"header": {"stage": "pretrain", "prompts": self.trainer.datamodule.prompts,
                                           "ckpt_path": self.trainer.ckpt_path, "predict": asdict(self.predict_settings),
                                           "engine": engine_info(self.predict_sampler), "time": time.time()}})

    def predict_step(self, batch: list[tuple[str, str]], batch_idx: int) -> None:
        settings = self.predict_settings
        generation = self.predict_sampler.generate(
            [prompt for _, prompt in batch], n=settings.n, max_new_tokens=settings.max_new_tokens, chat=False,
            greedy=settings.greedy, temperature=settings.temperature, top_p=settings.top_p,
            seed=settings.seed + batch_idx, batch_size=len(batch))
        for (prompt_id, prompt), result in zip(batch, generation.prompts):
            self.predictions.write({"id": prompt_id, "prompt": prompt, "completions": completion_records(result)})

    def on_predict_end(self) -> None:
        if self.predictions is not None:
            self.predictions.close()
            self.predictions = None

    # ---- optimisation --------------------------------------------------------------------

    def configure_optimizers(self):
        decay, no_decay = [], []
        decayed_modules = (torch.nn.Linear, torch.nn.Embedding)
        for module in self.model.modules():
            for name, parameter in module.named_parameters(recurse=False):
                is_weight = isinstance(module, decayed_modules) and name == "weight"
                (decay if is_weight else no_decay).append(parameter)
        unique = lambda params: list({id(p): p for p in params}.values())  # noqa: E731  (tied weights once)
        optimizer = torch.optim.AdamW(
            [{"params": unique(decay), "weight_decay": self.hparams.weight_decay},
             {"params": unique(no_decay), "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=tuple(self.hparams.betas), eps=self.hparams.eps)
        max_steps = self.hparams.max_steps or self.trainer.max_steps
        if max_steps is None or max_steps <= 0:
            raise ConfigError("the cosine schedule needs a length: set trainer.max_steps or model.max_steps")
        schedule = cosine_schedule(optimizer, self.hparams.warmup_steps, max_steps, self.hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def main(argv: list[str]) -> int:
    # PackedDataModule shards its batches across DDP ranks itself (Lightning cannot inject a sampler there)
    run_stage_cli(PretrainModule, PackedDataModule, "pretrain", argv,
                  trainer_defaults={"use_distributed_sampler": False})
    return 0
