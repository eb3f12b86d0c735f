"""LoRA supervised fine-tuning on prompt/completion pairs.

    lab sft fit --config configs/sft/gsm8k_smollm2.yaml
    lab sft fit --config configs/sft/gsm8k_smollm2.yaml --ckpt_path last          # resume
    lab sft validate --config configs/sft/gsm8k_smollm2.yaml --ckpt_path last
    lab adapter merge --adapter runs/sft/gsm8k_smollm2/adapters/final --out checkpoints/sft_gsm8k

The config file's keys are LightningCLI's: ``model:`` (`SFTModule` below), ``data:``
(`SampleDataModule`), ``trainer:`` and ``run:`` (run directory, see training/common.py).

Data: any source `load_benchmark` reads (a GSM8K / MATH / prompt-pair JSONL, a TSV, ``gsm8k``).
The completion is the sample's full solution where the source has one (``metadata["solution"]``:
GSM8K's answer text with its ``#### 72`` line, MATH solutions), else its reference (JSONL pairs
with a ``completion`` key). Training uses every sample of ``data.train_split`` that is not in
``data.val_split`` (the held-out dev slice, which `load_benchmark` cuts by a fixed seed), so the
whole dev half stays unseen even when validation uses only ``data.val_limit`` of it.

Each example is the prompt, tokenized as the sampler tokenizes it at inference (the chat template
with one user turn and the assistant header when the tokenizer has one, else the text verbatim),
followed by the completion and EOS. The loss is the mean cross-entropy over completion tokens
only (prompt and padding are masked). Batches are padded to their longest example (dynamic
padding; no packing, so examples never attend to each other).

The model (``model.model``: alias, HF directory, .gguf, lab .ckpt) is loaded by `load_causal_lm`
in `configure_model`, in ``model.dtype`` (fp32 by default). Mixed precision is the user's choice:
``trainer.precision: bf16-mixed`` autocasts the matrix products (fast on CUDA and on CPUs with
AVX512-BF16/AMX), or ``model.dtype: bf16`` keeps the frozen base in bf16 (half the memory) while
peft keeps the LoRA weights in fp32.

Checkpoints are small: ``state_dict`` holds only the trainable (LoRA) weights; the frozen base is
reloaded from ``model.model`` (a hyper-parameter, saved in the checkpoint). `on_load_checkpoint`
checks that the checkpoint's LoRA weights are exactly the ones this model has (same base, rank,
targets), which is why `strict_loading` can be off. With the optimizer and LR-schedule state,
the RNG states (LoRA dropout) and the batch position of `SampleBatches`, ``--ckpt_path last``
resumes exactly. One device (``trainer.devices: 1``: CPU, one GPU or MPS): `SampleBatches` does
not shard batches across DDP ranks, and more processes are an error naming ``--trainer.devices``.

At the end of fit (or a pause) the adapter is written in peft format to
``runs/sft/<name>/adapters/<adapter_name>/`` with the tokenizer and the base spec, ready for
``lab adapter merge`` or `lightning_lab.models.lora.load_adapter`.
Logged: ``train_loss``, ``lr``, ``train_completion_tokens`` per step; ``val_loss`` (token-weighted).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from lightning_lab.data.benchmarks import Sample, load_benchmark
from lightning_lab.data.io import DataError
from lightning_lab.models.loading import load_causal_lm
from lightning_lab.models.lora import LoraSettings, add_lora, save_adapter
from lightning_lab.sampling.prompts import encode_prompt
from lightning_lab.training.common import run_stage_cli
from lightning_lab.training.pretrain import warmup_cosine

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of prompt and padding positions: no loss there


# ---- data -------------------------------------------------------------------------------------


class SampleBatches:
    """Lists of `Sample`s in an order fixed by (seed, epoch); Lightning can checkpoint it mid-epoch.

    Lightning saves ``state_dict()`` (epoch, batches already given) in the checkpoint and calls
    ``load_state_dict()`` on resume, so a resumed run continues with the batch an uninterrupted
    run would have seen next (a plain DataLoader would restart the epoch). It has a length, so
    Lightning does not prefetch and the position counts exactly the batches trained on.
    """

    def __init__(self, samples: list[Sample], batch_size: int, shuffle: bool, seed: int = 0):
        self.samples = samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0  # batches of this epoch already given

    def __len__(self) -> int:
        return math.ceil(len(self.samples) / self.batch_size)

    def __iter__(self):
        if self.position >= len(self):  # the previous epoch was used up: start the next one
            self.epoch += 1
            self.position = 0
        order = list(range(len(self.samples)))
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        while self.position < len(self):
            start = self.position * self.batch_size
            self.position += 1
            yield [self.samples[i] for i in order[start:start + self.batch_size]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


class SampleDataModule(L.LightningDataModule):
    """Batches of `Sample`s from one source; the LightningModule tokenizes (it owns the tokenizer).

    Args:
        path: anything `load_benchmark` accepts: a .jsonl / .tsv path, ``gsm8k``, ``humaneval``.
        train_split: the split to train on, minus every sample of `val_split` (see module docstring).
            For a local file ``all`` (= the file minus its dev half); for ``gsm8k`` ``train``.
        val_split: the held-out split validated on (``dev``); None: no validation, nothing held out.
        train_limit: train on only the first this many training samples (file order).
        val_limit: validate on this many samples of `val_split`, chosen by `seed` (load_benchmark's limit).
        batch_size: samples (prompts) per training batch.
        val_batch_size: samples per validation batch (default: batch_size).
        seed: the shuffle order of each epoch and the choice of the `val_limit` samples.
    """

    def __init__(self, path: str, train_split: str = "all", val_split: str | None = "dev",
                 train_limit: int | None = None, val_limit: int | None = 200, batch_size: int = 8,
                 val_batch_size: int | None = None, seed: int = 0):
        super().__init__()
        self.path = path
        self.train_split = train_split
        self.val_split = val_split
        self.train_limit = train_limit
        self.val_limit = val_limit
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.seed = seed
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []

    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.world_size > 1:
            raise ValueError(f"--trainer.devices: {self.trainer.world_size} processes, but SampleBatches does not "
                             "shard batches across DDP ranks (every rank would train on the same samples); "
                             "run on one device (--trainer.devices 1)")
        if self.val_split is not None:
            self.val_samples = load_benchmark(self.path, split=self.val_split, limit=self.val_limit, seed=self.seed)
        if stage != "fit":
            return
        held_out = {s.id for s in load_benchmark(self.path, split=self.val_split)} if self.val_split else set()
        candidates = load_benchmark(self.path, split=self.train_split)
        self.train_samples = [sample for sample in candidates if sample.id not in held_out]
        if self.train_limit is not None:
            self.train_samples = self.train_samples[: self.train_limit]
        if not self.train_samples:
            raise DataError(f"{self.path}: no training samples left in split {self.train_split!r} "
                            f"after holding out split {self.val_split!r}")
        log.info("%s: %d training samples (split %r minus %d held out in %r), %d validation samples", self.path,
                 len(self.train_samples), self.train_split, len(held_out), self.val_split, len(self.val_samples))

    def train_dataloader(self) -> SampleBatches:
        return SampleBatches(self.train_samples, self.batch_size, shuffle=True, seed=self.seed)

    def val_dataloader(self) -> SampleBatches | list:
        if not self.val_samples:
            return []
        return SampleBatches(self.val_samples, self.val_batch_size, shuffle=False)


# ---- tokenization -----------------------------------------------------------------------------


def completion_text(sample: Sample) -> str:
    """What the model learns to write: the full solution when the source has one, else the reference."""
    return sample.metadata.get("solution") or sample.reference


def sft_batch(tokenizer, samples: list[Sample], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask, and labels that are the ids on completion tokens only.

    Prompt and completion are tokenized separately, so the prompt tokens are exactly the ones the
    sampler will feed the model at inference.
    """
    rows, n_prompt_tokens = [], []
    for sample in samples:
        prompt_ids = encode_prompt(tokenizer, sample.prompt)
        completion_ids = tokenizer(completion_text(sample), add_special_tokens=False).input_ids
        ids = prompt_ids + completion_ids + [tokenizer.eos_token_id]
        if len(ids) > max_length:
            log.warning("sample %s: %d tokens, truncated to model.max_length=%d", sample.id, len(ids), max_length)
            ids = ids[:max_length]
        if len(prompt_ids) >= len(ids):
            raise DataError(f"sample {sample.id}: the prompt alone has {len(prompt_ids)} tokens, "
                            f"at least model.max_length={max_length}; no completion token is left to learn")
        rows.append(ids)
        n_prompt_tokens.append(len(prompt_ids))
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(zip(rows, n_prompt_tokens)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---- the LoRA module shared with RL -----------------------------------------------------------


class LoraModule(L.LightningModule):
    """A causal LM with a LoRA adapter whose checkpoints hold only the adapter (see module docstring).

    Subclasses (`SFTModule`, `RLModule`) add the steps; this class owns loading, the optimizer,
    the small checkpoints, exact resume and saving the adapter at the end of fit.
    """

    def __init__(self, model: str, lora: LoraSettings, learning_rate: float, weight_decay: float,
                 warmup_steps: int, min_lr_ratio: float, dtype: str, adapter_name: str):
        super().__init__()
        self.lora = lora
        # plain types only in the hyper-parameters: checkpoints load with torch's weights_only
        self.save_hyperparameters(ignore=["lora"])
        self.hparams["lora"] = asdict(self.lora)
        self.model: torch.nn.Module | None = None
        self.tokenizer = None
        self.strict_loading = False  # only LoRA weights are saved; on_load_checkpoint checks them

    def configure_model(self) -> None:
        if self.model is not None:
            return
        loaded = load_causal_lm(self.hparams.model, device="cpu", dtype=self.hparams.dtype)  # Lightning moves it
        self.tokenizer = loaded.tokenizer
        self.model = add_lora(loaded.model, self.lora)
        self.model.train()  # load_causal_lm returns eval mode; Lightning keeps whatever mode it finds

    def trainable_names(self) -> set[str]:
        return {name for name, parameter in self.named_parameters() if parameter.requires_grad}

    # ---- optimisation --------------------------------------------------------------------

    def configure_optimizers(self):
        parameters = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        max_steps = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(
            step, self.hparams.warmup_steps, int(max_steps), self.hparams.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- small checkpoints, exact resume -------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved_model = checkpoint.get("hyper_parameters", {}).get("model")
        if saved_model is not None and saved_model != self.hparams.model:
            raise ValueError(f"checkpoint was trained on model.model={saved_model!r}, this run has "
                             f"{self.hparams.model!r}; resume with the same base model")
        self.configure_model()  # also reached from load_from_checkpoint, which does not call configure_model
        saved, expected = set(checkpoint["state_dict"]), self.trainable_names()
        if saved != expected:
            example = sorted(saved ^ expected)[:3]
            raise ValueError(f"checkpoint LoRA weights do not match this model's ({len(saved)} saved, "
                             f"{len(expected)} expected; e.g. {example}): same model.model and model.lora?")

    def adapter_dir(self) -> Path:
        return Path(self.trainer.default_root_dir) / "adapters" / self.hparams.adapter_name

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            path = save_adapter(self.model, self.tokenizer, self.adapter_dir(), base_spec=self.hparams.model)
            log.info("adapter saved to %s", path)


class SFTModule(LoraModule):
    """Cross-entropy on completion tokens of a LoRA-adapted causal LM.

    Args:
        model: base model spec for `load_causal_lm` (alias, HF directory, .gguf, lab .ckpt).
        lora: LoRA rank, alpha, dropout, target modules (default per architecture, see models/lora.py).
        learning_rate: peak AdamW learning rate (reached after `warmup_steps`).
        weight_decay: AdamW decoupled weight decay on the LoRA weights.
        warmup_steps: optimizer steps of linear warm-up; then cosine to ``min_lr_ratio * learning_rate``.
        min_lr_ratio: where the cosine ends, at ``trainer.max_steps``.
        max_length: longest example in tokens (prompt + completion + EOS); longer ones are cut, with a warning.
        dtype: dtype the base is loaded in: fp32 (default) or bf16 (see module docstring).
        adapter_name: the adapter goes to ``<run>/adapters/<adapter_name>/``.
    """

    def __init__(self, model: str = "smollm2-135m", lora: LoraSettings = LoraSettings(), learning_rate: float = 2e-4,
                 weight_decay: float = 0.0, warmup_steps: int = 10, min_lr_ratio: float = 0.1,
                 max_length: int = 1024, dtype: str = "fp32", adapter_name: str = "final"):
        super().__init__(model, lora, learning_rate, weight_decay, warmup_steps, min_lr_ratio, dtype, adapter_name)
        self._val_loss_sum = self._val_tokens = 0.0

    def loss(self, samples: list[Sample]) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over the completion tokens of `samples`, and how many there were."""
        batch = {k: v.to(self.device) for k, v in sft_batch(self.tokenizer, samples, self.hparams.max_length).items()}
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        targets = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        return loss, int((targets != IGNORE_INDEX).sum())

    def training_step(self, samples: list[Sample], batch_idx: int) -> torch.Tensor:
        loss, tokens = self.loss(samples)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(samples))
        self.log("train_completion_tokens", float(tokens), batch_size=len(samples))
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=len(samples))
        return loss

    def validation_step(self, samples: list[Sample], batch_idx: int) -> None:
        loss, tokens = self.loss(samples)
        self._val_loss_sum += float(loss) * tokens
        self._val_tokens += tokens

    def on_validation_epoch_end(self) -> None:
        if self._val_tokens:
            self.log("val_loss", self._val_loss_sum / self._val_tokens, prog_bar=True)
        self._val_loss_sum = self._val_tokens = 0.0


REQUIRED_ARTIFACTS = ("config.yaml", "checkpoints/last.ckpt", "metrics.jsonl", "adapters/*/adapter_model.safetensors")


def main(argv: list[str]) -> int:
    run_stage_cli(SFTModule, SampleDataModule, "sft", argv, required_artifacts=REQUIRED_ARTIFACTS)
    return 0
