"""`lab demo`: a short CPU tour of what the lab has, run through the same `lab` commands a user types.

Each step prints the command it runs, then runs it in this process; everything goes under
``--root`` (default ``runs/demo``). About 5 minutes on 2 CPU cores. Run it from the repository
root (it reads ``configs/`` and ``data/prompts/``).
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from lightning_lab.cli import main as lab
from lightning_lab.errors import ArgumentParser, check_writable_dir


def run(command: str) -> None:
    print(f"\n$ lab {command}", flush=True)
    start = time.perf_counter()
    status = lab(shlex.split(command))
    if status:
        raise SystemExit(f"`lab {command}` exited with status {status}")
    print(f"[{time.perf_counter() - start:.0f} s]", flush=True)


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="lab demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/demo", help="where the demo's runs go")
    parser.add_argument("--model", default="smollm2-135m", help="model for the sampling steps")
    parser.add_argument("--pretrain-steps", type=int, default=150, help="optimizer steps for the tiny GPT")
    args = parser.parse_args(argv)
    if args.pretrain_steps < 1:
        parser.error(f"--pretrain-steps must be a positive integer, got {args.pretrain_steps}")
    root = check_writable_dir(args.root, "--root")
    for needed in ("configs/bon/collector_base.json", "configs/pretrain/tiny.yaml", "data/prompts/arithmetic.jsonl"):
        if not Path(needed).is_file():
            parser.error(f"{needed} not found: run `lab demo` from the repository root")

    print("== 1. Best-of-N on SmolLM2-135M-Instruct: one shared prefill, 8 samples per prompt, pass@k")
    bon = root / "bon"
    run(f"bon collect --config configs/bon/collector_base.json --base_model {args.model} "
        f"--limit 6 --samples_per_prompt 8 --k_values [1,2,4,8] --max_new_tokens 160 "
        f"--output_dir {bon} --name demo --resume true")
    if not (bon / "summary.json").exists():
        run(f"bon analyze --runs {bon}/demo --out {bon}/summary.json --resamples 200")

    print("\n== 2. Pretraining the lab GPT (gpt_tiny) on the synthetic task corpus")
    data = root / "data"
    if not (data / "val.bin").is_file():
        run(f"data corpus --seed 0 --train-lines 20000 --val-lines 500 "
            f"--train-out {data}/train.txt --val-out {data}/val.txt")
        run(f"data tokenizer --input {data}/train.txt --model-prefix {data}/tokenizer --vocab-size 512")
        for split in ("train", "val"):
            run(f"data pack --tokenizer {data}/tokenizer --input {data}/{split}.txt --output {data}/{split}.bin")
    run(f"pretrain fit --config configs/pretrain/tiny.yaml --run.root {root} --run.name tiny "
        f"--model.tokenizer {data}/tokenizer --data.tokenizer {data}/tokenizer "
        f"--data.train_path {data}/train.bin --data.val_path {data}/val.bin --data.batch_size 8 "
        f"--data.seq_len 128 --model.warmup_steps 20 --trainer.max_steps {args.pretrain_steps} "
        f"--trainer.val_check_interval 50 --trainer.enable_progress_bar false")

    print("\n== Where things are")
    run(f"status --root {root}")
    print(f"\npass@k curves: {bon}/summary.png   pretraining metrics: {root}/pretrain/tiny/metrics.jsonl")
    return 0
