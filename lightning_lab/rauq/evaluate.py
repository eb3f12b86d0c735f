"""`lab rauq run | evaluate | ablate`: the RAUQ-CoT controller on one prompt, a benchmark, or a grid.

    lab rauq run --prompt "What is 2 + 3?" --heads heads.json --theta_file theta.json [--trace_out trace.json]
    lab rauq evaluate --benchmark gsm8k_dev.jsonl --limit 200 --heads heads.json --theta_file theta.json \\
        [--repair cot|rerank|none] [--save_repairs repairs.jsonl]
    lab rauq ablate --benchmark gsm8k_dev.jsonl --limit 50 --heads heads.json --theta_files '{rauq: theta.json}' \\
        --triggers [rauq,entropy] --repairs [cot,rerank]

Threshold: ``--threshold_type learned`` reads theta from ``--theta_file`` (`lab rauq fit-threshold`), refused
when its trigger, alpha, model or heads file differ from this run's; ``fixed`` takes ``--theta``.

``evaluate`` and ``ablate`` are loops (`lightning_lab.loops`): ``runs/rauq/<name>/`` holds config.yaml,
results.jsonl (one line per problem: its completion, correctness, tokens, triggers, latency; ``--resume``
skips finished ids), summary.json (accuracy, accuracy per 1000 generated tokens, mean tokens, trigger rate,
latency percentiles; ablate: per cell, with the exact McNemar p-value against the greedy cell) and
trace.png (the RAUQ trace of the first problem that triggered, trigger points marked). ``--batch_size`` problems
are decoded together, each row triggering, rolling back and inserting on its own
(`RAUQController.generate_batch`).

``--save_repairs FILE`` writes, for each fired thought, ``{prompt, prefix, cot, answer, completion,
trigger_positions, correct, num_tokens}``; ``completion`` is the whole text to learn (prefix + thought +
answer), so `lab sft fit` reads the file as it is. ``--max_repair_tokens`` and ``--only_correct`` keep short,
successful repairs.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lightning_lab.data.benchmarks import SPLITS
from lightning_lab.errors import UserError, check_input_file
from lightning_lab.loops import LoopConfig, LoopRun, check_choice, check_count, engine_info
from lightning_lab.rauq.calibrate import ModelOptions, check_output, labeller
from lightning_lab.rauq.controller import REPAIRS, ROLLBACK_MODES, TRIGGERS, COT_POLICIES, ControllerConfig

THRESHOLD_TYPES = ("learned", "fixed")


@dataclass
class ControllerOptions(ControllerConfig, ModelOptions):
    """The controller's settings plus the model, the heads file and the threshold."""

    heads: str | None = None
    """heads file from `lab rauq select-heads` (needed by the rauq trigger and the rauq cot policy)"""
    threshold_type: str = "learned"
    """learned: theta from --theta_file | fixed: --theta"""
    theta_file: str | None = None
    """theta file from `lab rauq fit-threshold` (threshold_type learned)"""
    theta: float | None = None
    """theta (threshold_type fixed); .inf never triggers: plain greedy decoding"""

    def __post_init__(self) -> None:
        ModelOptions.__post_init__(self)
        ControllerConfig.__post_init__(self)
        check_choice("threshold_type", self.threshold_type, THRESHOLD_TYPES)
        if self.heads is not None:
            check_input_file(self.heads, "heads:")
        if self.threshold_type == "learned":
            if not self.theta_file:
                raise UserError("theta_file: required with --threshold_type learned (or pass --threshold_type fixed "
                                "--theta VALUE)")
            check_input_file(self.theta_file, "theta_file:")
        elif self.theta is None or math.isnan(self.theta):
            raise UserError("theta: a number is required with --threshold_type fixed")

    def controller_config(self) -> ControllerConfig:
        return ControllerConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ControllerConfig)})

    def build(self, loaded, alpha: float, sampler=None):
        """The controller for this model: heads and theta read and checked against it."""
        from lightning_lab.rauq.calibrate import heads_for
        from lightning_lab.rauq.controller import RAUQController
        from lightning_lab.rauq.heads import file_hash
        from lightning_lab.rauq.threshold import load_threshold

        heads = heads_for(self.heads, loaded) if self.heads else None
        if heads is not None:
            heads = dataclasses.replace(heads, alpha=alpha)  # the recurrence runs with this run's alpha
        theta = self.theta
        if self.threshold_type == "learned":
            threshold = load_threshold(self.theta_file)
            threshold.check(self.trigger, alpha, loaded.spec, file_hash(self.heads) if self.heads else None,
                            self.theta_file)
            theta = threshold.theta
        return RAUQController(loaded, self.controller_config(), heads, theta, sampler=sampler)


# ---- run -----------------------------------------------------------------------------------------


@dataclass
class RunConfig(ControllerOptions):
    prompt: str = ""
    """the prompt: text, or a path to a text file"""
    trace_out: str | None = None
    """write the trace (every token with its RAUQ score, triggers, rolled-back tokens) as JSON"""
    trace_png: str | None = None
    """draw the trace (running RAUQ per token, theta, trigger points, rolled-back tokens, thoughts) as a PNG"""
    trace_tail: int = 12
    """answer tokens of the trace printed"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prompt:
            raise UserError("prompt: required (text, or a path to a text file)")
        for key in ("trace_out", "trace_png"):
            if getattr(self, key):
                check_output(key, getattr(self, key))


def run_one(config: RunConfig) -> int:
    from lightning_lab.data.io import write_json_atomic

    path = Path(config.prompt)
    prompt = path.read_text(encoding="utf-8") if len(config.prompt) < 4096 and path.is_file() else config.prompt
    loaded, alpha = config.load()
    controller = config.build(loaded, alpha)
    out = controller.generate(prompt)
    print(out.completion)
    print(f"\n[{len(out.trigger_events)} trigger(s) at answer tokens {[e['position'] for e in out.trigger_events]}; "
          f"{out.stats['answer_tokens']} answer + {out.stats['thought_tokens']} thought tokens, "
          f"{out.extra_tokens} extra; {out.stats['seconds']:.2f} s]")
    answer = [entry for entry in out.trace if entry["kind"] != "prompt"][-config.trace_tail:]
    for entry in answer:
        score = "  null" if entry["rauq"] is None else f"{entry['rauq']:6.3f}"
        marks = (" TRIGGER" if entry.get("trigger") else "") + (" rolled back" if entry["rolled_back"] else "")
        print(f"  {score}  {entry['kind']:<7} {entry['text']!r}{marks}")
    if config.trace_out:
        write_json_atomic(config.trace_out, {"completion": out.completion, "trigger_events": out.trigger_events,
                                             "rauq_scores": out.rauq_scores, "stats": out.stats, "trace": out.trace})
    if config.trace_png:
        plot_trace(out, controller.threshold, Path(config.trace_png))
    return 0


# ---- evaluate --------------------------------------------------------------------------------------


@dataclass
class EvaluateConfig(ControllerOptions, LoopConfig):
    output_dir: str = "runs/rauq"
    """runs go to <output_dir>/<name>/"""
    benchmark: str = "gsm8k"
    """gsm8k | humaneval | a local JSONL/TSV path (MATH: a local MATH-format JSONL)"""
    split: str = "test"
    """which split (a local file: dev, test or all; see data/benchmarks.py)"""
    limit: int | None = None
    """problems (a fixed seed-0 choice; None: all)"""
    scorer: str = "gsm8k"
    """exact | numeric | gsm8k | math | code | module:function: what counts as correct"""
    save_repairs: str | None = None
    """JSONL of fired thoughts, as SFT data (module docstring)"""
    max_repair_tokens: int | None = None
    """keep repairs whose completion has at most this many tokens"""
    only_correct: bool = False
    """keep repairs of correct answers only"""
    batch_size: int = 1
    """problems decoded together, each row triggering, rolling back and inserting on its own
    (`RAUQController.generate_batch`)"""
    uncertainty: bool = False
    """also score each final completion teacher-forced (RAUQ in both conventions, mean entropy, MSP, perplexity)
    and report each one's AUROC for wrong answers, with bootstrap intervals"""

    def __post_init__(self) -> None:
        LoopConfig.__post_init__(self)
        ControllerOptions.__post_init__(self)
        check_choice("split", self.split, SPLITS)
        check_count("batch_size", self.batch_size)
        labeller(self.scorer)
        if self.limit is not None:
            check_count("limit", self.limit)
        if self.max_repair_tokens is not None:
            check_count("max_repair_tokens", self.max_repair_tokens)
        if self.save_repairs and not self.resume:
            check_output("save_repairs", self.save_repairs)


def problem_record(sample, out, correct: bool) -> dict:
    """One line of results.jsonl."""
    return {"id": sample.id, "correct": correct, "completion": out.completion,
            "num_tokens": out.stats["decoded_tokens"], "answer_tokens": out.stats["answer_tokens"],
            "thought_tokens": out.stats["thought_tokens"], "extra_tokens": out.extra_tokens,
            "triggers": len(out.trigger_events), "trigger_positions": [e["position"] for e in out.trigger_events],
            "seconds": out.stats["seconds"], "finish": out.stats["finish"]}


def repair_records(sample, out, correct: bool, tokenizer) -> list[dict]:
    """The --save_repairs lines of one problem: one per inserted thought."""
    records = []
    for repair in out.repairs:
        answer = tokenizer.decode(out.token_ids[repair["thought_end"]:], skip_special_tokens=True)
        records.append({"prompt": sample.prompt, "prefix": repair["prefix"], "cot": repair["cot"], "answer": answer,
                        "completion": out.completion, "trigger_positions": [e["position"] for e in out.trigger_events],
                        "correct": correct, "num_tokens": len(out.token_ids)})
    return records


def summarize(records: list[dict]) -> dict:
    """Accuracy, accuracy per 1000 generated tokens, mean tokens, trigger rate, latency of result lines, and the
    AUROC of each recorded uncertainty for wrong answers."""
    from lightning_lab.eval.metrics import latency_stats
    from lightning_lab.rauq.threshold import auroc_interval

    count = len(records)
    correct = sum(r["correct"] for r in records)
    tokens = sum(r["num_tokens"] for r in records)
    scored = [r for r in records if r.get("uncertainty")]
    names = sorted({name for r in scored for name, value in r["uncertainty"].items() if value is not None})
    auroc = {name: auroc_interval([r["uncertainty"][name] for r in scored], [not r["correct"] for r in scored])
             for name in names if all(r["uncertainty"].get(name) is not None for r in scored)}
    return {**({"auroc_wrong": auroc} if auroc else {}), "problems": count, "accuracy": correct / count,
            "accuracy_per_1k_tokens": 1000 * correct / max(tokens, 1),
            "mean_tokens": tokens / count, "mean_extra_tokens": sum(r["extra_tokens"] for r in records) / count,
            "trigger_rate": sum(r["triggers"] > 0 for r in records) / count,
            "triggers_per_problem": sum(r["triggers"] for r in records) / count,
            "latency_s": latency_stats([r["seconds"] for r in records])}


def run_evaluate(config: EvaluateConfig) -> int:
    from lightning_lab.data.benchmarks import load_benchmark
    from lightning_lab.data.io import write_json_atomic
    from lightning_lab.rauq.scoring import uncertainties

    samples = load_benchmark(config.benchmark, split=config.split, limit=config.limit)
    label = labeller(config.scorer)
    with LoopRun(config, method="rauq") as run:
        loaded, alpha = config.load()
        controller = config.build(loaded, alpha)
        run.start(total=len(samples), header={"engine": engine_info(controller.sampler), "alpha": alpha,
                                              "theta": controller.threshold})
        repairs = open(config.save_repairs, "a", encoding="utf-8") if config.save_repairs else None
        traced = None
        try:
            todo = [sample for sample in samples if sample.id not in run.done]
            for sample, out in decode(controller, todo, config.batch_size, _progress(todo, config.progress)):
                correct = label(out.completion, sample)
                record = problem_record(sample, out, correct)
                if config.uncertainty:
                    record["uncertainty"] = {"rauq_running": out.rauq_scores[-1], **uncertainties(
                        loaded.model, controller.sampler.encode(sample.prompt), out.token_ids, alpha,
                        controller.scorer.heads if controller.scorer else None)}
                run.write(record)
                if traced is None and out.trigger_events:
                    traced = plot_trace(out, controller.threshold, run.directory / "trace.png", title=sample.id)
                for repair in repair_records(sample, out, correct, loaded.tokenizer) if repairs else []:
                    short = repair["num_tokens"] <= (config.max_repair_tokens or math.inf)
                    if short and (correct or not config.only_correct):
                        repairs.write(json.dumps(repair, ensure_ascii=False) + "\n")
                        repairs.flush()
        finally:
            if repairs:
                repairs.close()
        records = [record for record in _results(run.results_path)]
        summary = summarize(records)
        write_json_atomic(run.directory / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    print(f"results: {run.results_path}")
    return run.exit_status


# ---- ablate ------------------------------------------------------------------------------------------


@dataclass
class AblateConfig(EvaluateConfig):
    triggers: list[str] = field(default_factory=lambda: ["rauq"])
    """triggers of the grid"""
    threshold_types: list[str] = field(default_factory=lambda: ["learned"])
    """learned (theta_files[trigger]) and/or fixed (fixed_thetas[trigger])"""
    theta_files: dict[str, str] = field(default_factory=dict)
    """trigger -> theta file, for threshold type learned"""
    fixed_thetas: dict[str, float] = field(default_factory=dict)
    """trigger -> theta, for threshold type fixed"""
    repairs: list[str] = field(default_factory=lambda: ["cot", "rerank", "none"])
    """repairs of the grid"""
    cot_policies: list[str] = field(default_factory=lambda: ["rauq"])
    """cot policies of the grid (cells with repair cot)"""
    rollbacks: list[int] = field(default_factory=lambda: [2])
    """rollback depths of the grid"""
    rollback_modes: list[str] = field(default_factory=lambda: ["fixed"])
    """rollback modes of the grid"""
    threshold_type: str = "fixed"
    """(each cell sets its own)"""
    theta: float | None = math.inf
    """(each cell sets its own)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, values, choices in (("triggers", self.triggers, TRIGGERS), ("repairs", self.repairs, REPAIRS),
                                     ("threshold_types", self.threshold_types, THRESHOLD_TYPES),
                                     ("cot_policies", self.cot_policies, COT_POLICIES),
                                     ("rollback_modes", self.rollback_modes, ROLLBACK_MODES)):
            if not values:
                raise UserError(f"{key}: at least one value")
            for value in values:
                check_choice(key, value, choices)
        for trigger in self.triggers:
            if "learned" in self.threshold_types:
                if trigger not in self.theta_files:
                    raise UserError(f"theta_files: no theta file for trigger {trigger!r} (threshold type learned)")
                check_input_file(self.theta_files[trigger], f"theta_files.{trigger}:")
            if "fixed" in self.threshold_types and trigger not in self.fixed_thetas:
                raise UserError(f"fixed_thetas: no theta for trigger {trigger!r} (threshold type fixed)")

    def cells(self) -> list[tuple[str, ControllerOptions]]:
        """(name, options) per cell of the grid; the first is greedy (theta = +inf), the baseline of every test."""
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(ControllerOptions)}
        cells = [("greedy", {**base, "threshold_type": "fixed", "theta": math.inf, "repair": "none"})]
        for trigger, kind, repair, policy, rollback, mode in itertools.product(
                self.triggers, self.threshold_types, self.repairs, self.cot_policies, self.rollbacks,
                self.rollback_modes):
            if repair != "cot" and policy != self.cot_policies[0]:
                continue  # the cot policy only matters to cot
            theta = {"theta_file": self.theta_files[trigger]} if kind == "learned" else {
                "theta": self.fixed_thetas[trigger]}
            name = f"{trigger}-{kind}-{repair}" + (f"-{policy}" if repair == "cot" else "") + f"-{mode}{rollback}"
            cells.append((name, {**base, "trigger": trigger, "threshold_type": kind, "repair": repair,
                                 "cot_policy": policy, "rollback": rollback, "rollback_mode": mode, **theta}))
        return [(name, ControllerOptions(**values)) for name, values in cells]


def run_ablate(config: AblateConfig) -> int:
    from lightning_lab.data.benchmarks import load_benchmark
    from lightning_lab.data.io import write_json_atomic
    from lightning_lab.eval.stats import mcnemar_exact
    from lightning_lab.sampling.sampler import Sampler

    samples = load_benchmark(config.benchmark, split=config.split, limit=config.limit)
    label = labeller(config.scorer)
    cells = config.cells()
    with LoopRun(config, method="rauq") as run:
        loaded, alpha = config.load()
        sampler = Sampler(loaded)
        controllers = [(name, options.build(loaded, alpha, sampler)) for name, options in cells]
        run.start(total=len(cells) * len(samples), header={"engine": engine_info(sampler), "alpha": alpha,
                                                           "cells": [name for name, _ in cells]})
        for name, controller in controllers:
            todo = [sample for sample in samples if f"{name}/{sample.id}" not in run.done]
            for sample, out in decode(controller, todo, config.batch_size, _progress(todo, config.progress, name)):
                run.write({**problem_record(sample, out, label(out.completion, sample)), "id": f"{name}/{sample.id}",
                           "cell": name, "problem": sample.id})
        records = list(_results(run.results_path))
        by_cell = {name: sorted((r for r in records if r["cell"] == name), key=lambda r: r["problem"])
                   for name, _ in cells}
        greedy = [r["correct"] for r in by_cell["greedy"]]
        summary = {}
        for name, cell in by_cell.items():
            summary[name] = summarize(cell)
            if name != "greedy":
                # a = greedy, b = this cell: b_only counts the problems only this cell solved
                summary[name]["mcnemar_vs_greedy"] = mcnemar_exact(greedy, [r["correct"] for r in cell])
        write_json_atomic(run.directory / "summary.json", summary)
    print(ablation_table(summary))
    print(f"results: {run.results_path}")
    return run.exit_status


def ablation_table(summary: dict) -> str:
    lines = [f"{'cell':<40} {'acc':>6} {'acc/1k tok':>10} {'tokens':>7} {'trig rate':>9} {'p50 s':>6} {'McNemar p':>9}"]
    for name, row in summary.items():
        p_value = row.get("mcnemar_vs_greedy", {}).get("p_value")
        lines.append(f"{name:<40} {row['accuracy']:6.3f} {row['accuracy_per_1k_tokens']:10.2f} "
                     f"{row['mean_tokens']:7.1f} {row['trigger_rate']:9.2f} {row['latency_s']['p50']:6.2f} "
                     f"{'-' if p_value is None else f'{p_value:.3g}':>9}")
    return "\n".join(lines)


# ---- pieces -------------------------------------------------------------------------------------------


def plot_trace(out, theta: float, path: Path, title: str = "") -> Path:
    """The running RAUQ of every answer token (rolled-back ones grey), theta, and the trigger points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3.6), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    entries = [entry for entry in out.trace if entry["kind"] != "prompt"]
    # the kept answer's line breaks (NaN) at thoughts and rolled-back tokens
    kept = [math.nan if e["rolled_back"] or e["rauq"] is None else e["rauq"] for e in entries]
    gone = [(i, e["rauq"]) for i, e in enumerate(entries) if e["rolled_back"] and e["rauq"] is not None]
    thoughts = [i for i, e in enumerate(entries) if e["kind"] == "thought" and not e["rolled_back"]]
    triggers = [(i, e["rauq"]) for i, e in enumerate(entries) if e.get("trigger") and e["rauq"] is not None]
    axes.plot(range(len(kept)), kept, ".-", lw=1, ms=3, label="running RAUQ")
    if gone:
        axes.plot(*zip(*gone), "o", color="0.6", ms=3, label="rolled back")
    starts = [i for i in thoughts if i - 1 not in thoughts]
    ends = [i for i in thoughts if i + 1 not in thoughts]
    for number, (first, last) in enumerate(zip(starts, ends)):
        axes.axvspan(first - 0.5, last + 0.5, color="C2", alpha=0.15, label="thought" if number == 0 else None)
    if triggers:
        axes.plot(*zip(*triggers), "x", color="C3", ms=9, mew=2, label="trigger")
    if math.isfinite(theta):
        axes.axhline(theta, color="C3", ls="--", lw=1, label=f"theta = {theta:.3g}")
    axes.set_xlabel("token after the prompt (decoding order)")
    axes.set_ylabel("RAUQ")
    axes.set_title(title)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    return path


def decode(controller, samples: list, batch_size: int, bar=None):
    """Yield (sample, `ControllerOutput`) for each problem, `batch_size` decoded together
    (`RAUQController.generate_batch`: each row triggers, rolls back and inserts on its own); a problem's
    ``stats["seconds"]`` runs from the start of its batch until it finished."""
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        for sample, out in zip(batch, controller.generate_batch([sample.prompt for sample in batch])):
            if bar is not None:
                bar.update(1)
            yield sample, out


def _progress(samples, progress: bool, desc: str = "rauq"):
    """A tqdm bar over `samples` (None when off)."""
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=len(samples), desc=desc, unit="problem")


def _results(path: Path):
    """The result lines of a run's results.jsonl (the header line left out)."""
    from lightning_lab.data.io import read_jsonl

    return (record for _, record in read_jsonl(path) if record.get("kind") != "header")
