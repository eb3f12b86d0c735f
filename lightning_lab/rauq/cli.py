"""`lab rauq`: RAUQ scoring, head selection, threshold fitting and the RAUQ-CoT controller.

    lab rauq score         --input pairs.jsonl --output scores.jsonl [--convention paper|lm-polygraph]
    lab rauq select-heads  --calibration FILE --num_examples 512 --output heads.json
    lab rauq fit-threshold --calibration FILE --heads heads.json --output theta.json [--unit token|sequence]

Every command is a jsonargparse CLI over its config dataclass (`lightning_lab.loops.parse_loop`):
``--config file.yaml``, ``--key value``, ``--print_config``, ``--help``.
"""

from __future__ import annotations

from lightning_lab.loops import parse_loop
from lightning_lab.rauq import calibrate

COMMANDS = {
    "score": (calibrate.ScoreConfig, "RAUQ of given prompt + completion pairs (per layer and sequence), as JSONL"),
    "select-heads": (calibrate.SelectHeadsConfig, "per middle layer the head most attentive to the previous token"),
    "fit-threshold": (calibrate.FitThresholdConfig, "theta for the trigger, fitted on greedy calibration outputs"),
}
RUNNERS = {"score": calibrate.run_score, "select-heads": calibrate.run_select_heads,
           "fit-threshold": calibrate.run_fit_threshold}


def main(argv: list[str]) -> int:
    command, config = parse_loop("lab rauq", COMMANDS, argv)
    return RUNNERS[command](config)
