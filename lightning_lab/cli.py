"""`lab`: the one entry point.

Each command lives in its own module as a function ``main(argv: list[str]) -> int | None``;
this file only maps command names to those functions, so `lab --help` stays one line per
command and importing the CLI stays cheap (modules are imported on use).
Stage commands (`lab pretrain fit ...`) hand their arguments to a LightningCLI; loop commands
(`lab status ...`) parse their own with jsonargparse/argparse.
"""

from __future__ import annotations

import importlib
import re
import sys

from lightning_lab.errors import EXIT_USER_ERROR, UserError

# name -> ("module:function", one-line help). Only commands that exist are listed.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("lightning_lab.demo:main", "a 15-minute CPU tour of the five methods, then `lab report` over it"),
    "report": ("lightning_lab.reports.report:main", "report.md + self-contained report.html over any runs directory"),
    "status": ("lightning_lab.callbacks.status:status_main", "one row per run: step/total, rate, ETA, status, heartbeat age"),
    "artifacts": ("lightning_lab.callbacks.status:artifacts_main", "required vs present artifacts per run"),
    "data": ("lightning_lab.data.cli:main", "corpus | tokenizer | pack: build pretraining data"),
    "pretrain": ("lightning_lab.training.pretrain:main", "LightningCLI: pretrain the lab GPT (fit | validate)"),
    "export": ("lightning_lab.export:main", "write a checkpoint as a HF directory (safetensors + tokenizer)"),
    "sft": ("lightning_lab.training.sft:main", "LightningCLI: LoRA supervised fine-tuning (fit | validate)"),
    "sdft": ("lightning_lab.discover.sdft:main", "LightningCLI: self-distillation (or SFT) of discovered answers (fit | validate | predict)"),
    "rl": ("lightning_lab.training.rl:main", "LightningCLI: LoRA RL with a verifiable reward (fit)"),
    "adapter": ("lightning_lab.models.lora:main", "adapter merge: write base + LoRA as one model"),
    "bon": ("lightning_lab.bon.cli:main", "best-of-N: collect | distill | analyze | predict"),
    "quietstar": ("lightning_lab.quietstar.cli:main", "Quiet-STaR: bake thoughts into weights (fit | validate | predict | bake)"),
    "rauq": ("lightning_lab.rauq.cli:main", "RAUQ-CoT: score | select-heads | fit-threshold | run | evaluate | ablate"),
    "discover": ("lightning_lab.discover.cli:main", "discovery suite: run (best-of-N | TTT) | compare"),
    "ace": ("lightning_lab.ace.cli:main", "evolving playbooks (ACE): run | epochs | grid | summarize"),
    "eval": ("lightning_lab.eval.retention:main", "retention: perplexity of a base and an updated model, paired delta"),
    "pipeline": ("lightning_lab.discover.pipeline:main", "discover-distill: phases A..F of the Discover→Distill experiment, resumable"),
    "ab": ("lightning_lab.eval.ab:main", "A/B test of two arms (settings or models) on one benchmark: McNemar, bootstrap"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: lab <command> [args...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `lab <command> --help` for the arguments of one command."]
    return "\n".join(lines)


def command_name(name: str, rest: list[str]) -> str:
    """How an error names the command: ``data pack`` when the first argument is a subcommand (a plain
    lowercase word, not a flag, path or value), else just ``export``."""
    return f"{name} {rest[0]}" if rest and re.fullmatch(r"[a-z][a-z0-9_-]*", rest[0]) else name


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # show the traceback of a user error too
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lab: error: unknown command {name!r}; the commands are {', '.join(COMMANDS)} (lab --help)",
              file=sys.stderr)
        return EXIT_USER_ERROR
    module_name, function_name = COMMANDS[name][0].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    try:
        return int(function(rest) or 0)
    except (UserError, OSError) as error:
        # An OSError that names a file (permission denied, no space left, is a directory...) is about the
        # user's paths, not a bug in the lab; any other OSError keeps its traceback.
        if debug or (isinstance(error, OSError) and not error.filename):
            raise
        message = str(error) if isinstance(error, UserError) else f"{error.filename}: {error.strerror}"
        print(f"lab {command_name(name, rest)}: error: {' '.join(message.split())}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
