"""`lab report`: every section found or "no runs", numbers read from the artifacts, figures embedded."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import yaml

from lightning_lab.cli import main as lab
from lightning_lab.reports.plots import plot_curves
from lightning_lab.reports.report import write_report


def fake_run(directory: Path, stage: str, config: dict | str, files: dict[str, object]) -> Path:
    """A run directory as a loop or stage writes it: heartbeat, config.yaml, and the given artifacts."""
    (directory / "_run_tracker").mkdir(parents=True)
    (directory / "_run_tracker" / "heartbeat.json").write_text(
        json.dumps({"stage": stage, "name": directory.name, "status": "completed", "step": 4, "total": 4}))
    (directory / "config.yaml").write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    for name, content in files.items():
        (directory / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return directory


def test_report_sections_numbers_commands_and_figures(tmp_path):
    root = tmp_path / "runs"
    rauq = fake_run(root / "rauq" / "ev1", "rauq", {"benchmark": "x"}, {"summary.json": {"accuracy": 0.625}})
    plot_curves({"ttt": {"x": [1, 2], "y": [0.1, 0.2]}}, rauq / "trace.png")
    fake_run(root / "bon" / "demo", "bon", {"base_model": "m"}, {"samples.jsonl": '{"id": "a"}\n{"id": "b"}\n'})
    fake_run(root / "pretrain" / "tiny", "pretrain", "# lightning.pytorch==2.6.6\nseed_everything: 0\n",
             {"metrics.jsonl": '{"step": 1, "val_loss": 3.5}\n{"step": 2, "val_loss": 2.25}\n'})

    assert lab(["report", "--root", str(root), "--out", str(tmp_path / "out")]) == 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    page = (tmp_path / "out" / "report.html").read_text()
    assert "| summary.json | accuracy | 0.625 |" in markdown
    assert "| samples.jsonl | lines | 2 |" in markdown
    assert "| metrics.jsonl (last line) | val_loss | 2.25 |" in markdown  # the last line, not the first
    assert f"lab pretrain fit --config {root / 'pretrain' / 'tiny' / 'config.yaml'}" in markdown
    for method in ("ACE: evolving playbooks", "Quiet-STaR and A/B tests"):
        assert markdown.split(f"## {method}\n\n", 1)[1].startswith("no runs")
    assert base64.b64encode((rauq / "trace.png").read_bytes()).decode()[:200] in page  # embedded, not linked

    # The numbers are the artifacts': change one and the report follows.
    (rauq / "summary.json").write_text(json.dumps({"accuracy": 0.875}))
    write_report(root, tmp_path / "out")
    assert "| summary.json | accuracy | 0.875 |" in (tmp_path / "out" / "report.md").read_text()
    assert "0.625" not in (tmp_path / "out" / "report.html").read_text()


def test_report_loop_subcommand_from_config_keys(tmp_path):
    from lightning_lab.ace.cli import COMMANDS

    config = {f.name: None for f in dataclasses.fields(COMMANDS["epochs"][0])}
    fake_run(tmp_path / "e", "ace", config, {})
    markdown = (write_report(tmp_path)[0]).read_text()
    assert f"lab ace epochs --config {tmp_path / 'e' / 'config.yaml'}" in markdown


def test_report_pipeline_root_and_bad_inputs(tmp_path, capsys):
    dd = tmp_path / "runs" / "dd"
    fake_run(dd / "pretrain" / "pretrain", "pretrain", "# lightning.pytorch\n", {})
    (dd / "pipeline.json").write_text(json.dumps({"phases": {"A": {"seconds": 12.5}, "F": {"seconds": 1.0}}}))
    (dd / "results.md").write_text("# Discover→Distill results\n\n## Paired\n\n| a | b |\n|---|---|\n| 0.5 | 0.7 |\n")
    markdown = write_report(tmp_path / "runs")[0].read_text()
    assert "| pipeline.json | phase A seconds | 12.5 |" in markdown and "#### Paired" in markdown
    assert "### dd/pretrain/pretrain" not in markdown  # a pipeline's runs are shown through its registry
    assert "<td>0.7</td>" in (tmp_path / "runs" / "report.html").read_text()

    assert lab(["report", "--root", str(tmp_path / "missing")]) == 2
    assert "missing is not a directory" in capsys.readouterr().err
    (dd / "pipeline.json").write_text("{broken")
    assert lab(["report", "--root", str(tmp_path / "runs")]) == 2
    assert "pipeline.json: not valid JSON" in capsys.readouterr().err
