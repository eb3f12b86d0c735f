"""notebooks/analysis.py runs as a script over a runs directory and shows the artifacts' numbers and figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_runs(root: Path) -> None:
    """What `lab bon analyze`, `lab rauq evaluate` and `lab discover compare` write, cut to the fields read."""
    (root / "bon" / "demo").mkdir(parents=True)
    (root / "bon" / "demo" / "summary.json").write_text(json.dumps({"runs": {"base": {
        "k": [1, 2, 4], "pass_at_k": [0.125, 0.25, 0.375], "lower": [0.0, 0.0, 0.1], "upper": [0.3, 0.5, 0.6]}}}))
    rauq = root / "rauq" / "demo"
    (rauq / "_run_tracker").mkdir(parents=True)
    (rauq / "_run_tracker" / "heartbeat.json").write_text(json.dumps({"stage": "rauq", "status": "completed"}))
    rows = [{"id": "arith-001", "correct": True, "num_tokens": 40, "triggers": 1, "trigger_positions": [7]},
            {"id": "arith-002", "correct": False, "num_tokens": 60, "triggers": 0, "trigger_positions": []}]
    (rauq / "results.jsonl").write_text("\n".join(json.dumps(r) for r in [{"header": True}, *rows]) + "\n")
    (root / "dd").mkdir()
    (root / "dd" / "compare.json").write_text(json.dumps({"rows": [
        {"comparison": "ttt vs bestofn@samples", "family": "all", "items": 6,
         "reward": {"a": 0.75, "b": 0.5, "difference": 0.25, "low": 0.1, "high": 0.4}},
        {"comparison": "ttt vs bestofn@samples", "family": "add", "items": 3,
         "reward": {"a": 0.5, "b": 0.5, "difference": 0.0, "low": 0.0, "high": 0.0}}]}))


def run_notebook(runs: Path, figures: Path) -> str:
    env = {**os.environ, "RUNS": str(runs), "FIGURES": str(figures), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "notebooks" / "analysis.py")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_notebook_over_runs(tmp_path):
    write_runs(tmp_path / "runs")
    out = run_notebook(tmp_path / "runs", tmp_path / "figs")
    assert "demo/base: pass@1=0.125  pass@2=0.250  pass@4=0.375" in out
    assert "2 problems, accuracy 0.500, mean tokens 50.0, triggers 1" in out and "triggers at [7]" in out
    assert "diff=+0.250 [+0.100, +0.400] a wins" in out
    for figure in ("pass_at_k.png", "rauq_triggers.png", "ttt_vs_bestofn.png"):
        assert (tmp_path / "figs" / figure).stat().st_size > 1000


def test_notebook_over_empty_runs(tmp_path):
    (tmp_path / "runs").mkdir()
    out = run_notebook(tmp_path / "runs", tmp_path / "figs")
    assert "no best-of-N summaries" in out and "no RAUQ runs" in out and "no TTT vs best-of-N comparisons" in out
