"""SDFT: the data set of verified-exact demonstrations (`lab discover build-sdft`) and the distillation stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_lab.cli import main as lab
from lightning_lab.discover.tasks import DiscoveryTask

TASKS = [
    DiscoveryTask("rev", "reverse", 1, 'reverse "abc"', "cba"),
    DiscoveryTask("sort", "sort_digits", 1, "sort the digits 3 1 2", "1 2 3"),
    DiscoveryTask("dd", "dedup", 1, 'remove repeated letters from "abca"', "abc"),
]


def task_file(directory: Path, tasks=TASKS) -> Path:
    path = directory / "tasks.jsonl"
    path.write_text("".join(json.dumps(task.__dict__) + "\n" for task in tasks))
    return path


def fake_run(directory: Path, best: dict[str, tuple[str, bool]]) -> Path:
    """A finished discovery run as `lab discover run` writes it: summary.jsonl + tasks/<id>/result.json."""
    directory.mkdir(parents=True)
    lines = [{"kind": "header"}]
    for task_id, (text, exact) in best.items():
        (directory / "tasks" / task_id).mkdir(parents=True)
        result = {"id": task_id, "best": {"text": text, "exact": exact, "reward": 1.0 if exact else 0.5}}
        (directory / "tasks" / task_id / "result.json").write_text(json.dumps(result))
        lines.append({"id": task_id, "exact": exact})
    (directory / "summary.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return directory


def test_build_sdft_keeps_only_verified_exact_demonstrations(tmp_path, capsys):
    tasks = task_file(tmp_path)
    # seed 0 solved rev and sort (sort's "exact" flag is wrong: the verifier disagrees), seed 1 rev again and dd
    fake_run(tmp_path / "suite" / "ttt-s0", {"rev": ("cba", True), "sort": ("3 1 2", True), "dd": ("abca", False)})
    fake_run(tmp_path / "suite" / "ttt-s1", {"rev": ("cba", True), "dd": ("abc", True)})
    out = tmp_path / "sdft.jsonl"
    assert lab(["discover", "build-sdft", "--suite_root", str(tmp_path / "suite"), "--tasks", str(tasks),
                "--out", str(out), "--min_reward", "0.99"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["task_id"], row["demonstration"]) for row in rows] == [("rev", "cba"), ("dd", "abc")]
    assert rows[0]["prompt"] == 'Q: reverse "abc" A:' and rows[0]["completion"] == " cba"
    assert all(row["reward"] == 1.0 for row in rows)
    assert "2 demonstrations of 2 tasks" in capsys.readouterr().out
    from lightning_lab.data.benchmarks import load_benchmark

    assert [s.reference for s in load_benchmark(str(out), split="all")] == [" cba", " abc"]  # SFT reads it as pairs
    # nothing overwritten; a run on another task file is named
    assert lab(["discover", "build-sdft", "--suite_root", str(tmp_path / "suite"), "--tasks", str(tasks),
                "--out", str(out)]) == 2
    (tmp_path / "other").mkdir()
    other = task_file(tmp_path / "other", TASKS[:1])
    assert lab(["discover", "build-sdft", "--suite_root", str(tmp_path / "suite"), "--tasks", str(other),
                "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "not in" in capsys.readouterr().err
