"""`lab demo`: a tour of the five methods at small scale on a CPU, then `lab report` over what it wrote.

    lab demo                                   # everything, into runs/demo (about 15 minutes on 2 CPU cores)
    lab demo --only rauq --out /tmp/d          # one method
    lab demo --resume                          # continue: a finished command is skipped
    lab demo --gsm8k ../shared/data/gsm8k/train.jsonl   # RAUQ on real GSM8K problems instead of data/prompts

Each step prints the `lab` commands it runs (type them yourself to do the same at a larger scale), runs
them in this process and prints its time; a command whose output already exists is skipped on --resume.
The steps use the project's own small data (data/prompts, data/ace, the generated discovery tasks); run
it from the repository root. Finally `<out>/report.md` and `<out>/report.html` show every run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from lightning_lab.callbacks.status import run_status
from lightning_lab.cli import main as lab
from lightning_lab.data.io import write_json_atomic
from lightning_lab.errors import ArgumentParser, UserError, check_writable_dir
from lightning_lab.reports.report import write_report


@dataclass
class Command:
    """One `lab` command line and the file it writes last: when that file exists the command is done (a loop's
    heartbeat.json must also say completed: a paused loop is continued with its --resume true)."""

    line: str
    done: Path

    def finished(self) -> bool:
        if self.done.name == "heartbeat.json":
            return run_status(self.done.parents[1]) == "completed"  # <run>/_run_tracker/heartbeat.json
        return self.done.is_file()


@dataclass
class Step:
    method: str
    title: str
    commands: list[Command]


def demo_steps(out: Path, model: str, gsm8k: str | None) -> list[Step]:
    """The tour, smallest settings that still show each method's figure and table (sized by measuring:
    see the README's demo section)."""
    prompts = "data/prompts/arithmetic.jsonl"
    bon, rauq, ace, ab = out / "bon", out / "rauq", out / "ace", out / "ab"
    rauq_data = f"--calibration {gsm8k} --split dev" if gsm8k else f"--calibration {prompts}"
    rauq_eval = f"--benchmark {gsm8k} --split test" if gsm8k else f"--benchmark {prompts} --scorer gsm8k"
    return [
        Step("discover", "Discover→Distill: tiny GPT pretrained, best-of-N vs test-time LoRA, SDFT, retention", [
            Command(f"pipeline discover-distill --config configs/pipeline/demo.yaml --root {out / 'discover-distill'}"
                    " --resume", out / "discover-distill" / "results.md")]),
        Step("bon", f"Best-of-N emergence: {model}, 8 samples per prompt from one prefill, pass@k, predictor", [
            Command(f"bon collect --config configs/bon/collector_base.json --base_model {model} --limit 24 "
                    f"--samples_per_prompt 8 --k_values [1,2,4,8] --max_new_tokens 128 --output_dir {bon} "
                    "--name demo --resume true", bon / "demo" / "_run_tracker" / "heartbeat.json"),
            Command(f"bon analyze --runs {bon / 'demo'} --out {bon / 'demo' / 'summary.json'} --resamples 200",
                    bon / "demo" / "summary.json"),
            Command(f"bon predict --runs {bon / 'demo'} --out {bon / 'demo' / 'predictor.json'} --feature_samples 4 "
                    "--n_splits 2 --extrapolate_k [16,32]", bon / "demo" / "predictor.json")]),
        # A fixed theta: `lab rauq fit-threshold` on 16 of these problems gave 1.94 once (AUROC 0.57) and refused
        # the next time (every greedy answer wrong), and 1.9 never fired on 4 problems; 1.0 fires on each, so the
        # trace shows rollbacks. Fit theta on real calibration data (--gsm8k) for experiments.
        Step("rauq", f"RAUQ-CoT: attention heads, then the controller on a few problems ({model})", [
            Command(f"rauq select-heads --model {model} {rauq_data} --num_examples 8 --output {rauq / 'heads.json'}",
                    rauq / "heads.json"),
            Command(f"rauq evaluate --model {model} {rauq_eval} --limit 4 --heads {rauq / 'heads.json'} "
                    f"--threshold_type fixed --theta 1.0 --max_new_tokens 128 --output_dir {rauq} "
                    "--name demo --resume true", rauq / "demo" / "summary.json")]),
        Step("ace", f"ACE: baseline vs an evolving playbook on the tiny IoT task ({model})", [
            Command(f"ace run --model_id {model} --task_name iot_tiny --limit 6 --mode {mode} --max_new_tokens 64 "
                    f"--reflector_max_new_tokens 96 --output_dir {ace} --name {mode} --resume true",
                    ace / mode / "_run_tracker" / "heartbeat.json") for mode in ("baseline", "ace")]),
        Step("quietstar", f"Quiet-STaR: A/B of sampling with and without injected thoughts ({model})", [
            Command(f"ab --a configs/quietstar/ab_baseline.yaml --b configs/quietstar/ab_thoughts.yaml "
                    f"--dataset {prompts} --samples 2 --rounds 2 --bootstrap_resamples 1000 --output_dir {ab} "
                    "--name demo --resume true", ab / "demo" / "ab_results.json")]),
    ]


def run_command(command: Command) -> None:
    print(f"\n$ lab {command.line}", flush=True)
    status = lab(shlex.split(command.line))
    if status:
        raise UserError(f"`lab {command.line}` exited with status {status}; continue with `lab demo --resume`")


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="lab demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="where the demo's runs, times and report go")
    parser.add_argument("--only", action="append", choices=["discover", "bon", "rauq", "ace", "quietstar"],
                        help="run only this method's step (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue an earlier demo in --out")
    parser.add_argument("--model", default="smollm2-135m", help="the model of the sampling steps")
    parser.add_argument("--gsm8k", default=None, help="a GSM8K JSONL (e.g. ../shared/data/gsm8k/train.jsonl) "
                                                     "for RAUQ instead of data/prompts")
    args = parser.parse_args(argv)
    out = check_writable_dir(args.out, "--out")
    if out.is_dir() and any(out.iterdir()) and not args.resume:
        raise UserError(f"--out {out}: not empty; continue that demo with --resume, or choose another --out")
    if args.gsm8k is not None and not Path(args.gsm8k).is_file():
        raise UserError(f"--gsm8k {args.gsm8k}: no such file")
    for needed in ("configs/pipeline/demo.yaml", "configs/bon/collector_base.json", "data/prompts/arithmetic.jsonl"):
        if not Path(needed).is_file():
            raise UserError(f"{needed} not found: run `lab demo` from the repository root")

    steps = [step for step in demo_steps(out, args.model, args.gsm8k) if not args.only or step.method in args.only]
    times_path = out / "demo_times.json"
    out.mkdir(parents=True, exist_ok=True)
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    for index, step in enumerate(steps, 1):
        print(f"\n== [{index}/{len(steps)}] {step.title}", flush=True)
        start = time.perf_counter()
        for command in step.commands:
            if command.finished():
                print(f"(done, skipped) lab {command.line}")
                continue
            run_command(command)
        times[step.method] = round(times.get(step.method, 0.0) + time.perf_counter() - start, 1)  # summed over resumes
        write_json_atomic(times_path, times)
        print(f"== [{index}/{len(steps)}] {step.method}: {time.perf_counter() - start:.0f} s", flush=True)

    md_path, html_path = write_report(out)
    print(f"\nseconds per step: {json.dumps(times)}\nreport: {md_path}  {html_path}")
    return 0
