"""`lab discover`: the discovery suite (run).

    lab discover run --tasks data/discover/heldout.jsonl --model smollm2-135m --mode bestofn|ttt --seed 0
    lab discover run --config runs/discover/NAME/config.yaml --resume true
"""

from __future__ import annotations

from lightning_lab.discover.run import DiscoverConfig, run
from lightning_lab.loops import parse_loop

COMMANDS = {
    "run": (DiscoverConfig, "best-of-N or test-time training on every task of a discovery task file"),
}


def main(argv: list[str]) -> int:
    command, config = parse_loop("lab discover", COMMANDS, argv)
    return run(config)
