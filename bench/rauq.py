"""The RAUQ-CoT controller's cost when it never fires, against plain greedy decoding, in the same run.

    python bench/rauq.py [--model smollm2-135m] [--gsm8k PATH] [--dtype fp32] [--new-tokens 128] [--reps 3]

One GSM8K question as a chat prompt. Plain: `Sampler.generate` greedy. Monitored: `RAUQController` with
theta = +inf (it never triggers: the same tokens), which decodes on the sampler's step API, captures the
heads of the middle layers (one per layer, as a heads file holds them) and updates the running RAUQ after
every token. Both stop at EOS or ``--new-tokens``; the ratio compares seconds per generated token, medians
of ``--reps`` repetitions that alternate between the two sides (`paired_median_seconds`, bench/sampler.py).
Target: monitored <= 1.10x plain.

Batched evaluation (issue 23 asks batch 16 >= 3x the problems per hour of batch 1) is not measured: the
sampler's step API decodes one prompt per state, so `lab rauq evaluate` decodes problems one at a time.
"""

from __future__ import annotations

import argparse
import json
import math
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
    args = parser.parse_args(argv)

    from lightning_lab.models.loading import load_causal_lm
    from lightning_lab.rauq.controller import ControllerConfig, RAUQController
    from lightning_lab.rauq.heads import HeadsFile
    from lightning_lab.rauq.scoring import middle_layers
    from lightning_lab.sampling.sampler import Sampler

    print(load_average())
    question = json.loads(Path(args.gsm8k).read_text().splitlines()[0])["question"]
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
    print(load_average())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
