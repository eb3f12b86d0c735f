"""`lab pipeline discover-distill`: a complete step is skipped, an incomplete one is redone (phase A, tiny sizes)."""

from __future__ import annotations

import json

from lightning_lab.cli import main as lab

TINY = """
corpus_train_lines: 300
corpus_val_lines: 40
vocab_size: 400
train_per_cell: 1
heldout_per_cell: 1
"""


def test_a_complete_phase_is_skipped_and_an_incomplete_one_redone(tmp_path, capsys):
    config, root = tmp_path / "tiny.yaml", tmp_path / "root"
    config.write_text(TINY)
    args = ["pipeline", "discover-distill", "--config", str(config), "--root", str(root), "--to-phase", "A"]
    assert lab(args) == 0
    first = capsys.readouterr().out
    assert "phase A: done in" in first and "$ lab data pack" in first
    data = root / "data"
    outputs = ["train_tasks.jsonl", "heldout_tasks.jsonl", "train.txt", "train.bin", "val.bin", "tokenizer"]
    assert all((data / name).exists() for name in outputs)
    train_lines = (data / "train.txt").read_text().splitlines()
    assert len(train_lines) == 300 + 20  # the corpus plus one line per train task (10 families x 2 difficulties)
    stamps = {path: path.stat().st_mtime_ns for path in data.rglob("*") if path.is_file()}

    assert lab(args) == 2  # a root that holds a pipeline needs --resume
    assert "--resume" in capsys.readouterr().err
    assert lab(args + ["--resume"]) == 0
    again = capsys.readouterr().out
    assert "$ lab" not in again and again.count("complete, skipped") == 5
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps

    (data / "val.bin.json").unlink()  # a pack killed between its two files: that step alone is redone
    assert lab(args + ["--resume"]) == 0
    redo = capsys.readouterr().out
    assert "$ lab data pack" in redo and "--output " + str(data / "val.bin") in redo and redo.count("$ lab") == 1
    assert (data / "val.bin.json").is_file()
    assert (data / "train.bin").stat().st_mtime_ns == stamps[data / "train.bin"]
    assert json.loads((root / "pipeline.json").read_text())["phases"]["A"]["seconds"] >= 0


def test_bad_arguments_are_named(tmp_path, capsys):
    assert lab(["pipeline", "discover-distill", "--scale", "huge", "--root", str(tmp_path)]) == 2
    assert "huge" in capsys.readouterr().err
    assert lab(["pipeline", "discover-distill", "--from-phase", "C", "--to-phase", "B", "--root", str(tmp_path)]) == 2
