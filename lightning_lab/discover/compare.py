"""`lab discover compare`: best-of-N against TTT, and each TTT ablation against full TTT, on the same tasks.

    lab discover compare --runs [runs/discover/bon-s0,runs/discover/bon-s1,runs/discover/ttt-s0,runs/discover/ttt-s1]

Each run directory is read back (its config from the summary header, each task's result.json) and named
by its arm: ``bestofn``, ``ttt``, or ``ttt`` plus what it turns off relative to the defaults
(``ttt-expected``, ``ttt-noreuse``, ``ttt-fixedbeta``, ``ttt-nokl``). Items are (task, seed) pairs present
in both arms of a comparison; runs of several seeds pool into one arm.

Comparisons, per family and overall, on the best reward found and on the exact rate, each with the mean
of both arms and a paired bootstrap interval of the difference over items (eval/stats.py):

- ``ttt vs bestofn@samples``: best-of-N over its first steps x rollouts samples (sample-matched);
- ``ttt vs bestofn@flops``: best-of-N over as many samples as TTT's forward + backward FLOPs on that task
  would buy at best-of-N's FLOPs per sample (FLOP-matched; ``short`` counts the items whose best-of-N run
  drew fewer samples than that and did not find the exact answer: rerun best-of-N with more ``samples``);
- ``<ablation> vs ttt`` for each ablation run given.

Wall-clock seconds per arm are summed over its items. ``--out FILE`` also writes everything as JSON.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lightning_lab.data.io import DataError, read_jsonl, read_yaml_or_json, write_json_atomic
from lightning_lab.errors import UserError, check_new_output_file

ABLATIONS = (("objective", "expected", "expected"), ("reuse", False, "noreuse"),
             ("adaptive_beta", False, "fixedbeta"), ("kl_coef", 0.0, "nokl"))


@dataclass
class CompareConfig:
    """`lab discover compare`: paired comparisons of discover runs."""

    runs: list[str] = field(default_factory=list)
    """run directories written by `lab discover run` (both arms, any seeds, any ablations)"""
    out: str | None = None
    """also write the comparison as JSON to this new file"""
    resamples: int = 2000
    """bootstrap resamples"""
    confidence: float = 0.95
    """interval confidence level"""
    seed: int = 0
    """bootstrap seed"""

    def __post_init__(self) -> None:
        if not self.runs:
            raise UserError("runs: give the run directories to compare (--runs [DIR,DIR,...])")
        if self.out is not None:
            check_new_output_file(self.out, "out")


def arm_label(config: dict) -> str:
    """bestofn | ttt | ttt-<what an ablation turns off>."""
    if config["mode"] == "bestofn":
        return "bestofn"
    off = [name for key, value, name in ABLATIONS if config.get(key) == value]
    return "-".join(["ttt", *off])


def read_run(directory: str | Path) -> tuple[str, dict, dict[tuple[str, int], dict]]:
    """(arm label, config, {(task id, seed): result}) of one run directory."""
    directory = Path(directory)
    summary = directory / "summary.jsonl"
    if not summary.is_file():
        raise UserError(f"runs: {directory} is not a discover run (no summary.jsonl)")
    config, results = None, {}
    for line, record in read_jsonl(summary):
        if record.get("kind") == "header":
            config = record["config"]
            continue
        if config is None:
            raise DataError(f"{summary}:{line}: a task line before the header")
        result_path = directory / "tasks" / record["id"] / "result.json"
        if not result_path.is_file():
            raise DataError(f"{summary}:{line}: {result_path} is missing")
        results[(record["id"], config["seed"])] = read_yaml_or_json(result_path)
    if config is None:
        raise DataError(f"{summary}: no header line")
    return arm_label(config), config, results


def outcomes(results: dict[tuple[str, int], dict]) -> dict[tuple[str, int], tuple[float, bool]]:
    """{item: (best reward, exact)} of a run's results: what the paired comparisons compare."""
    return {item: (result["reward"], result["exact"]) for item, result in results.items()}


def families_of(*runs: dict[tuple[str, int], dict]) -> dict[tuple[str, int], str]:
    """{item: task family} over the results of several runs."""
    return {item: result["family"] for results in runs for item, result in results.items()}


def best_of_prefix(result: dict, samples: int) -> tuple[float, bool, bool]:
    """(best reward, exact found, short) of best-of-N over its first `samples` samples; short when the run drew
    fewer and found no exact answer (so more samples could have done better)."""
    rewards, exacts = result["rewards"][:samples], result["exacts"][:samples]
    short = len(result["rewards"]) < samples and not any(result["exacts"])
    return max(rewards), any(exacts), short


def total_flops(result: dict) -> int:
    return result["flops"]["forward"] + result["flops"]["backward"]


def paired_rows(name: str, a: dict, b: dict, families: dict, config: CompareConfig, **extra) -> list[dict]:
    """Rows (overall, then per family) comparing per-item values a[item] = (reward, exact) and b[item]."""
    from lightning_lab.eval.stats import paired_bootstrap_difference

    items = sorted(set(a) & set(b))
    if not items:
        return []
    rows = []
    for family in ["all", *sorted({families[item] for item in items})]:
        chosen = [item for item in items if family == "all" or families[item] == family]
        row = {"comparison": name, "family": family, "items": len(chosen), **extra}
        for index, metric in enumerate(("reward", "exact")):
            values_a = [float(a[item][index]) for item in chosen]
            values_b = [float(b[item][index]) for item in chosen]
            mean, low, high = paired_bootstrap_difference(values_a, values_b, resamples=config.resamples,
                                                          confidence=config.confidence, seed=config.seed)
            row[metric] = {"a": sum(values_a) / len(chosen), "b": sum(values_b) / len(chosen),
                           "difference": float(mean[0]), "low": float(low[0]), "high": float(high[0])}
        rows.append(row)
    return rows


def compare(config: CompareConfig) -> int:
    arms: dict[str, dict] = defaultdict(dict)
    settings: dict[str, dict] = {}
    for directory in config.runs:
        label, run_config, results = read_run(directory)
        overlap = set(arms[label]) & set(results)
        if overlap:
            raise UserError(f"runs: {directory} repeats {len(overlap)} (task, seed) items of another {label} run")
        arms[label].update(results)
        settings.setdefault(label, run_config)
    families = families_of(*arms.values())
    own = {label: outcomes(results) for label, results in arms.items()}
    rows, wall_clock = [], {label: sum(r["seconds"] for r in results.values()) for label, results in arms.items()}

    if "ttt" in arms and "bestofn" in arms:
        ttt, bon = arms["ttt"], arms["bestofn"]
        sample_matched = settings["ttt"]["steps"] * settings["ttt"]["rollouts"]
        at_samples = {item: best_of_prefix(bon[item], sample_matched)[:2] for item in bon}
        rows += paired_rows("ttt vs bestofn@samples", own["ttt"], at_samples, families, config,
                            samples=sample_matched)
        at_flops, short, needed = {}, 0, 0
        for item in set(ttt) & set(bon):
            per_sample = total_flops(bon[item]) / bon[item]["samples"]
            matched = max(1, math.floor(total_flops(ttt[item]) / per_sample))
            reward, exact, is_short = best_of_prefix(bon[item], matched)
            at_flops[item] = (reward, exact)
            short += is_short
            needed = max(needed, matched)
        rows += paired_rows("ttt vs bestofn@flops", own["ttt"], at_flops, families, config, short=short,
                            samples=needed)
    for label in sorted(arms):
        if label.startswith("ttt-") and "ttt" in arms:
            rows += paired_rows(f"{label} vs ttt", own[label], own["ttt"], families, config)
    if not rows:
        raise UserError(f"runs: nothing to compare (arms {sorted(arms)} share no (task, seed) items, or there is "
                        "no ttt run to compare best-of-N or an ablation with)")

    print(format_table(rows, wall_clock, config.confidence))
    if config.out is not None:
        write_json_atomic(config.out, {"rows": rows, "wall_clock_s": wall_clock, "runs": list(config.runs)})
    return 0


def format_table(rows: list[dict], wall_clock: dict, confidence: float) -> str:
    level = f"{100 * confidence:g}%"
    lines = [f"{'comparison':<26} {'family':<12} {'items':>5}  {'reward a / b':>13}  {'diff [' + level + ']':>24}"
             f"  {'exact a / b':>11}  {'diff [' + level + ']':>24}"]
    for row in rows:
        cells = []
        for metric in ("reward", "exact"):
            m = row[metric]
            cells.append(f"{m['a']:.3f} / {m['b']:.3f}  {m['difference']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}]")
        lines.append(f"{row['comparison']:<26} {row['family']:<12} {row['items']:>5}  {cells[0]:>39}  {cells[1]:>37}")
    for row in rows:
        if row["family"] == "all" and row.get("short"):
            lines.append(f"{row['comparison']}: {row['short']} of {row['items']} items drew fewer best-of-N samples "
                         f"than TTT's FLOPs buy (up to {row['samples']}); rerun best-of-N with --samples {row['samples']}")
    lines.append("wall-clock s: " + ", ".join(f"{label} {seconds:.1f}" for label, seconds in sorted(wall_clock.items())))
    return "\n".join(lines)
