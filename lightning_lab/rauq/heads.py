"""Fixed RAUQ heads, chosen once on calibration data, and the heads file that carries them.

A controller scores tokens as they are generated, so it cannot pick heads per answer as the paper does. It
uses, per layer of the middle third, the head with the largest mean attention to the previous token over the
completion tokens of teacher-forced calibration pairs (`HeadSelection`: every a_t with t >= 1, pooled over
all pairs, so a long completion weighs more than a short one).

The heads file (JSON) says which model and data chose them, so that another model cannot use them by mistake::

    {"heads": {"10": 3, ...}, "layers": [10, ...], "alpha": 0.5, "model": "smollm2-135m",
     "num_layers": 30, "num_heads": 9, "convention": "paper", "data_hash": "sha256:...", "num_examples": 512}
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lightning_lab.data.benchmarks import load_benchmark
from lightning_lab.data.io import DataError, write_json_atomic
from lightning_lab.rauq.scoring import check_convention


def file_hash(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file's bytes: which calibration data, heads or threshold file a result came from."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def write_new_json(path: str | os.PathLike, record: dict) -> None:
    """Write `record` as JSON to a file that does not exist yet (nothing already written is overwritten)."""
    if Path(path).exists():
        raise DataError(f"{path}: already exists; pass another --output (nothing is overwritten)")
    write_json_atomic(path, record)


class HeadSelection:
    """Sums a_t (t >= 1) per (layer, head) over calibration completions; `heads` is the argmax per layer."""

    def __init__(self, num_layers: int, num_heads: int):
        self.sums = torch.zeros(num_layers, num_heads, dtype=torch.float64)
        self.count = 0

    def add(self, attention: torch.Tensor) -> None:
        """One completion's a_t of every head, (layers, heads, T) (`scoring.previous_token_attention`)."""
        self.sums += attention[..., 1:].double().sum(-1)
        self.count += attention.shape[-1] - 1

    def heads(self, layers: list[int]) -> dict[int, int]:
        if self.count == 0:
            raise DataError("head selection: the calibration completions have no token after their first "
                            "(one-token completions carry no attention to a previous completion token)")
        return {layer: int(self.sums[layer].argmax()) for layer in layers}


@dataclass
class HeadsFile:
    heads: dict[int, int]
    layers: list[int]
    alpha: float
    model: str
    num_layers: int
    num_heads: int
    convention: str
    data_hash: str
    num_examples: int

    def save(self, path: str | os.PathLike) -> None:
        """Write it as JSON; an existing file is never overwritten."""
        record = asdict(self)
        record["heads"] = {str(layer): head for layer, head in self.heads.items()}
        write_new_json(path, record)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """(layer, head) in layer order: the sampler's ``capture_heads``."""
        return [(layer, self.heads[layer]) for layer in self.layers]


def load_heads(path: str | os.PathLike, model: str | None = None, num_layers: int | None = None,
               num_heads: int | None = None) -> HeadsFile:
    """Read and check a heads file; with `model`, `num_layers`, `num_heads` given, refuse one chosen for
    another model (its id, or a layer or head the model does not have), naming both."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such heads file (write one with `lab rauq select-heads`)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        heads = HeadsFile(**{**record, "heads": {int(layer): int(head) for layer, head in record["heads"].items()},
                             "layers": [int(layer) for layer in record["layers"]]})
        check_convention(heads.convention)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataError(f"{path}: not a heads file written by `lab rauq select-heads` ({error})") from None
    if sorted(heads.heads) != sorted(heads.layers):
        raise DataError(f"{path}: 'heads' covers layers {sorted(heads.heads)} but 'layers' lists {heads.layers}")
    if model is not None and heads.model != model:
        raise DataError(f"{path}: heads chosen for model {heads.model!r}, not for {model!r}; "
                        "run `lab rauq select-heads` for this model")
    if num_layers is not None and num_heads is not None:
        outside = [(layer, head) for layer, head in heads.heads.items()
                   if not (0 <= layer < num_layers and 0 <= head < num_heads)]
        if outside or (heads.num_layers, heads.num_heads) != (num_layers, num_heads):
            raise DataError(f"{path}: heads chosen on {heads.model!r} ({heads.num_layers} layers x {heads.num_heads} "
                            f"heads; (layer, head) pairs outside this model: {outside}), but {model or 'this model'!r} "
                            f"has {num_layers} layers x {num_heads} heads")
    return heads



def calibration_pairs(path: str | os.PathLike, split: str = "all",
                      limit: int | None = None) -> list[tuple[str, str, str]]:
    """(id, prompt, completion) of the pairs of a JSONL or TSV calibration file (`data.benchmarks.load_benchmark`:
    ``split`` all, or its dev or test half; ``limit`` a fixed seed-0 choice; an empty prompt or completion is a
    `DataError` naming file:line). A GSM8K or MATH record's completion is its full solution, any other record's
    its completion/reference/target/answer."""
    return [(sample.id, sample.prompt, sample.metadata.get("solution", sample.reference))
            for sample in load_benchmark(path, split=split, limit=limit)]
