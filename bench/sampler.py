"""Sampler speed against `transformers.generate`, both measured here, in the same run.

    python bench/sampler.py [--model smollm2-135m] [--gsm8k PATH] [--dtypes fp32,bf16] [--reps 3]

One GSM8K question as a chat prompt, `--new-tokens` (128) tokens forced on both sides (EOS
ignored: `min_new_tokens` for generate, `ignore_eos=True` for the sampler). Each case is timed
`--reps` times (n=1 greedy at least 5 times, the capture pair at least 9) after a short (8-token) warm-up
run per side; the table shows medians. Targets:

- n=32 sampling: sampler tokens/s >= 4x generate(num_return_sequences=32, do_sample=True);
- n=1 greedy:    sampler tokens/s >= 2x generate(do_sample=False), plainly and with prompt lookup
  (`--lookup` drafted tokens per pass, exact greedy: see the sampler's docstring); generate with its own
  prompt lookup (`prompt_lookup_num_tokens`) is printed beside them, and llama.cpp on the same GGUF when
  llama-cpp-python is installed;
- capture:       greedy with `--heads` (30) captured heads takes <= 1.15x the time of the same decode without;
- adapter:       the sampler with a LoRA adapter (`--adapter-rank`, on every projection, random B) makes >= 0.8x
                 the tokens/s of the same model without one, for n=`--adapter-n` (8) sampling and n=1 greedy
                 (baseline column: the sampler without the adapter).

``--cases`` picks the cases (default all: sampling,greedy,capture,adapter). The engine of each sampler
(`Sampler.engine_info`) is printed before its figures.

The repetitions of the two sides of a ratio alternate (baseline, sampler, baseline, ...): this VM's speed
drifts by tens of percent within minutes, and timing one side after the other would fold that drift
into the ratio. ``--levers`` adds the sampler without its prepacked linear weights, the sampler with
torch's operations instead of its CPU kernels (``cpu_kernels=False``: SDPA, `F.rms_norm`), and the sampler
on transformers' forward instead of the written-out Llama forward (`LlamaDecoder`). The machine's load
(`uptime`) is printed before and after: other processes on a small CPU make every number here noisy
(with 2 threads, an oversubscribed CPU slows OpenMP code by up to 10x).
Run it without ``OMP_WAIT_POLICY=PASSIVE`` (what `make test` sets): sleeping OpenMP threads add a
wake-up to every small operation, and the ratios would describe that setting, not the sampler.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

DEFAULT_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


def paired_median_seconds(runs: list, steps: int, reps: int) -> list[float]:
    """Median wall time of each of ``runs`` (called with ``steps``), their repetitions interleaved (A B A B ...)
    so that a machine whose speed drifts during the bench slows both sides alike. Each run first does a short
    (8-step) warm-up: kernel choice, weight packing, allocator."""
    for run in runs:
        run(min(steps, 8))
    times = [[] for _ in runs]
    for _ in range(reps):
        for run, samples in zip(runs, times):
            started = time.perf_counter()
            run(steps)
            samples.append(time.perf_counter() - started)
    return [statistics.median(samples) for samples in times]


def llama_cpp_tokens_per_s(gguf: Path, prompt: str, new_tokens: int, reps: int) -> float | None:
    """llama.cpp greedy single-stream tokens/s on the same GGUF, or None when llama-cpp-python is absent.

    Uses `Llama.generate`, which yields tokens without stopping at EOS, so exactly `new_tokens` are made.
    """
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=torch.get_num_threads(), verbose=False)
    prompt_tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)

    def run(steps):
        llm.reset()
        for count, _ in enumerate(llm.generate(prompt_tokens, temp=0.0), start=1):
            if count == steps:
                break

    return new_tokens / paired_median_seconds([run], new_tokens, reps)[0]


def adapter_sampler(loaded, rank: int):
    """A sampler for a copy of the model with a LoRA adapter of `rank` on every projection (the lab's defaults),
    B drawn at random so that the adapter changes the function (peft starts it at zero)."""
    from lightning_lab.models.loading import LoadedModel
    from lightning_lab.models.lora import LoraSettings, add_lora
    from lightning_lab.sampling.sampler import Sampler

    peft_model = add_lora(copy.deepcopy(loaded.model), LoraSettings(rank=rank))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.01)
    return Sampler(LoadedModel(peft_model, loaded.tokenizer, loaded.spec, loaded.device, loaded.dtype))


def bench_dtype(args, dtype: str, question: str) -> list[dict]:
    from lightning_lab.sampling.sampler import Sampler
    from lightning_lab.models.loading import load_causal_lm

    loaded = load_causal_lm(args.model, device="cpu", dtype=dtype)
    model, sampler, steps = loaded.model, Sampler(loaded), args.new_tokens
    messages = [{"role": "user", "content": question}]
    input_ids = torch.tensor([sampler.encode(messages)])
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    pad = dict(pad_token_id=loaded.tokenizer.pad_token_id)
    config = model.config
    heads = [(i % config.num_hidden_layers, (i * 7) % config.num_attention_heads) for i in range(args.heads)]
    rows = []

    def generate_sampling(k):
        model.generate(input_ids, do_sample=True, num_return_sequences=args.n, max_new_tokens=k, min_new_tokens=k,
                       **sampling, **pad)

    def sampler_sampling(k, chosen=sampler):
        chosen.generate(messages, n=args.n, max_new_tokens=k, ignore_eos=True, **sampling)

    def generate_greedy(k):
        model.generate(input_ids, do_sample=False, max_new_tokens=k, min_new_tokens=k, **pad)

    def generate_lookup(k):
        model.generate(input_ids, do_sample=False, max_new_tokens=k, min_new_tokens=k,
                       prompt_lookup_num_tokens=args.lookup, **pad)

    def sampler_greedy(k, chosen=sampler, capture=None, lookup=0):
        chosen.generate(messages, greedy=True, max_new_tokens=k, ignore_eos=True, capture_heads=capture,
                        prompt_lookup=lookup)

    def row(case, tokens, base_s, ours_s, target=None, lower_is_better=False):
        """A table row; `target` None: a reference figure, ratio printed, no verdict."""
        ratio = ours_s / base_s if lower_is_better else base_s / ours_s
        ok = None if target is None else (ratio <= target if lower_is_better else ratio >= target)
        rows.append(dict(dtype=dtype, case=case, baseline_tok_s=tokens / base_s, sampler_tok_s=tokens / ours_s,
                         ratio=ratio, ok=ok, target="(reference)" if target is None else
                         f"{'<=' if lower_is_better else '>='} {target}x"))
        print(f"  {dtype} {case}: baseline {base_s:.2f} s, sampler {ours_s:.2f} s", flush=True)

    def timed(*runs, reps=args.reps):
        return paired_median_seconds(list(runs), steps, reps)

    greedy_reps = max(args.reps, 5)  # single-row runs are short and noisier: more repetitions, still cheap
    capture_reps = max(args.reps, 9)  # a ~3% difference under this VM's drift needs the most

    # the sampler, and with --levers the sampler with one lever taken away: prepacked weights, the CPU
    # kernels (torch's operations instead), or the written-out Llama forward (transformers' forward instead)
    variants = {"": sampler}
    if args.levers:
        variants[" unpacked"] = Sampler(loaded, pack_weights=False)
        variants[" no CPU kernels"] = Sampler(loaded, cpu_kernels=False)
        variants[" transformers fwd"] = Sampler(loaded, llama_decoder=False)
    for name, chosen in variants.items():
        print(f"  {dtype} sampler{name}: {chosen.engine_info()}", flush=True)
    with torch.inference_mode():
        if "sampling" in args.cases:
            base_s, *ours_s = timed(generate_sampling, *[lambda k, chosen=chosen: sampler_sampling(k, chosen)
                                                         for chosen in variants.values()])
            for name, seconds in zip(variants, ours_s):
                row(f"n={args.n} sampling{name}", args.n * steps, base_s, seconds, 4.0)
        if "greedy" in args.cases:
            lookup_runs = [lambda k: sampler_greedy(k, lookup=args.lookup), generate_lookup] if args.lookup else []
            base_s, *ours_s = timed(generate_greedy, *[lambda k, chosen=chosen: sampler_greedy(k, chosen)
                                                       for chosen in variants.values()], *lookup_runs, reps=greedy_reps)
            if args.lookup:
                *ours_s, lookup_s, generate_lookup_s = ours_s
            for name, seconds in zip(variants, ours_s):
                row(f"n=1 greedy{name}", steps, base_s, seconds, 2.0)
            if args.lookup:
                row(f"n=1 greedy, prompt lookup {args.lookup}", steps, base_s, lookup_s, 2.0)
                row(f"generate, prompt lookup {args.lookup}", steps, base_s, generate_lookup_s)
        if "capture" in args.cases:
            row(f"greedy + {len(heads)} heads", steps,
                *timed(sampler_greedy, lambda k: sampler_greedy(k, capture=heads), reps=capture_reps), 1.15,
                lower_is_better=True)
    if "adapter" in args.cases:
        adapted = adapter_sampler(loaded, args.adapter_rank)
        print(f"  {dtype} sampler with LoRA r={args.adapter_rank}: {adapted.engine_info()}", flush=True)

        def adapter_sampling(k, chosen):
            chosen.generate(messages, n=args.adapter_n, max_new_tokens=k, ignore_eos=True, **sampling)

        with torch.inference_mode():
            row(f"n={args.adapter_n} sampling, LoRA r={args.adapter_rank}", args.adapter_n * steps,
                *timed(lambda k: adapter_sampling(k, sampler), lambda k: adapter_sampling(k, adapted)), 0.8)
            row(f"n=1 greedy, LoRA r={args.adapter_rank}", steps,
                *timed(sampler_greedy, lambda k: sampler_greedy(k, adapted), reps=greedy_reps), 0.8)
    if args.llama_cpp and "greedy" in args.cases and dtype == args.dtypes[0]:
        from lightning_lab.models.loading import ALIASES, alias_gguf_path

        if args.model in ALIASES:
            prompt = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            try:
                rate = llama_cpp_tokens_per_s(alias_gguf_path(args.model), prompt, steps, args.reps)
            except Exception as error:  # an optional comparison: report, never fail the bench
                print(f"  llama.cpp comparison failed: {type(error).__name__}: {error}")
                rate = None
            if rate is not None:
                rows.append(dict(dtype="gguf", case="n=1 greedy llama.cpp", baseline_tok_s=None,
                                 sampler_tok_s=rate, ratio=None, target="(reference)", ok=None))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--gsm8k", type=Path, default=DEFAULT_GSM8K, help="GSM8K JSONL; its first question is the prompt")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--lookup", type=int, default=5,
                        help="drafted tokens per pass in the prompt-lookup greedy rows (0: leave those rows out)")
    parser.add_argument("--heads", type=int, default=30, help="captured (layer, head) pairs in the capture case")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false")
    parser.add_argument("--levers", action="store_true",
                        help="also time the sampler without each lever: prepacked weights, CPU kernels, decoder")
    parser.add_argument("--cases", default="sampling,greedy,capture,adapter",
                        help="comma-separated: sampling, greedy, capture, adapter")
    parser.add_argument("--adapter-rank", type=int, default=8, help="LoRA rank in the adapter case")
    parser.add_argument("--adapter-n", type=int, default=8, help="samples per prompt in the adapter case")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    unknown = args.cases - {"sampling", "greedy", "capture", "adapter"}
    if unknown:
        parser.error(f"--cases: unknown {sorted(unknown)}")
    if not args.gsm8k.is_file():
        parser.error(f"--gsm8k {args.gsm8k}: file not found")
    if args.threads:
        torch.set_num_threads(args.threads)
    question = json.loads(args.gsm8k.open(encoding="utf-8").readline())["question"]

    wait_policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(f"before: {load_average()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY {wait_policy}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    if wait_policy.upper() == "PASSIVE":
        print("warning: OMP_WAIT_POLICY=PASSIVE wakes sleeping threads at every parallel region, which costs the "
              "sampler more than generate (a 64-row bf16 decode step took 1.5x as long); the lab's commands run unset")
    print(f"model {args.model}, {args.new_tokens} new tokens forced, n={args.n}, temperature={args.temperature} "
          f"top_p={args.top_p} top_k={args.top_k}, median of {args.reps}", flush=True)
    rows = []
    for dtype in args.dtypes:
        rows += bench_dtype(args, dtype, question)
    print(f"after: {load_average()}\n")

    header = f"{'dtype':<6} {'case':<32} {'baseline tok/s':>15} {'sampler tok/s':>14} {'ratio':>7} {'target':>11}  result"
    print(header)
    print("-" * len(header))
    for row in rows:
        base = f"{row['baseline_tok_s']:.1f}" if row["baseline_tok_s"] is not None else "-"
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
        result = "" if row["ok"] is None else ("PASS" if row["ok"] else "MISS")
        print(f"{row['dtype']:<6} {row['case']:<32} {base:>15} {row['sampler_tok_s']:>14.1f} {ratio:>7} "
              f"{row['target']:>11}  {result}")
    print("baseline = transformers.generate (greedy rows: without prompt lookup), except in the capture row: the "
          "sampler without capture (ratio = time with / time without), in the LoRA rows: the sampler without the "
          "adapter (ratio = tokens/s with / without), and in the 'generate, prompt lookup' row, where "
          "generate with its own prompt lookup stands in the sampler's column")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
