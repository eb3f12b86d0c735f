"""Where a TTT step's time goes, on the tiny lab GPT (CPU): sampling, the backward pass, and the rest.

    python bench/ttt.py [--tasks 4] [--steps 4] [--rollouts 8] [--groups 2] [--rounds 3] [--threads N]

Builds gpt_tiny (configs/model/gpt_tiny.yaml, random weights: timing does not depend on what the model
knows) with a 512-piece tokenizer trained here on the synthetic corpus, saves it as a HF directory, and
runs `TestTimeTrainer.solve` (the `lab discover run --mode ttt` code: sampling through the sampler with
the adapter active, the teacher-forced passes through models/scoring, AdamW on the LoRA weights, the
archive, metrics.jsonl, the per-step adapter and progress.pt) on held-out discovery tasks, with
stop_on_exact off so every task takes every step.

Per round: the wall-clock of every `solve` call, against the seconds its steps spent sampling and in
the backward pass (metrics.jsonl). "Outside" = wall-clock - sampling - backward: the teacher-forced
forward passes (policy and adapter-off base), advantages, archive, and writing the adapter, metrics
and progress. Target: outside <= 40% of the step time, judged on the median of the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep (shared 2-core machines)

import torch  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_lab.callbacks.pause import PauseFlag  # noqa: E402
from lightning_lab.data.corpus import CorpusConfig, write_corpus  # noqa: E402
from lightning_lab.data.tokenizer import train_tokenizer  # noqa: E402
from lightning_lab.discover.run import DiscoverConfig  # noqa: E402
from lightning_lab.discover.tasks import SplitConfig, read_tasks, write_task_files  # noqa: E402
from lightning_lab.discover.ttt import TestTimeTrainer  # noqa: E402
from lightning_lab.models.gpt import LabGPTConfig, LabGPTForCausalLM  # noqa: E402
from lightning_lab.models.loading import LoadedModel, load_causal_lm  # noqa: E402
from lightning_lab.sampling.sampler import Sampler  # noqa: E402

TARGET = 0.40


def build_tiny_gpt(directory: Path) -> Path:
    """gpt_tiny with random weights and a 512-piece tokenizer, saved as a HF directory."""
    paths = write_corpus(CorpusConfig(seed=0, train_lines=5000, val_lines=10), directory / "train.txt",
                         directory / "val.txt")
    tokenizer_dir = train_tokenizer(paths["train"], directory / "tokenizer", vocab_size=512)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    sizes = yaml.safe_load((ROOT / "configs/model/gpt_tiny.yaml").read_text())
    torch.manual_seed(0)
    model = LabGPTForCausalLM(LabGPTConfig(**sizes, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(directory / "gpt_tiny")
    tokenizer.save_pretrained(directory / "gpt_tiny")
    return directory / "gpt_tiny"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=4, help="held-out tasks per round")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as temporary:
        temporary = Path(temporary)
        model_dir = build_tiny_gpt(temporary)
        tasks_file = temporary / "heldout.jsonl"
        write_task_files(SplitConfig(seed=0, train_per_cell=0, heldout_per_cell=1), temporary / "train.jsonl",
                         tasks_file)
        tasks = read_tasks(tasks_file)
        tasks = tasks[::max(1, len(tasks) // args.tasks)][:args.tasks]  # spread over the families
        config = DiscoverConfig(tasks=str(tasks_file), model=str(model_dir), mode="ttt", steps=args.steps,
                                rollouts=args.rollouts, groups=args.groups, max_new_tokens=args.max_new_tokens,
                                stop_on_exact=False, device="cpu", dtype="auto", progress=False)
        loaded = load_causal_lm(str(model_dir), device="cpu", dtype="auto")
        trainer = TestTimeTrainer(loaded, config)
        sampler = Sampler(LoadedModel(trainer.model, loaded.tokenizer, loaded.spec, loaded.device, loaded.dtype))
        print(f"gpt_tiny {sum(p.numel() for p in loaded.model.parameters()) / 1e6:.1f}M parameters, "
              f"dtype {loaded.dtype}, threads {torch.get_num_threads()}; {len(tasks)} tasks x {args.steps} steps x "
              f"{args.rollouts} rollouts ({args.groups} groups), {args.max_new_tokens} new tokens")
        shares = []
        print(f"{'round':>5} {'wall s':>8} {'sampling':>9} {'scoring':>8} {'backward':>9} {'outside':>8}")
        with PauseFlag() as pause:
            for round_index in range(args.rounds + 1):  # round 0 warms up (kernels, allocator), not counted
                wall, parts = 0.0, {"sampling": 0.0, "scoring": 0.0, "backward": 0.0}
                for task in tasks:
                    task_dir = temporary / f"round{round_index}" / task.id
                    task_dir.mkdir(parents=True)
                    started = time.perf_counter()
                    trainer.solve(sampler, task, task_dir, pause)
                    wall += time.perf_counter() - started
                    for line in (task_dir / "metrics.jsonl").open():
                        seconds = json.loads(line)["seconds"]
                        for key in parts:
                            parts[key] += seconds[key]
                if round_index == 0:
                    continue
                outside = (wall - parts["sampling"] - parts["backward"]) / wall
                shares.append(outside)
                print(f"{round_index:>5} {wall:>8.2f} {parts['sampling'] / wall:>9.1%} {parts['scoring'] / wall:>8.1%} "
                      f"{parts['backward'] / wall:>9.1%} {outside:>8.1%}")
    median = statistics.median(shares)
    print(f"\noutside sampling and backward: median {median:.1%} of a TTT step's time (target <= {TARGET:.0%}): "
          f"{'met' if median <= TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
