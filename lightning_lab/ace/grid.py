"""`lab ace grid` (every model x task x mode of a YAML, as `lab ace` commands) and `lab ace summarize`.

A grid YAML lists ``models``, ``tasks`` and ``modes`` (configs/ace/exp_grid.yaml). Mode ``baseline`` is
``lab ace run --mode baseline``; mode ``ace`` is ``lab ace epochs --epochs 1`` (epoch 0 baseline, epoch 1
ACE). ``--dry_run true`` prints the commands and runs nothing; otherwise they run one after another and a
summary table is printed. The baseline-only grid over the three tiny tasks with ``--limit 3`` (the
defaults) is the seed's ``run_all_tiny_baselines``.

`summarize` reads every result CSV under ``--input_dir`` (passes that adapt or select a playbook, split
``train`` and ``val``, are left out: they are not evaluations), groups the rows by ``model_id, task_name,
mode, epoch`` and writes ``accuracy, avg_latency_ms, num_samples`` (and mean token F1) per group to
``--output_path`` (default ``<input_dir>/summary.csv``) and a Markdown table beside it.
"""

from __future__ import annotations

import csv
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from lightning_lab.ace.runner import CORE_COLUMNS, markdown_table
from lightning_lab.errors import UserError, check_input_dir, check_new_output_file
from lightning_lab.loops import check_choice, check_count, check_device

SUMMARY_KEYS = ["model_id", "task_name", "mode", "epoch"]
SUMMARY_COLUMNS = SUMMARY_KEYS + ["accuracy", "avg_latency_ms", "num_samples", "f1"]
NOT_EVALUATION = ("train", "val")


@dataclass
class GridConfig:
    """Run every model x task x mode of a grid (or print the commands)."""

    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    """models to run (aliases, hub ids, paths)"""
    tasks: list[str] = field(default_factory=lambda: ["tatqa_tiny", "medqa_tiny", "iot_tiny"])
    """registered task names"""
    modes: list[str] = field(default_factory=lambda: ["baseline"])
    """baseline | ace (ace = epoch 0 baseline + epoch 1 ACE)"""
    output_dir: str = "runs/ace/grid"
    """each run goes to <output_dir>/<task>-<model>-<mode>/"""
    dry_run: bool = False
    """print the commands, run nothing"""
    limit: int | None = 3
    """items per task (none: all)"""
    model_id: str | None = None
    """run only this model instead of the grid's list"""
    resume: bool = False
    """continue runs that exist instead of refusing them"""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps"""
    dtype: str = "auto"
    """auto | fp32 | bf16 | fp16"""

    def __post_init__(self) -> None:
        from lightning_lab.ace.tasks import task_path

        check_device(self.device, self.dtype)
        for mode in self.modes:
            check_choice("modes", mode, ("baseline", "ace"))
        for task in self.tasks:
            task_path(task)
        if self.limit is not None:
            check_count("limit", self.limit)
        if not self.models and self.model_id is None:
            raise UserError("models: the grid lists no model (or pass --model_id)")


def grid_commands(config: GridConfig) -> list[list[str]]:
    """The `lab ace` argument lists of the grid, in model, task, mode order."""
    commands = []
    for model in [config.model_id] if config.model_id else config.models:
        for task in config.tasks:
            for mode in config.modes:
                name = f"{task}-{model.replace('/', '_')}-{mode}"
                command = (["run", "--mode", "baseline"] if mode == "baseline" else ["epochs", "--epochs", "1"])
                command += ["--model_id", model, "--task_name", task, "--output_dir", config.output_dir,
                            "--name", name, "--device", config.device, "--dtype", config.dtype]
                command += ["--limit", str(config.limit)] if config.limit is not None else []
                command += ["--resume", "true"] if config.resume else []
                commands.append(command)
    return commands


def grid(config: GridConfig) -> int:
    from lightning_lab.ace.cli import main as ace_main

    commands = grid_commands(config)
    for command in commands:
        print("lab ace " + shlex.join(command), flush=True)
        if not config.dry_run:
            status = ace_main(command)
            if status:
                return status
    if not config.dry_run:
        print(markdown_table(summarize_rows(read_results(Path(config.output_dir))), SUMMARY_COLUMNS))
    return 0


# ---- summarize ---------------------------------------------------------------------------------


@dataclass
class SummarizeConfig:
    """Accuracy, latency and counts per model, task, mode and epoch over the result CSVs of a directory."""

    input_dir: str = "runs/ace"
    """a directory searched (recursively) for result CSVs"""
    output_path: str | None = None
    """summary CSV, a new file (default: <input_dir>/summary.csv); a .md table is written beside it"""


def read_results(directory: Path) -> list[dict]:
    """The evaluation rows of every result CSV under `directory` (CSVs without the core columns are skipped)."""
    rows = []
    for path in sorted(directory.rglob("*.csv")):
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not set(CORE_COLUMNS + ["correct"]) <= set(reader.fieldnames or []):
                continue
            rows += [row for row in reader if row.get("split") not in NOT_EVALUATION]
    return rows


def summarize_rows(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(key) or "" for key in SUMMARY_KEYS), []).append(row)
    summary = []
    for key, group in sorted(groups.items()):
        correct = [row["correct"].strip().lower() in ("true", "1") for row in group]
        f1 = [float(row["f1"]) for row in group if row.get("f1")]
        summary.append({**dict(zip(SUMMARY_KEYS, key)), "accuracy": sum(correct) / len(group),
                        "avg_latency_ms": sum(float(row["latency_ms"]) for row in group) / len(group),
                        "num_samples": len(group), "f1": sum(f1) / len(f1) if f1 else None})
    return summary


def summarize(config: SummarizeConfig) -> int:
    directory = check_input_dir(config.input_dir, "input_dir")
    output = check_new_output_file(config.output_path or directory / "summary.csv", "output_path")
    rows = read_results(directory)
    if not rows:
        raise UserError(f"input_dir {directory}: no result CSV (with columns {', '.join(CORE_COLUMNS)}, correct)")
    summary = summarize_rows(rows)
    with output.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(summary)
    table = markdown_table(summary, SUMMARY_COLUMNS)
    output.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"summary: {output} and {output.with_suffix('.md')}")
    return 0
