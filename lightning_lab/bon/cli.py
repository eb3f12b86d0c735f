"""`lab bon`: best-of-N emergence, a loop command (lightning_lab/loops.py) with four subcommands.

    lab bon collect --config configs/bon/collector_base.json [--key value ...]   # sample N per prompt -> a run
    lab bon distill --runs runs/bon/loop/base --out runs/bon/loop/distill.jsonl   # best sample per prompt -> lab sft
    lab bon analyze --runs runs/bon/loop --out runs/bon/loop/summary.json         # pass@k with bootstrap CIs + PNG
    lab bon predict --runs runs/bon/loop --out runs/bon/loop/predictor.json       # emergence predictor + beta-binomial

`lab bon <command> --help` lists every key with its meaning; `--print_config` prints the resolved
config. collect exits 0 when finished and 3 when paused (Ctrl+C; resume with
``--config <run>/config.yaml --resume true``).
"""

from __future__ import annotations

import json
import logging

from lightning_lab.bon.analyze import AnalyzeConfig, analyze
from lightning_lab.bon.analyze import report_lines as analyze_lines
from lightning_lab.bon.collect import CollectConfig, collect
from lightning_lab.bon.distill import DistillConfig, distill
from lightning_lab.bon.predict import PredictConfig, predict
from lightning_lab.bon.predict import report_lines as predict_lines
from lightning_lab.loops import parse_loop

COMMANDS = {
    "collect": (CollectConfig, "sample N completions per prompt into a run (runs/bon/<name>/)"),
    "distill": (DistillConfig, "the best sample per prompt as SFT rows (prompt, completion) for lab sft"),
    "analyze": (AnalyzeConfig, "pass@k curves with bootstrap CIs per run and adapter, and a PNG"),
    "predict": (PredictConfig, "emergence predictor (logistic regression, grouped CV) + beta-binomial"),
}


def main(argv: list[str]) -> int:
    command, config = parse_loop("lab bon", COMMANDS, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if command == "collect":
        run = collect(config)
        print(run.results_path)
        return run.exit_status
    if command == "distill":
        print(json.dumps(distill(config)))
    elif command == "analyze":
        summary = analyze(config)
        print("\n".join(analyze_lines(summary)))
        print(f"wrote {config.out} and {summary['plot']}")
    else:
        print("\n".join(predict_lines(predict(config))))
        print(f"wrote {config.out}")
    return 0
