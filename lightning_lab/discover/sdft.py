"""Self-distillation (SDFT): consolidate what test-time training found into the weights.

    lab discover build-sdft --suite_root runs/discover/ttt-train-s0 --tasks data/discover/train.jsonl \\
        --out data/discover/sdft.jsonl --min_reward 0.99

`build-sdft` reads the finished tasks of one discovery run (``<suite_root>/summary.jsonl`` and
``tasks/<id>/result.json``) or of every run directly under ``suite_root``, and keeps each task's best answer
only when it is verified exact: the run marked it exact and the task's verifier (`tasks.verify`, re-run here
against the task file's answer) gives it a reward of at least ``min_reward``. One JSONL line per
(task, distinct demonstration): ``id``, ``task_id``, ``family``, ``difficulty``, ``prompt`` (the task's
``Q: ... A:``), ``demonstration`` (the answer line), ``completion`` (what follows the prompt in the corpus
format: a space and the answer, so `lab sft` and `load_benchmark` read the file as prompt/completion pairs),
``reward`` and ``source`` (the run it came from).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lightning_lab.data.io import DataError, read_jsonl
from lightning_lab.errors import UserError, check_new_output_file
from lightning_lab.loops import check_input_file, check_number

# ---- the SDFT data set -------------------------------------------------------------------------------


@dataclass
class BuildSdftConfig:
    """`lab discover build-sdft`: verified-exact demonstrations of a discovery run, as SDFT/SFT data."""

    suite_root: str = ""
    """a `lab discover run` directory (summary.jsonl), or a directory whose subdirectories are such runs"""
    tasks: str = ""
    """the task file the runs solved (its answers re-verify every demonstration)"""
    out: str = ""
    """the JSONL to write (must not exist)"""
    min_reward: float = 0.99
    """keep a demonstration only when the verifier's reward is at least this (and the answer is exact)"""

    def __post_init__(self) -> None:
        for key in ("suite_root", "tasks", "out"):
            if not getattr(self, key):
                raise UserError(f"{key}: required (--{key} ...)")
        check_input_file("tasks", self.tasks)
        if not Path(self.suite_root).is_dir():
            raise UserError(f"suite_root: {self.suite_root}: no such directory")
        check_number("min_reward", self.min_reward, 0.0, 1.0)
        check_new_output_file(self.out, "out")


def suite_runs(root: Path) -> list[Path]:
    """`root` when it is a discovery run, else its subdirectories that are (sorted by name)."""
    if (root / "summary.jsonl").is_file():
        return [root]
    runs = sorted(path for path in root.iterdir() if (path / "summary.jsonl").is_file())
    if not runs:
        raise UserError(f"suite_root: {root} holds no discovery run (no summary.jsonl in it or its subdirectories)")
    return runs


def demonstrations(config: BuildSdftConfig) -> list[dict]:
    """Every verified-exact demonstration of the runs under `suite_root`, one per (task, answer)."""
    from lightning_lab.discover.tasks import read_tasks, verify

    tasks = {task.id: task for task in read_tasks(config.tasks)}
    rows, seen = [], set()
    for run in suite_runs(Path(config.suite_root)):
        for line, record in read_jsonl(run / "summary.jsonl"):
            if record.get("kind") == "header":
                continue
            task = tasks.get(record.get("id"))
            if task is None:
                raise DataError(f"{run / 'summary.jsonl'}:{line}: task {record.get('id')!r} is not in {config.tasks}"
                                " (was the run made on another task file?)")
            result_path = run / "tasks" / task.id / "result.json"
            if not result_path.is_file():
                raise DataError(f"{run / 'summary.jsonl'}:{line}: {result_path} is missing")
            best = json.loads(result_path.read_text(encoding="utf-8")).get("best")
            if not best or not best.get("exact"):
                continue
            exact, reward = verify(best["text"], task.answer)
            if not exact or reward < config.min_reward or (task.id, best["text"]) in seen:
                continue
            seen.add((task.id, best["text"]))
            rows.append({"id": f"{task.id}-{len(rows)}", "task_id": task.id, "family": task.family,
                         "difficulty": task.difficulty, "prompt": task.prompt, "demonstration": best["text"],
                         "completion": f" {best['text']}", "reward": reward, "source": str(run)})
    return rows


def build_sdft(config: BuildSdftConfig) -> int:
    """Write the demonstrations; print how many tasks gave one."""
    rows = demonstrations(config)
    if not rows:
        raise UserError(f"suite_root: {config.suite_root}: no task was solved exactly (reward >= "
                        f"{config.min_reward}); nothing to distil")
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("x", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")
    print(f"{out}: {len(rows)} demonstrations of {len({row['task_id'] for row in rows})} tasks")
    return 0
