"""The A/B harness: two generation settings (or models) on the same items, compared by sound statistics.

    lab ab --a configs/quietstar/ab_baseline.yaml --b configs/quietstar/ab_thoughts.yaml \\
           --dataset ../shared/data/gsm8k/train.jsonl --split dev --samples 200 --rounds 3

An arm is a YAML file: the keys of `PlainArm` (model, adapter, temperature, top_p, greedy,
max_new_tokens, stop, chat), or ``class_path: <module>.<Arm subclass>`` plus ``init_args:`` for an
arm of a method (``lightning_lab.quietstar.arm.ThoughtArm`` decodes with injected thoughts). Each arm
loads its own model. Both arms answer the same items in each of ``rounds`` rounds; round r samples with
seed ``seed + r`` in both arms. Every answer is scored (``scorer``: gsm8k, math, code, ...) to 1 or 0.

The statistics (A is the baseline, B the treatment; accuracy = mean over items and rounds):

- ``improvement`` = accuracy(B) - accuracy(A), in absolute points (0.05 = five points);
  ``relative_improvement`` = improvement / accuracy(A) (None when A solved nothing).
- ``mcnemar_p``: exact McNemar test (two-sided binomial test on the discordant pairs) on one paired
  outcome per item: an item counts as solved by an arm when it is solved in more than half of the
  rounds. Pooling the rounds instead would count one item several times as if independent.
- ``bootstrap_ci``: paired bootstrap interval (percentile, ``confidence``) of the accuracy difference,
  resampling items, each with its mean outcome over the rounds in both arms.
- ``ttest_p``: the paired t-test of the per-round accuracies (the seed's test; None for one round or
  identical rounds). Reported, not used to decide: three rounds are three numbers.
- ``mde``: minimum detectable effect of the McNemar test at ``alpha`` with 80% power for this item count,
  (z_{1-alpha/2} + z_{0.8}) * sqrt(d / n), with d the observed fraction of discordant items (at least 1/n).
- ``winner``: B's name when B is better by at least ``improvement_threshold`` and ``mcnemar_p <
  alpha``; A's name when A is better by as much and significantly; else None (no winner). An A/A test
  (identical arms) has no discordant pair, so McNemar's p is 1 and there is never a winner.

McNemar, the bootstrap and the t-test are eval/stats.py's, shared by every method.

Written to ``<output_dir>/<name>/`` (the loop convention, lightning_lab/loops.py: config.yaml,
_run_tracker/, ``--resume true``): ``results.jsonl`` (a header, then one line per arm, round and item: the
answer and its score), ``ab_results.json`` (the keys above plus ``baseline_accuracy``, ``thoughts_accuracy``,
``rounds``: per-round accuracies with Wilson intervals, and both arms' configs) and ``ab_rounds.png``
(per-round accuracy of each arm with its interval).
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from lightning_lab.callbacks.pause import PauseFlag
from lightning_lab.data.benchmarks import Sample, load_benchmark
from lightning_lab.data.io import read_jsonl, read_yaml_or_json, write_json_atomic
from lightning_lab.errors import UserError
from lightning_lab.eval.metrics import SCORERS, score
from lightning_lab.eval.stats import mcnemar_exact, paired_bootstrap_difference, paired_t_test
from lightning_lab.loops import (EXIT_PAUSED, LoopConfig, LoopRun, check_choice, check_count, check_number,
                                 parse_loop)

POWER = 0.8  # the power at which the minimum detectable effect is given


# ---- arms -------------------------------------------------------------------------------------------


@dataclass
class PlainArm:
    """One generation setting: a model (optionally with a LoRA adapter) and how it samples.

    Args:
        name: the arm's name in results (default: the config file's stem).
        model: `load_causal_lm` spec (alias, HF directory, .gguf, lab .ckpt).
        adapter: a peft adapter directory to apply to `model` (None: the model alone).
        temperature: sampling temperature; 0 decodes greedily (then every round gives the same answers).
        top_p: nucleus sampling mass.
        greedy: argmax decoding.
        max_new_tokens: answer length limit.
        stop: stop strings.
        chat: frame prompts with the chat template (None: when the tokenizer has one).
    """

    decodes_thoughts = False  # a class that hides thought tokens from its answers (quietstar's ThoughtArm)

    name: str = ""
    model: str = "smollm2-135m"
    adapter: str | None = None
    temperature: float = 0.7
    top_p: float = 1.0
    greedy: bool = False
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    chat: bool | None = None

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise UserError(f"arm {self.name!r}: temperature={self.temperature} must be >= 0, top_p={self.top_p} "
                            f"in (0, 1], max_new_tokens={self.max_new_tokens} >= 1")

    def load(self, device: str, dtype: str) -> None:
        """Load the model (and adapter) and build the sampler; called once before the first round."""
        from lightning_lab.models.loading import load_causal_lm
        from lightning_lab.models.lora import load_adapter
        from lightning_lab.sampling.sampler import Sampler

        loaded = (load_adapter(self.adapter, base=self.model, device=device, dtype=dtype) if self.adapter
                  else load_causal_lm(self.model, device=device, dtype=dtype))
        if getattr(loaded.model.config, "thought_token_ids", None) and not self.decodes_thoughts:
            raise UserError(f"arm {self.name!r}: model {self.model!r} has thought tokens, whose thoughts plain "
                            "decoding would show as text; use class_path: lightning_lab.quietstar.arm.ThoughtArm")
        self.loaded = self.prepare(loaded)
        self.sampler = Sampler(self.loaded)

    def prepare(self, loaded):
        """Change the loaded model before the sampler is built (a subclass adds tokens); the model as it is here."""
        return loaded

    def answers(self, samples: list[Sample], seed: int) -> list[dict]:
        """One answer per sample, ``{"text": ...}`` plus whatever the arm records, sampled with `seed`."""
        generation = self.sampler.generate([s.prompt for s in samples], n=1, max_new_tokens=self.max_new_tokens,
                                           temperature=self.temperature, top_p=self.top_p, greedy=self.greedy,
                                           stop=self.stop, seed=seed, chat=self.chat)
        return [{"text": completions[0].text} for completions in generation.completions]


def load_arm(path: str | Path, key: str) -> PlainArm:
    """An arm from a YAML file (module docstring); `key` names the flag in errors."""
    if not path:
        raise UserError(f"{key}: an arm config file is required")
    config = read_yaml_or_json(path)
    if not isinstance(config, dict):
        raise UserError(f"{key}: {path}: expected a mapping of arm settings")
    class_path = config.pop("class_path", None)
    arguments = config.pop("init_args", {}) if class_path else config
    if class_path and config:
        raise UserError(f"{key}: {path}: keys {sorted(config)} beside class_path; put them under init_args")
    arm_class = PlainArm
    if class_path:
        module_name, _, class_name = class_path.rpartition(".")
        try:
            arm_class = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError):
            raise UserError(f"{key}: {path}: class_path {class_path!r} does not name a class") from None
        if not (isinstance(arm_class, type) and issubclass(arm_class, PlainArm)):
            raise UserError(f"{key}: {path}: {class_path} is not an arm (a subclass of {PlainArm.__qualname__})")
    known = {f.name for f in fields(arm_class)}
    unknown = sorted(set(arguments) - known)
    if unknown:
        raise UserError(f"{key}: {path}: unknown keys {unknown}; {arm_class.__name__} takes {sorted(known)}")
    arguments.setdefault("name", Path(path).stem)
    return arm_class(**arguments)


# ---- statistics (the tests themselves are eval/stats.py's) ---------------------------------------


def minimum_detectable_effect(discordant: int, items: int, alpha: float, power: float = POWER) -> float:
    """The accuracy difference McNemar detects with `power` at `alpha` (normal approximation; module docstring)."""
    from scipy.stats import norm

    rate = max(discordant, 1) / items
    return float((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * math.sqrt(rate / items))


def wilson_interval(solved: int, total: int, confidence: float) -> list[float]:
    from scipy.stats import binomtest

    interval = binomtest(solved, total).proportion_ci(confidence_level=confidence, method="wilson")
    return [float(interval.low), float(interval.high)]


def compare(a: np.ndarray, b: np.ndarray, names: tuple[str, str], alpha: float, improvement_threshold: float,
            confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> dict:
    """The statistics of two arms' 0/1 outcomes, each (items, rounds), paired by item and round (module docstring)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"outcomes of shapes {a.shape} and {b.shape}: need two equal (items, rounds) arrays")
    items, rounds = a.shape
    accuracy_a, accuracy_b = float(a.mean()), float(b.mean())
    improvement = accuracy_b - accuracy_a
    mcnemar = mcnemar_exact(a.mean(axis=1) > 0.5, b.mean(axis=1) > 0.5)  # one outcome per item: its majority
    # items are the unit: each item's mean outcome over the rounds, resampled with its pair
    _, low, high = paired_bootstrap_difference(b.mean(axis=1), a.mean(axis=1), resamples, confidence, seed)
    a_rounds, b_rounds = a.mean(axis=0).tolist(), b.mean(axis=0).tolist()
    significant = mcnemar["p_value"] < alpha and abs(improvement) >= improvement_threshold and improvement != 0
    return {
        "baseline": names[0],
        "thoughts": names[1],
        "baseline_accuracy": accuracy_a,
        "thoughts_accuracy": accuracy_b,
        "improvement": improvement,
        "relative_improvement": improvement / accuracy_a if accuracy_a > 0 else None,
        "mcnemar_p": mcnemar["p_value"],
        "mcnemar_discordant": {"only_baseline": mcnemar["a_only"], "only_thoughts": mcnemar["b_only"]},
        "bootstrap_ci": [float(low[0]), float(high[0])],
        "ttest_p": paired_t_test(b_rounds, a_rounds)["p_value"],
        "mde": minimum_detectable_effect(mcnemar["a_only"] + mcnemar["b_only"], items, alpha),
        "winner": (names[1] if improvement > 0 else names[0]) if significant else None,
        "alpha": alpha,
        "improvement_threshold": improvement_threshold,
        "confidence": confidence,
        "items": items,
        "rounds": [{"round": r, "baseline_accuracy": a_rounds[r], "thoughts_accuracy": b_rounds[r],
                    "baseline_interval": wilson_interval(int(a[:, r].sum()), items, confidence),
                    "thoughts_interval": wilson_interval(int(b[:, r].sum()), items, confidence)}
                   for r in range(rounds)],
    }


def plot_rounds(results: dict, path: str | Path) -> Path:
    """Per-round accuracy of each arm with its Wilson interval, as a PNG."""
    from lightning_lab.reports.plots import plot_curves

    rounds = results["rounds"]
    x = [r["round"] + 1 for r in rounds]
    curves = {results[arm]: {"x": x, "y": [r[f"{arm}_accuracy"] for r in rounds],
                             "lower": [r[f"{arm}_interval"][0] for r in rounds],
                             "upper": [r[f"{arm}_interval"][1] for r in rounds]}
              for arm in ("baseline", "thoughts")}
    title = (f"{results['thoughts']} vs {results['baseline']}: {results['improvement']:+.3f}, "
             f"McNemar p={results['mcnemar_p']:.3g}")
    return plot_curves(curves, path, xlabel="round", ylabel="accuracy", title=title, log_x=False)


# ---- the run --------------------------------------------------------------------------------------


@dataclass
class ABConfig(LoopConfig):
    """`lab ab`: arms A (baseline) and B (treatment) on one benchmark."""

    output_dir: str = "runs/ab"
    """runs go to <output_dir>/<name>/"""
    a: str = ""
    """YAML file of arm A, the baseline (PlainArm keys, or class_path + init_args)"""
    b: str = ""
    """YAML file of arm B, the treatment"""
    dataset: str = "gsm8k"
    """gsm8k | humaneval | a local JSONL/TSV path (MATH: a local JSONL)"""
    split: str = "test"
    """which split of the dataset (a local file: dev or test half, or all)"""
    samples: int = 100
    """how many items (chosen by seed, see load_benchmark)"""
    rounds: int = 3
    """rounds of sampling; round r uses seed + r in both arms"""
    seed: int = 0
    """base seed of the rounds, the item choice and the bootstrap"""
    scorer: str = "gsm8k"
    """how an answer is scored: exact | numeric | gsm8k | math | code"""
    alpha: float = 0.05
    """significance level of the exact McNemar test"""
    improvement_threshold: float = 0.02
    """least absolute accuracy improvement for a winner (0.02 = two points)"""
    confidence: float = 0.95
    """level of the bootstrap and per-round intervals"""
    bootstrap_resamples: int = 10_000
    """resamples of the paired bootstrap"""

    def __post_init__(self):
        super().__post_init__()
        check_count("rounds", self.rounds)
        check_count("samples", self.samples)
        check_count("bootstrap_resamples", self.bootstrap_resamples)
        check_choice("scorer", self.scorer, SCORERS)
        check_number("alpha", self.alpha, 0.0, 1.0, low_open=True)
        check_number("confidence", self.confidence, 0.0, 1.0, low_open=True)
        check_number("improvement_threshold", self.improvement_threshold, 0.0, 1.0)


def check_references(samples: list[Sample], scorer: str, dataset: str) -> None:
    """Every item needs an answer to score against: a dataset without answers is a clear error."""
    missing = [s.id for s in samples if not str(s.reference).strip()]
    if missing:
        raise UserError(f"{dataset}: {len(missing)} items have no answer to score against (e.g. {missing[:3]})")
    if scorer == "gsm8k":
        from lightning_lab.eval.metrics import extract_gsm8k_answer

        unusable = [s.id for s in samples if extract_gsm8k_answer(s.reference) is None]
        if unusable:
            raise UserError(f"{dataset}: scorer gsm8k needs a number in every reference; items {unusable[:3]} "
                            "have none (choose --scorer exact or math)")


def run_ab(config: ABConfig, arm_a: PlainArm | None = None, arm_b: PlainArm | None = None,
           samples: list[Sample] | None = None) -> dict | None:
    """Run both arms over the items for every round in the run directory <output_dir>/<name>/ (results.jsonl:
    one line per arm, round and item; ab_results.json; ab_rounds.png); the results, or None when paused.
    Arms and items not given come from the config (``a``, ``b``; ``dataset``, ``split``, ``samples``).
    ``--resume true`` keeps the lines already written and runs only the rounds that are not complete."""
    arm_a = arm_a or load_arm(config.a, "--a")
    arm_b = arm_b or load_arm(config.b, "--b")
    if arm_a.name == arm_b.name:
        arm_b.name = f"{arm_b.name}_b"
    if samples is None:
        samples = load_benchmark(config.dataset, split=config.split, limit=config.samples, seed=config.seed)
    check_references(samples, config.scorer, config.dataset)
    arms = {arm.name: {"class": type(arm).__qualname__, **asdict(arm)} for arm in (arm_a, arm_b)}
    with LoopRun(config, method="ab", required_artifacts=("ab_results.json", "ab_rounds.png")) as run, \
            PauseFlag() as pause:
        done_file = run.directory / "ab_results.json"
        if done_file.is_file():
            return {**json.loads(done_file.read_text()), "output_dir": str(run.directory)}
        run.start(total=2 * config.rounds * len(samples), header={"arms": arms})
        outcomes = {arm.name: np.zeros((len(samples), config.rounds)) for arm in (arm_a, arm_b)}
        position = {sample.id: index for index, sample in enumerate(samples)}
        for _, record in read_jsonl(run.results_path):  # lines of an earlier, paused run
            if "arm" in record:
                outcomes[record["arm"]][position[record["item"]], record["round"]] = record["score"]
        for arm in (arm_a, arm_b):
            todo = [r for r in range(config.rounds)
                    if any(f"{arm.name}/{r}/{sample.id}" not in run.done for sample in samples)]
            if todo:
                arm.load(config.device, config.dtype)
            for round_index in todo:
                if pause.requested:
                    run.pause()
                    return None
                # the whole round again (the same seed and batch give the same answers); only missing lines written
                answers = arm.answers(samples, seed=config.seed + round_index)
                for item, (sample, answer) in enumerate(zip(samples, answers)):
                    line_id = f"{arm.name}/{round_index}/{sample.id}"
                    correct = score(config.scorer, answer["text"], sample.reference, sample)
                    outcomes[arm.name][item, round_index] = correct
                    if line_id not in run.done:
                        run.write({"id": line_id, "arm": arm.name, "round": round_index, "item": sample.id,
                                   "score": correct, **answer})
            if todo:
                del arm.sampler, arm.loaded  # one model in memory at a time
        results = compare(outcomes[arm_a.name], outcomes[arm_b.name], (arm_a.name, arm_b.name), config.alpha,
                          config.improvement_threshold, config.confidence, config.bootstrap_resamples, config.seed)
        results["arms"] = arms
        results["config"] = asdict(config)
        plot_rounds(results, run.directory / "ab_rounds.png")
        write_json_atomic(done_file, results)
        return {**results, "output_dir": str(run.directory)}


def summary(results: dict) -> str:
    """A few lines for the terminal."""
    ci = results["bootstrap_ci"]
    ttest = "n/a" if results["ttest_p"] is None else f"{results['ttest_p']:.3g}"
    relative = results["relative_improvement"]
    return "\n".join([
        f"{results['baseline']}: {results['baseline_accuracy']:.3f}   {results['thoughts']}: "
        f"{results['thoughts_accuracy']:.3f}   ({results['items']} items x {len(results['rounds'])} rounds)",
        f"improvement {results['improvement']:+.3f} ({'n/a' if relative is None else f'{relative:+.1%}'} relative), "
        f"{results['confidence']:.0%} bootstrap CI [{ci[0]:+.3f}, {ci[1]:+.3f}], minimum detectable effect "
        f"{results['mde']:.3f}",
        f"exact McNemar p={results['mcnemar_p']:.3g}, paired t-test across rounds p={ttest}",
        f"winner: {results['winner'] or 'none'} (needs improvement >= {results['improvement_threshold']} and "
        f"McNemar p < {results['alpha']})",
    ])


def main(argv: list[str]) -> int:
    _, config = parse_loop("lab", {"ab": (ABConfig, "A/B test of two arms on one benchmark")}, ["ab", *argv])
    results = run_ab(config)
    if results is None:
        print(f"paused; continue with: lab ab --config {Path(config.output_dir) / '<name>' / 'config.yaml'} "
              "--resume true", file=sys.stderr)
        return EXIT_PAUSED
    print(summary(results))
    print(f"results: {results['output_dir']}/ab_results.json, figure: {results['output_dir']}/ab_rounds.png")
    return 0
