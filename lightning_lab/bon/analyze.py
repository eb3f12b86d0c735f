"""Best-of-N analysis: pass@k curves with bootstrap intervals, per run and per adapter, and a PNG.

    lab bon analyze --runs runs/bon/loop --out runs/bon/loop/summary.json [--resamples 1000]

Per run: mean pass@k over its prompts with a 95% percentile bootstrap interval over prompts,
answer entropy, distinct answers, cost per solved prompt (all generated tokens and seconds, solved
or not, divided by the prompts solved by at least one sample), how many of its planned prompts it
holds (a run that stopped early says so), and its telemetry when collected. Per adapter (the label
"base" for runs without one): the same over all its runs' prompts pooled, at the k values they
share, and for each adapter the paired difference to base on the prompts both have (the same
prompts resampled on both sides: eval/stats.py). The PNG draws one curve per adapter on a log-k axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lightning_lab.bon.collect import adapter_label, read_runs, records_by_adapter
from lightning_lab.bon.distill import check_output
from lightning_lab.bon.predict import dataset_emergence, powers_of_two_up_to
from lightning_lab.data.io import write_json_atomic
from lightning_lab.eval.stats import bootstrap_mean_ci, paired_bootstrap_difference
from lightning_lab.errors import UserError
from lightning_lab.loops import check_count


@dataclass
class AnalyzeConfig:
    """pass@k curves with bootstrap intervals per run and adapter, a summary JSON and a PNG."""

    runs: list[str] | str = field(default_factory=lambda: ["runs/bon"])
    """run directories, samples.jsonl files, or directories holding runs: one path, or [path, path, ...]"""
    out: str = "runs/bon/summary.json"
    """the summary JSON; must not exist yet"""
    plot: str | None = None
    """the PNG (default: the --out path with .png); must not exist yet"""
    resamples: int = 1000
    """bootstrap resamples over prompts"""
    confidence: float = 0.95
    """confidence level of the intervals, in (0, 1)"""
    seed: int = 0
    """seed of the bootstrap resampling"""

    def __post_init__(self) -> None:
        self.runs = [self.runs] if isinstance(self.runs, str) else list(self.runs)
        check_count("resamples", self.resamples)
        if not 0 < self.confidence < 1:  # also refuses NaN
            raise UserError(f"confidence: must be a number in (0, 1); got {self.confidence!r}")


def summarize_prompts(records: Sequence[dict], ks: Sequence[int], config: AnalyzeConfig) -> dict:
    """Mean pass@k curve with bootstrap CIs over prompts, diversity, and cost per solved prompt."""
    matrix = np.array([[record["pass_at_k"][str(k)] for k in ks] for record in records])
    mean, lower, upper = bootstrap_mean_ci(matrix, config.resamples, config.confidence, config.seed)
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
        # where the curve gains most per doubling of k (predict.dataset_emergence); needs k = 1, 2, 4, ...
        "emergence": dataset_emergence(ks, mean.tolist()) if list(ks) == powers_of_two_up_to(max(ks)) else None,
    }


def paired_difference(records: Sequence[dict], base_records: Sequence[dict], ks: Sequence[int],
                      config: AnalyzeConfig) -> dict | None:
    """Mean of pass@k(adapter) - pass@k(base) over the prompts both have, with a paired bootstrap interval."""
    base_by_id = {record["id"]: record for record in base_records}
    shared = [record for record in records if record["id"] in base_by_id]
    if not shared or not ks:
        return None
    adapter = [[record["pass_at_k"][str(k)] for k in ks] for record in shared]
    base = [[base_by_id[record["id"]]["pass_at_k"][str(k)] for k in ks] for record in shared]
    mean, lower, upper = paired_bootstrap_difference(adapter, base, config.resamples, config.confidence, config.seed)
    return {"num_prompts": len(shared), "k": list(ks), "difference": mean.tolist(), "lower": lower.tolist(),
            "upper": upper.tolist()}


def telemetry_summary(telemetry: dict) -> dict:
    batches = {row["batch"]: row for row in telemetry.values()}.values()
    return {"batches": len(batches),
            "mean_queue_wait_s": float(np.mean([row["queue_wait_s"] for row in batches])),
            "decode_s_per_token": sum(row["decode_s"] for row in batches) / max(sum(row["new_tokens"]
                                                                                    for row in batches), 1)}


def analyze(config: AnalyzeConfig) -> dict:
    """Summarise the runs (see the module docstring); writes the summary JSON and the PNG, returns the summary."""
    from lightning_lab.reports.plots import plot_curves

    out = check_output(config.out, config.runs)
    plot = check_output(config.plot if config.plot is not None else out.with_suffix(".png"), config.runs, "plot")
    runs = read_runs(config.runs)
    summary = {"bootstrap": {"resamples": config.resamples, "confidence": config.confidence, "seed": config.seed},
               "runs": {}, "adapters": {}}
    ks_by_adapter: dict[str, list[set]] = {}  # label -> the k values of each of its runs
    for name, header, records, telemetry in runs:
        ks = header["config"]["k_values"]
        planned = header.get("planned_prompts")  # absent in runs collected before it was recorded
        summary["runs"][name] = {
            "adapter": adapter_label(header), "model": header["model"], "scorer": header["config"]["scorer"],
            "prompts_file": header["config"]["prompts_file"], "planned_prompts": planned,
            "complete": None if planned is None else len(records) >= planned,
            **summarize_prompts(records, ks, config),
            **({"telemetry": telemetry_summary(telemetry)} if telemetry is not None else {})}
        ks_by_adapter.setdefault(adapter_label(header), []).append(set(ks))
    pooled = records_by_adapter(runs)
    common_ks = {label: sorted(set.intersection(*ks_of_runs)) for label, ks_of_runs in ks_by_adapter.items()}
    for label, records in pooled.items():
        summary["adapters"][label] = {"runs": len(ks_by_adapter[label]),
                                      **summarize_prompts(records, common_ks[label], config)}
        if label != "base" and "base" in pooled:
            shared_ks = [k for k in common_ks[label] if k in common_ks["base"]]
            summary["adapters"][label]["minus_base"] = paired_difference(records, pooled["base"], shared_ks, config)
    curves = {label: {"x": s["k"], "y": s["pass_at_k"], "lower": s["lower"], "upper": s["upper"]}
              for label, s in summary["adapters"].items()}
    level = f"{config.confidence:.0%}"
    summary["plot"] = str(plot_curves(curves, plot, title=f"best-of-N: mean pass@k ({level} bootstrap CI)"))
    write_json_atomic(out, summary)
    return summary


def report_lines(summary: dict) -> list[str]:
    """What `lab bon analyze` prints: runs that stopped early, then one curve per adapter and its gain over base."""
    lines = [f"run {name}: {s['num_prompts']} of the {s['planned_prompts']} planned prompts (stopped early; "
             f"resume it to complete)" for name, s in summary["runs"].items() if s["complete"] is False]
    for label, s in summary["adapters"].items():
        curve = ", ".join(f"pass@{k}={v:.3f}" for k, v in zip(s["k"], s["pass_at_k"]))
        lines.append(f"{label}: {s['num_prompts']} prompts, {curve}")
        if s.get("minus_base"):
            d = s["minus_base"]
            curve = ", ".join(f"pass@{k} {v:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                              for k, v, lo, hi in zip(d["k"], d["difference"], d["lower"], d["upper"]))
            lines.append(f"  {label} - base on {d['num_prompts']} shared prompts: {curve}")
    return lines
