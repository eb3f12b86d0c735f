"""What the repeated playbook costs an ACE epoch, measured here, in the same run.

    python bench/ace.py [--model smollm2-135m] [--task tatqa_tiny] [--items 16] [--batch-size 8] [--bullets 20]

Every generator prompt holds the same playbook before a different question, so a prefix cache in the
sampler (the playbook's KV computed once per batch and shared by its rows) could save the playbook's
prefill for every row but one of a batch. The sampler has no such cache, so this script measures how
much there is to save instead of assuming it:

1. an ACE epoch over ``--items`` items of a task (generator with a playbook of ``--bullets`` lessons,
   then the reflector and curator: `runner.learn_from_batch`), timed per role, with the sampler's own
   prefill / decode split of every generator call;
2. the same generator calls with an empty playbook: the difference in prefill is what the repeated
   playbook costs per generator row, paid again by every regeneration of the reflection rounds;
3. the epoch's time with a prefix cache, projected: the epoch less (batch - 1) / batch of that cost
   (a prefix cache still prefills the playbook once per batch).

Reported: the epoch's time without and with the cache (projected), and the playbook prefill's share.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from lightning_lab.ace.playbook import Playbook
from lightning_lab.ace.runner import EpochsConfig, Roles, learn_from_batch, load_model
from lightning_lab.ace.tasks import load_items, task_path
from lightning_lab.sampling.sampler import Sampler

# Lessons of the kind a reflector writes for finance table questions; enough of them to fill the budget.
LESSONS = [
    "Percent change is (new - old) / old * 100: divide by the earlier year's value, never the later one.",
    "Operating profit is revenue minus operating costs; the operating margin divides it by revenue.",
    "Read the table's unit line ($ thousands, $ millions) and answer in the unit the question names.",
    "Averages over quarters divide the total by the number of quarters listed, here four.",
    "The current ratio is current assets divided by current liabilities, not total liabilities.",
    "Debt-to-equity divides total liabilities by shareholders' equity; round only the final ratio.",
    "Total assets equal total liabilities plus shareholders' equity on a balance sheet.",
    "A share of a total is the part divided by the sum of every row of the table, times 100.",
    "The payout ratio is dividends paid divided by net income, as a percent.",
    "Earnings per share divide net income by shares outstanding; both may be in millions.",
    "Revenue per employee divides revenue by headcount; convert millions to thousands first if asked.",
    "Units sold are beginning inventory plus purchases minus ending inventory.",
    "Cost of goods sold is units sold times the cost per unit given in the table's title.",
    "Simple interest for t years is principal * rate * t; six months is t = 0.5.",
    "Free cash flow is operating cash flow minus capital expenditures, before dividends.",
    "When a question asks which row is largest or smallest, answer with the row's name, not its value.",
    "Growth between two years is the later value minus the earlier one, in the table's unit.",
    "Thousands separators (4,800) are part of the number, not two numbers.",
    "Give percentages to the number of decimals the question asks for, without the % sign if unsure.",
    "Capital expenditures as a percent of operating cash flow divide capex by operating cash flow.",
    "Check whether a figure is a level (revenue in a year) or a change (growth) before subtracting.",
    "Headcount changes are computed like revenue changes: (new - old) / old * 100.",
]


class TimedSampler:
    """The sampler, with the prefill and decode seconds of every generate call added up."""

    def __init__(self, sampler: Sampler):
        self.sampler, self.tokenizer = sampler, sampler.tokenizer
        self.prefill_s = self.decode_s = 0.0
        self.prompt_tokens = 0

    def generate(self, prompts, **kwargs):
        out = self.sampler.generate(prompts, **kwargs)
        self.prefill_s += out.timing.prefill_s
        self.decode_s += out.timing.decode_s
        self.prompt_tokens += out.timing.prompt_tokens
        return out


def generator_pass(roles: Roles, items, playbook: Playbook, batch_size: int, top_k: int) -> tuple[float, list]:
    """Answer every item in batches (the playbook's retrieved bullets in each prompt): (seconds, answers)."""
    start, answers = time.perf_counter(), []
    for first in range(0, len(items), batch_size):
        batch = items[first:first + batch_size]
        views = [playbook.retrieve(f"{item.question} {item.context}", top_k) for item in batch]
        answers.append((batch, views, roles.answer(batch, views, playbook)))
    return time.perf_counter() - start, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="tatqa_tiny")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bullets", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    path, domain = task_path(args.task)
    items = load_items(path, domain)[: args.items]
    config = EpochsConfig(task_name=args.task, model_id=args.model, batch_size=args.batch_size, top_k=args.bullets,
                          max_new_tokens=args.max_new_tokens, reflector_max_new_tokens=args.max_new_tokens,
                          dtype=args.dtype, token_budget=10**6)
    sampler = TimedSampler(Sampler(load_model(args.model, "auto", args.dtype)))
    sampler.generate("Hello", max_new_tokens=2, greedy=True)  # kernel load and first-call costs, not measured
    roles = Roles(sampler, sampler, config)

    def fresh_playbook(bullets: int) -> Playbook:
        playbook = Playbook(token_budget=None)
        for lesson in LESSONS[:bullets]:
            playbook.add(lesson, "formulas")
        return playbook

    playbook = fresh_playbook(args.bullets)
    playbook_tokens = len(sampler.tokenizer.encode(playbook.render(), add_special_tokens=False))
    sampler.prefill_s = sampler.decode_s = 0.0
    generate_s, batches = generator_pass(roles, items, playbook, args.batch_size, args.bullets)
    prefill_with, decode_with = sampler.prefill_s, sampler.decode_s
    learn_start, stats = time.perf_counter(), Counter()
    for batch, views, answers in batches:
        learn_from_batch(roles, playbook, batch, answers, views, stats)
    learn_s = time.perf_counter() - learn_start
    epoch_s = generate_s + learn_s

    sampler.prefill_s = sampler.decode_s = 0.0
    plain_s, _ = generator_pass(roles, items, fresh_playbook(0), args.batch_size, args.bullets)
    prefill_without = sampler.prefill_s

    per_row = max(0.0, prefill_with - prefill_without) / len(items)
    playbook_prefill = per_row * (len(items) + stats["regenerations"])  # regenerations hold the playbook too
    saved = playbook_prefill * (args.batch_size - 1) / args.batch_size
    print(f"model {args.model}, task {args.task}, {len(items)} items in batches of {args.batch_size}, "
          f"playbook of {args.bullets} bullets = {playbook_tokens} tokens, {args.max_new_tokens} new tokens per call")
    print(f"generator pass with the playbook:    {generate_s:7.2f} s (prefill {prefill_with:.2f} s, "
          f"decode {decode_with:.2f} s)")
    print(f"generator pass with no playbook:     {plain_s:7.2f} s (prefill {prefill_without:.2f} s)")
    print(f"reflector + curator:                 {learn_s:7.2f} s ({stats['reflections']} reflections, "
          f"{stats['regenerations']} regenerations)")
    print(f"the playbook's repeated prefill:     {playbook_prefill:7.2f} s = {playbook_prefill / epoch_s:.1%} of the epoch "
          f"({per_row * 1000:.0f} ms per generator row, {len(items) + stats['regenerations']} rows)")
    print(f"ACE epoch without a prefix cache:    {epoch_s:7.2f} s (measured)")
    print(f"ACE epoch with a prefix cache:       {epoch_s - saved:7.2f} s (projected: {saved:.2f} s saved, "
          f"{saved / epoch_s:.1%})")


if __name__ == "__main__":
    main()
