"""The offline RAUQ commands: `lab rauq score`, `select-heads`, `fit-threshold`.

    lab rauq score --input pairs.jsonl --output scores.jsonl [--convention lm-polygraph] [--heads heads.json]
    lab rauq select-heads --calibration gsm8k_train.jsonl --num_examples 512 --output heads.json
    lab rauq fit-threshold --calibration gsm8k_train.jsonl --heads heads.json --output theta.json [--unit sequence]

``score`` and ``select-heads`` read prompt + completion pairs (JSONL or TSV, `heads.calibration_pairs`) and
run the shared teacher-forced scoring function over them (every head at once). ``fit-threshold`` greedy
decodes calibration problems through the sampler, capturing the heads file's heads, labels each output with
the task metric (``--scorer``) and fits theta on the running token-level RAUQ (``--unit token``, each token
labelled with its output's label; at most ``--max_samples`` of them, drawn at random over all outputs) or
on sequence scores (``--unit sequence``).
Every input is checked before the model loads; nothing already written is overwritten.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightning_lab.errors import UserError, check_input_file
from lightning_lab.loops import check_choice, check_count, check_device, check_number
from lightning_lab.rauq.controller import TRIGGERS, signal_trace
from lightning_lab.rauq.scoring import CONVENTIONS, default_alpha

SCORERS = ("exact", "numeric", "gsm8k", "math", "code")  # eval.metrics.score's names; or module:function
FILE_SPLITS = ("all", "dev", "test")  # what a local file offers (data/benchmarks.py)


@dataclass
class ModelOptions:
    """What every `lab rauq` command takes: the model, where it runs, and the recurrence's alpha."""

    model: str = "smollm2-135m"
    """model spec: alias, HF directory, .gguf, .ckpt or hub id"""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps"""
    dtype: str = "auto"
    """auto | fp32 | bf16 | fp16"""
    alpha: float | None = None
    """alpha of the recurrence (default: 0.5 for a model with a chat template, i.e. instruct; 0.2 for a base
    model; the seed used 0.3)"""

    def __post_init__(self) -> None:
        check_device(self.device, self.dtype)
        if self.alpha is not None:
            check_number("alpha", self.alpha, 0.0, 1.0)

    def load(self):
        """The model, and alpha resolved against it."""
        from lightning_lab.models.loading import load_causal_lm

        loaded = load_causal_lm(self.model, device=self.device, dtype=self.dtype)
        alpha = self.alpha if self.alpha is not None else default_alpha(bool(getattr(loaded.tokenizer,
                                                                                      "chat_template", None)))
        return loaded, alpha


def check_output(key: str, path: str) -> Path:
    """A file to create: given, new, in a directory that exists or can be made."""
    if not path:
        raise UserError(f"{key}: required (the file to write)")
    if Path(path).exists():
        raise UserError(f"{key}: {path} already exists (nothing is overwritten)")
    return Path(path)


def labeller(scorer: str):
    """``(completion, sample) -> bool`` for a scorer name of `eval.metrics.score` or ``module:function``
    (called as ``function(completion, reference, sample)``, truthy = correct)."""
    from lightning_lab.eval.metrics import score

    if scorer in SCORERS:
        return lambda completion, sample: score(scorer, completion, sample.reference, sample) > 0
    module_name, _, function_name = scorer.partition(":")
    if not function_name:
        raise UserError(f"scorer: {scorer!r} is not one of {', '.join(SCORERS)} nor module:function")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise UserError(f"scorer: cannot import {scorer!r} ({error})") from None
    return lambda completion, sample: bool(function(completion, sample.reference, sample))


# ---- score ----------------------------------------------------------------------------------------


@dataclass
class ScoreConfig(ModelOptions):
    input: str = ""
    """prompt + completion pairs (JSONL: prompt/question/problem + completion/reference/target/answer; or TSV)"""
    output: str = ""
    """JSONL to write: one line per pair (id, score, per-layer scores, heads, tokens)"""
    convention: str = "paper"
    """paper (a_{i,i-1}: the sub-diagonal of a full pass) | lm-polygraph (the reference code's reading)"""
    heads: str | None = None
    """a heads file (fixed heads); default: heads chosen per sequence as the paper does"""
    batch_size: int = 4
    """pairs per teacher-forced pass"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_input_file(self.input, "input:")
        check_output("output", self.output)
        check_choice("convention", self.convention, CONVENTIONS)
        check_count("batch_size", self.batch_size)
        if self.heads is not None:
            check_input_file(self.heads, "heads:")


def run_score(config: ScoreConfig) -> int:
    from lightning_lab.data.io import JsonlWriter
    from lightning_lab.rauq.heads import calibration_pairs
    from lightning_lab.rauq.scoring import completion_attention, score_sequence

    pairs = calibration_pairs(config.input)
    loaded, alpha = config.load()
    heads = heads_for(config.heads, loaded) if config.heads else None
    encode = _encoder(loaded)
    with JsonlWriter(config.output) as writer:
        for start in range(0, len(pairs), config.batch_size):
            batch = pairs[start:start + config.batch_size]
            rows = completion_attention(loaded.model, [encode(prompt) for _, prompt, _ in batch],
                                        [_completion_ids(loaded, completion) for *_, completion in batch],
                                        config.convention)
            for (pair_id, *_), (logprobs, attention) in zip(batch, rows):
                result = score_sequence(logprobs, attention, alpha, config.convention,
                                        heads=heads.heads if heads else None)
                writer.write({"id": pair_id, "score": result.score, "layer_scores": result.layer_scores,
                              "heads": result.heads, "num_tokens": len(logprobs), "alpha": alpha,
                              "convention": config.convention})
    print(f"scored {len(pairs)} pairs -> {config.output}")
    return 0


# ---- select-heads -----------------------------------------------------------------------------------


@dataclass
class SelectHeadsConfig(ModelOptions):
    calibration: str = ""
    """prompt + completion pairs (JSONL or TSV; GSM8K/MATH records use their full solution)"""
    split: str = "all"
    """all, or the dev or test half of the file (data/benchmarks.py): keep calibration and evaluation apart"""
    num_examples: int = 512
    """pairs used (a fixed seed-0 choice from the split)"""
    output: str = ""
    """heads file (JSON) to write"""
    convention: str = "paper"
    """which a_{i,i-1} reading the heads are chosen on (paper | lm-polygraph)"""
    batch_size: int = 4
    """pairs per teacher-forced pass"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_input_file(self.calibration, "calibration:")
        check_output("output", self.output)
        check_count("num_examples", self.num_examples)
        check_choice("split", self.split, FILE_SPLITS)
        check_choice("convention", self.convention, CONVENTIONS)
        check_count("batch_size", self.batch_size)


def run_select_heads(config: SelectHeadsConfig) -> int:
    from lightning_lab.models.scoring import pretrained_model
    from lightning_lab.rauq.heads import HeadSelection, HeadsFile, calibration_pairs, file_hash
    from lightning_lab.rauq.scoring import completion_attention, middle_layers

    pairs = calibration_pairs(config.calibration, config.split, config.num_examples)
    loaded, alpha = config.load()
    model_config = pretrained_model(loaded.model).config.get_text_config(decoder=True)
    num_layers, num_heads = model_config.num_hidden_layers, model_config.num_attention_heads
    selection = HeadSelection(num_layers, num_heads)
    encode = _encoder(loaded)
    for start in range(0, len(pairs), config.batch_size):
        batch = pairs[start:start + config.batch_size]
        rows = completion_attention(loaded.model, [encode(prompt) for _, prompt, _ in batch],
                                    [_completion_ids(loaded, completion) for *_, completion in batch],
                                    config.convention)
        for _, attention in rows:
            selection.add(attention)
    layers = middle_layers(num_layers)
    heads = HeadsFile(selection.heads(layers), layers, alpha, loaded.spec, num_layers, num_heads, config.convention,
                      file_hash(config.calibration), len(pairs))
    heads.save(config.output)
    print(f"heads over {len(pairs)} pairs ({selection.count} tokens): " +
          ", ".join(f"{layer}:{head}" for layer, head in heads.heads.items()) + f" -> {config.output}")
    return 0


# ---- fit-threshold -----------------------------------------------------------------------------------


@dataclass
class FitThresholdConfig(ModelOptions):
    calibration: str = ""
    """calibration problems with references (gsm8k JSONL, MATH JSONL, pairs JSONL/TSV)"""
    heads: str = ""
    """heads file from `lab rauq select-heads`"""
    split: str = "all"
    """all, or the dev or test half of the file (data/benchmarks.py): keep calibration and evaluation apart"""
    num_examples: int = 512
    """most calibration problems decoded (a fixed seed-0 choice from the split)"""
    max_samples: int = 2048
    """most tokens (unit token) or outputs (unit sequence) fitted on: a seeded random draw over all outputs"""
    seed: int = 0
    """seed of that draw"""
    trigger: str = "rauq"
    """the signal theta is for: rauq (running RAUQ) | entropy | margin (1 - top-2 margin)"""
    unit: str = "token"
    """token: the signal the trigger compares, at every token | sequence: one score per output"""
    scorer: str = "gsm8k"
    """exact | numeric | gsm8k | math | code | module:function: labels each output correct or wrong"""
    max_new_tokens: int = 256
    """greedy tokens per calibration output"""
    batch_size: int = 8
    """problems decoded together"""
    output: str = ""
    """theta file (JSON) to write"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_input_file(self.calibration, "calibration:")
        check_input_file(self.heads, "heads:")
        check_output("output", self.output)
        for key in ("num_examples", "max_samples", "max_new_tokens", "batch_size"):
            check_count(key, getattr(self, key))
        check_choice("split", self.split, FILE_SPLITS)
        check_choice("unit", self.unit, ("token", "sequence"))
        check_choice("trigger", self.trigger, TRIGGERS)
        labeller(self.scorer)


def run_fit_threshold(config: FitThresholdConfig) -> int:
    from lightning_lab.data.benchmarks import load_benchmark
    from lightning_lab.rauq.heads import file_hash
    from lightning_lab.rauq.threshold import Threshold, fit_threshold
    from lightning_lab.sampling.sampler import Sampler

    samples = load_benchmark(config.calibration, split=config.split, limit=config.num_examples)
    label = labeller(config.scorer)
    loaded, alpha = config.load()
    heads = heads_for(config.heads, loaded)
    sampler = Sampler(loaded)
    scores, wrong, outputs = [], [], 0
    for start in range(0, len(samples), config.batch_size):
        batch = samples[start:start + config.batch_size]
        generation = sampler.generate([sample.prompt for sample in batch], greedy=True, logprobs=True, entropy=True,
                                      margin=True, max_new_tokens=config.max_new_tokens, capture_heads=heads.pairs,
                                      batch_size=config.batch_size)
        for sample, (completion,) in zip(batch, generation.completions):
            if not completion.token_ids:
                continue
            trace = signal_trace(completion, config.trigger, alpha, len(heads.pairs))
            is_wrong = not label(completion.text, sample)
            # a sequence: RAUQ's score is the running score at its last token; entropy and margin average
            sequence = trace[-1] if config.trigger == "rauq" else sum(trace) / len(trace)
            values = trace if config.unit == "token" else [sequence]
            scores += values
            wrong += [is_wrong] * len(values)
            outputs += 1
    # at most max_samples of them, drawn at random (seeded) so that every output can contribute
    keep = np.sort(np.random.default_rng(config.seed).permutation(len(scores))[:config.max_samples])
    scores, wrong = np.array(scores)[keep], np.array(wrong)[keep]
    fit = fit_threshold(scores, wrong)
    threshold = Threshold(trigger=config.trigger, unit=config.unit, num_outputs=outputs, alpha=alpha, model=loaded.spec,
                          heads_hash=file_hash(config.heads), data_hash=file_hash(config.calibration), **fit)
    threshold.save(config.output)
    print(f"theta = {threshold.theta:.4f} ({config.trigger}, {config.unit} unit, {threshold.num_samples} samples "
          f"from {outputs} "
          f"outputs, {threshold.num_wrong} wrong; AUROC {threshold.auroc:.3f}, Youden J {threshold.youden_j:.3f}) "
          f"-> {config.output}")
    return 0


# ---- shared pieces -----------------------------------------------------------------------------------


def heads_for(path: str, loaded):
    """The heads file, refused if it was chosen for another model."""
    from lightning_lab.models.scoring import pretrained_model
    from lightning_lab.rauq.heads import load_heads

    model_config = pretrained_model(loaded.model).config.get_text_config(decoder=True)
    return load_heads(path, loaded.spec, model_config.num_hidden_layers, model_config.num_attention_heads)


def _encoder(loaded):
    from lightning_lab.sampling.prompts import encode_prompt

    return lambda prompt: encode_prompt(loaded.tokenizer, prompt)


def _completion_ids(loaded, text: str) -> list[int]:
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
