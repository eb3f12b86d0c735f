"""An ACE epoch's time with and without the sampler's prefix cache, measured in the same run.

    python bench/ace.py [--model smollm2-135m] [--task tatqa_tiny] [--items 16] [--batch-size 8] [--bullets 20]
                        [--top-k 20] [--max-new-tokens 64] [--dtype auto] [--repeats 3]

Every generator prompt holds the same playbook before a different question. The sampler prefills a batch's
common token prefix once and shares its KV cache with every row (`Sampler.generate`'s ``prefix_cache``, on by
default), and with ``Sampler(keep_prefix=True)`` (what `lab ace` uses) keeps it for the next call. This script
measures what each is worth, in three settings (`SETTINGS`: no prefix cache, per batch, kept across calls),
their order turned every repeat, ``--repeats`` times:

1. an ACE epoch over ``--items`` items of a task: the generator with a playbook of ``--bullets`` lessons, then
   the reflector and curator (`runner.learn_from_batch`), each epoch from the same starting playbook;
2. a frozen pass: the generator alone over the same items, the playbook unchanged (what validation and test
   passes do).

Printed per setting: the median seconds, the prefill seconds inside them, the prompt tokens and the share of
them prefilled once for a batch, the new tokens, whether every setting produced the same outputs (fp32 greedy
does; in bf16 the cache rounds differently and a greedy path may turn at a near-tie, and then the work differs),
and the machine's load average before and after. The settings of one run compare; figures of a loaded machine
(the lab's evidence runs share these cores) do not compare across runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
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


# (prefix_cache, keep_prefix) of each setting measured
SETTINGS = {"no prefix cache": (False, False), "prefix cache per batch": (True, False),
            "prefix kept across calls": (True, True)}


class TimedSampler:
    """The sampler in one of the `SETTINGS` for every generate call, adding up the calls' timing."""

    def __init__(self, sampler: Sampler):
        self.sampler, self.tokenizer = sampler, sampler.tokenizer
        self.use("no prefix cache")

    def use(self, setting: str) -> None:
        """Decode in `setting` from now on, counting from zero."""
        self.prefix_cache, self.sampler.keep_prefix = SETTINGS[setting]
        self.prefill_s = 0.0
        self.prompt_tokens = self.shared_tokens = self.new_tokens = 0

    def generate(self, prompts, **kwargs):
        out = self.sampler.generate(prompts, prefix_cache=self.prefix_cache, **kwargs)
        self.prefill_s += out.timing.prefill_s
        self.prompt_tokens += out.timing.prompt_tokens
        self.shared_tokens += out.timing.shared_prompt_tokens
        self.new_tokens += out.timing.new_tokens
        return out


def playbook_of(bullets: int) -> Playbook:
    playbook = Playbook(token_budget=None)
    for lesson in LESSONS[:bullets]:
        playbook.add(lesson, "formulas", now="2026-12-04T00:00:00+00:00")
    return playbook


def generator_pass(roles: Roles, items, playbook: Playbook, batch_size: int, top_k: int) -> list:
    """Answer every item in batches, the playbook's retrieved bullets in each prompt: (items, views, answers)."""
    batches = []
    for first in range(0, len(items), batch_size):
        batch = items[first:first + batch_size]
        views = [playbook.retrieve(f"{item.question} {item.context}", top_k) for item in batch]
        batches.append((batch, views, roles.answer(batch, views, playbook)))
    return batches


def ace_epoch(roles: Roles, items, bullets: int, batch_size: int) -> tuple[Counter, str]:
    """Generator, reflector and curator over the items, the playbook updated after every batch: the counters
    and the playbook it ends with."""
    playbook, stats = playbook_of(bullets), Counter()
    for first in range(0, len(items), batch_size):
        [(batch, views, answers)] = generator_pass(roles, items[first:first + batch_size], playbook, batch_size,
                                                   roles.config.top_k)
        learn_from_batch(roles, playbook, batch, answers, views, stats)
    return stats, playbook.render()


def outputs(result) -> str:
    """What a run produced, to tell whether the prefix cache changed it: an epoch's final playbook, a frozen
    pass's generator outputs."""
    if isinstance(result, tuple):
        return result[1]
    return "\n".join(answer.output for _, _, answers in result for answer in answers)


def load() -> str:
    return "load average " + ", ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="tatqa_tiny")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bullets", type=int, default=20)
    parser.add_argument("--top-k", type=int, default=20, help="bullets retrieved per question (ACE's top_k)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    path, domain = task_path(args.task)
    items = load_items(path, domain)[: args.items]
    config = EpochsConfig(task_name=args.task, model_id=args.model, batch_size=args.batch_size, top_k=args.top_k,
                          max_new_tokens=args.max_new_tokens, reflector_max_new_tokens=args.max_new_tokens,
                          dtype=args.dtype, token_budget=10**6)
    sampler = TimedSampler(Sampler(load_model(args.model, "auto", args.dtype)))
    sampler.generate("Hello", max_new_tokens=2, greedy=True)  # kernel load and first-call costs, not measured
    roles = Roles(sampler, sampler, config)
    frozen = playbook_of(args.bullets)
    playbook_tokens = len(sampler.tokenizer.encode(frozen.render(), add_special_tokens=False))
    print(f"model {args.model} ({sampler.sampler.engine_info()['dtype']}), task {args.task}, {len(items)} items in "
          f"batches of {args.batch_size}, playbook of {args.bullets} bullets = {playbook_tokens} tokens "
          f"(top {args.top_k} retrieved), {args.max_new_tokens} new tokens per call, median of {args.repeats}")
    print(f"before: {load()}")

    runs = {"ACE epoch": lambda: ace_epoch(roles, items, args.bullets, args.batch_size),
            "frozen pass": lambda: generator_pass(roles, items, frozen, args.batch_size, args.top_k)}
    measured = {(name, setting): [] for name in runs for setting in SETTINGS}
    for repeat in range(args.repeats):
        for name, run in runs.items():
            # the order of the settings turns every repeat, so that a drift of the machine's speed hits all alike
            order = list(SETTINGS)[repeat % len(SETTINGS):] + list(SETTINGS)[:repeat % len(SETTINGS)]
            for setting in order:
                sampler.use(setting)
                start = time.perf_counter()
                result = run()
                seconds = time.perf_counter() - start
                measured[name, setting].append((seconds, sampler.prefill_s, sampler.prompt_tokens,
                                                sampler.shared_tokens, sampler.new_tokens, outputs(result)))
                if name == "ACE epoch":
                    stats = result[0]
    print(f"after:  {load()}")
    print(f"an ACE epoch: {stats['reflections']} reflections, {stats['regenerations']} regenerations")

    def median(name: str, setting: str, field: int) -> float:
        return statistics.median(run[field] for run in measured[name, setting])

    for name in runs:
        same = len({run[5] for setting in SETTINGS for run in measured[name, setting]}) == 1
        print(f"{name} ({'the same outputs in every setting' if same else 'outputs differ between settings, so does the work'}):")
        baseline = median(name, "no prefix cache", 0)
        for setting in SETTINGS:
            seconds, prefill, tokens = (median(name, setting, field) for field in (0, 1, 2))
            print(f"    {setting + ':':26s} {seconds:7.2f} s ({seconds / baseline - 1:+6.1%}); prefill {prefill:6.2f} s "
                  f"for {tokens:.0f} prompt tokens, {median(name, setting, 3) / tokens:4.0%} of them shared; "
                  f"{median(name, setting, 4):.0f} new tokens")


if __name__ == "__main__":
    main()
