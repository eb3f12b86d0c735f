"""Best-of-N distillation data: the best sample per prompt, as rows `lab sft fit` reads as they are.

    lab bon distill --runs runs/bon/loop/base --out runs/bon/loop/distill.jsonl [--keep_unsolved true]
    lab sft fit --config configs/bon/sft_distill.yaml --data.path runs/bon/loop/distill.jsonl

One JSONL row per prompt (over all given runs): ``{"id", "prompt", "completion", "solved", "score",
"logprob", "reference", "run"}``. `lab sft` reads it as a prompt/completion pair file
(data/benchmarks.py: the prompt from ``prompt``, the text to learn from ``completion``; the other
keys are kept as metadata). Best = the highest score; among equal scores the highest summed
log-prob. Only solved prompts are written (so only solved rows train) unless ``--keep_unsolved
true``, which writes the best attempt of the rest too, marked ``"solved": false``.

The output is a new file: one that exists (a run file above all, or one of the inputs) is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lightning_lab.bon.collect import find_run_files, read_runs
from lightning_lab.bon.predict import is_correct
from lightning_lab.data.io import write_text_atomic
from lightning_lab.errors import UserError, check_new_output_file


@dataclass
class DistillConfig:
    """The best sample per prompt of best-of-N runs, as SFT rows (prompt, completion)."""

    runs: list[str] | str = field(default_factory=lambda: ["runs/bon"])
    """run directories, samples.jsonl files, or directories holding runs: one path, or [path, path, ...]"""
    out: str = "runs/bon/distill.jsonl"
    """the SFT rows (JSONL); must not exist yet"""
    keep_unsolved: bool = False
    """also write prompts no sample solved (their best attempt, marked solved=false), which SFT then trains on"""

    def __post_init__(self) -> None:
        self.runs = [self.runs] if isinstance(self.runs, str) else list(self.runs)


def check_output(out: str | Path, runs: list[str], flag: str = "out") -> Path:
    """A new output file that is none of the input run files (nothing already written is overwritten)."""
    out = Path(out)
    if out.exists() and any(out.resolve() == run.resolve() for run in find_run_files(runs)):
        raise UserError(f"{flag} {out}: is one of the input runs (--runs); write the output elsewhere")
    return check_new_output_file(out, flag)


def distill(config: DistillConfig) -> dict:
    """Write the best sample per prompt; returns counts (prompts, written, unsolved) and the path."""
    out = check_output(config.out, config.runs)
    candidates: dict[str, list[tuple[str, dict, dict]]] = {}
    for name, _, records, _ in read_runs(config.runs):
        for record in records:
            candidates.setdefault(record["id"], []).extend((name, record, s) for s in record["samples"])
    rows, unsolved = [], 0
    for prompt_id, options in candidates.items():
        options = [option for option in options if option[2]["text"].strip()] or options  # SFT needs a completion
        name, record, best = max(options, key=lambda option: (option[2]["score"], option[2]["logprob"]))
        solved = is_correct(best["score"])
        if not solved:
            unsolved += 1
            if not config.keep_unsolved:
                continue
        rows.append({"id": prompt_id, "prompt": record["prompt"], "completion": best["text"], "solved": solved,
                     "score": best["score"], "logprob": best["logprob"], "reference": record["reference"],
                     "run": name})
    if not rows:
        raise UserError(f"runs: no prompt was solved in {', '.join(config.runs)}, so there is nothing to distill "
                        f"(--keep_unsolved true writes the best attempts anyway)")
    write_text_atomic(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return {"prompts": len(candidates), "written": len(rows), "unsolved": unsolved,
            "unsolved_written": unsolved if config.keep_unsolved else 0, "out": str(out)}
