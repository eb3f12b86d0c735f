"""Pretraining throughput: the Lightning stage vs a plain PyTorch loop, MFU, peak memory, mHC cost.

    python bench/pretrain.py [--steps 12] [--warmup 3] [--big-steps 4] [--rounds 2] [--threads N] [--skip-120m]
                             [--mhc-only] [--mhc-big-steps 3]

Everything is measured in this one run, on this machine:
- the peak matmul rate (bf16 and fp32, a timed 2048^3 product, at the start and again at the end,
  best kept), which also picks the precision (bf16-mixed when bf16 is > 1.5x faster than fp32,
  else 32-true);
- tokens/s of `lab pretrain fit` (the real stage: `run_stage_cli` with PretrainModule,
  PackedDataModule and the lab callbacks RunTracker, GracefulPause, ModelCheckpoint, MetricsJsonl,
  CSV logger; validation off) and of a plain loop (autocast, AdamW, the same warm-up/cosine
  schedule, clipping) over the same model, data, precision and batch. The first `--warmup` steps
  of every run are left out (1 for gpt_120m). Rounds alternate plain / Lightning, and tokens/s is
  tokens per step / the median step time over all timed steps of all rounds: on a shared machine
  other processes lengthen some steps, and the median ignores them (the mean-based figure is
  printed beside it);
- MFU = achieved model FLOP/s / the measured peak matmul rate, with model FLOPs per token =
  6 x parameters (tied head included) + 12 x layers x seq_len x hidden (attention), i.e. the
  PaLM convention; mHC's extra FLOPs are not counted;
- peak memory of gpt_120m at seq_len 256, micro-batch 4, in a fresh subprocess running the stage
  for `--big-steps` steps: on CPU the growth of the process's peak RSS (Linux VmHWM, else
  ru_maxrss) from just before the stage starts (libraries imported, nothing built) to the end of
  the last step (before the final checkpoint is written), i.e. weights + gradients + AdamW state +
  activations + allocator slack; on CUDA torch.cuda.max_memory_allocated at that point;
- the cost of mHC: the training step time (forward + backward + AdamW step, the plain loop, so only
  the architecture differs) of gpt_tiny (micro-batch 16) and gpt_120m (micro-batch 2) with mHC
  (configs/model/*_mhc.yaml: 4 streams, dynamic) vs without, in 3 rounds that alternate the two
  models; each round's figure is its median step time, the printed ratio the median of the 3
  rounds' ratios (`--mhc-only` runs just this part).

Data: a synthetic corpus (`lightning_lab.data.corpus`), a 512-piece tokenizer for gpt_tiny and an
8192-piece one for gpt_120m (105M parameters), packed into a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (set before torch starts its thread pool): with
# spinning threads, a 2-core machine shared with other processes slows small training steps
# 10-80x at random and the numbers mean nothing. An explicit OMP_WAIT_POLICY is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_lab.data.corpus import CorpusConfig, write_corpus  # noqa: E402
from lightning_lab.data.packed import PackedDataModule, pack  # noqa: E402
from lightning_lab.data.tokenizer import train_tokenizer  # noqa: E402
from lightning_lab.models.gpt import LabGPTForCausalLM  # noqa: E402
from lightning_lab.training.common import cosine_schedule  # noqa: E402
from lightning_lab.training.pretrain import PretrainModule, build_model_config  # noqa: E402

MODELS = ROOT / "configs" / "model"
BASE_CONFIG = ROOT / "configs" / "pretrain" / "tiny.yaml"
SEQ_LEN = 256
TINY_BATCH = 16
BIG_BATCH = 4
MHC_BIG_BATCH = 2
MHC_ROUNDS = 3


def make_data(root: Path) -> dict[str, dict[str, Path]]:
    """Corpus -> tokenizers (512 for gpt_tiny, 8192 for gpt_120m) -> packed train/val for each."""
    text = write_corpus(CorpusConfig(seed=0, train_lines=20_000, val_lines=200), root / "train.txt", root / "val.txt")
    data = {}
    for vocab in (512, 8192):
        tokenizer = train_tokenizer(text["train"], root / f"tokenizer{vocab}", vocab_size=vocab)
        for split in ("train", "val"):
            pack(tokenizer, text[split], root / f"{split}{vocab}.bin")
        data[vocab] = {"tokenizer": tokenizer, "train": root / f"train{vocab}.bin", "val": root / f"val{vocab}.bin"}
    return data


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_gflops(dtype: torch.dtype, size: int = 2048, reps: int = 5) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device())
    b = torch.randn(size, size, dtype=dtype, device=device())
    a @ b
    synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize()
    return 2 * size**3 * reps / (time.perf_counter() - start) / 1e9


def flops_per_token(model: LabGPTForCausalLM, seq_len: int) -> float:
    config = model.config
    return 6 * model.num_parameters() + 12 * config.num_hidden_layers * seq_len * config.hidden_size


class StepTimer(Callback):
    """perf_counter after every optimizer step, and the peak memory so far (read in ~0.05 ms), which
    therefore leaves out the checkpoint Lightning writes after the last step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.peak_memory = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize()
        self.times.append(time.perf_counter())
        self.peak_memory = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else peak_rss_bytes()


def step_durations(step_times: list[float], warmup: int) -> list[float]:
    """Seconds per step (end of one step to the end of the next), the first `warmup` steps left out."""
    timed = step_times[warmup - 1:]
    return [later - earlier for earlier, later in zip(timed, timed[1:])]


def tokens_per_s(durations: list[float], tokens_per_step: int) -> float:
    """tokens per step / the median step time (a busy machine lengthens some steps; the median ignores them)."""
    return tokens_per_step / statistics.median(durations)


def lightning_run(model_yaml: Path, data: dict, batch: int, steps: int, precision: str, run_root: Path,
                  name: str) -> tuple[StepTimer, PretrainModule]:
    """`lab pretrain fit` in-process with a StepTimer; returns the timer and the module."""
    argv = ["fit", "--config", str(BASE_CONFIG), "--model.model_config", str(model_yaml),
            "--model.tokenizer", str(data["tokenizer"]), "--data.tokenizer", str(data["tokenizer"]),
            "--data.train_path", str(data["train"]), "--data.val_path", str(data["val"]),
            "--data.seq_len", str(SEQ_LEN), "--data.batch_size", str(batch), "--trainer.max_steps", str(steps),
            "--trainer.precision", precision, "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--run.root", str(run_root), "--run.name", name,
            "--trainer.callbacks+=__main__.StepTimer"]
    from lightning_lab.training.common import run_stage_cli

    cli = run_stage_cli(PretrainModule, PackedDataModule, "pretrain", argv)
    timer = next(c for c in cli.trainer.callbacks if isinstance(c, StepTimer))
    return timer, cli.model


def plain_run(model_yaml: Path, data: dict, batch: int, steps: int, precision: str) -> list[float]:
    """The same model, batches, precision, optimizer, schedule and clipping as the stage, in a bare loop."""
    torch.manual_seed(0)
    datamodule = PackedDataModule(str(data["train"]), str(data["val"]), str(data["tokenizer"]), seq_len=SEQ_LEN,
                                  batch_size=batch)
    model = LabGPTForCausalLM(build_model_config(str(model_yaml), datamodule.tokenizer)).to(device()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = cosine_schedule(optimizer, 100, 2000, 0.1)
    use_bf16 = precision == "bf16-mixed"
    times = []
    for step, (input_ids, labels) in enumerate(datamodule.train_dataloader()):
        if step == steps:
            break
        input_ids, labels = input_ids.to(device()), labels.to(device())
        with torch.autocast(device().type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=input_ids, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        times.append(time.perf_counter())
    return times


def compare(label: str, model_yaml: Path, data: dict, batch: int, steps: int, warmup: int, rounds: int,
            precision: str, run_root: Path) -> dict:
    """Plain loop and Lightning stage in alternating rounds; tokens/s from the median of all their timed steps."""
    tokens_per_step = batch * SEQ_LEN
    plain, lightning, model = [], [], None
    for round_index in range(rounds):
        plain += step_durations(plain_run(model_yaml, data, batch, steps, precision), warmup)
        timer, module = lightning_run(model_yaml, data, batch, steps, precision, run_root, f"{label}-{round_index}")
        lightning += step_durations(timer.times, warmup)
        model = module.model
    return {"label": label, "params": model.num_parameters(), "flops_per_token": flops_per_token(model, SEQ_LEN),
            "batch": batch, "steps": len(plain), "plain": tokens_per_s(plain, tokens_per_step),
            "lightning": tokens_per_s(lightning, tokens_per_step),
            "plain_mean": tokens_per_step * len(plain) / sum(plain),
            "lightning_mean": tokens_per_step * len(lightning) / sum(lightning)}


def mhc_cost(name: str, data: dict, batch: int, steps: int, warmup: int, precision: str) -> dict:
    """Median step time of `name` and `name`_mhc in MHC_ROUNDS alternating rounds of the plain loop."""
    rounds = []
    for _ in range(MHC_ROUNDS):
        rounds.append({variant: statistics.median(step_durations(
            plain_run(MODELS / f"{variant}.yaml", data, batch, steps, precision), warmup))
            for variant in (name, f"{name}_mhc")})
    ratios = [r[f"{name}_mhc"] / r[name] for r in rounds]
    return {"label": name, "batch": batch, "timed_steps": steps - warmup, "rounds": rounds, "ratios": ratios,
            "ratio": statistics.median(ratios)}


def print_mhc_cost(cost: dict) -> None:
    name = cost["label"]
    seconds = " ".join(f"{r[f'{name}_mhc']:.3f}/{r[name]:.3f}" for r in cost["rounds"])
    print(f"mHC cost, {name} (n_streams 4, dynamic; seq_len {SEQ_LEN}, micro-batch {cost['batch']}, "
          f"median of {cost['timed_steps']} timed steps per round): step time with/without mHC per round "
          f"{seconds} s -> {cost['ratio']:.2f}x the step time (median of {len(cost['ratios'])} rounds: "
          f"{', '.join(f'{r:.2f}' for r in cost['ratios'])}), {1 / cost['ratio']:.2f}x the tokens/s")


def peak_rss_bytes() -> int:
    """This process's peak resident set size. Linux: VmHWM, which starts afresh at exec (ru_maxrss does
    not: a child started from a big parent inherits the parent's peak). Elsewhere: ru_maxrss."""
    status = Path("/proc/self/status")
    if status.is_file():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on other Unixes


def memory_probe(data_json: str, steps: int, precision: str) -> None:
    """Subprocess entry: gpt_120m through the stage; prints {"baseline": .., "peak": .., "kind": ..} as JSON."""
    data = {key: Path(value) for key, value in json.loads(data_json).items()}
    baseline = peak_rss_bytes()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as run_root:
        timer, _ = lightning_run(MODELS / "gpt_120m.yaml", data, BIG_BATCH, steps, precision, Path(run_root), "memory")
    kind = "cuda_max_allocated" if torch.cuda.is_available() else "cpu_peak_rss"
    print(json.dumps({"kind": kind, "baseline": 0 if torch.cuda.is_available() else baseline,
                      "peak": timer.peak_memory}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="gpt_tiny steps per measurement (default 12)")
    parser.add_argument("--warmup", type=int, default=3, help="steps excluded from every measurement (default 3)")
    parser.add_argument("--big-steps", type=int, default=4, help="gpt_120m steps per measurement (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating plain / Lightning rounds (default 2)")
    parser.add_argument("--skip-120m", action="store_true", help="only gpt_tiny")
    parser.add_argument("--mhc-only", action="store_true", help="only the mHC cost (no Lightning, MFU, memory)")
    parser.add_argument("--mhc-big-steps", type=int, default=3,
                        help="gpt_120m steps per mHC-cost measurement, the first untimed (default 3)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, the physical cores)")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: subprocess entry
    parser.add_argument("--precision", default="32-true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args.memory_probe, args.big_steps, args.precision)
        return
    if args.warmup < 1 or args.steps < args.warmup + 2 or args.big_steps < 3 or args.mhc_big_steps < 2:
        parser.error("need --warmup >= 1, --steps >= warmup + 2, --big-steps >= 3 and --mhc-big-steps >= 2")

    bf16 = matmul_gflops(torch.bfloat16)
    fp32 = matmul_gflops(torch.float32)
    precision = "bf16-mixed" if bf16 > 1.5 * fp32 else "32-true"
    print(f"device {device()}, {torch.get_num_threads()} threads (OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), "
          f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"load average {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    print(f"matmul 2048^3: bf16 {bf16:.0f} GFLOP/s, fp32 {fp32:.0f} GFLOP/s -> precision {precision}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_data(root)
        # mHC on / off: gpt_120m with a warm-up of 1 (its first step dominates otherwise short runs)
        mhc_costs = [mhc_cost("gpt_tiny", data[512], TINY_BATCH, args.steps, args.warmup, precision)]
        if not args.skip_120m:
            mhc_costs.append(mhc_cost("gpt_120m", data[8192], MHC_BIG_BATCH, args.mhc_big_steps, 1, precision))
        if args.mhc_only:
            print()
            for cost in mhc_costs:
                print_mhc_cost(cost)
            return
        results = [compare("gpt_tiny", MODELS / "gpt_tiny.yaml", data[512], TINY_BATCH, args.steps, args.warmup,
                           args.rounds, precision, root / "runs")]
        if not args.skip_120m:
            results.append(compare("gpt_120m", MODELS / "gpt_120m.yaml", data[8192], BIG_BATCH, args.big_steps,
                                   1, args.rounds, precision, root / "runs"))
        memory = None
        if not args.skip_120m:
            data_json = json.dumps({key: str(value) for key, value in data[8192].items()})
            probe = subprocess.run([sys.executable, __file__, "--memory-probe", data_json, "--big-steps",
                                    str(args.big_steps), "--precision", precision,
                                    "--threads", str(torch.get_num_threads())],
                                   capture_output=True, text=True, check=True)
            memory = json.loads(probe.stdout.strip().splitlines()[-1])

    # the peak is measured again at the end (best of both): a busy machine only ever lowers it
    if precision == "bf16-mixed":
        peak = max(bf16, matmul_gflops(torch.bfloat16))
    else:
        peak = max(fp32, matmul_gflops(torch.float32))
    print(f"\nseq_len {SEQ_LEN}; tokens/s = tokens per step / median step time over all timed steps of "
          f"{args.rounds} alternating rounds (mean-based in brackets); MFU against the peak "
          f"{precision.split('-')[0]} matmul rate measured here, {peak:.0f} GFLOP/s")
    print(f"{'model':<10} {'params':>8} {'batch':>6} {'steps':>6} {'plain tok/s':>18} {'lightning tok/s':>18} "
          f"{'overhead':>9} {'MFU plain':>10} {'MFU lightning':>14}")
    for r in results:
        overhead = r["plain"] / r["lightning"] - 1
        mfu = lambda tps: tps * r["flops_per_token"] / (peak * 1e9)  # noqa: E731
        print(f"{r['label']:<10} {r['params'] / 1e6:>7.1f}M {r['batch']:>6} {r['steps']:>6} "
              f"{r['plain']:>8.0f} [{r['plain_mean']:>7.0f}] {r['lightning']:>8.0f} [{r['lightning_mean']:>7.0f}] "
              f"{overhead:>+8.1%} {mfu(r['plain']):>10.1%} {mfu(r['lightning']):>14.1%}")
    overhead = results[0]["plain"] / results[0]["lightning"] - 1
    print(f"\nLightning overhead on gpt_tiny: {overhead:+.1%} (target <= 5%): "
          f"{'met' if overhead <= 0.05 else 'NOT met'}")
    for cost in mhc_costs:
        print_mhc_cost(cost)
    if memory is not None:
        what = ("growth of the process's peak RSS from before the stage to the end of the last step: weights, "
                "grads, AdamW state, activations, allocator slack" if memory["kind"] == "cpu_peak_rss"
                else "torch.cuda.max_memory_allocated up to the end of the last step")
        print(f"peak memory gpt_120m, seq_len {SEQ_LEN}, micro-batch {BIG_BATCH}, {precision}: "
              f"{(memory['peak'] - memory['baseline']) / 2**30:.2f} GiB ({what})")


if __name__ == "__main__":
    main()
