"""The RAUQ-CoT controller's cost when it never fires, against plain greedy decoding, in the same run.

    python bench/rauq.py [--model smollm2-135m] [--gsm8k PATH] [--dtype fp32] [--new-tokens 128] [--reps 3]

One GSM8K question as a chat prompt. Plain: `Sampler.generate` greedy. Monitored: `RAUQController` with
theta = +inf (it never triggers: the same tokens), which decodes on the sampler's step API, captures the
heads of the middle layers (one per layer, as a heads file holds them) and updates the running RAUQ after
every token. Both stop at EOS or ``--new-tokens``; the ratio compares seconds per generated token, medians
of ``--reps`` repetitions that alternate between the two sides (`paired_median_seconds`, bench/sampler.py).
Target: monitored <= 1.10x plain.

Batched evaluation: ``--problems`` (16) GSM8K questions, each through the controller as `lab rauq evaluate`
runs it, at ``--batch-size`` 1 and ``--batch-size`` 16 (`RAUQController.generate_batch`: every row triggers, rolls
back and inserts its thought on its own in one batch), with the entropy trigger and cot repair at ``--theta``
(default: the 80th percentile of the greedy tokens' entropies, measured here, so that most problems trigger).
Target: batch 16 >= 3x the problems per hour of batch 1.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from sampler import DEFAULT_GSM8K, load_average, paired_median_seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--gsm8k", default=str(DEFAULT_GSM8K))
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--theta", type=float, default=None, help="entropy theta of the triggering case")
    args = parser.parse_args(argv)
    if args.batch_size < 2:
        parser.error(f"--batch-size {args.batch_size}: compares batch 1 with a larger batch, give at least 2")

    from lightning_lab.models.loading import load_causal_lm
    from lightning_lab.rauq.controller import ControllerConfig, RAUQController
    from lightning_lab.rauq.heads import HeadsFile
    from lightning_lab.rauq.scoring import middle_layers
    from lightning_lab.sampling.sampler import Sampler

    print(load_average())
    questions = [json.loads(line)["question"] for line in Path(args.gsm8k).read_text().splitlines()[:args.problems]]
    question = questions[0]
    loaded = load_causal_lm(args.model, device="cpu", dtype=args.dtype)
    sampler = Sampler(loaded)
    layers = middle_layers(sampler.num_layers)
    heads = HeadsFile({layer: 0 for layer in layers}, layers, 0.5, loaded.spec, sampler.num_layers,
                      sampler.num_heads, "paper", "bench", 0)
    tokens = {}

    def plain(steps):
        completion = sampler.generate([question], greedy=True, max_new_tokens=steps).completions[0][0]
        tokens["plain"] = len(completion.token_ids)

    def monitored(steps):
        controller = RAUQController(loaded, ControllerConfig(max_new_tokens=steps), heads, math.inf, sampler=sampler)
        tokens["monitored"] = controller.generate(question).stats["answer_tokens"]

    with torch.inference_mode():
        plain_s, monitored_s = paired_median_seconds([plain, monitored], args.new_tokens, args.reps)
    per_token = {"plain": plain_s / tokens["plain"], "monitored": monitored_s / tokens["monitored"]}
    ratio = per_token["monitored"] / per_token["plain"]
    print(f"{args.model} {args.dtype}, {len(layers)} heads captured, {tokens['plain']} tokens, median of {args.reps}")
    print(f"plain greedy (Sampler.generate):     {1000 * per_token['plain']:7.2f} ms/token")
    print(f"RAUQ-monitored (controller, theta=inf): {1000 * per_token['monitored']:7.2f} ms/token")
    print(f"ratio {ratio:.3f}x (target <= 1.10x): {'met' if ratio <= 1.10 else 'NOT met'}")

    # batched evaluation: problems per hour at batch 1 and at --batch-size, entropy trigger, cot repair
    def evaluation(theta, batch_size):
        config = ControllerConfig(trigger="entropy", max_new_tokens=args.new_tokens, max_repairs=1)
        controller = RAUQController(loaded, config, heads, theta, sampler=sampler)
        started = time.perf_counter()
        triggered = 0
        for start in range(0, len(questions), batch_size):
            outputs = controller.generate_batch(questions[start:start + batch_size])
            triggered += sum(bool(out.trigger_events) for out in outputs)
        return 3600 * len(questions) / (time.perf_counter() - started), triggered

    theta = args.theta
    if theta is None:  # one batched greedy pass over the problems
        generation = sampler.generate(questions, greedy=True, max_new_tokens=args.new_tokens, entropy=True,
                                      batch_size=len(questions))
        entropies = sorted(e for (completion,) in generation.completions for e in completion.entropies)
        theta = entropies[int(0.8 * (len(entropies) - 1))]
    rates = {size: [] for size in (1, args.batch_size)}
    for _ in range(args.reps):  # alternate the two batch sizes, as paired_median_seconds does
        for size in rates:
            rates[size].append(evaluation(theta, size))
    (one, hits), (many, _) = (min(rates[size], key=lambda r: abs(r[0] - statistics.median(x[0] for x in rates[size])))
                              for size in rates)
    print(f"evaluation, entropy trigger theta={theta:.3f}, cot ({hits}/{len(questions)} problems trigger): batch 1 "
          f"{one:8.1f} problems/h, batch {args.batch_size} {many:8.1f} problems/h, {many / one:.2f}x (target >= 3x)")
    print(load_average())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
