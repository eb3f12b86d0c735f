"""Retention: did an update (SDFT, SFT, a merged adapter) make the model worse at its pretraining text?

    lab eval retention --base runs/pretrain/tiny/checkpoints/last.ckpt --updated runs/sdft/tiny/adapters/final \\
        --val_bin data/packed/val.bin --seq_len 256 --max_batches 16 --out runs/retention.json

Both models read the same windows of a packed validation file (`data.packed.PackedDataset`: the first
``max_batches x batch_size`` non-overlapping windows of ``seq_len + 1`` tokens, in file order) and each
window's mean negative log-likelihood comes from the lab's one scoring function (`models.scoring.score`:
the first token is the prompt, the other ``seq_len`` are scored). Every window has ``seq_len`` scored
tokens, so the mean over windows is the token mean and ``exp`` of it the perplexity.

The comparison is paired by window: ``delta_nll`` is the mean over windows of (updated - base) NLL, which
is the log of the perplexity ratio, with a percentile bootstrap interval that resamples windows
(`eval.stats.paired_bootstrap_difference`); ``perplexity_ratio`` is exp of it (and of its interval:
exp is monotone). ``delta_perplexity`` = updated - base perplexity. A model against itself gives 0 with
the interval [0, 0].

``--updated`` (and ``--base``) is any `load_causal_lm` spec or a LoRA adapter directory (adapter_config.json:
loaded on the base it records). Both tokenizers must be the one the file was packed with. The JSON written
to ``--out`` (never overwritten) holds the settings, both perplexities, the delta with its interval and
every window's NLL.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lightning_lab.errors import UserError, check_input_file, check_new_output_file
from lightning_lab.loops import check_count, check_device, check_number, parse_loop


@dataclass
class RetentionConfig:
    """`lab eval retention`: perplexity of two models on the same validation windows."""

    base: str = ""
    """the model before the update: any load_causal_lm spec, or a LoRA adapter directory"""
    updated: str = ""
    """the model after the update: any load_causal_lm spec, or a LoRA adapter directory"""
    val_bin: str = ""
    """a packed validation file (`lab data pack`), packed with the models' tokenizer"""
    out: str = ""
    """the JSON report (must not exist)"""
    seq_len: int = 256
    """tokens scored per window"""
    batch_size: int = 8
    """windows per forward pass"""
    max_batches: int | None = 16
    """read only the first max_batches x batch_size windows (None: every window of the file)"""
    resamples: int = 1000
    """bootstrap resamples of the windows"""
    confidence: float = 0.95
    """confidence level of the interval"""
    seed: int = 0
    """bootstrap seed"""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps"""
    dtype: str = "fp32"
    """fp32 | bf16 | fp16 | auto (fp32 by default: a small delta needs exact arithmetic)"""

    def __post_init__(self) -> None:
        for key in ("base", "updated", "val_bin", "out"):
            if not getattr(self, key):
                raise UserError(f"{key}: required (--{key} ...)")
        check_input_file(self.val_bin, "val_bin:")
        for key in ("base", "updated"):
            path = Path(getattr(self, key))
            if path.is_dir() and (path / "adapter_config.json").is_file():
                from lightning_lab.models.lora import check_adapter_dir

                check_adapter_dir(path)
        check_new_output_file(self.out, "out")
        for key in ("seq_len", "batch_size", "resamples"):
            check_count(key, getattr(self, key))
        if self.max_batches is not None:
            check_count("max_batches", self.max_batches)
        check_number("confidence", self.confidence, 0.0, 0.999, low_open=True)
        check_device(self.device, self.dtype)


def load_model(spec: str, device: str, dtype: str):
    """A `LoadedModel` from a model spec or a LoRA adapter directory."""
    from lightning_lab.models.loading import load_causal_lm
    from lightning_lab.models.lora import load_adapter

    if (Path(spec) / "adapter_config.json").is_file():
        return load_adapter(spec, device=device, dtype=dtype)
    return load_causal_lm(spec, device=device, dtype=dtype)


def window_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> list[float]:
    """Mean NLL of each window's last ``seq_len`` tokens given the ones before (rows of `windows`: seq_len + 1)."""
    from lightning_lab.models.scoring import score

    values = []
    for start in range(0, len(windows), batch_size):
        rows = windows[start:start + batch_size]
        scores = score(model, rows[:, :1], rows[:, 1:])
        values += (-scores.logprobs.sum(dim=1) / scores.mask.sum(dim=1)).tolist()
    return values


def read_windows(val_bin: str, seq_len: int, count: int | None) -> torch.Tensor:
    """The first `count` windows of ``seq_len + 1`` tokens of a packed file, as one LongTensor (count, seq_len + 1)."""
    from lightning_lab.data.packed import PackedDataset

    dataset = PackedDataset(val_bin, seq_len)
    count = len(dataset) if count is None else min(count, len(dataset))
    return torch.stack([torch.cat([dataset[i][0], dataset[i][1][-1:]]) for i in range(count)])


def compare_perplexity(base_nll: list[float], updated_nll: list[float], resamples: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> dict:
    """Both perplexities, the paired delta of mean NLL (log perplexity ratio) with its bootstrap interval."""
    from lightning_lab.eval.stats import paired_bootstrap_difference

    delta, low, high = paired_bootstrap_difference(updated_nll, base_nll, resamples=resamples,
                                                   confidence=confidence, seed=seed)
    base_ppl = math.exp(sum(base_nll) / len(base_nll))
    updated_ppl = math.exp(sum(updated_nll) / len(updated_nll))
    return {"windows": len(base_nll), "base_perplexity": base_ppl, "updated_perplexity": updated_ppl,
            "delta_perplexity": updated_ppl - base_ppl,
            "delta_nll": float(delta[0]), "delta_nll_interval": [float(low[0]), float(high[0])],
            "perplexity_ratio": math.exp(float(delta[0])),
            "perplexity_ratio_interval": [math.exp(float(low[0])), math.exp(float(high[0]))],
            "confidence": confidence}


def retention(config: RetentionConfig) -> dict:
    """Score both models on the same windows; write and return the report."""
    from lightning_lab.data.io import write_json_atomic
    from lightning_lab.data.packed import check_tokenizer

    count = None if config.max_batches is None else config.max_batches * config.batch_size
    windows = read_windows(config.val_bin, config.seq_len, count)
    nll = {}
    for key in ("base", "updated"):
        loaded = load_model(getattr(config, key), config.device, config.dtype)
        check_tokenizer(config.val_bin, loaded.tokenizer, getattr(config, key))
        nll[key] = window_nll(loaded.model, windows, config.batch_size)
        del loaded
    report = {"config": asdict(config),
              **compare_perplexity(nll["base"], nll["updated"], config.resamples, config.confidence, config.seed),
              "base_window_nll": nll["base"], "updated_window_nll": nll["updated"]}
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config.out, report)
    return report


def summary_text(report: dict) -> str:
    low, high = report["delta_nll_interval"]
    return (f"{report['windows']} windows: perplexity {report['base_perplexity']:.3f} -> "
            f"{report['updated_perplexity']:.3f} (x{report['perplexity_ratio']:.4f}); delta NLL "
            f"{report['delta_nll']:+.4f} [{low:+.4f}, {high:+.4f}] ({report['confidence']:.0%} bootstrap)")


COMMANDS = {"retention": (RetentionConfig, "perplexity of a base and an updated model on the same windows, "
                                            "with a paired bootstrap interval of the delta")}


def main(argv: list[str]) -> int:
    _, config = parse_loop("lab eval", COMMANDS, argv)
    report = retention(config)
    print(summary_text(report))
    print(f"written to {config.out}")
    return 0
