"""Best-of-N collection: sample N answers per prompt, score each, write one run.

    lab bon collect --config configs/bon/collector_base.json [--key value ...] [--name NAME]
    lab bon collect --config runs/bon/<name>/config.yaml --resume true        # continue a paused run

A run is a directory ``<output_dir>/<name>/`` (the loop convention, lightning_lab/loops.py):
``config.yaml``, ``_run_tracker/`` and ``samples.jsonl``:

- line 1, the header: ``{"kind": "header", "method": "bon", "config": {...}, "model", "adapter":
  {"name", "path"} | null, "planned_prompts", "versions", "engine", "seed", "device", "dtype",
  "threads", "host", "created"}``;
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
resumed run samples what an uninterrupted one would have (same batch_size, device, dtype, threads:
the header records them, and a resume with another torch thread count warns).

With ``--telemetry true`` the run also gets ``telemetry.csv``, one row per batch: ``batch,
prompt_ids, num_prompts, num_samples, queue_wait_s, prefill_s, decode_s, new_tokens``.
``queue_wait_s`` is the host time between the end of the previous batch's generation (or the
start of the loop) and the start of this batch's, i.e. scoring and writing the previous batch.

Every prompt line is on disk (flushed, fsynced) before the next batch starts. Ctrl+C stops after
the current batch (one prompt by default), keeping everything written, and exits with status 3
(paused; `lab status` says so); ``--config <run>/config.yaml --resume true`` continues it.

`read_runs` reads runs back (a run directory, its samples.jsonl, a directory of runs, or a run
file of the earlier flat layout ``<output_dir>/<timestamp>.jsonl``) for distill, analyze and predict.
"""

from __future__ import annotations

import csv
import itertools
import logging
import os
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lightning_lab.bon.predict import answer_entropy, is_correct
from lightning_lab.callbacks.status import TRACKER_DIR
from lightning_lab.data.benchmarks import SPLITS, Sample, load_benchmark
from lightning_lab.data.io import DataError, read_jsonl
from lightning_lab.errors import UserError, check_input_dir, check_input_file
from lightning_lab.eval.metrics import (SCORERS, extract_boxed, extract_gsm8k_answer, latency_stats,
                                        normalize_math_answer, normalize_text, parse_number, pass_at_k, score)
from lightning_lab.loops import LoopConfig, LoopRun, check_choice, check_count, check_sampling, engine_info

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
NAMED_BENCHMARKS = ("gsm8k", "humaneval")  # prompts_file values that are not files


@dataclass
class CollectConfig(LoopConfig):
    """Sample N completions per prompt, score them, and write a best-of-N run."""

    output_dir: str = "runs/bon"
    """runs go to <output_dir>/<name>/"""
    base_model: str = "smollm2-135m"
    """any load_causal_lm spec: alias, HF directory, .gguf, lab .ckpt"""
    adapter_name: str | None = None
    """label of the adapter in reports (default: <sft run>/<adapter> from adapter_path)"""
    adapter_path: str | None = None
    """a peft LoRA adapter directory applied on top of base_model (e.g. runs/sft/<run>/adapters/final)"""
    prompts_file: str = "data/prompts/arithmetic.jsonl"
    """a JSONL/TSV file of prompts, or a benchmark name (gsm8k, humaneval)"""
    answer_field: str | None = "answer"
    """the key holding the reference in a JSONL file; every line must have it"""
    k_values: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """the k of pass@k; each an integer in [1, samples_per_prompt]"""
    samples_per_prompt: int = 8
    """N, samples per prompt"""
    max_new_tokens: int = 256
    """new tokens per sample at most"""
    temperature: float = 0.8
    """sampling temperature; 0 decodes greedily (then samples_per_prompt must be 1)"""
    top_p: float = 0.95
    """nucleus sampling mass, in (0, 1]"""
    scorer: str = "gsm8k"
    """exact | numeric | gsm8k | math | code"""
    metadata: dict = field(default_factory=dict)
    """copied into the header, for your own bookkeeping"""
    seed: int = 0
    """sampling seed (each batch derives its own from it) and the choice of the `limit` prompts"""
    limit: int | None = None
    """keep this many prompts (a seeded subset, see load_benchmark); null: all"""
    split: str = "all"
    """all | dev | test (| train for gsm8k)"""
    batch_size: int = 1
    """prompts per sampler call; each call decodes batch_size * samples_per_prompt sequences"""
    shard: str | None = None
    """"i/n": only prompts i, i+n, i+2n, ... (1-based), to split one collection over processes"""
    telemetry: bool = False
    """also write telemetry.csv: per-batch queue wait, prefill and decode time"""

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("samples_per_prompt", "max_new_tokens", "batch_size"):
            check_count(key, getattr(self, key))
        if self.limit is not None:
            check_count("limit", self.limit)
        check_sampling(self.temperature, self.top_p)
        check_choice("scorer", self.scorer, SCORERS)
        check_choice("split", self.split, SPLITS)
        if not self.k_values:
            raise UserError("k_values: must list at least one k")
        for k in self.k_values:
            check_count("k_values", k)
        if max(self.k_values) > self.samples_per_prompt:
            raise UserError(f"k_values: {self.k_values} include k > samples_per_prompt={self.samples_per_prompt}; "
                            f"pass@k needs at least k samples per prompt")
        self.k_values = sorted(set(self.k_values))
        if self.temperature == 0 and self.samples_per_prompt != 1:
            raise UserError(f"temperature: 0 decodes greedily, so every sample would be the same: set "
                            f"samples_per_prompt to 1 (and k_values to [1]); got samples_per_prompt="
                            f"{self.samples_per_prompt}")
        if self.shard is not None:
            parse_shard(self.shard)
        if self.adapter_name and not self.adapter_path:
            raise UserError(f"adapter_name: {self.adapter_name!r} is set but adapter_path is not")
        if self.adapter_path and not self.adapter_name:
            # runs/sft/<run>/adapters/<adapter> (where lab stages save them) -> "<run>/<adapter>"
            adapter = Path(self.adapter_path)
            self.adapter_name = f"{adapter.parent.parent.name}/{adapter.name}" if adapter.parent.name == "adapters" \
                else adapter.name


def parse_shard(shard) -> tuple[int, int]:
    """(index, count) of a "i/n" shard, 1 <= i <= n."""
    index, _, count = str(shard).partition("/")
    if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise UserError(f"shard: must look like \"i/n\" with 1 <= i <= n (e.g. \"2/3\"); got {shard!r}")
    return int(index), int(count)


# ---- prompts and answers ------------------------------------------------------------------------


def load_prompts(config: CollectConfig) -> list[Sample]:
    """The config's prompts (`load_benchmark`), with the reference read from `answer_field` when set.

    Every line of a local JSONL file must have `answer_field` (a `DataError` names the first line
    that lacks it). The loader's own reference is kept when it came from that field (for GSM8K
    files it is already the number after ``####``); otherwise the field's value replaces it. The
    loader still needs one of its reference keys (completion, reference, target, answer) per line.
    """
    path = Path(config.prompts_file)
    if config.prompts_file not in NAMED_BENCHMARKS:
        check_input_file(path, "prompts_file")
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
    ids = [sample.id for sample in samples]
    if len(set(ids)) != len(ids):
        raise DataError(f"{config.prompts_file}: prompt ids are not unique")
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


def load_model(config: CollectConfig):
    from lightning_lab.models.loading import LoadedModel, load_causal_lm
    from lightning_lab.models.lora import load_adapter

    if not config.adapter_path:
        return load_causal_lm(config.base_model, device=config.device, dtype=config.dtype)
    # folded into the base weights: the same function, sampled at the plain model's speed
    loaded = load_adapter(config.adapter_path, base=config.base_model, device=config.device, dtype=config.dtype)
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
    """telemetry.csv beside a run's samples.jsonl (<stem>.telemetry.csv for a flat run file)."""
    return run_path.with_name("telemetry.csv" if run_path.name == SAMPLES_FILE else run_path.stem + ".telemetry.csv")


def collect(config: CollectConfig) -> LoopRun:
    """Sample `samples_per_prompt` completions per prompt into a run; returns it (`results_path`, `exit_status`)."""
    import torch
    from tqdm import tqdm

    from lightning_lab.callbacks.pause import PauseFlag
    from lightning_lab.sampling.sampler import Sampler

    samples = load_prompts(config)  # every input checked before the run is claimed and the model loads
    if config.adapter_path:
        check_input_dir(config.adapter_path, "adapter_path")
    with LoopRun(config, method="bon", results_file=SAMPLES_FILE) as run:
        unknown_done = run.done - {sample.id for sample in samples}
        if unknown_done:
            raise DataError(f"{run.results_path}: holds prompt ids not in {config.prompts_file}: "
                            f"{sorted(unknown_done)[:5]}")
        loaded = load_model(config)
        sampler = Sampler(loaded)
        if run.results_path.stat().st_size:
            started_with = read_header(run.results_path).get("threads")
            if started_with not in (None, torch.get_num_threads()):
                log.warning("%s: resumed with %d torch threads, the run started with %d: samples are reproducible "
                            "only with the same threads, and telemetry decode times change with them",
                            run.results_path, torch.get_num_threads(), started_with)
        run.start(total=len(samples), header={
            "model": config.base_model,
            "adapter": {"name": config.adapter_name, "path": config.adapter_path} if config.adapter_path else None,
            "planned_prompts": len(samples), "seed": config.seed, "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "engine": engine_info(sampler), "metadata": config.metadata})
        done = run.done
        batches = [samples[i:i + config.batch_size] for i in range(0, len(samples), config.batch_size)]
        telemetry = TelemetryWriter(telemetry_path(run.results_path)) if config.telemetry else None
        bar = tqdm(total=len(samples), initial=len(done), unit="prompt", desc=run.directory.name,
                   disable=not config.progress)
        log.info("collect -> %s: %d prompts, %d already done, N=%d", run.results_path, len(samples), len(done),
                 config.samples_per_prompt)
        try:
            with PauseFlag() as pause:
                ready_at = time.perf_counter()
                for batch_index, batch in enumerate(batches):
                    batch = [sample for sample in batch if sample.id not in done]
                    if not batch:
                        continue
                    if pause.requested:
                        run.pause()
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
                        run.write(prompt_record(sample, completions, config, seconds / len(batch)))
                        done.add(sample.id)
                    if telemetry is not None:
                        telemetry.write(
                            batch=batch_index, prompt_ids=" ".join(sample.id for sample in batch),
                            num_prompts=len(batch), num_samples=len(batch) * config.samples_per_prompt,
                            queue_wait_s=started - ready_at, prefill_s=result.timing.prefill_s,
                            decode_s=result.timing.decode_s, new_tokens=result.timing.new_tokens)
                    ready_at = time.perf_counter()
                    bar.update(len(batch))
        finally:
            bar.close()
            if telemetry is not None:
                telemetry.close()
    if run.status == "paused":
        print(f"paused after {len(done)}/{len(samples)} prompts; continue with: "
              f"{run.resume_command('lab bon collect')}", file=sys.stderr)
    return run


# ---- reading runs ---------------------------------------------------------------------------


def read_header(path: Path) -> dict:
    for line_number, record in read_jsonl(path):
        if record.get("kind") != "header":
            raise DataError(f"{path}:{line_number}: expected the bon run header (kind 'header') first")
        return record
    raise DataError(f"{path}: empty file, not a bon run")


def find_run_files(paths: Sequence[str | Path]) -> list[Path]:
    """Run files given directly, or every ``*.jsonl`` under a given directory whose first line is a bon header."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            for candidate in sorted(path.rglob("*.jsonl")):
                if TRACKER_DIR in candidate.parts:  # a run's own events.jsonl
                    continue
                try:
                    read_header(candidate)
                except DataError:
                    log.info("skipping %s: not a bon run file", candidate)
                    continue
                found.append(candidate)
        elif path.is_file():
            read_header(path)
            found.append(path)
        else:
            raise DataError(f"{path}: no such run file or directory")
    if not found:
        raise DataError(f"no bon run files in {', '.join(map(str, paths))}")
    return found


def run_name(path: Path) -> str:
    """A run's name: its directory's (runs/bon/<name>/samples.jsonl), or a flat run file's stem."""
    return path.parent.name if path.name == SAMPLES_FILE else path.stem


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
        planned = header.get("planned_prompts")
        raise DataError(f"{path}: no prompt lines yet" + (f" (0 of {planned} planned)" if planned else ""))
    return run_name(path), header, records, read_telemetry(telemetry_path(path))


def read_runs(paths: Sequence[str | Path]) -> list[tuple[str, dict, list[dict], dict | None]]:
    files = find_run_files(paths)
    runs = [read_run(path) for path in files]
    if len({name for name, *_ in runs}) < len(runs):  # same run name in two directories
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
