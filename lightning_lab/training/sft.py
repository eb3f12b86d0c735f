"""LoRA supervised fine-tuning on prompt/completion pairs.

    lab sft fit --config configs/sft/gsm8k_smollm2.yaml
    lab sft fit --config configs/sft/gsm8k_smollm2.yaml --ckpt_path last          # resume
    lab sft validate --config configs/sft/gsm8k_smollm2.yaml --ckpt_path last
    lab sft predict --config configs/sft/gsm8k_smollm2.yaml --ckpt_path last      # generations -> JSONL
    lab sft predict --config configs/sft/gsm8k_smollm2.yaml --model.adapter runs/sft/gsm8k_smollm2/adapters/final
    lab sft fit --config configs/sft/gsm8k_smollm2.yaml --trainer.devices 2 --trainer.strategy ddp
    lab adapter merge --adapter runs/sft/gsm8k_smollm2/adapters/final --out checkpoints/sft_gsm8k

The config file's keys are LightningCLI's: ``model:`` (`SFTModule` below), ``data:``
(`SampleDataModule`), ``trainer:`` and ``run:`` (run directory, see training/common.py, which also holds
`SampleDataModule` and `LoraModule`, shared with RL).

Data: any source `load_benchmark` reads (a GSM8K / MATH / prompt-pair JSONL, a TSV, ``gsm8k``).
The completion is the sample's full solution where the source has one (``metadata["solution"]``:
GSM8K's answer text with its ``#### 72`` line, MATH solutions), else its reference (JSONL pairs
with a ``completion`` key). Training uses every sample of ``data.train_split`` that is not in
``data.val_split`` (the held-out dev slice, which `load_benchmark` cuts by a fixed seed), so the
whole dev half stays unseen even when validation uses only ``data.val_limit`` of it.

Each example is the prompt, tokenized as the sampler tokenizes it at inference (the chat template
with one user turn and the assistant header when the tokenizer has one, else the text verbatim),
followed by the completion and EOS. The loss is the mean negative log-likelihood of the completion
tokens (prompt and padding are masked), from the lab's one teacher-forced scoring function
(`models.scoring.score`). Batches are padded to their longest prompt and completion (dynamic padding; no
packing, so examples never attend to each other).

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
resumes exactly. Several processes (``--trainer.devices N --trainer.strategy ddp``; CUDA, or CPU with
gloo) shard every global batch of ``N x data.batch_size`` samples across the ranks (`SampleBatches`), and
a Ctrl+C on any rank pauses them all after the same step.

``lab sft predict`` writes the generations of the trained model (``--ckpt_path``) or of a saved adapter
(``--model.adapter DIR``) on ``data.predict_split`` to ``<run>/predictions.jsonl`` through the lab
sampler (``model.predict``: n, max_new_tokens, greedy, ...; see `LoraModule`).

At the end of fit (or a pause) the adapter is written in peft format to
``runs/sft/<name>/adapters/<adapter_name>/`` with the tokenizer and the base spec, ready for
``lab adapter merge`` or `lightning_lab.models.lora.load_adapter`.
Logged: ``train_loss``, ``lr``, ``train_completion_tokens`` per step; ``val_loss`` (token-weighted over
all ranks' validation samples: a torchmetrics ``MeanMetric``).
"""

from __future__ import annotations

import logging

import torch
from torchmetrics import MeanMetric

from lightning_lab.data.benchmarks import Sample
from lightning_lab.data.io import DataError
from lightning_lab.models.lora import LoraSettings
from lightning_lab.models.scoring import score
from lightning_lab.sampling.prompts import encode_prompt
from lightning_lab.training.common import LoraModule, PredictSettings, SampleDataModule, run_stage_cli

log = logging.getLogger(__name__)


def completion_text(sample: Sample) -> str:
    """What the model learns to write: the full solution when the source has one, else the reference."""
    return sample.metadata.get("solution") or sample.reference


def sft_example(tokenizer, sample: Sample, max_length: int) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids + EOS) of one sample, cut to `max_length` tokens in all.

    Prompt and completion are tokenized separately, so the prompt tokens are exactly the ones the
    sampler will feed the model at inference.
    """
    prompt_ids = encode_prompt(tokenizer, sample.prompt)
    completion_ids = tokenizer(completion_text(sample), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    if len(prompt_ids) >= max_length:
        raise DataError(f"sample {sample.id}: the prompt alone has {len(prompt_ids)} tokens, "
                        f"at least model.max_length={max_length}; no completion token is left to learn")
    if len(prompt_ids) + len(completion_ids) > max_length:
        log.warning("sample %s: %d tokens, truncated to model.max_length=%d", sample.id,
                    len(prompt_ids) + len(completion_ids), max_length)
        completion_ids = completion_ids[:max_length - len(prompt_ids)]
    return prompt_ids, completion_ids


class SFTModule(LoraModule):
    """Cross-entropy on completion tokens of a LoRA-adapted causal LM.

    Args:
        model: base model spec for `load_causal_lm` (alias, HF directory, .gguf, lab .ckpt).
        lora: LoRA rank, alpha, dropout, target modules (default per architecture, see models/lora.py).
        learning_rate: peak AdamW learning rate (reached after `warmup_steps`).
        weight_decay: AdamW decoupled weight decay on the LoRA weights.
        warmup_steps: optimizer steps of linear warm-up (from 0); then cosine to ``min_lr_ratio * learning_rate``.
        min_lr_ratio: where the cosine ends, at ``trainer.max_steps``.
        max_length: longest example in tokens (prompt + completion + EOS); longer ones are cut, with a warning.
        dtype: dtype the base is loaded in: fp32 (default) or bf16 (see module docstring).
        adapter_name: the adapter goes to ``<run>/adapters/<adapter_name>/``.
        adapter: start from this saved peft adapter directory (its rank and targets) instead of a new LoRA.
        predict: decoding settings of ``lab sft predict`` (`PredictSettings`).
    """

    def __init__(self, model: str = "smollm2-135m", lora: LoraSettings = LoraSettings(), learning_rate: float = 2e-4,
                 weight_decay: float = 0.0, warmup_steps: int = 10, min_lr_ratio: float = 0.1,
                 max_length: int = 1024, dtype: str = "fp32", adapter_name: str = "final", adapter: str | None = None,
                 predict: PredictSettings = PredictSettings()):
        super().__init__(model, lora, learning_rate, weight_decay, warmup_steps, min_lr_ratio, dtype, adapter_name,
                         adapter, predict)
        self.val_loss = MeanMetric()  # token-weighted; a torchmetric, so DDP ranks' shares add up

    def loss(self, samples: list[Sample], grad: bool) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over the completion tokens of `samples`, and how many there were."""
        examples = [sft_example(self.tokenizer, sample, self.hparams.max_length) for sample in samples]
        scores = score(self.model, [prompt for prompt, _ in examples], [completion for _, completion in examples],
                       grad=grad)
        return scores.mean_nll(), scores.num_tokens

    def training_step(self, samples: list[Sample], batch_idx: int) -> torch.Tensor:
        loss, tokens = self.loss(samples, grad=True)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(samples))
        self.log("train_completion_tokens", float(tokens), batch_size=len(samples))
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=len(samples))
        return loss

    def validation_step(self, samples: list[Sample], batch_idx: int) -> None:
        loss, tokens = self.loss(samples, grad=False)
        self.val_loss.update(loss, weight=tokens)

    def on_validation_epoch_end(self) -> None:
        self.log("val_loss", self.val_loss.compute(), prog_bar=True)  # compute() reduces across DDP ranks
        self.val_loss.reset()


REQUIRED_ARTIFACTS = ("config.yaml", "checkpoints/last.ckpt", "metrics.jsonl", "adapters/*/adapter_model.safetensors")


def main(argv: list[str]) -> int:
    run_stage_cli(SFTModule, SampleDataModule, "sft", argv, required_artifacts=REQUIRED_ARTIFACTS)
    return 0
