# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Analysis over a runs directory
#
# pass@k curves (best-of-N), RAUQ-CoT triggers and traces, and test-time training vs best-of-N
# (Discover→Distill), read from the artifacts the `lab` commands write. Point it at a directory with
# `RUNS=runs/demo` (default `runs`); the figures go to `$FIGURES` (default `$RUNS/notebook`).
# Open it in Jupyter with jupytext, or run it as a script: `RUNS=runs/demo python notebooks/analysis.py`.

# %%
import json
import os
from pathlib import Path

from lightning_lab.reports.plots import plot_curves, plot_intervals

RUNS = Path(os.environ.get("RUNS", "runs"))
FIGURES = Path(os.environ.get("FIGURES", RUNS / "notebook"))
assert RUNS.is_dir(), f"RUNS={RUNS} is not a directory"


def stage_of(run_dir: Path) -> str | None:
    heartbeat = run_dir / "_run_tracker" / "heartbeat.json"
    return json.loads(heartbeat.read_text())["stage"] if heartbeat.is_file() else None


# %% [markdown]
# ## pass@k curves
# Every `lab bon analyze` summary (a JSON with per-run `k` and `pass_at_k`), one curve per run and adapter,
# with its bootstrap band.

# %%
curves = {}
for path in sorted(RUNS.rglob("*.json")):
    summary = json.loads(path.read_text())
    if not isinstance(summary, dict) or not isinstance(summary.get("runs"), dict):
        continue
    for name, run in summary["runs"].items():
        if "pass_at_k" in run:
            label = f"{path.parent.name}/{name}"
            curves[label] = {"x": run["k"], "y": run["pass_at_k"], "lower": run["lower"], "upper": run["upper"]}
            print(f"{label}: " + "  ".join(f"pass@{k}={p:.3f}" for k, p in zip(run["k"], run["pass_at_k"])))
if curves:
    print("figure:", plot_curves(curves, FIGURES / "pass_at_k.png", title="pass@k"))
else:
    print("no best-of-N summaries")

# %% [markdown]
# ## RAUQ-CoT: where the controller fired
# Per `lab rauq evaluate` run: accuracy, tokens and triggers per problem, and the answer-token positions
# where the RAUQ score crossed theta (one row per problem).

# %%
trigger_curves = {}
for results in sorted(RUNS.rglob("results.jsonl")):
    if stage_of(results.parent) != "rauq":
        continue
    rows = [json.loads(line) for line in results.read_text().splitlines()[1:] if line.strip()]  # line 1: header
    rows = [row for row in rows if "trigger_positions" in row]
    if not rows:
        continue
    accuracy = sum(row["correct"] for row in rows) / len(rows)
    print(f"{results.parent}: {len(rows)} problems, accuracy {accuracy:.3f}, "
          f"mean tokens {sum(row['num_tokens'] for row in rows) / len(rows):.1f}, "
          f"triggers {sum(row['triggers'] for row in rows)}")
    for row in rows:
        print(f"  {row['id']:<16} correct={row['correct']!s:<5} tokens={row['num_tokens']:<4} "
              f"triggers at {row['trigger_positions']}")
    trigger_curves[results.parent.name] = {"x": list(range(len(rows))),
                                           "y": [row["triggers"] for row in rows]}
for trace_file in sorted(RUNS.rglob("*.json")):  # `lab rauq run --trace_out`: the whole per-token score curve
    trace = json.loads(trace_file.read_text())
    if isinstance(trace, dict) and trace.get("rauq_scores"):
        scores = [s for s in trace["rauq_scores"] if s is not None]
        trigger_curves[f"{trace_file.stem} (RAUQ score per token)"] = {"x": list(range(len(scores))), "y": scores}
if trigger_curves:
    print("figure:", plot_curves(trigger_curves, FIGURES / "rauq_triggers.png", xlabel="problem / token",
                                 ylabel="triggers / RAUQ score", title="RAUQ-CoT", log_x=False))
else:
    print("no RAUQ runs")

# %% [markdown]
# ## Test-time training vs best-of-N
# Every `lab discover compare` result (`compare.json`): the paired difference, over all task families, of
# TTT against compute-matched best-of-N and of each ablation against TTT. An interval that spans 0 names no winner.

# %%
bars = []
for path in sorted(RUNS.rglob("compare.json")):
    for row in json.loads(path.read_text())["rows"]:
        if row["family"] != "all":
            continue
        reward = row["reward"]
        bars.append((row["comparison"], reward["difference"], reward["low"], reward["high"]))
        winner = "no winner" if reward["low"] <= 0.0 <= reward["high"] else "a wins" if reward["difference"] > 0 else "b wins"
        print(f"{row['comparison']:<28} items={row['items']:<3} reward a={reward['a']:.3f} b={reward['b']:.3f} "
              f"diff={reward['difference']:+.3f} [{reward['low']:+.3f}, {reward['high']:+.3f}] {winner}")
if bars:
    print("figure:", plot_intervals(bars, FIGURES / "ttt_vs_bestofn.png", xlabel="mean reward difference (a - b)"))
else:
    print("no TTT vs best-of-N comparisons")
