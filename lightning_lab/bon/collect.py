"""Best-of-N emergence: sample N answers per prompt, then distill, analyze and predict.

    lab bon collect --config configs/bon/collector_base.json [--set KEY=VALUE] [--telemetry]
                    [--out FILE] [--resume [FILE]]
    lab bon distill --runs runs/bon --out data/bon_sft.jsonl [--keep-unsolved]
    lab bon analyze --runs runs/bon --out runs/bon/summary.json
    lab bon predict --runs runs/bon --out runs/bon/predictor.json

**Collect** writes one JSONL run file, ``<output_dir>/<timestamp>.jsonl`` (or ``--out FILE``):

- line 1, the header: ``{"kind": "header", "config": {...}, "model": ..., "adapter": {"name", "path"} | null,
  "versions": {...}, "seed": ..., "device": ..., "dtype": ..., "created": ...}``;
- then one line per prompt: ``{"kind": "prompt", "id", "prompt", "reference", "n", "num_correct",
  "samples": [{"text", "answer", "score", "logprob", "num_tokens", "latency_s", "finish_reason"}, ...],
  "pass_at_k": {"1": ..., "k": ...}, "diversity": {...}, "latency": {mean, p50, p95, p99},
  "tokens", "seconds"}``.

Prompts are framed by the model's chat template (the sampler does it, as `lab sft` does when it
trains). ``answer`` is the final answer the scorer compares (the extracted number for
gsm8k/numeric, the normalised \\boxed{} content for math, the normalised text for exact, the code
for code; null when there is none). ``logprob`` is the summed log-probability of the sample's
tokens. pass@k is the unbiased estimator (Chen et al. 2021) over the N samples, for each k of the
config. Diversity: ``distinct_answers`` (count, "no answer" counts once), ``answer_entropy``
(bits), ``distinct_1`` / ``distinct_2`` (distinct word n-grams / all word n-grams over the N texts)
and ``mean_pairwise_similarity`` (mean Jaccard similarity of the word-bigram sets of every pair).
A sample's ``latency_s`` runs from the start of its batch's generation until that sample finished;
a prompt's ``seconds`` is its share of its batch's generation time.

Each batch is sampled with a seed derived from the config's ``seed`` and its prompt ids, so a
resumed run samples what an uninterrupted one would have (same batch_size, device, dtype, threads: the
header records them, and a resume with another torch thread count warns).

With ``--telemetry`` a CSV beside the run (``<timestamp>.telemetry.csv``) gets one row per batch:
``batch, prompt_ids, num_prompts, num_samples, queue_wait_s, prefill_s, decode_s, new_tokens``.
``queue_wait_s`` is the host time between the end of the previous batch's generation (or the
start of the loop) and the start of this batch's, i.e. scoring and writing the previous batch.

Every prompt line is on disk (flushed, fsynced) before the next batch starts. ``--resume FILE``
continues a run, skipping the prompts already in it, with the config saved in its header (a
``--config`` that differs is an error naming the keys); ``--out FILE --resume`` does the same for
a fixed output file, or starts it when it does not exist yet. Ctrl+C stops after the current
batch (one prompt by default), keeping everything written; the run tracker
(``<output_dir>/<timestamp>/_run_tracker/``, read by ``lab status``) says paused.

Config keys (JSON or YAML): those of `CollectConfig` below; any other key is an error naming it.

**Distill**, **analyze** and **predict** read run files (or every run file in a directory):
see `distill`, `analyze` and `predict` below, and `predictor.py` for the emergence definition.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import itertools
import json
import logging
import os
import platform
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path

import numpy as np

from lightning_lab.data.benchmarks import Sample, load_benchmark
from lightning_lab.data.io import DataError, JsonlWriter, read_jsonl, read_yaml_or_json, write_json_atomic
from lightning_lab.eval.metrics import (SCORERS, extract_boxed, extract_gsm8k_answer, latency_stats,
                                        normalize_math_answer, normalize_text, parse_number, pass_at_k, score)
from lightning_lab.loops import package_versions
from lightning_lab.bon.predict import answer_entropy, dataset_emergence, is_correct, powers_of_two_up_to

log = logging.getLogger(__name__)


@dataclass
class CollectConfig:
    base_model: str = "smollm2-135m"  # any load_causal_lm spec
    adapter_name: str | None = None  # label of the adapter in reports (default: from its path, see validate_config)
    adapter_path: str | None = None  # a peft LoRA adapter directory applied on top of base_model
    prompts_file: str = "data/prompts/arithmetic.jsonl"  # a JSONL/TSV file or a benchmark name (gsm8k, humaneval)
    answer_field: str | None = "answer"  # the key holding the reference; every line must have it
    k_values: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    samples_per_prompt: int = 8  # N; every k must be <= N
    max_new_tokens: int = 256
    temperature: float = 0.8  # 0: greedy decoding (then samples_per_prompt must be 1)
    top_p: float = 0.95
    scorer: str = "gsm8k"  # exact | numeric | gsm8k | math | code
    output_dir: str = "runs/bon"
    metadata: dict = field(default_factory=dict)  # copied into the header, for your own bookkeeping
    seed: int = 0  # sampling seed (each batch derives its own from it) and the `limit` subset
    limit: int | None = None  # keep this many prompts (a seeded subset, see load_benchmark)
    split: str = "all"  # all | dev | test (| train for gsm8k)
    batch_size: int = 1  # prompts per sampler call; each call decodes batch_size * samples_per_prompt sequences
    shard: str | None = None  # "i/n": only prompts i, i+n, i+2n, ... (1-based), to split one collection over processes


def validate_config(config: CollectConfig, source: str = "config") -> CollectConfig:
    """Check values that would otherwise fail late (after the model has loaded)."""
    def fail(message: str) -> None:
        raise DataError(f"{source}: {message}")

    if not config.k_values or not all(isinstance(k, int) and k >= 1 for k in config.k_values):
        fail(f"k_values must be a non-empty list of positive integers; got {config.k_values!r}")
    if max(config.k_values) > config.samples_per_prompt:
        fail(f"k_values {config.k_values} include k > samples_per_prompt={config.samples_per_prompt}; "
             f"pass@k needs at least k samples per prompt")
    if config.scorer not in SCORERS:
        fail(f"scorer {config.scorer!r} is not one of {', '.join(SCORERS)}")
    for name in ("temperature", "top_p"):
        if isinstance(getattr(config, name), bool) or not isinstance(getattr(config, name), (int, float)):
            fail(f"{name} must be a number; got {getattr(config, name)!r}")
    if config.temperature < 0:
        fail(f"temperature must be > 0 (or 0 for greedy decoding); got {config.temperature}")
    if config.temperature == 0 and config.samples_per_prompt != 1:
        fail(f"temperature 0 decodes greedily, so every sample would be the same: set samples_per_prompt to 1 "
             f"(and k_values to [1]); got samples_per_prompt={config.samples_per_prompt}")
    if not 0 < config.top_p <= 1:
        fail(f"top_p must be in (0, 1]; got {config.top_p}")
    for name in ("samples_per_prompt", "max_new_tokens", "batch_size"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
            fail(f"{name} must be a positive integer; got {getattr(config, name)!r}")
    if config.shard is not None:
        parse_shard(config.shard, source)
    if config.adapter_name and not config.adapter_path:
        fail(f"adapter_name {config.adapter_name!r} is set but adapter_path is not")
    if config.adapter_path and not config.adapter_name:
        # runs/sft/<run>/adapters/<adapter> (where lab stages save them) -> "<run>/<adapter>"
        adapter = Path(config.adapter_path)
        config.adapter_name = f"{adapter.parent.parent.name}/{adapter.name}" if adapter.parent.name == "adapters" \
            else adapter.name
    config.k_values = sorted(set(config.k_values))
    return config


def parse_shard(shard, source: str = "config") -> tuple[int, int]:
    """(index, count) of a "i/n" shard, 1 <= i <= n."""
    index, _, count = str(shard).partition("/")
    if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise DataError(f"{source}: shard must look like \"i/n\" with 1 <= i <= n (e.g. \"2/3\"); got {shard!r}")
    return int(index), int(count)


def config_from_dict(values: dict, source: str = "config") -> CollectConfig:
    known = {f.name for f in fields(CollectConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DataError(f"{source}: unknown config key(s) {', '.join(map(repr, unknown))}; "
                        f"valid keys: {', '.join(sorted(known))}")
    return validate_config(CollectConfig(**values), source)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> CollectConfig:
    """Read a JSON/YAML config; ``overrides`` are ``key=value`` strings (value parsed as JSON when it can be)."""
    return config_from_dict(apply_overrides(read_yaml_or_json(path), overrides), str(path))


def apply_overrides(values: dict, overrides: Sequence[str]) -> dict:
    values = dict(values)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise DataError(f"--set {override!r}: expected KEY=VALUE")
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = value
    return values


# ---- prompts and answers ------------------------------------------------------------------------


def load_prompts(config: CollectConfig) -> list[Sample]:
    """The config's prompts (`load_benchmark`), with the reference read from `answer_field` when set.

    Every line of a local JSONL file must have `answer_field` (a `DataError` names the first line
    that lacks it). The loader's own reference is kept when it came from that field (for GSM8K
    files it is already the number after ``####``); otherwise the field's value replaces it. The
    loader still needs one of its reference keys (completion, reference, target, answer) per line.
    """
    path = Path(config.prompts_file)
    check_field = config.answer_field and path.suffix.lower() == ".jsonl"
    if check_field:
        for line_number, record in read_jsonl(path):
            if config.answer_field not in record:
                raise DataError(f"{path}:{line_number}: answer_field {config.answer_field!r} is missing "
                                f"(keys on this line: {', '.join(sorted(record))})")
    samples = load_benchmark(config.prompts_file, split=config.split, limit=config.limit, seed=config.seed)
    if config.shard is not None:  # after `limit`, so the shards of a run partition the same prompts
        index, count = parse_shard(config.shard)
        samples = samples[index - 1::count]
    if check_field:
        for sample in samples:
            if config.answer_field in sample.metadata:
                sample.reference = str(sample.metadata[config.answer_field])
    return samples


def final_answer(scorer: str, text: str) -> str | None:
    """The part of a completion the scorer compares, in a canonical form (so equal answers are equal strings)."""
    if scorer in ("gsm8k", "numeric"):
        raw = extract_gsm8k_answer(text) if scorer == "gsm8k" else text.strip()
        value = parse_number(raw) if raw is not None else None
        if value is None:
            return None
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    if scorer == "math":
        boxed = extract_boxed(text)
        return normalize_math_answer(boxed) if boxed is not None else None
    if scorer == "exact":
        return normalize_text(text)
    return "\n".join(line.rstrip() for line in text.strip().splitlines())  # code


def diversity(texts: Sequence[str], answers: Sequence[str | None]) -> dict:
    words = [text.split() for text in texts]

    def distinct_n(n: int) -> float:
        grams = [tuple(w[i:i + n]) for w in words for i in range(len(w) - n + 1)]
        return len(set(grams)) / len(grams) if grams else 0.0

    bigram_sets = [set(zip(w, w[1:])) or set(w) for w in words]
    similarities = [len(a & b) / len(a | b) if a | b else 1.0 for a, b in itertools.combinations(bigram_sets, 2)]
    return {
        "distinct_answers": len(set(answers)),
        "answer_entropy": answer_entropy(answers),
        "distinct_1": distinct_n(1),
        "distinct_2": distinct_n(2),
        "mean_pairwise_similarity": float(np.mean(similarities)) if similarities else 1.0,
    }


def prompt_record(sample: Sample, completions: Sequence, config: CollectConfig, seconds: float) -> dict:
    """One output line: every sample with its score, then pass@k, diversity and latency."""
    rows = []
    for completion in completions:
        rows.append({
            "text": completion.text,
            "answer": final_answer(config.scorer, completion.text),
            "score": score(config.scorer, completion.text, sample.reference, sample),
            "logprob": float(sum(completion.logprobs)),
            "num_tokens": len(completion.token_ids),
            "latency_s": completion.seconds,
            "finish_reason": completion.finish_reason,
        })
    n, c = len(rows), sum(is_correct(row["score"]) for row in rows)
    return {
        "kind": "prompt",
        "id": sample.id,
        "prompt": sample.prompt,
        "reference": sample.reference,
        "n": n,
        "num_correct": c,
        "samples": rows,
        "pass_at_k": {str(k): pass_at_k(n, c, k) for k in config.k_values},
        "diversity": diversity([row["text"] for row in rows], [row["answer"] for row in rows]),
        "latency": latency_stats([row["latency_s"] for row in rows]),
        "tokens": sum(row["num_tokens"] for row in rows),
        "seconds": seconds,
    }


# ---- collect ------------------------------------------------------------------------------------


def batch_seed(seed: int, prompt_ids: Sequence[str]) -> int:
    """A seed per batch that depends only on the run seed and the batch's prompts, so a resumed
    run samples what the uninterrupted run would have sampled."""
    return zlib.crc32(f"{seed}:{','.join(prompt_ids)}".encode())


def load_model(config: CollectConfig, device: str, dtype: str):
    from lightning_lab.models.loading import LoadedModel, load_causal_lm
    from lightning_lab.models.lora import load_adapter

    if not config.adapter_path:
        return load_causal_lm(config.base_model, device=device, dtype=dtype)
    # folded into the base weights: the same function, sampled at the plain model's speed
    loaded = load_adapter(config.adapter_path, base=config.base_model, device=device, dtype=dtype)
    return LoadedModel(loaded.model.merge_and_unload(), loaded.tokenizer, loaded.spec, loaded.device, loaded.dtype)


class TelemetryWriter:
    """Per-batch timing rows appended to a CSV, each flushed; a torn last row is dropped on reopen."""

    COLUMNS = ("batch", "prompt_ids", "num_prompts", "num_samples", "queue_wait_s", "prefill_s", "decode_s",
               "new_tokens")

    def __init__(self, path: Path):
        self.path = path
        if path.exists() and path.stat().st_size:
            data = path.read_bytes()
            if not data.endswith(b"\n"):
                path.write_bytes(data[: data.rfind(b"\n") + 1])
        is_new = not path.exists() or path.stat().st_size == 0
        self._file = path.open("a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        if is_new:
            self._writer.writerow(self.COLUMNS)

    def write(self, **row) -> None:
        self._writer.writerow([row[column] for column in self.COLUMNS])
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def telemetry_path(run_path: Path) -> Path:
    return run_path.with_name(run_path.stem + ".telemetry.csv")


def new_run_path(output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = output_dir / f"{stamp}.jsonl"
    for suffix in itertools.count(1):
        if not path.exists():
            return path
        path = output_dir / f"{stamp}-{suffix}.jsonl"


def read_header(path: Path) -> dict:
    for line_number, record in read_jsonl(path):
        if record.get("kind") != "header":
            raise DataError(f"{path}:{line_number}: expected the bon run header (kind 'header') first")
        return record
    raise DataError(f"{path}: empty file, not a bon run")


def collect(config: CollectConfig, out: Path | None = None, resume: bool = False, telemetry: bool = False,
            device: str = "auto", dtype: str = "auto", progress: bool = True) -> Path:
    """Sample `samples_per_prompt` completions per prompt and write the run file; returns its path."""
    import torch
    from tqdm import tqdm

    from lightning_lab.callbacks.pause import PauseFlag
    from lightning_lab.callbacks.tracker import RunTracker
    from lightning_lab.sampling.sampler import Sampler

    path = Path(out) if out is not None else new_run_path(config.output_dir)
    if path.exists() and path.stat().st_size:
        if not resume:
            raise DataError(f"{path}: run file exists; pass --resume to continue it or choose another --out")
        header = read_header(path)
        saved = asdict(config_from_dict(header["config"], f"{path} header"))
        changed = [key for key, value in asdict(config).items() if saved[key] != value]
        if changed:
            raise DataError(f"{path}: the run was collected with different {', '.join(changed)}; "
                            f"resume it with its own config (--resume {path} without --config) or start a new run")
        if header.get("threads") not in (None, torch.get_num_threads()):
            log.warning("%s: resumed with %d torch threads, the run started with %d: samples are reproducible only "
                        "with the same threads, and telemetry decode times change with them", path,
                        torch.get_num_threads(), header["threads"])
    samples = load_prompts(config)
    ids = [sample.id for sample in samples]
    if len(set(ids)) != len(ids):
        raise DataError(f"{config.prompts_file}: prompt ids are not unique")

    loaded = load_model(config, device, dtype)
    sampler = Sampler(loaded)
    writer = JsonlWriter(path, id_key="id")
    if not path.stat().st_size:
        writer.write({"kind": "header", "config": asdict(config), "model": config.base_model,
                      "adapter": {"name": config.adapter_name, "path": config.adapter_path}
                      if config.adapter_path else None,
                      "versions": package_versions(), "seed": config.seed, "device": str(loaded.device),
                      "dtype": str(loaded.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
                      "created": datetime.now().isoformat()})
    done = writer.done_ids()
    unknown_done = done - set(ids)
    if unknown_done:
        raise DataError(f"{path}: holds prompt ids not in {config.prompts_file}: {sorted(unknown_done)[:5]}")
    batches = [samples[i:i + config.batch_size] for i in range(0, len(samples), config.batch_size)]
    telemetry_writer = TelemetryWriter(telemetry_path(path)) if telemetry else None
    tracker = RunTracker(path.with_suffix(""), stage="bon", total=len(samples), name=path.stem)
    tracker.start(total=len(samples), step=len(done))
    bar = tqdm(total=len(samples), initial=len(done), unit="prompt", desc=path.name, disable=not progress)
    log.info("collect -> %s: %d prompts, %d already done, N=%d", path, len(samples), len(done),
             config.samples_per_prompt)
    status = "completed"
    try:
        with PauseFlag() as pause:
            ready_at = time.perf_counter()
            for batch_index, batch in enumerate(batches):
                batch = [sample for sample in batch if sample.id not in done]
                if not batch:
                    continue
                if pause.requested:
                    status = "paused"
                    break
                started = time.perf_counter()
                # the sampler frames each prompt with the model's chat template (as `lab sft` trains)
                result = sampler.generate(
                    [sample.prompt for sample in batch], n=config.samples_per_prompt,
                    max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                    seed=batch_seed(config.seed, [sample.id for sample in batch]), logprobs=True,
                    batch_size=len(batch))
                seconds = time.perf_counter() - started
                for sample, completions in zip(batch, result.completions):
                    writer.write(prompt_record(sample, completions, config, seconds / len(batch)))
                    done.add(sample.id)
                if telemetry_writer is not None:
                    telemetry_writer.write(
                        batch=batch_index, prompt_ids=" ".join(sample.id for sample in batch), num_prompts=len(batch),
                        num_samples=len(batch) * config.samples_per_prompt, queue_wait_s=started - ready_at,
                        prefill_s=result.timing.prefill_s, decode_s=result.timing.decode_s,
                        new_tokens=result.timing.new_tokens)
                ready_at = time.perf_counter()
                bar.update(len(batch))
                tracker.update(len(done))
    except BaseException as error:
        tracker.finish("paused" if isinstance(error, KeyboardInterrupt) else "failed", error=repr(error))
        raise
    finally:
        bar.close()
        writer.close()
        if telemetry_writer is not None:
            telemetry_writer.close()
    tracker.finish(status, prompts_done=len(done))
    if status == "paused":
        print(f"paused after {len(done)}/{len(samples)} prompts; continue with: lab bon collect --resume {path}",
              file=sys.stderr)
    return path


# ---- reading runs ---------------------------------------------------------------------------


def find_run_files(paths: Sequence[str | Path]) -> list[Path]:
    """Run files given directly, or every ``*.jsonl`` in a given directory whose first line is a bon header."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            for candidate in sorted(path.glob("*.jsonl")):
                try:
                    read_header(candidate)
                except DataError:
                    log.info("skipping %s: not a bon run file", candidate)
                    continue
                found.append(candidate)
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"{path}: no such run file or directory")
    if not found:
        raise DataError(f"no bon run files in {', '.join(map(str, paths))}")
    return found


def read_telemetry(path: Path) -> dict[str, dict] | None:
    """prompt id -> its batch's telemetry row (numbers as floats); None when the run has no telemetry."""
    if not path.is_file():
        return None
    rows = {}
    with path.open(newline="", encoding="utf-8") as f:
        for line_number, row in enumerate(csv.DictReader(f), start=2):
            try:
                values = {key: float(row[key]) for key in TelemetryWriter.COLUMNS if key != "prompt_ids"}
            except (KeyError, TypeError, ValueError) as error:
                raise DataError(f"{path}:{line_number}: malformed telemetry row ({error})") from None
            for prompt_id in row["prompt_ids"].split():
                rows[prompt_id] = values  # a batch re-run after a crash: the last row wins
    return rows


def read_run(path: str | Path) -> tuple[str, dict, list[dict], dict | None]:
    """(name, header, prompt records, telemetry or None) of one run file; each prompt id exactly once."""
    path = Path(path)
    header = read_header(path)
    records, first_line = [], {}
    for line_number, record in itertools.islice(read_jsonl(path), 1, None):
        if record.get("kind") != "prompt":
            raise DataError(f"{path}:{line_number}: expected a prompt line (kind 'prompt')")
        if record["id"] in first_line:
            raise DataError(f"{path}:{line_number}: prompt {record['id']!r} again "
                            f"(first on line {first_line[record['id']]})")
        first_line[record["id"]] = line_number
        records.append(record)
    if not records:
        raise DataError(f"{path}: no prompt lines yet")
    return path.stem, header, records, read_telemetry(telemetry_path(path))


def read_runs(paths: Sequence[str | Path]) -> list[tuple[str, dict, list[dict], dict | None]]:
    files = find_run_files(paths)
    runs = [read_run(path) for path in files]
    if len({name for name, *_ in runs}) < len(runs):  # same file name in two directories
        runs = [(str(path), *rest) for path, (_, *rest) in zip(files, runs)]
    return runs


def adapter_label(header: dict) -> str:
    return header["adapter"]["name"] if header.get("adapter") else "base"


def records_by_adapter(runs) -> dict[str, list[dict]]:
    """adapter label -> the prompt records of all its runs; "base" first, then adapters by name."""
    pooled: dict[str, list[dict]] = {}
    for _, header, records, _ in runs:
        pooled.setdefault(adapter_label(header), []).extend(records)
    return dict(sorted(pooled.items(), key=lambda item: (item[0] != "base", item[0])))


# ---- distill ------------------------------------------------------------------------------------


def distill(run_paths: Sequence[str | Path], out: str | Path, keep_unsolved: bool = False) -> dict:
    """Best-of-N imitation data: per prompt (over all given runs) the best sample as the completion.

    Best = the highest score; among equal scores the highest summed log-prob. A prompt whose best
    sample is not correct is written only with `keep_unsolved`, marked ``"solved": false``.
    """
    candidates: dict[str, list[tuple[str, dict, dict]]] = {}
    for name, _, records, _ in read_runs(run_paths):
        for record in records:
            candidates.setdefault(record["id"], []).extend((name, record, s) for s in record["samples"])
    rows, unsolved = [], 0
    for prompt_id, options in candidates.items():
        name, record, best = max(options, key=lambda option: (option[2]["score"], option[2]["logprob"]))
        solved = is_correct(best["score"])
        if not solved:
            unsolved += 1
            if not keep_unsolved:
                continue
        rows.append({"id": prompt_id, "prompt": record["prompt"], "completion": best["text"],
                     "score": best["score"], "logprob": best["logprob"], "solved": solved,
                     "reference": record["reference"], "run": name})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp")
    staging.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    os.replace(staging, out)
    return {"prompts": len(candidates), "written": len(rows), "unsolved": unsolved,
            "unsolved_written": unsolved if keep_unsolved else 0, "out": str(out)}


# ---- analyze --------------------------------------------------------------------------------


def bootstrap_mean_ci(values: np.ndarray, resamples: int = 1000, confidence: float = 0.95,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column means of `values` (rows = prompts) with percentile bootstrap intervals over rows."""
    values = np.asarray(values, dtype=float)
    if values.ndim == 1:
        values = values[:, None]
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(values), size=(resamples, len(values)))
    means = values[rows].mean(axis=1)  # (resamples, columns)
    tail = (1 - confidence) / 2
    return values.mean(axis=0), np.quantile(means, tail, axis=0), np.quantile(means, 1 - tail, axis=0)


def paired_difference(records: Sequence[dict], base_records: Sequence[dict], ks: Sequence[int], resamples: int,
                      seed: int) -> dict | None:
    """Mean of pass@k(adapter) - pass@k(base) over the prompts both have, with a paired bootstrap interval
    (the same prompts resampled on both sides: far narrower than comparing two separate intervals)."""
    base_by_id = {record["id"]: record for record in base_records}
    shared = [record for record in records if record["id"] in base_by_id]
    if not shared or not ks:
        return None
    differences = np.array([[record["pass_at_k"][str(k)] - base_by_id[record["id"]]["pass_at_k"][str(k)]
                             for k in ks] for record in shared])
    mean, lower, upper = bootstrap_mean_ci(differences, resamples=resamples, seed=seed)
    return {"num_prompts": len(shared), "k": list(ks), "difference": mean.tolist(), "lower": lower.tolist(),
            "upper": upper.tolist()}


def summarize_prompts(records: Sequence[dict], ks: Sequence[int], resamples: int, seed: int) -> dict:
    """Mean pass@k curve with bootstrap CIs over prompts, diversity, and cost per solved prompt (all
    generated tokens and seconds, solved or not, divided by the prompts solved by at least one sample)."""
    matrix = np.array([[record["pass_at_k"][str(k)] for k in ks] for record in records])
    mean, lower, upper = bootstrap_mean_ci(matrix, resamples=resamples, seed=seed)
    solved = sum(record["num_correct"] > 0 for record in records)
    tokens = sum(record["tokens"] for record in records)
    seconds = sum(record["seconds"] for record in records)
    return {
        "num_prompts": len(records),
        "solved_prompts": solved,
        "k": list(ks),
        "pass_at_k": mean.tolist(), "lower": lower.tolist(), "upper": upper.tolist(),
        "answer_entropy": float(np.mean([record["diversity"]["answer_entropy"] for record in records])),
        "distinct_answers": float(np.mean([record["diversity"]["distinct_answers"] for record in records])),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_solved_prompt": tokens / solved if solved else None,
        "seconds_per_solved_prompt": seconds / solved if solved else None,
        # where the curve gains most per doubling of k (predictor.dataset_emergence); needs k = 1, 2, 4, ...
        "emergence": dataset_emergence(ks, mean.tolist()) if list(ks) == powers_of_two_up_to(max(ks)) else None,
    }


def analyze(run_paths: Sequence[str | Path], out: str | Path, plot: str | Path | None = None,
            resamples: int = 1000, seed: int = 0) -> dict:
    """Per run and per adapter: mean pass@k with bootstrap CIs, entropy, cost per solved prompt; a PNG.

    An adapter's entry pools the prompts of all its runs (at the k values they share); the PNG
    draws one curve per adapter ("base" for runs without one) on a log-k axis.
    """
    from lightning_lab.reports.plots import plot_curves

    runs = read_runs(run_paths)
    summary = {"bootstrap": {"resamples": resamples, "confidence": 0.95, "seed": seed}, "runs": {}, "adapters": {}}
    ks_by_adapter: dict[str, list[set]] = {}  # label -> the k values of each of its runs
    for name, header, records, telemetry in runs:
        ks = header["config"]["k_values"]
        run_summary = {"adapter": adapter_label(header), "model": header["model"], "scorer": header["config"]["scorer"],
                       "prompts_file": header["config"]["prompts_file"],
                       **summarize_prompts(records, ks, resamples, seed)}
        if telemetry is not None:
            batches = {row["batch"]: row for row in telemetry.values()}.values()
            run_summary["telemetry"] = {
                "batches": len(batches),
                "mean_queue_wait_s": float(np.mean([row["queue_wait_s"] for row in batches])),
                "decode_s_per_token": (sum(row["decode_s"] for row in batches)
                                       / max(sum(row["new_tokens"] for row in batches), 1)),
            }
        summary["runs"][name] = run_summary
        ks_by_adapter.setdefault(adapter_label(header), []).append(set(ks))
    pooled = records_by_adapter(runs)
    common_ks = {label: sorted(set.intersection(*ks_of_runs)) for label, ks_of_runs in ks_by_adapter.items()}
    for label, records in pooled.items():
        summary["adapters"][label] = {"runs": len(ks_by_adapter[label]),
                                      **summarize_prompts(records, common_ks[label], resamples, seed)}
        if label != "base" and "base" in pooled:
            shared_ks = [k for k in common_ks[label] if k in common_ks["base"]]
            summary["adapters"][label]["minus_base"] = paired_difference(records, pooled["base"], shared_ks,
                                                                         resamples, seed)
    plot = Path(plot) if plot is not None else Path(out).with_suffix(".png")
    curves = {label: {"x": s["k"], "y": s["pass_at_k"], "lower": s["lower"], "upper": s["upper"]}
              for label, s in summary["adapters"].items()}
    summary["plot"] = str(plot_curves(curves, plot, title="best-of-N: mean pass@k (95% bootstrap CI)"))
    write_json_atomic(out, summary)
    return summary


# ---- predict --------------------------------------------------------------------------------


def predict(run_paths: Sequence[str | Path], out: str | Path, config=None) -> dict:
    """Fit and cross-validate the emergence predictor, fit the beta-binomial extrapolation; save JSON + plot."""
    from lightning_lab.bon.predict import (EmergencePredictor, PredictConfig, build_dataset,
                                                   cross_validate, extrapolation_report)
    from lightning_lab.reports.plots import plot_calibration

    config = config or PredictConfig()
    runs = read_runs(run_paths)
    dataset = build_dataset(runs, config)
    cv = cross_validate(dataset, config)
    model = EmergencePredictor.fit(dataset.features, dataset.labels, dataset.feature_names, config.regularization_c)
    model.metadata = {"k_max": dataset.k_max, "threshold": config.threshold,
                      "feature_samples": config.feature_samples, "runs": [name for name, *_ in runs]}
    out = Path(out)
    calibration_png = plot_calibration([b["mean_predicted"] for b in cv["calibration"]],
                                       [b["fraction_positive"] for b in cv["calibration"]],
                                       out.with_suffix(".calibration.png"),
                                       counts=[b["count"] for b in cv["calibration"]],
                                       title=f"emergence predictor, out-of-fold ({cv['group_by']} groups)")
    report = {
        "definition": {
            "prompt": f"emergent when pass@{dataset.k_max} - pass@1 >= {config.threshold} (unbiased, all samples)",
            "dataset": "emergence k = the power of two k maximising pass@k - pass@(k/2) of the mean curve",
            "features": f"from the first {config.feature_samples} samples of each prompt",
        },
        "config": asdict(config),
        "num_prompts": int(len(dataset.labels)),
        "num_emergent": int(dataset.labels.sum()),
        "model": model.to_json(),
        "cross_validation": {key: value for key, value in cv.items() if key != "out_of_fold_probability"},
        "calibration_plot": str(calibration_png),
        # per adapter (its runs pooled, e.g. the shards of one collection), as `analyze` pools them
        "beta_binomial": [extrapolation_report(label, records, config.feature_samples, config.extrapolate_k)
                          for label, records in records_by_adapter(runs).items()],
    }
    write_json_atomic(out, report)
    return report


# ---- CLI ----------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    from lightning_lab.bon.predict import PredictConfig

    parser = argparse.ArgumentParser(prog="lab bon",
                                     description="Best-of-N emergence: collect | distill | analyze | predict")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("collect", help="sample N completions per prompt into a JSONL run file")
    p.add_argument("--config", help="JSON/YAML collector config (keys: see lightning_lab/bon/collect.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (value parsed as JSON), repeatable")
    p.add_argument("--out", help="fixed run file (default: <output_dir>/<timestamp>.jsonl)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="FILE",
                   help="continue FILE (or --out), skipping prompts already written")
    p.add_argument("--telemetry", action="store_true",
                   help="per-batch queue wait and decode time to <run>.telemetry.csv")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 | fp16")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")

    p = commands.add_parser("distill", help="best sample per prompt as SFT data (prompt, completion)")
    p.add_argument("--runs", nargs="+", required=True, help="run files or directories of run files")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--keep-unsolved", action="store_true", help="also write unsolved prompts (marked solved=false)")

    p = commands.add_parser("analyze", help="pass@k curves with bootstrap CIs per run and adapter, and a PNG")
    p.add_argument("--runs", nargs="+", required=True, help="run files or directories of run files")
    p.add_argument("--out", required=True, help="summary JSON")
    p.add_argument("--plot", help="PNG path (default: the --out path with .png)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples over prompts")
    p.add_argument("--seed", type=int, default=0)

    p = commands.add_parser("predict", help="emergence predictor (logistic regression, grouped CV) + beta-binomial")
    p.add_argument("--runs", nargs="+", required=True, help="run files or directories of run files")
    p.add_argument("--out", required=True, help="predictor JSON (a .calibration.png goes beside it)")
    defaults = PredictConfig()
    p.add_argument("--threshold", type=float, default=defaults.threshold, help="emergent: pass@k_max - pass@1 >= this")
    p.add_argument("--k-max", type=int, default=defaults.k_max, help="default: the largest k every run measured")
    p.add_argument("--feature-samples", type=int, default=defaults.feature_samples,
                   help="samples per prompt the features and the beta-binomial fit may see")
    p.add_argument("--group-by", choices=["prompt", "run"], default=defaults.group_by)
    p.add_argument("--n-splits", type=int, default=defaults.n_splits)
    p.add_argument("--extrapolate-k", type=int, nargs="+", default=list(defaults.extrapolate_k))
    p.add_argument("--seed", type=int, default=defaults.seed)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "collect":
            return _collect_command(parser, args)
        if args.command == "distill":
            print(json.dumps(distill(args.runs, args.out, args.keep_unsolved)))
        elif args.command == "analyze":
            summary = analyze(args.runs, args.out, args.plot, args.resamples, args.seed)
            for label, s in summary["adapters"].items():
                curve = ", ".join(f"pass@{k}={v:.3f}" for k, v in zip(s["k"], s["pass_at_k"]))
                print(f"{label}: {s['num_prompts']} prompts, {curve}")
                if s.get("minus_base"):
                    d = s["minus_base"]
                    curve = ", ".join(f"pass@{k} {v:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                                      for k, v, lo, hi in zip(d["k"], d["difference"], d["lower"], d["upper"]))
                    print(f"  {label} - base on {d['num_prompts']} shared prompts: {curve}")
            print(f"wrote {args.out} and {summary['plot']}")
        else:
            config = PredictConfig(threshold=args.threshold, k_max=args.k_max, feature_samples=args.feature_samples,
                                   group_by=args.group_by, n_splits=args.n_splits,
                                   extrapolate_k=tuple(args.extrapolate_k), seed=args.seed)
            report = predict(args.runs, args.out, config)
            cv = report["cross_validation"]
            auc = "n/a" if cv["roc_auc"] is None else f"{cv['roc_auc']:.3f}"
            print(f"{report['num_emergent']}/{report['num_prompts']} prompts emergent; out-of-fold ROC-AUC={auc}, "
                  f"Brier={cv['brier']:.4f} (base rate {cv['brier_base_rate']:.4f})")
            for fit in report["beta_binomial"]:
                errors = [fit["max_abs_error_beta_binomial"], fit["max_abs_error_plug_in"]]
                errors = ["n/a" if e is None else f"{e:.3f}" for e in errors]
                print(f"{fit['adapter']}: beta-binomial alpha={fit['fit']['alpha']:.3g} beta={fit['fit']['beta']:.3g}; "
                      f"max |pass@k error| for k > {fit['budget']}: {errors[0]} (plug-in {errors[1]})")
            print(f"wrote {args.out}")
    except (DataError, ValueError) as error:
        parser.exit(2, f"lab bon {args.command}: error: {error}\n")
    return 0


def _collect_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    resume_file = args.resume if isinstance(args.resume, str) else None
    if resume_file and args.out and Path(resume_file) != Path(args.out):
        parser.exit(2, "lab bon collect: error: --resume FILE and --out name different files\n")
    out = Path(resume_file or args.out) if (resume_file or args.out) else None
    try:
        if resume_file and not out.is_file():
            raise DataError(f"{out}: no such run to resume")
        if args.resume and out is None:
            raise DataError("--resume needs the run file: --resume FILE, or --out FILE --resume")
        if args.config:
            config = load_config(args.config, args.overrides)
        elif args.resume and out.is_file():  # continue with the config saved in the run's header
            config = config_from_dict(apply_overrides(read_header(out)["config"], args.overrides), f"{out} header")
        else:
            raise DataError("pass --config FILE (or --resume FILE to continue a run)")
        path = collect(config, out=out, resume=bool(args.resume), telemetry=args.telemetry, device=args.device,
                       dtype=args.dtype, progress=not args.no_progress)
    except (DataError, ValueError) as error:
        parser.exit(2, f"lab bon collect: error: {error}\n")
    print(path)
    return 0
