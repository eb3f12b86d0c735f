"""`lab discover`: the discovery suite (run), its comparison (compare) and the SDFT data (build-sdft).

    lab discover run --tasks data/discover/heldout.jsonl --model smollm2-135m --mode bestofn|ttt --seed 0
    lab discover run --config runs/discover/NAME/config.yaml --resume true
    lab discover compare --runs [runs/discover/bon-s0,runs/discover/ttt-s0,...] --out runs/discover/compare.json
    lab discover build-sdft --suite_root runs/discover/ttt-train-s0 --tasks data/discover/train.jsonl --out sdft.jsonl
"""

from __future__ import annotations

from lightning_lab.discover.compare import CompareConfig, compare
from lightning_lab.discover.run import DiscoverConfig, run
from lightning_lab.discover.sdft import BuildSdftConfig, build_sdft
from lightning_lab.loops import parse_loop

COMMANDS = {
    "run": (DiscoverConfig, "best-of-N or test-time training on every task of a discovery task file"),
    "compare": (CompareConfig, "best-of-N vs TTT and its ablations: per family and overall, paired bootstrap intervals"),
    "build-sdft": (BuildSdftConfig, "the verified-exact demonstrations of discovery runs, as SDFT / SFT data"),
}
ACTIONS = {"run": run, "compare": compare, "build-sdft": build_sdft}


def main(argv: list[str]) -> int:
    command, config = parse_loop("lab discover", COMMANDS, argv)
    return ACTIONS[command](config)
