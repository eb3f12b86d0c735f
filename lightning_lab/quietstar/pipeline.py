"""The whole Quiet-STaR experiment in one command: inject -> A/B -> bake -> A/B of the baked model.

    lab quietstar bake --model smollm2-135m --out runs/quietstar/gsm8k --eval_dataset ../shared/data/gsm8k/train.jsonl \\
        --eval_samples 100 --ab_test_rounds 3 [--config configs/quietstar/bake_smollm2.yaml] [--resume true]

    from lightning_lab.quietstar.pipeline import QuietSTaRBaker, QuietSTaRConfig
    results = QuietSTaRBaker(QuietSTaRConfig(model="smollm2-135m", out="runs/quietstar/x")).run()

Steps, each writing under ``out`` (``--resume true`` skips the steps whose results are there):

1. ``ab_thoughts/``: the A/B harness (eval/ab.py): the model plainly vs the model with hidden thoughts
   injected (`ThoughtArm`), on ``eval_samples`` items of ``eval_split``, ``ab_test_rounds`` rounds.
2. ``traces.jsonl``: on ``trace_samples`` other items of the same split (disjoint from the A/B items), the
   thoughts arm answers ``traces_per_item`` times; a trace is kept when its answer is correct and its
   trace quality (quality.py) is at least ``min_trace_quality`` (None: any). ``trace_quality.json`` holds
   the quality distribution of all traces, kept or not.
3. ``quietstar/bake/``: only when thoughts won the A/B (or ``force``): the baking stage with the star
   objective on the kept traces (``learning_rate``, ``epochs``, LoRA of ``lora_rank`` or full fine-tuning
   when 0); the baked model is ``quietstar/bake/baked_model/``.
4. ``ab_baked/``: the A/B harness again, the original model plainly vs the baked model, which thinks by
   itself (thoughts sampled when it starts them, never shown), on the same A/B items.

``bake_results.json`` gathers the results; the closing summary prints the winner, the improvement, the
p-values and where the model was saved. Defaults are the seed's: ``max_thought_length`` 64,
``thought_probability`` 0.5, gsm8k, 100 eval samples, 3 rounds, learning rate 1e-5, 3 epochs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from lightning_lab.data.benchmarks import load_benchmark
from lightning_lab.data.io import JsonlWriter, write_json_atomic
from lightning_lab.errors import UserError
from lightning_lab.eval.ab import ABConfig, PlainArm, check_references, run_ab, summary
from lightning_lab.eval.metrics import score
from lightning_lab.loops import EXIT_PAUSED
from lightning_lab.quietstar.arm import ThoughtArm
from lightning_lab.quietstar.injector import InjectorConfig, ThoughtInjector
from lightning_lab.quietstar.quality import gold_ids, trace_quality
from lightning_lab.quietstar.tokens import END_THOUGHT, START_THOUGHT

SCORER_OF = {"gsm8k": "gsm8k", "math": "math", "humaneval": "code"}


class Paused(Exception):
    """A step stopped on Ctrl+C; the pipeline continues from there with --resume true."""


@dataclass
class QuietSTaRConfig:
    """`lab quietstar bake`: every field is a flag (``--eval_samples 200``) or a key of ``--config FILE``.

    Args:
        model: the model to test and bake (alias, HF directory, .gguf, lab .ckpt).
        out: the experiment's directory.
        eval_dataset: gsm8k | humaneval | a local JSONL/TSV path (MATH: a local JSONL).
        eval_split: the split both the A/B items and the trace items come from.
        eval_samples: A/B items.
        trace_samples: items whose thought traces are collected for baking (disjoint from the A/B items).
        traces_per_item: sampled traces per trace item.
        ab_test_rounds: A/B rounds (seeds seed, seed + 1, ...).
        scorer: how answers are scored; None: from the dataset (gsm8k, math, code; a local file: gsm8k).
        seed: seed of the item choice, the rounds and the traces.
        max_thought_length: most tokens per thought.
        thought_probability: chance of a thought at each candidate position.
        thought_temperature: sampling temperature inside thoughts.
        start_token: thought start marker.
        end_token: thought end marker.
        temperature: answer sampling temperature (0: greedy).
        top_p: answer nucleus mass.
        max_new_tokens: answer length limit.
        min_trace_quality: keep only traces of at least this quality (nats per gold token); None: all correct.
        objective: the baking objective for traces (star).
        learning_rate: baking learning rate.
        epochs: baking epochs over the kept traces.
        batch_size: traces per baking step.
        lora_rank: LoRA rank for baking; 0: full fine-tuning.
        alpha: significance level of the McNemar test.
        improvement_threshold: least absolute accuracy improvement for a winner.
        force: bake even when thoughts did not win.
        resume: skip the steps whose results are already in `out`.
        device: auto | cpu | cuda | mps.
        dtype: auto | fp32 | bf16.
        wandb_project: log to Weights & Biases under this project (needs `pip install wandb`); None: no W&B.
    """

    model: str = "smollm2-135m"
    out: str = "runs/quietstar/bake"
    eval_dataset: str = "gsm8k"
    eval_split: str = "test"
    eval_samples: int = 100
    trace_samples: int = 100
    traces_per_item: int = 2
    ab_test_rounds: int = 3
    scorer: str | None = None
    seed: int = 0
    max_thought_length: int = 64
    thought_probability: float = 0.5
    thought_temperature: float = 1.0
    start_token: str = START_THOUGHT
    end_token: str = END_THOUGHT
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 256
    min_trace_quality: float | None = None
    objective: str = "star"
    learning_rate: float = 1e-5
    epochs: int = 3
    batch_size: int = 4
    lora_rank: int = 0
    alpha: float = 0.05
    improvement_threshold: float = 0.02
    force: bool = False
    resume: bool = False
    device: str = "auto"
    dtype: str = "auto"
    wandb_project: str | None = None

    def __post_init__(self):
        if self.ab_test_rounds < 1:
            raise UserError(f"--ab_test_rounds: must be >= 1; got {self.ab_test_rounds}")
        for key in ("eval_samples", "trace_samples", "traces_per_item", "epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise UserError(f"--{key}: must be >= 1; got {getattr(self, key)}")
        if self.objective != "star":
            raise UserError(f"--objective: the pipeline bakes traces with 'star'; got {self.objective!r} (the "
                            "quietstar objective trains on text: lab quietstar fit --model.objective quietstar)")
        if self.wandb_project and importlib.util.find_spec("wandb") is None:
            raise UserError(f"--wandb_project {self.wandb_project}: the wandb package is not installed "
                            "(`pip install wandb`), or leave --wandb_project unset")
        if self.lora_rank < 0:
            raise UserError(f"--lora_rank: 0 (full fine-tuning) or a positive rank; got {self.lora_rank}")
        self.thoughts = InjectorConfig(thought_probability=self.thought_probability,
                                       max_thought_length=self.max_thought_length,
                                       thought_temperature=self.thought_temperature, thought_top_p=self.top_p)

    @property
    def resolved_scorer(self) -> str:
        return self.scorer or SCORER_OF.get(self.eval_dataset, "gsm8k")


class QuietSTaRBaker:
    """Runs the pipeline of the module docstring; `run()` returns the results dict (also in bake_results.json)."""

    def __init__(self, config: QuietSTaRConfig):
        self.config = config
        self.out = Path(config.out)
        self.wandb = None  # the W&B run while one is open

    def run(self) -> dict:
        config = self.config
        if self.out.exists() and any(self.out.iterdir()) and not config.resume:
            raise UserError(f"--out {self.out}: exists and is not empty; continue it with --resume true or choose "
                            "another --out")
        eval_items, trace_items = self.items()
        self.out.mkdir(parents=True, exist_ok=True)
        if config.wandb_project:
            import wandb

            self.wandb = wandb.init(project=config.wandb_project, job_type="quietstar", config=asdict(config),
                                    dir=str(self.out))
        try:
            return self.steps(eval_items, trace_items)
        finally:
            if self.wandb is not None:
                self.wandb.finish()

    def steps(self, eval_items: list, trace_items: list) -> dict:
        """Steps 1-4 of the module docstring; the results (also written to bake_results.json)."""
        config = self.config
        results = {"config": asdict(config)}
        results["ab_thoughts"] = self.ab("ab_thoughts", self.plain_arm("baseline", config.model),
                                         self.thought_arm("thoughts", config.model, config.thoughts), eval_items)
        results["traces"] = self.collect_traces(trace_items)
        won = results["ab_thoughts"]["winner"] == "thoughts"
        if not (won or config.force):
            results["baked_model"] = None
            results["skipped_bake"] = "thoughts did not win the A/B test (pass --force true to bake anyway)"
        elif results["traces"]["kept"] == 0:
            results["baked_model"] = None
            results["skipped_bake"] = "no trace was kept (correct and above --min_trace_quality)"
        else:
            results["baked_model"] = self.bake()
            baked_arm = self.thought_arm("baked", results["baked_model"], InjectorConfig(
                thought_probability=0.0, max_thought_length=config.max_thought_length,
                thought_temperature=config.thought_temperature, thought_top_p=config.top_p))
            results["ab_baked"] = self.ab("ab_baked", self.plain_arm("original", config.model), baked_arm, eval_items)
        write_json_atomic(self.out / "bake_results.json", results)
        if self.wandb is not None:
            self.log_wandb(results)
        return results

    def log_wandb(self, results: dict) -> None:
        """The seed's W&B names: metric ``reasoning_accuracy`` per arm, the trace-quality distribution, and the
        baked model as the artifact ``baked_quietstar_model``."""
        import wandb

        for test in ("ab_thoughts", "ab_baked"):
            if test in results:
                ab = results[test]
                self.wandb.log({f"{test}/reasoning_accuracy/{ab['baseline']}": ab["baseline_accuracy"],
                                f"{test}/reasoning_accuracy/{ab['thoughts']}": ab["thoughts_accuracy"],
                                f"{test}/improvement": ab["improvement"], f"{test}/mcnemar_p": ab["mcnemar_p"]})
        qualities = results["traces"]["quality"]["values"]
        if qualities:
            self.wandb.log({"trace_quality": wandb.Histogram(qualities)})
        if results["baked_model"] is not None:
            artifact = wandb.Artifact("baked_quietstar_model", type="model")
            artifact.add_dir(results["baked_model"])
            self.wandb.log_artifact(artifact)

    # ---- items and arms ---------------------------------------------------------------------------

    def items(self) -> tuple[list, list]:
        """The A/B items and the trace items: disjoint, from one split, chosen by the seed."""
        config = self.config
        samples = load_benchmark(config.eval_dataset, split=config.eval_split,
                                 limit=config.eval_samples + config.trace_samples, seed=config.seed)
        check_references(samples, config.resolved_scorer, config.eval_dataset)
        if len(samples) <= config.eval_samples:
            raise UserError(f"--eval_dataset {config.eval_dataset}: split {config.eval_split!r} has {len(samples)} "
                            f"items, not enough for {config.eval_samples} A/B items and any trace items")
        random.Random(config.seed).shuffle(samples)
        return samples[:config.eval_samples], samples[config.eval_samples:]

    def arm_settings(self) -> dict:
        config = self.config
        return {"temperature": config.temperature, "top_p": config.top_p, "max_new_tokens": config.max_new_tokens}

    def plain_arm(self, name: str, model: str) -> PlainArm:
        return PlainArm(name=name, model=model, **self.arm_settings())

    def thought_arm(self, name: str, model: str, thoughts: InjectorConfig) -> ThoughtArm:
        return ThoughtArm(name=name, model=model, thoughts=thoughts, start_token=self.config.start_token,
                          end_token=self.config.end_token, **self.arm_settings())

    # ---- steps ------------------------------------------------------------------------------------

    def ab(self, name: str, arm_a: PlainArm, arm_b: PlainArm, items: list) -> dict:
        """One A/B test on `items` (step 1 or 4) in <out>/<name>/; its earlier results when resuming."""
        config = self.config
        ab_config = ABConfig(output_dir=str(self.out), name=name, resume=config.resume, device=config.device,
                             dtype=config.dtype, dataset=config.eval_dataset, split=config.eval_split,
                             samples=config.eval_samples, rounds=config.ab_test_rounds, seed=config.seed,
                             scorer=config.resolved_scorer, alpha=config.alpha,
                             improvement_threshold=config.improvement_threshold)
        results = run_ab(ab_config, arm_a, arm_b, samples=items)
        if results is None:
            raise Paused(f"the A/B test {name} was paused; continue with the same command and --resume true")
        print(f"\n[{name}]\n{summary(results)}")
        return results

    def collect_traces(self, items: list) -> dict:
        """Step 2: thought traces of the trace items; the correct ones of enough quality go to traces.jsonl."""
        config = self.config
        summary_path = self.out / "trace_quality.json"
        if config.resume and summary_path.is_file():
            return json.loads(summary_path.read_text())
        arm = self.thought_arm("traces", config.model, InjectorConfig(**{**asdict(config.thoughts),
                                                                         "show_thoughts": True}))
        arm.load(config.device, config.dtype)
        injector = ThoughtInjector(arm.sampler, arm.thought_tokens, arm.thoughts)
        qualities, kept = [], 0
        with JsonlWriter(self.out / "traces.jsonl") as writer:
            for index, sample in enumerate(items):
                gold = gold_ids(arm.sampler.tokenizer, sample.reference)
                for draw in range(config.traces_per_item):
                    trace = injector.generate(sample.prompt, config.max_new_tokens, config.temperature, config.top_p,
                                              seed=config.seed * 1_000_003 + index * 1009 + draw)
                    answer = arm.sampler.tokenizer.decode(trace.visible_ids, skip_special_tokens=True)
                    correct = score(config.resolved_scorer, answer, sample.reference, sample) == 1.0
                    quality = trace_quality(arm.loaded.model, trace, arm.thought_tokens, gold).mean
                    if quality is not None:
                        qualities.append(quality)
                    good = quality is None or config.min_trace_quality is None or quality >= config.min_trace_quality
                    if correct and trace.thoughts and good:
                        writer.write({"id": f"{sample.id}-{draw}", "prompt": sample.prompt,
                                      "completion": trace.text, "quality": quality})
                        kept += 1
        values = np.array(qualities) if qualities else np.zeros(0)
        result = {"traces": len(items) * config.traces_per_item, "with_thoughts": len(qualities), "kept": kept,
                  "min_trace_quality": config.min_trace_quality,
                  "quality": {"mean": float(values.mean()) if len(values) else None,
                              "quantiles": {str(q): float(np.quantile(values, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
                              if len(values) else {},
                              "values": [round(v, 5) for v in qualities]}}
        write_json_atomic(summary_path, result)
        print(f"\n[traces] {kept} of {result['traces']} traces kept; trace quality mean "
              f"{result['quality']['mean']}")
        return result

    def bake(self) -> str:
        """Step 3: the baking stage (star) on the kept traces; the baked model's directory."""
        from lightning_lab.quietstar.baking import fit_main

        config = self.config
        baked = self.out / "quietstar" / "bake" / "baked_model"
        if config.resume and (baked / "config.json").is_file():
            return str(baked)
        argv = ["fit", "--model.model", config.model, "--model.objective", "star",
                "--model.learning_rate", str(config.learning_rate), "--model.max_length", "1024",
                "--model.dtype", "bf16" if config.dtype == "bf16" else "fp32",
                "--data.train_path", str(self.out / "traces.jsonl"), "--data.batch_size", str(config.batch_size),
                "--trainer.max_epochs", str(config.epochs), "--trainer.enable_progress_bar", "false",
                "--trainer.accelerator", "cpu" if config.device in ("auto", "cpu") else config.device.split(":")[0],
                "--run.root", str(self.out), "--run.name", "bake"]
        if self.wandb is not None:  # the stage logs into the pipeline's W&B run
            argv += ["--trainer.logger", "lightning.pytorch.loggers.WandbLogger",
                     "--trainer.logger.project", config.wandb_project, "--trainer.logger.job_type", "quietstar"]
        if config.lora_rank:
            argv += ["--model.lora.rank", str(config.lora_rank), "--model.lora.alpha", str(2 * config.lora_rank)]
        if (baked.parent / "checkpoints" / "last.ckpt").is_file():
            argv += ["--ckpt_path", "last"]
        fit_main(argv)
        if not (baked / "config.json").is_file():  # the stage was paused (Ctrl+C): its checkpoint is kept
            raise Paused(f"baking paused before the end; continue with the same command and --resume true "
                            f"(checkpoint: {baked.parent / 'checkpoints' / 'last.ckpt'})")
        return str(baked)


def closing_summary(results: dict) -> str:
    """The seed's closing lines: winner, improvement, p-values, where the model was saved."""
    first = results["ab_thoughts"]
    lines = ["", "Quiet-STaR summary",
             f"  thoughts vs baseline: winner {first['winner'] or 'none'}, improvement {first['improvement']:+.3f} "
             f"(McNemar p={first['mcnemar_p']:.3g}, t-test p={first['ttest_p']})",
             f"  traces kept for baking: {results['traces']['kept']} of {results['traces']['traces']}"]
    if results["baked_model"] is None:
        lines.append(f"  not baked: {results['skipped_bake']}")
    else:
        baked = results["ab_baked"]
        lines += [f"  baked vs original: winner {baked['winner'] or 'none'}, improvement {baked['improvement']:+.3f} "
                  f"(McNemar p={baked['mcnemar_p']:.3g}, t-test p={baked['ttest_p']})",
                  f"  baked model saved to {results['baked_model']}"]
    return "\n".join(lines)


def bake_main(argv: list[str]) -> int:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="lab quietstar bake", description=QuietSTaRConfig.__doc__.split("\n")[0],
                            exit_on_error=False, default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of the keys below")
    parser.add_class_arguments(QuietSTaRConfig, as_group=False)
    try:
        namespace = parser.parse_args(argv)
    except argparse.ArgumentError as error:
        raise UserError(" ".join(str(error).split())) from None
    config = QuietSTaRConfig(**{f.name: namespace[f.name] for f in fields(QuietSTaRConfig)})
    try:
        results = QuietSTaRBaker(config).run()
    except Paused as pause:
        print(f"lab quietstar bake: {pause}", file=sys.stderr)
        return EXIT_PAUSED
    print(closing_summary(results))
    return 0
