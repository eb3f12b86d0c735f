"""`lab rauq`: RAUQ scoring, head selection, threshold fitting and the RAUQ-CoT controller.

    lab rauq score         --input pairs.jsonl --output scores.jsonl [--convention paper|lm-polygraph]
    lab rauq select-heads  --calibration FILE --num_examples 512 --output heads.json
    lab rauq fit-threshold --calibration FILE --heads heads.json --output theta.json [--unit token|sequence]
    lab rauq run           --prompt TEXT_OR_FILE --heads heads.json --theta_file theta.json [--trace_out t.json]
    lab rauq evaluate      --benchmark FILE --limit 200 --heads heads.json --theta_file theta.json [--save_repairs F]
    lab rauq ablate        --benchmark FILE --limit 50 --heads heads.json --theta_files '{rauq: theta.json}' ...

Every command is a jsonargparse CLI over its config dataclass (`lightning_lab.loops.parse_loop`):
``--config file.yaml``, ``--key value``, ``--print_config``, ``--help``.
"""

from __future__ import annotations

from lightning_lab.loops import parse_loop
from lightning_lab.rauq import calibrate, evaluate

COMMANDS = {
    "score": (calibrate.ScoreConfig, "RAUQ of given prompt + completion pairs (per layer and sequence), as JSONL"),
    "select-heads": (calibrate.SelectHeadsConfig, "per middle layer the head most attentive to the previous token"),
    "fit-threshold": (calibrate.FitThresholdConfig, "theta for the trigger, fitted on greedy calibration outputs"),
    "run": (evaluate.RunConfig, "the RAUQ-CoT controller on one prompt: completion, triggers, trace"),
    "evaluate": (evaluate.EvaluateConfig, "the controller on a benchmark: accuracy, tokens, triggers, latency"),
    "ablate": (evaluate.AblateConfig, "a grid of triggers x thresholds x repairs x cot policies x rollbacks"),
}
RUNNERS = {"score": calibrate.run_score, "select-heads": calibrate.run_select_heads,
           "fit-threshold": calibrate.run_fit_threshold, "run": evaluate.run_one, "evaluate": evaluate.run_evaluate,
           "ablate": evaluate.run_ablate}


def main(argv: list[str]) -> int:
    command, config = parse_loop("lab rauq", COMMANDS, argv)
    return RUNNERS[command](config)
