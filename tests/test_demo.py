"""`lab demo`'s plumbing: every step's commands parse, a finished command is skipped on --resume, bad input is refused."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
from pathlib import Path

import pytest

import lightning_lab.demo as demo
from lightning_lab.cli import main as lab


@pytest.fixture
def fake_lab(monkeypatch):
    """Stands in for `lab` inside the demo: records each command line and writes the file that marks it done."""
    calls: list[str] = []

    def fake(argv: list[str]) -> int:
        line = shlex.join(argv)
        calls.append(line)
        for step in demo.demo_steps(Path(fake.out), "smollm2-135m", None):
            for command in step.commands:
                if shlex.join(shlex.split(command.line)) == line:
                    command.done.parent.mkdir(parents=True, exist_ok=True)
                    done = {"status": "completed"} if command.done.name == "heartbeat.json" else {}
                    command.done.write_text(json.dumps(done))
        return 0

    monkeypatch.setattr(demo, "lab", fake)
    fake.calls = calls
    return fake


def test_every_demo_command_parses():
    """Each step's command line is accepted by its `lab` command (checked with --print_config: nothing runs)."""
    for step in demo.demo_steps(Path("/tmp/never-written"), "smollm2-135m", "gsm8k.jsonl"):
        for command in step.commands:
            if command.line.startswith("pipeline"):
                continue  # argparse, no --print_config; its config is loaded in the next test
            with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as printed:
                lab([*shlex.split(command.line), "--print_config"])  # jsonargparse prints, then exits 0
            assert printed.value.code == 0, command.line


def test_demo_pipeline_config_loads():
    from lightning_lab.discover.pipeline import load_scale

    config = load_scale(Path("configs/pipeline/demo.yaml"))
    assert "150" in config.pretrain_args  # the demo's short pretraining, not tiny's 200 steps


def test_demo_runs_skips_finished_and_reports(tmp_path, fake_lab, capsys):
    out = tmp_path / "demo"
    fake_lab.out = str(out)
    assert demo.main(["--out", str(out), "--only", "ace", "--only", "quietstar"]) == 0
    assert [line.split()[:1] for line in fake_lab.calls] == [["ace"], ["ace"], ["ab"]]
    assert set(json.loads((out / "demo_times.json").read_text())) == {"ace", "quietstar"}
    assert (out / "report.md").is_file() and (out / "report.html").is_file()

    # Not empty: refused without --resume; with it, every finished command is skipped.
    assert lab(["demo", "--out", str(out), "--only", "ace"]) == 2
    assert "continue that demo with --resume" in capsys.readouterr().err
    fake_lab.calls.clear()
    (out / "ab" / "demo" / "ab_results.json").unlink()  # the A/B step did not finish
    assert demo.main(["--out", str(out), "--resume"]) == 0
    methods = [line.split()[0] for line in fake_lab.calls]
    assert "ace" not in methods and methods.count("ab") == 1
    assert methods[:1] == ["pipeline"] and "bon" in methods and "rauq" in methods


def test_demo_failed_command_and_bad_inputs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "lab", lambda argv: 2)
    assert lab(["demo", "--out", str(tmp_path / "d"), "--only", "quietstar"]) == 2
    assert "exited with status 2; continue with `lab demo --resume`" in capsys.readouterr().err
    assert lab(["demo", "--out", str(tmp_path / "e"), "--gsm8k", str(tmp_path / "none.jsonl")]) == 2
    assert "--gsm8k" in capsys.readouterr().err
    assert lab(["demo", "--only", "nothing"]) == 2
