"""`lab ace run | epochs | grid | summarize`: evolving playbooks (generator -> reflector -> curator).

The commands follow the loop convention (`lightning_lab.loops`: ``--config FILE``, ``--key value``,
``--print_config``, ``--help``). The seed's spelling is accepted too: ``--model-id`` is ``--model_id``,
a bare boolean flag (``--dry-run``, ``--online``) means true, and ``--no-ground-truth`` is
``--ground_truth false``.
"""

from __future__ import annotations

import dataclasses

from lightning_lab.ace.grid import GridConfig, SummarizeConfig, grid, summarize
from lightning_lab.ace.runner import EpochsConfig, RunConfig, epochs, run
from lightning_lab.loops import parse_loop

COMMANDS = {
    "run": (RunConfig, "one pass over a task, baseline or ACE; prints accuracy and latency"),
    "epochs": (EpochsConfig, "epoch 0 baseline, then ACE epochs (offline train/val/test, or online)"),
    "grid": (GridConfig, "every model x task x mode of a grid YAML (configs/ace/exp_grid.yaml)"),
    "summarize": (SummarizeConfig, "accuracy, latency and counts per model, task, mode and epoch of result CSVs"),
}
RUNNERS = {"run": run, "epochs": epochs, "grid": grid, "summarize": summarize}


def seed_spelling(argv: list[str]) -> list[str]:
    """The seed's flags in the loop convention's spelling (module docstring)."""
    booleans = {f.name for config, _ in COMMANDS.values() for f in dataclasses.fields(config) if f.type in (bool, "bool")}
    out = []
    for index, arg in enumerate(argv):
        if arg in ("--no-ground-truth", "--no_ground_truth"):
            out.append("--ground_truth=false")
            continue
        if arg.startswith("--") and arg != "--":
            flag, equals, value = arg[2:].partition("=")
            arg = "--" + flag.replace("-", "_") + equals + value
            following = argv[index + 1] if index + 1 < len(argv) else None
            if not equals and flag.replace("-", "_") in booleans and (following is None or following.startswith("--")):
                arg += "=true"
        out.append(arg)
    return out


def main(argv: list[str]) -> int:
    command, config = parse_loop("lab ace", COMMANDS, seed_spelling(argv))
    return RUNNERS[command](config)
