"""The results registry of a Discover→Distill root: every number read from the artifacts, never typed by hand.

    from lightning_lab.reports.registry import write_registry
    write_registry("runs/dd-tiny")       # -> figs/*.png, results.md, results.tex   (phase F of the pipeline)

Read (paths under the root, as discover/pipeline.py writes them; a missing one is listed, not guessed):

- ``discover/heldout/compare.json``: TTT vs best-of-N (sample- and FLOP-matched) and each ablation vs TTT.
- ``discover/heldout/bestofn-s0`` and ``discover/post/<arm>-bestofn-s0``: best-of-N before and after
  consolidation on the same held-out tasks and seed (paired by task), and SDFT vs the SFT baseline.
- ``retention/<arm>.json`` (`lab eval retention`) and ``sdft/<arm>/sdft_eval_report.json`` (the gate's bound).
- ``pretrain/mhc_on_vs_off.json`` (`lab eval retention`, the mHC-off control as base) and each arm's
  ``pretrain/<arm>/model_config.json``: mHC on vs off on the same validation windows.
- ``pipeline.json``: wall-clock per phase.

Claim safety (the seed's rules): a comparison whose paired interval spans zero names no winner, nor does a
FLOP-matched best-of-N arm that ran short of samples (``short`` in compare.json); "no forgetting"
is claimed only when the whole retention interval of the perplexity ratio lies within the gate's bound
(1 + max_rise); and no claim about mHC is made unless the artifacts hold an mHC-on arm (``pretrain/pretrain``),
an mHC-off arm (``pretrain/pretrain_plain``), each model_config.json saying which, and their comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning_lab.reports.plots import plot_flow, plot_intervals

ARMS = ("sdft", "sft")
PHASE_NAMES = ["A data", "B pretrain", "C held-out\nBoN + TTT", "D TTT train\n+ SDFT/SFT", "E post BoN\n+ retention",
               "F figures\n+ registry"]


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def ratio_text(report: dict) -> str:
    """A `lab eval retention` perplexity ratio with its interval: 1.0123 [1.0051, 1.0190]."""
    low, high = report["perplexity_ratio_interval"]
    return f"{report['perplexity_ratio']:.4f} [{low:.4f}, {high:.4f}]"


def verdict(name_a: str, name_b: str, difference: float, low: float, high: float) -> str:
    """The claim a paired interval supports."""
    if low <= 0.0 <= high:
        return f"no winner between {name_a} and {name_b} (the interval spans 0)"
    return f"{name_a if difference > 0 else name_b} is better"


def paired_results(runs: dict[str, dict], a: str, b: str) -> list[dict]:
    """Rows (overall and per family) of best-of-N run `a` vs run `b` (results by name, compare.read_run's) on their
    shared (task, seed) items."""
    from lightning_lab.discover.compare import CompareConfig, families_of, outcomes, paired_rows

    return paired_rows(f"{a} vs {b}", outcomes(runs[a]), outcomes(runs[b]), families_of(runs[a], runs[b]),
                       CompareConfig(runs=[a, b]))


def collect(root: Path) -> dict:
    """Everything the registry reports, read from the artifacts under `root` (and which ones are missing)."""
    found: dict = {"comparisons": [], "retention": {}, "missing": [], "phases": {}}
    compare = read_json(root / "discover" / "heldout" / "compare.json")
    if compare is None:
        found["missing"].append("discover/heldout/compare.json")
    else:
        found["comparisons"] += compare["rows"]
    from lightning_lab.discover.compare import read_run

    # best-of-N before (bestofn-s0) and after consolidation (<arm>-bestofn-s0): each run read once
    directories = {"bestofn-s0": root / "discover" / "heldout" / "bestofn-s0",
                   **{f"{arm}-bestofn-s0": root / "discover" / "post" / f"{arm}-bestofn-s0" for arm in ARMS}}
    runs = {name: read_run(directory)[2] for name, directory in directories.items()
            if (directory / "summary.jsonl").is_file()}
    for arm in ARMS:
        if f"{arm}-bestofn-s0" in runs and "bestofn-s0" in runs:
            found["comparisons"] += paired_results(runs, f"{arm}-bestofn-s0", "bestofn-s0")
        else:
            found["missing"].append(f"discover/post/{arm}-bestofn-s0 or discover/heldout/bestofn-s0")
    if all(f"{arm}-bestofn-s0" in runs for arm in ARMS):
        found["comparisons"] += paired_results(runs, "sdft-bestofn-s0", "sft-bestofn-s0")
    for arm in ARMS:
        report = read_json(root / "retention" / f"{arm}.json")
        gate = read_json(root / "sdft" / arm / "sdft_eval_report.json")
        if report is None:
            found["missing"].append(f"retention/{arm}.json")
            continue
        found["retention"][arm] = {**{key: report[key] for key in (
            "windows", "base_perplexity", "updated_perplexity", "delta_nll", "delta_nll_interval",
            "perplexity_ratio", "perplexity_ratio_interval", "confidence")},
            "gate_max_rise": gate["gate"]["max_rise"] if gate else None}
    pipeline = read_json(root / "pipeline.json")
    found["phases"] = {phase: entry["seconds"] for phase, entry in (pipeline or {"phases": {}})["phases"].items()}
    found["mhc"] = mhc_arms(root)
    return found


def mhc_arms(root: Path) -> dict:
    """mHC on (pretrain/pretrain) vs its mHC-off control (pretrain/pretrain_plain): their perplexities on the same
    windows, or ``{"missing": why}`` when the artifacts cannot support a claim about mHC."""
    enabled = {}
    for name in ("pretrain", "pretrain_plain"):
        config = read_json(root / "pretrain" / name / "model_config.json")
        enabled[name] = None if config is None else bool(config.get("mhc", {}).get("enabled"))
    if enabled["pretrain_plain"] is None:
        on_or_off = {True: "on", False: "off", None: "unknown"}[enabled["pretrain"]]
        return {"missing": f"no mHC-off control arm was pretrained (the pipeline config's mhc_off_model_config is "
                           f"unset, so there is no pretrain/pretrain_plain); the pipeline's model has mHC {on_or_off}"}
    if enabled != {"pretrain": True, "pretrain_plain": False}:
        said = {name: "on" if value else "off" for name, value in enabled.items()}
        return {"missing": f"pretrain/pretrain has mHC {said['pretrain']} and pretrain/pretrain_plain mHC "
                           f"{said['pretrain_plain']}: not an on / off pair"}
    report = read_json(root / "pretrain" / "mhc_on_vs_off.json")
    if report is None:
        return {"missing": "pretrain/mhc_on_vs_off.json, both arms' perplexity on the same windows, is missing"}
    return {key: report[key] for key in ("windows", "base_perplexity", "updated_perplexity", "perplexity_ratio",
                                         "perplexity_ratio_interval", "confidence")}


def claims(found: dict) -> list[str]:
    """What the artifacts support, and what they do not."""
    lines = []
    for row in found["comparisons"]:
        if row["family"] != "all":
            continue
        name_a, name_b = row["comparison"].split(" vs ")
        if row.get("short"):  # `discover compare`'s FLOP-matched arm drew fewer samples than TTT's FLOPs buy
            lines.append(f"{row['comparison']}: no claim (best-of-N ran short of samples on {row['short']} of "
                         f"{row['items']} items: it drew fewer than TTT's FLOPs buy, up to {row['samples']}; rerun "
                         f"best-of-N with --samples {row['samples']})")
            continue
        for metric in ("reward", "exact"):
            m = row[metric]
            lines.append(f"{row['comparison']} ({metric}, {row['items']} items): "
                         f"{verdict(name_a, name_b, m['difference'], m['low'], m['high'])}")
    for arm, r in found["retention"].items():
        high = r["perplexity_ratio_interval"][1]
        bound = r["gate_max_rise"]
        if bound is None:
            lines.append(f"{arm} retention: no gate bound recorded, so no claim about forgetting")
        elif high <= 1 + bound:
            lines.append(f"{arm} retention: no forgetting beyond the gate's bound (ratio {ratio_text(r)}, its "
                         f"interval within 1 + {bound:g})")
        else:
            lines.append(f"{arm} retention: no \"no forgetting\" claim (ratio {ratio_text(r)}: the interval is not "
                         f"inside 1 + {bound:g})")
    mhc = found["mhc"]
    if "missing" in mhc:
        lines.append(f"mHC: no claim about mHC: {mhc['missing']}")
    else:
        low, high = mhc["perplexity_ratio_interval"]
        if low <= 1.0 <= high:
            said = "no winner between mHC on and off (the interval spans 1)"
        else:
            said = f"mHC {'on' if high < 1.0 else 'off'} has the lower validation perplexity"
        lines.append(f"mHC on vs off (perplexity ratio on / off on {mhc['windows']} validation windows, "
                     f"{ratio_text(mhc)}): {said}")
    return lines


def markdown(found: dict) -> str:
    lines = ["# Discover→Distill results", "", "Every number below is read from the run's artifacts "
             "(reports/registry.py).", "", "## Paired comparisons (a - b, bootstrap interval)", "",
             "| comparison | family | items | reward a | reward b | diff [interval] | exact a | exact b | "
             "diff [interval] |", "|---|---|---|---|---|---|---|---|---|"]
    for row in found["comparisons"]:
        cells = []
        for metric in ("reward", "exact"):
            m = row[metric]
            cells += [f"{m['a']:.3f}", f"{m['b']:.3f}", f"{m['difference']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}]"]
        lines.append(f"| {row['comparison']} | {row['family']} | {row['items']} | " + " | ".join(cells) + " |")
    lines += ["", "## Retention (perplexity on the pretraining validation windows)", "",
              "| arm | windows | base ppl | updated ppl | ratio [interval] | gate bound |", "|---|---|---|---|---|---|"]
    for arm, r in found["retention"].items():
        bound = "-" if r["gate_max_rise"] is None else f"{1 + r['gate_max_rise']:g}"
        lines.append(f"| {arm} | {r['windows']} | {r['base_perplexity']:.3f} | {r['updated_perplexity']:.3f} | "
                     f"{ratio_text(r)} | {bound} |")
    if "missing" not in found["mhc"]:
        m = found["mhc"]
        lines += ["", "## mHC on vs off (pretraining, the same validation windows)", "",
                  "| windows | mHC off ppl | mHC on ppl | ratio on / off [interval] |", "|---|---|---|---|",
                  f"| {m['windows']} | {m['base_perplexity']:.3f} | {m['updated_perplexity']:.3f} | {ratio_text(m)} |"]
    lines += ["", "## What the artifacts support", ""] + [f"- {line}" for line in claims(found)]
    if found["phases"]:
        lines += ["", "## Wall-clock per phase", "", "| phase | seconds |", "|---|---|"]
        lines += [f"| {phase} | {seconds:.1f} |" for phase, seconds in sorted(found["phases"].items())]
    if found["missing"]:
        lines += ["", "## Missing artifacts (their rows are absent, not estimated)", ""]
        lines += [f"- {path}" for path in found["missing"]]
    return "\n".join(lines) + "\n"


def latex(found: dict) -> str:
    rows = []
    for row in found["comparisons"]:
        if row["family"] == "all":
            r, e = row["reward"], row["exact"]
            rows.append(f"{row['comparison'].replace('_', chr(92) + '_')} & {row['items']} & "
                        f"{r['difference']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] & "
                        f"{e['difference']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}] \\\\")
    ratios = {f"retention {arm}": report for arm, report in found["retention"].items()}
    if "missing" not in found["mhc"]:
        ratios["mHC on / off"] = found["mhc"]
    rows += [f"{name} (ppl ratio) & {report['windows']} & {ratio_text(report)} & -- \\\\"
             for name, report in ratios.items()]
    return ("\\begin{tabular}{lrll}\n\\hline\ncomparison & items & reward diff & exact diff \\\\\n\\hline\n"
            + "\n".join(rows) + "\n\\hline\n\\end{tabular}\n")


def figures(found: dict, directory: Path) -> list[Path]:
    """The pipeline diagram and one interval chart per group of comparisons that has rows."""
    paths = [plot_flow(PHASE_NAMES, directory / "pipeline.png", title="Discover→Distill")]
    groups = {
        "bestofn_vs_ttt.png": ("TTT - best-of-N, per family (sample-matched)",
                               lambda row: row["comparison"] == "ttt vs bestofn@samples"),
        "ablations.png": ("ablation - TTT (all tasks)",
                          lambda row: row["comparison"].startswith("ttt-") and row["family"] == "all"),
        "sdft_before_after.png": ("after - before consolidation (best-of-N, all tasks)",
                                  lambda row: row["comparison"].endswith("vs bestofn-s0") and row["family"] == "all"
                                  and "-bestofn-s0 " in row["comparison"]),
    }
    for name, (title, chosen) in groups.items():
        rows = [(f"{row['comparison']} / {row['family']}", row["reward"]["difference"], row["reward"]["low"],
                 row["reward"]["high"]) for row in found["comparisons"] if chosen(row)]
        if rows:
            paths.append(plot_intervals(rows, directory / name, xlabel="mean reward difference", title=title))
    if found["retention"]:
        rows = [(arm, r["delta_nll"], *r["delta_nll_interval"]) for arm, r in found["retention"].items()]
        paths.append(plot_intervals(rows, directory / "retention.png", xlabel="delta NLL (log perplexity ratio)",
                                    title="retention: updated - base"))
    return paths


def write_registry(root: str | Path) -> list[Path]:
    """figs/*.png, results.md and results.tex under `root`, from its artifacts (rewritten on every call)."""
    from lightning_lab.data.io import write_text_atomic

    root = Path(root)
    found = collect(root)
    paths = figures(found, root / "figs")
    for name, text in (("results.md", markdown(found)), ("results.tex", latex(found))):
        write_text_atomic(root / name, text)
        paths.append(root / name)
    return paths
