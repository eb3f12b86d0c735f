"""ACE tasks: items with a question, a gold answer, a context and a domain, and how an answer is scored.

The task registry (`TASKS`) maps a name to a file and a domain. The project's own small tasks live in
``data/ace/`` (written for this lab, a few dozen items each):

    tatqa_tiny   finance   questions over small financial tables (numbers; percentages to one decimal)
    medqa_tiny   medical   clinical questions whose answer is one of the options listed in the context
    iot_tiny     iot       sensor readings: is there an anomaly, and which sensor / what kind

A task file is the seed's format, read as it is: a JSON list of ``{id, question, answer, context,
domain}`` (``context`` optional). GSM8K comes from a local JSONL path (``--dataset-path
.../gsm8k/train.jsonl``), read by `lightning_lab.data.benchmarks`; its items have no context.

Scoring (`score_answer`): the answer is the text after the last "Answer:" (or "the answer is") of the
output, else its first line (for a numeric gold, the output's last number). A numeric gold is matched
numerically: exactly for an integer gold, and within half a unit of its last decimal for a gold written
with decimals (gold "12.5" accepts 12.46 and 12.54: the model rounded the same value). Any other gold
is matched by normalised exact match. Token F1 is kept beside it for partial credit.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lightning_lab.data.io import DataError
from lightning_lab.eval.metrics import exact_match, extract_gsm8k_answer, parse_number

REPO_ROOT = Path(__file__).resolve().parents[2]
# task name -> (file relative to the repository root, domain)
TASKS = {
    "tatqa_tiny": ("data/ace/tatqa_tiny.json", "finance"),
    "medqa_tiny": ("data/ace/medqa_tiny.json", "medical"),
    "iot_tiny": ("data/ace/iot_tiny.json", "iot"),
}
ANSWER_MARKER = re.compile(r"\banswer\b(?:\s+is\b)?\s*:", re.IGNORECASE)
ANSWER_IS = re.compile(r"\banswer\s+is\b\s*:?", re.IGNORECASE)


@dataclass
class Item:
    id: str
    question: str
    answer: str
    context: str = ""
    domain: str = ""


def task_path(task_name: str) -> tuple[Path, str]:
    """The file and domain of a registered task; a UserError naming the known tasks otherwise."""
    if task_name not in TASKS:
        raise DataError(f"task_name: unknown task {task_name!r}; known tasks: {', '.join(TASKS)} "
                        "(or pass --dataset-path FILE --domain NAME)")
    relative, domain = TASKS[task_name]
    return REPO_ROOT / relative, domain


def load_items(path: str | os.PathLike, domain: str | None = None, split: str = "all") -> list[Item]:
    """Items of a seed-format JSON task file (a list of {id, question, answer, context, domain}) or of a
    JSONL file that `load_benchmark` reads (GSM8K or prompt/reference pairs; ``split`` dev or test picks
    its fixed half, as `load_benchmark` cuts it). `domain`, when given, replaces the file's. Malformed
    records are DataErrors naming the file and the item."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset_path: {path}: no such file")
    if path.suffix.lower() == ".json":
        if split != "all":
            raise DataError(f"dataset_split: {split!r} is for JSONL files; {path} is a task file, "
                            "used whole (epochs split it into train/val/test itself)")
        return _read_task_json(path, domain)
    from lightning_lab.data.benchmarks import load_benchmark

    return [Item(sample.id, sample.prompt, sample.reference, str(sample.metadata.get("context", "")),
                 domain or str(sample.metadata.get("domain", "")) or ("math" if "solution" in sample.metadata else ""))
            for sample in load_benchmark(path, split=split)]


def _read_task_json(path: Path, domain: str | None) -> list[Item]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: malformed JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: expected a non-empty JSON list of {{id, question, answer, context, domain}}")
    items, seen = [], set()
    for index, record in enumerate(records):
        where = f"{path}: item {index}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object, got {type(record).__name__}")
        for key in ("id", "question", "answer"):
            value = record.get(key)
            if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
                raise DataError(f"{where}: missing or empty {key!r}")
        item_id = str(record["id"])
        if item_id in seen:
            raise DataError(f"{where}: duplicate id {item_id!r}")
        seen.add(item_id)
        items.append(Item(item_id, str(record["question"]), str(record["answer"]), str(record.get("context") or ""),
                          domain or str(record.get("domain") or "")))
    return items


# ---- scoring ---------------------------------------------------------------------------------


def extract_answer(output: str, gold: str) -> str:
    """The answer part of a model output (module docstring)."""
    markers = list(ANSWER_MARKER.finditer(output)) or list(ANSWER_IS.finditer(output))
    if markers:
        rest = output[markers[-1].end():].strip()
        answer = rest.splitlines()[0].strip() if rest else ""
        answer = re.sub(r"^(?:the\s+)?answer\s+is\b\s*:?", "", answer, count=1, flags=re.IGNORECASE)
    elif parse_number(gold) is not None:
        answer = extract_gsm8k_answer(output) or ""
    else:
        answer = next((line.strip() for line in output.splitlines() if line.strip()), "")
    return answer.strip().strip("*`\"' ").rstrip(".").strip()


def score_answer(pred: str, gold: str) -> bool:
    """Is the extracted answer `pred` the gold answer? (module docstring)"""
    expected = parse_number(gold)
    if expected is None:
        return exact_match(pred, gold)
    found = extract_gsm8k_answer(pred)
    value = parse_number(found) if found is not None else None
    if value is None:
        return False
    decimals = len(gold.strip().rstrip("%").split(".")[1]) if "." in gold else 0
    tolerance = 0.5 * 10 ** -decimals + 1e-9 if decimals else 0.0
    return abs(value - expected) <= tolerance or math.isclose(value, expected, rel_tol=1e-6, abs_tol=1e-12)
