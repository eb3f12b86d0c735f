"""ACE loops: `lab ace run` (one pass, baseline or ACE) and `lab ace epochs` (baseline, then ACE epochs).

A pass goes through items in batches of ``batch_size``. For each batch the generator answers every item
with the playbook bullets retrieved for it (none in baseline mode); those answers are the predictions
that are scored and written. In ACE mode the reflector then reviews every ``reflect_every``-th item
(up to ``reflection_rounds`` rounds: reflect, regenerate with the reflection, stop once correct; without
ground truth, once the output's form is right), its tags update the used bullets' counters (a used
bullet the reflector did not tag counts as helpful when the answer was correct and harmful when it was
wrong; without ground truth as neutral), its specific lessons go to the curator, whose operations for
the whole batch are merged by `Playbook.apply`; the playbook is saved after every batch. So in `run`
and in online epochs each item is predicted before the playbook learns from it.

`epochs`: epoch 0 is the baseline. Offline (default), the items are split by seed into train / val /
test; each ACE epoch adapts the playbook on train, then scores it frozen on val and test; the playbook
of the best val epoch is kept (``playbook_best.jsonl``) and reported. ``online=true``: each epoch is one
ACE pass over all items, predicting each before updating on it. The summary gives, per epoch, the test
accuracy with an exact McNemar p-value against epoch 0 on the same items, token F1, generation and
reflection latency p50/p95/p99 and the playbook's size.

A run writes ``runs/ace/<name>/`` (`lightning_lab.loops`): config.yaml, results.jsonl (one line per
item and pass; a rerun with ``--resume true`` skips them and continues the saved playbook),
_run_tracker/, the CSVs (one per pass; `run` also writes ``--output_path``), playbook.jsonl (or
``--playbook_path``), and for epochs playbook_epoch<k>.jsonl, playbook_best.jsonl, epoch_summary.csv/.md.
Ctrl+C (or SIGTERM) pauses at the next batch boundary (exit status 3); the counters in a resumed run's
summaries count the work done since it resumed.
"""

from __future__ import annotations

import csv
import io
import math
import random
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lightning_lab.ace import roles
from lightning_lab.ace.playbook import Delta, Playbook
from lightning_lab.ace.tasks import Item, load_items, score_answer, task_path
from lightning_lab.callbacks.pause import PauseFlag
from lightning_lab.data.io import read_jsonl, write_text_atomic
from lightning_lab.errors import UserError, check_new_output_file
from lightning_lab.eval.metrics import latency_stats, token_f1
from lightning_lab.eval.stats import mcnemar_exact
from lightning_lab.loops import (LoopConfig, LoopRun, check_choice, check_count, check_number, check_sampling,
                                 engine_info)

# The seed's model names: each maps to its hub id (loaded from the local Hugging Face cache, or downloaded
# only when the hub is reachable; offline and uncached, the load fails at once naming the alias).
SEED_MODELS = {
    "tiny-gpt2": "sshleifer/tiny-gpt2",
    "phi3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B-Instruct",
}
CORE_COLUMNS = ["model_id", "task_name", "domain", "mode", "sample_id", "gold", "pred", "latency_ms"]
EXTRA_COLUMNS = ["question", "context", "correct", "f1", "split", "bullets_used"]
ACE_COLUMNS = ["reflection_latency_ms", "reflected", "epoch", "playbook_size"]
GENERATOR_STOP = ("\nReasoning:", "\nQuestion:")  # a small model that answered starts the format over
ANSWER_LINE = re.compile(r"(?im)^\W*answer\W*:")
LINE_TOKENS = 48  # new tokens of a one-line continuation (the answer, the bullet ids)


@dataclass
class AceConfig(LoopConfig):
    """What every ACE loop takes."""

    output_dir: str = "runs/ace"
    """runs go to <output_dir>/<name>/"""
    model_id: str = "smollm2-135m"
    """generator model: smollm2-135m, a seed alias (tiny-gpt2, phi3-mini, llama-3.2-1b, mistral-7b, llama-3-8b),
    a hub id, a local HF directory, a .gguf or a lab .ckpt"""
    reflector_model: str | None = None
    """the reflector's and curator's model (default: the generator's)"""
    task_name: str | None = None
    """a registered task: tatqa_tiny | medqa_tiny | iot_tiny (or give dataset_path)"""
    dataset_path: str | None = None
    """a task file: the seed's JSON list of {id, question, answer, context, domain}, or a GSM8K/pairs JSONL"""
    domain: str | None = None
    """domain of the items (default: the task's, or each item's own)"""
    dataset_split: str = "all"
    """all | dev | test: for a JSONL dataset_path, the fixed half that lightning_lab.data.benchmarks cuts
    (GSM8K's train.jsonl: dev = a seed-0 half of it)"""
    limit: int | None = None
    """use this many items, a fixed seeded subset (default: all)"""
    seed: int = 0
    """seed of the subset, the splits and sampling"""
    batch_size: int = 8
    """items answered per generate call; the playbook updates after each batch"""
    top_k: int = 20
    """playbook bullets retrieved (TF-IDF) into each generator prompt"""
    embedding_model: str | None = None
    """retrieve by the cosine of this model's mean last hidden states instead of TF-IDF (any model spec)"""
    token_budget: int = 600
    """the playbook's rendered size, in generator tokens, is held at or under this"""
    merge_threshold: float = 0.8
    """TF-IDF cosine similarity at which two bullets are merged as near-duplicates"""
    prune_below: int = -3
    """a bullet whose helpful - harmful falls to this or lower is removed"""
    reflection_rounds: int = 1
    """reflect and regenerate up to this many rounds per item, stopping once correct"""
    reflect_every: int = 1
    """run the reflector on every n-th item of a pass"""
    ground_truth: bool = True
    """the reflector sees the gold answer; false (--no-ground-truth) gives it only feedback on the output's form"""
    max_new_tokens: int = 160
    """generator tokens per answer"""
    reflector_max_new_tokens: int = 160
    """reflector and curator tokens per call"""
    temperature: float = 0.0
    """sampling temperature of every role; 0 decodes greedily"""
    top_p: float = 1.0
    """nucleus sampling of every role (with temperature > 0)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.task_name is None) == (self.dataset_path is None):
            raise UserError("task_name / dataset_path: give exactly one (--task_name tatqa_tiny, or "
                            "--dataset_path FILE [--domain NAME])")
        if self.limit is not None:
            check_count("limit", self.limit)
        for key in ("batch_size", "top_k", "token_budget", "reflection_rounds", "reflect_every", "max_new_tokens",
                    "reflector_max_new_tokens"):
            check_count(key, getattr(self, key))
        check_number("merge_threshold", self.merge_threshold, 0.0, 1.0, low_open=True)
        check_sampling(self.temperature, self.top_p)
        check_choice("dataset_split", self.dataset_split, ("all", "dev", "test"))


@dataclass
class RunConfig(AceConfig):
    """One pass over the items, baseline or ACE."""

    mode: str = "baseline"
    """baseline (no playbook) | ace (generator -> reflector -> curator, updating the playbook)"""
    playbook_path: str | None = None
    """the playbook to start from and to update (created if missing; default: <run>/playbook.jsonl)"""
    output_path: str | None = None
    """also write the result CSV here (a new file)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("mode", self.mode, ("baseline", "ace"))
        if self.output_path is not None and not self.resume:
            check_new_output_file(self.output_path, "output_path")


@dataclass
class EpochsConfig(AceConfig):
    """Epoch 0 baseline, then ACE epochs: offline (train/val/test) or online."""

    epochs: int = 3
    """ACE epochs after the baseline epoch 0"""
    online: bool = False
    """each epoch predicts every item before updating on it (no splits)"""
    train_fraction: float = 0.5
    """offline: the share of items the playbook adapts on"""
    val_fraction: float = 0.25
    """offline: the share that picks the best epoch's playbook; the rest is the test split"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("epochs", self.epochs)
        check_number("train_fraction", self.train_fraction, 0.0, 1.0, low_open=True)
        check_number("val_fraction", self.val_fraction, 0.0, 1.0, low_open=True)
        if self.train_fraction + self.val_fraction >= 1.0:
            raise UserError(f"train_fraction + val_fraction must leave a test split; got "
                            f"{self.train_fraction} + {self.val_fraction}")


# ---- inputs ------------------------------------------------------------------------------------


def task_items(config: AceConfig) -> tuple[str, list[Item]]:
    """The task's name and its items (domain filled in, the seeded subset of `limit`)."""
    if config.task_name is not None:
        path, domain = task_path(config.task_name)
        name = config.task_name
    else:
        path, domain, name = Path(config.dataset_path), None, Path(config.dataset_path).stem
    items = load_items(path, config.domain or domain, config.dataset_split)
    if config.limit is not None and config.limit < len(items):
        keep = sorted(random.Random(config.seed).sample(range(len(items)), config.limit))
        items = [items[i] for i in keep]
    return name, items


def split_items(items: list[Item], config: EpochsConfig) -> dict[str, list[Item]]:
    """Disjoint train / val / test splits by a seeded shuffle of the ids (each keeps file order)."""
    if len(items) < 3:
        raise UserError(f"epochs: offline needs at least 3 items for train/val/test, got {len(items)} "
                        "(raise --limit, or pass --online true)")
    ids = sorted(item.id for item in items)
    random.Random(config.seed).shuffle(ids)
    n_train = max(1, round(len(ids) * config.train_fraction))
    n_val = max(1, min(len(ids) - n_train - 1, round(len(ids) * config.val_fraction)))
    part = {i: "train" for i in ids[:n_train]} | {i: "val" for i in ids[n_train:n_train + n_val]}
    return {split: [item for item in items if part.get(item.id, "test") == split] for split in ("train", "val", "test")}


def load_model(model_id: str, device: str, dtype: str):
    """`load_causal_lm` of a model id, the seed's aliases mapped to hub ids; a failed load names the alias."""
    from lightning_lab.models.loading import ModelLoadError, load_causal_lm

    hub_id = SEED_MODELS.get(model_id)
    try:
        return load_causal_lm(hub_id or model_id, device=device, dtype=dtype)
    except ModelLoadError as error:
        if hub_id is None:
            raise
        raise ModelLoadError(f"model_id {model_id!r} (the seed's alias of {hub_id}): {error}") from None


# ---- roles on the sampler ------------------------------------------------------------------------


@dataclass
class Roles:
    """The samplers and decoding settings of the three roles."""

    generator: object  # Sampler
    reflector: object  # Sampler (the generator's when no reflector_model is given)
    config: AceConfig
    embed: object = None  # HiddenStateEmbedder for retrieval; None: TF-IDF

    def _call(self, sampler, prompts: list[str], max_new_tokens: int, primes: list[str],
              stop: tuple[str, ...] = ()) -> list[tuple[str, float]]:
        """One batched generate; reply i starts with ``primes[i]`` (written after the chat template's assistant
        turn, so the model continues the asked format) and is returned with it."""
        if not prompts:
            return []
        config = self.config
        tokenizer = sampler.tokenizer
        if getattr(tokenizer, "chat_template", None):
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True) + prime
                     for prompt, prime in zip(prompts, primes)]
        else:
            texts = [f"{prompt}\n\n{prime}" for prompt, prime in zip(prompts, primes)]
        out = sampler.generate(texts, n=1, max_new_tokens=max_new_tokens, temperature=config.temperature,
                               top_p=config.top_p, greedy=config.temperature == 0, seed=config.seed,
                               stop=list(stop), chat=False, batch_size=len(prompts))
        return [(prime + result.completions[0].text, result.completions[0].seconds)
                for prime, result in zip(primes, out.prompts)]

    def _continue(self, sampler, prompts: list[str], texts: list[str], seconds: list[float], label: str,
                  rows: list[int], max_new_tokens: int, stop: tuple[str, ...]) -> None:
        """Rows `rows` of the replies `texts` go on with `label` and what the model writes after it."""
        replies = self._call(sampler, [prompts[j] for j in rows], max_new_tokens, [texts[j] + label for j in rows],
                             stop)
        for j, (text, spent) in zip(rows, replies):
            texts[j], seconds[j] = text, seconds[j] + spent

    def answer(self, items: list[Item], views: list[list], playbook: Playbook,
               reflections: list[str] | None = None) -> list[roles.Answer]:
        """The reply is primed with "Reasoning:"; a reply that ends without naming its bullets (when some were
        shown) or without an "Answer:" line is continued with those labels, one line each: SmolLM2-135M
        wrote one sentence of reasoning and stopped in 8 of 8 replies on iot_tiny."""
        prompts = [roles.generator_prompt(item, playbook.render(view), reflection)
                   for item, view, reflection in zip(items, views, reflections or [""] * len(items))]
        texts, seconds, every = [""] * len(prompts), [0.0] * len(prompts), list(range(len(prompts)))
        self._continue(self.generator, prompts, texts, seconds, "Reasoning:", every, self.config.max_new_tokens,
                       GENERATOR_STOP)
        unanswered = [j for j in every if not ANSWER_LINE.search(texts[j])]
        self._continue(self.generator, prompts, texts, seconds, "\nBullets used:",
                       [j for j in unanswered if views[j] and "bullets used" not in texts[j].lower()],
                       LINE_TOKENS, ("\n",))
        self._continue(self.generator, prompts, texts, seconds, "\nAnswer:", unanswered, LINE_TOKENS, ("\n",))
        answers = []
        for item, view, text, spent in zip(items, views, texts, seconds):
            answer = roles.parse_answer(text, item, [entry.id for entry in view])
            answer.seconds = spent
            answers.append(answer)
        return answers

    def reflect(self, items: list[Item], answers: list[roles.Answer], used: list[list], correct: list[bool]
                ) -> list[roles.Reflection]:
        """The reply is written one labelled line at a time (Diagnosis, Lesson, and Bullet tags where bullets
        were used), each call continuing the last: a small model asked for all three at once writes the first
        and then rambles (SmolLM2-135M on tatqa_tiny wrote no Lesson line in 8 of 8 replies)."""
        prompts = [roles.reflector_prompt(item, answer, entries, self.config.ground_truth, ok)
                   for item, answer, entries, ok in zip(items, answers, used, correct)]
        texts, seconds, every = [""] * len(prompts), [0.0] * len(prompts), list(range(len(prompts)))
        for label, rows in (("Diagnosis:", every), ("\nLesson:", every), ("\nBullet tags:", [j for j in every if used[j]])):
            self._continue(self.reflector, prompts, texts, seconds, label, rows, self.config.reflector_max_new_tokens,
                           ("\n",))
        reflections = []
        for entries, text, spent in zip(used, texts, seconds):
            reflection = roles.parse_reflection(text, [entry.id for entry in entries])
            reflection.seconds = spent
            reflections.append(reflection)
        return reflections

    def curate(self, items: list[Item], lessons: list[list[str]], playbook: Playbook) -> list[roles.Curation]:
        prompts = [roles.curator_prompt(item, item_lessons, playbook.retrieve(" ".join(item_lessons), 5, self.embed),
                                        playbook)
                   for item, item_lessons in zip(items, lessons)]
        curations = []
        for text, seconds in self._call(self.reflector, prompts, self.config.reflector_max_new_tokens,
                                        [""] * len(prompts)):
            curation = roles.parse_curation(text)
            curation.seconds = seconds
            curations.append(curation)
        return curations


# ---- one pass ------------------------------------------------------------------------------------


@dataclass
class Pass:
    """One pass over items: its key in results.jsonl, what it does, and where its CSV goes."""

    name: str  # e.g. "epoch1/train"
    items: list[Item]
    mode: str  # baseline | ace
    learn: bool  # update the playbook (ACE mode only)
    split: str
    epoch: int | None
    csv_path: Path


def is_ok(item: Item, answer: roles.Answer, ground_truth: bool) -> bool:
    """Correct (with ground truth), or without it: an output whose form draws no feedback."""
    return score_answer(answer.answer, item.answer) if ground_truth else not roles.feedback(item, answer)


class Paused(Exception):
    """Ctrl+C / SIGTERM asked for a pause; raised between batches (the run resumes with --resume true)."""


def run_pass(run: LoopRun, roles_: Roles, playbook: Playbook, save_playbook, step: Pass, meta: dict,
             stats: Counter, pause: PauseFlag) -> list[dict]:
    """Answer (and in ACE mode learn from) the items of `step` not yet in results.jsonl; returns all its rows."""
    config = roles_.config
    done = run.done
    for start in range(0, len(step.items), config.batch_size):
        batch = [(start + offset, item) for offset, item in enumerate(step.items[start:start + config.batch_size])
                 if f"{step.name}/{item.id}" not in done]
        if not batch:
            continue
        if pause.requested:
            raise Paused
        indices, items = [index for index, _ in batch], [item for _, item in batch]
        views = [playbook.retrieve(f"{item.question} {item.context}", config.top_k, roles_.embed)
                 if step.mode == "ace" else []
                 for item in items]
        size = len(playbook) if step.mode == "ace" else 0
        answers = roles_.answer(items, views, playbook)
        stats["generator_unparsed"] += sum(not answer.parsed for answer in answers)
        reflect_seconds = [0.0] * len(items)
        reflections: list[str | None] = [None] * len(items)
        if step.learn:
            chosen = [j for j, index in enumerate(indices) if index % config.reflect_every == 0]
            seconds, texts = learn_from_batch(roles_, playbook, [items[j] for j in chosen],
                                              [answers[j] for j in chosen], [views[j] for j in chosen], stats)
            save_playbook()
            for j, spent, text in zip(chosen, seconds, texts):
                reflect_seconds[j], reflections[j] = spent, text
        for j, item in enumerate(items):
            answer = answers[j]
            run.write({"id": f"{step.name}/{item.id}", "pass": step.name, **meta, "domain": item.domain,
                       "mode": step.mode, "sample_id": item.id, "gold": item.answer, "pred": answer.answer,
                       "latency_ms": round(answer.seconds * 1000, 1), "question": item.question,
                       "context": item.context, "correct": score_answer(answer.answer, item.answer),
                       "f1": round(token_f1(answer.answer, item.answer), 4), "split": step.split,
                       "bullets_used": " ".join(answer.bullet_ids),
                       "reflection_latency_ms": round(reflect_seconds[j] * 1000, 1),
                       "reflected": reflections[j] is not None, "epoch": step.epoch, "playbook_size": size,
                       "output": answer.output, "reflection": reflections[j]})
    rows = pass_rows(run, step.name)
    write_csv(step.csv_path, rows, ace=step.mode == "ace" or step.epoch is not None)
    return rows


def learn_from_batch(roles_: Roles, playbook: Playbook, items: list[Item], answers: list[roles.Answer],
                     views: list[list], stats: Counter) -> tuple[list[float], list[str]]:
    """Reflect (rounds), tag the used bullets, curate the specific lessons, merge all deltas of the batch.
    Returns each item's reflection + regeneration + curation seconds, and its first reflection's text."""
    config = roles_.config
    seconds = [0.0] * len(items)
    texts = [""] * len(items)
    used = [[entry for entry in view if entry.id in answer.bullet_ids] for view, answer in zip(views, answers)]
    first_correct = [score_answer(answer.answer, item.answer) for item, answer in zip(items, answers)]
    lessons: list[list[str]] = [[] for _ in items]
    tags: dict[str, str] = {}
    current, pending = list(answers), list(range(len(items)))
    for round_ in range(config.reflection_rounds):
        reflections = roles_.reflect([items[j] for j in pending], [current[j] for j in pending],
                                     [used[j] if round_ == 0 else [] for j in pending],
                                     [score_answer(current[j].answer, items[j].answer) for j in pending])
        retry = []
        for j, reflection in zip(pending, reflections):
            seconds[j] += reflection.seconds
            texts[j] = texts[j] or reflection.output
            stats["reflections"] += 1
            stats["reflection_unparsed"] += not reflection.parsed
            lessons[j] += reflection.lessons
            if round_ == 0:
                for entry in used[j]:
                    tag = reflection.tags.get(entry.id)
                    if tag is None:
                        tag = ("helpful" if first_correct[j] else "harmful") if config.ground_truth else "neutral"
                        stats["tags_from_outcome"] += 1
                    else:
                        stats["tags_from_reflector"] += 1
                    tags[entry.id] = tag if entry.id not in tags or tags[entry.id] == tag else "neutral"
            if not is_ok(items[j], current[j], config.ground_truth):
                retry.append((j, reflection.diagnosis or reflection.output.strip()[:600]))
        if not retry:
            break
        regenerated = roles_.answer([items[j] for j, _ in retry], [views[j] for j, _ in retry], playbook,
                                    [diagnosis for _, diagnosis in retry])
        stats["regenerations"] += len(retry)
        pending = []
        for (j, _), answer in zip(retry, regenerated):
            seconds[j] += answer.seconds
            current[j] = answer
            if is_ok(items[j], answer, config.ground_truth):
                stats["fixed_by_reflection"] += 1
            else:
                pending.append(j)
        if not pending:
            break
    playbook.tag(tags)
    specific = []
    for item, item_lessons in zip(items, lessons):
        unique = list(dict.fromkeys(item_lessons))
        specific_ = [lesson for lesson in unique if roles.is_specific(lesson, item)]
        kept = [lesson for lesson in specific_ if not roles.leaks_answer(lesson, item)]
        stats["lessons"] += len(kept)
        stats["lessons_generic"] += len(unique) - len(specific_)
        stats["lessons_leaking_answer"] += len(specific_) - len(kept)
        specific.append(kept)
    curated = [j for j, kept in enumerate(specific) if kept]
    curations = roles_.curate([items[j] for j in curated], [specific[j] for j in curated], playbook)
    deltas: list[Delta] = []
    for j, curation in zip(curated, curations):
        seconds[j] += curation.seconds
        if not curation.parsed:  # the lessons go in as they are: the curator's reply could not be read
            stats["curator_unparsed"] += 1
            deltas += [Delta("ADD", lesson) for lesson in specific[j]]
            continue
        for delta in curation.deltas:
            if delta.op in ("ADD", "UPDATE") and (not roles.is_specific(delta.content, items[j])
                                                  or roles.leaks_answer(delta.content, items[j])):
                stats["operations_filtered"] += 1
            else:
                deltas.append(delta)
    report = playbook.apply(deltas)
    for key in ("added", "updated", "removed", "merged", "pruned", "over_budget"):
        stats[f"playbook_{key}"] += getattr(report, key)
    stats["operations_skipped"] += len(report.skipped)
    return seconds, texts


# ---- results -------------------------------------------------------------------------------------


def pass_rows(run: LoopRun, pass_name: str) -> list[dict]:
    return [record for _, record in read_jsonl(run.results_path)
            if record.get("pass") == pass_name and "sample_id" in record]


def write_csv(path: Path, rows: list[dict], ace: bool) -> None:
    """The seed's result CSV: core columns, then question/context/correct (+ f1, split, bullets_used),
    then in ACE mode reflection_latency_ms, reflected, epoch, playbook_size."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CORE_COLUMNS + EXTRA_COLUMNS + (ACE_COLUMNS if ace else []),
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


def pass_summary(rows: list[dict]) -> dict:
    """Accuracy, mean token F1, latency percentiles (generation; reflection where any ran)."""
    summary = {"num_samples": len(rows), "accuracy": sum(bool(r["correct"]) for r in rows) / max(1, len(rows)),
               "f1": sum(float(r["f1"]) for r in rows) / max(1, len(rows))}
    if rows:
        latency = latency_stats([float(r["latency_ms"]) for r in rows])
        summary |= {f"latency_{k}_ms": round(v, 1) for k, v in latency.items()}
        reflected = [float(r["reflection_latency_ms"]) for r in rows if r.get("reflected")]
        if reflected:
            summary |= {f"reflection_{k}_ms": round(v, 1) for k, v in latency_stats(reflected).items()}
    return summary


def describe(name: str, summary: dict, playbook: Playbook | None = None) -> str:
    line = (f"{name}: accuracy {summary['accuracy']:.3f} ({summary['num_samples']} items), F1 {summary['f1']:.3f}, "
            f"latency p50/p95/p99 {summary.get('latency_p50_ms', 0):.0f}/{summary.get('latency_p95_ms', 0):.0f}/"
            f"{summary.get('latency_p99_ms', 0):.0f} ms")
    if "reflection_p50_ms" in summary:
        line += (f", reflection p50/p95/p99 {summary['reflection_p50_ms']:.0f}/{summary['reflection_p95_ms']:.0f}/"
                 f"{summary['reflection_p99_ms']:.0f} ms")
    if playbook is not None:
        line += f", playbook {len(playbook)} bullets / {playbook.tokens()} tokens"
    return line


# ---- the loops ---------------------------------------------------------------------------------


def open_roles(config: AceConfig) -> Roles:
    from lightning_lab.sampling.sampler import Sampler

    models = {}  # each model id loaded once, shared by every role that names it

    def model(model_id: str):
        if model_id not in models:
            models[model_id] = load_model(model_id, config.device, config.dtype)
        return models[model_id]

    # keep_prefix: the playbook's KV cache, computed for one call, serves the next calls that show it (the
    # continuations of a batch, every batch of a frozen pass); the roles never change the model's weights
    generator = Sampler(model(config.model_id), keep_prefix=True)
    reflector = generator
    if config.reflector_model not in (None, config.model_id):
        reflector = Sampler(model(config.reflector_model), keep_prefix=True)
    for sampler in {id(generator): generator, id(reflector): reflector}.values():
        sampler.generate("Hello", max_new_tokens=2, greedy=True)  # one-time costs (kernel load) stay out of latency
    embed = None
    if config.embedding_model is not None:
        embed = HiddenStateEmbedder(model(config.embedding_model))
    return Roles(generator, reflector, config, embed)


class HiddenStateEmbedder:
    """Texts -> the mean of a model's last hidden states over their tokens, for retrieval by embedding.
    Vectors are kept by text, so each playbook entry is embedded once."""

    def __init__(self, loaded):
        self.model, self.tokenizer, self.vectors = loaded.model, loaded.tokenizer, {}

    def __call__(self, texts: list[str]):
        import numpy as np
        import torch

        for text in dict.fromkeys(texts):
            if text not in self.vectors:  # one text per forward pass: no padding to mask out
                ids = self.tokenizer(text or " ", return_tensors="pt").input_ids.to(self.model.device)
                with torch.inference_mode():
                    hidden = self.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
                self.vectors[text] = hidden.float().mean(0).cpu().numpy()
        return np.stack([self.vectors[text] for text in texts])


def new_playbook(config: AceConfig, path: Path, tokenizer) -> Playbook:
    """The playbook at `path` (a resumed run's, or the one --playbook_path names), else an empty one; its
    token budget counted in the generator's tokens."""
    settings = {"token_budget": config.token_budget, "merge_threshold": config.merge_threshold,
                "prune_below": config.prune_below,
                "count_tokens": lambda text: len(tokenizer.encode(text, add_special_tokens=False))}
    return Playbook.load(path, **settings) if path.is_file() else Playbook(**settings)


def run(config: RunConfig) -> int:
    task_name, items = task_items(config)
    with LoopRun(config, method="ace") as loop, PauseFlag() as pause:
        roles_ = open_roles(config)
        playbook_path = Path(config.playbook_path) if config.playbook_path else loop.directory / "playbook.jsonl"
        playbook = new_playbook(config, playbook_path, roles_.generator.tokenizer)
        loop.start(total=len(items), header={"task_name": task_name, "engine": engine_info(roles_.generator)})
        step = Pass("run", items, config.mode, config.mode == "ace", "all", None, loop.directory / "results.csv")
        stats: Counter = Counter()
        try:
            rows = run_pass(loop, roles_, playbook, lambda: playbook.save(playbook_path), step,
                            {"model_id": config.model_id, "task_name": task_name}, stats, pause)
        except Paused:
            print(f"paused; continue with: {loop.resume_command('lab ace run')}")
            return loop.pause()
        if config.output_path:
            write_csv(Path(config.output_path), rows, ace=config.mode == "ace")
        summary = pass_summary(rows)
        loop.writer.write({"kind": "summary", "of": "run", **summary, **stats})
        print(describe(f"{task_name} {config.mode} ({config.model_id})", summary,
                       playbook if config.mode == "ace" else None))
        if stats:
            print("counts: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
        print(f"results: {step.csv_path}" + (f" and {config.output_path}" if config.output_path else ""))
    return loop.exit_status


def epochs(config: EpochsConfig) -> int:
    task_name, items = task_items(config)
    splits = {"all": items} if config.online else split_items(items, config)
    test_split = "all" if config.online else "test"
    with LoopRun(config, method="ace") as loop, PauseFlag() as pause:
        roles_ = open_roles(config)
        directory = loop.directory
        playbook_path = directory / "playbook.jsonl"
        playbook = new_playbook(config, playbook_path, roles_.generator.tokenizer)
        per_epoch = len(items)  # online: every item once; offline: train + val + test
        loop.start(total=len(splits[test_split]) + config.epochs * per_epoch,
                   header={"task_name": task_name, "engine": engine_info(roles_.generator),
                           "splits": {k: [i.id for i in v] for k, v in splits.items()}})
        meta = {"model_id": config.model_id, "task_name": task_name}

        def one_pass(name: str, split: str, epoch: int, learn: bool, csv_path: Path) -> list[dict]:
            step = Pass(f"epoch{epoch}/{name}", splits[split], "ace" if epoch else "baseline", learn, split, epoch,
                        csv_path)
            return run_pass(loop, roles_, playbook, lambda: playbook.save(playbook_path), step, meta, stats, pause)

        def snapshot(epoch: int) -> Path:
            """The playbook as this epoch's adaptation left it (kept as written when a resumed run gets here)."""
            path = directory / f"playbook_epoch{epoch}.jsonl"
            if not path.is_file():
                playbook.save(path)
            return path

        table, baseline, best = [], None, (-1.0, 0)
        try:
            for epoch in range(config.epochs + 1):
                stats: Counter = Counter()
                val = None
                if epoch > 0 and not config.online:
                    one_pass("train", "train", epoch, True, directory / "train" / f"epoch{epoch}.csv")
                    snapshot(epoch)
                    val = pass_summary(one_pass("val", "val", epoch, False, directory / "val" / f"epoch{epoch}.csv"))
                    best = max(best, (val["accuracy"], -epoch))  # ties go to the earlier epoch
                rows = one_pass(test_split, test_split, epoch, config.online and epoch > 0, directory / f"epoch{epoch}.csv")
                adapted = Playbook.load(snapshot(epoch), count_tokens=playbook.count_tokens) if epoch else None
                summary = pass_summary(rows)
                outcomes = {r["sample_id"]: bool(r["correct"]) for r in rows}
                baseline = baseline or outcomes
                ids = sorted(outcomes)
                test = mcnemar_exact([baseline[i] for i in ids], [outcomes[i] for i in ids])
                table.append({"epoch": epoch, "mode": "ace" if epoch else "baseline", "split": test_split, **summary,
                              "mcnemar_p": test["p_value"], "only_baseline": test["a_only"], "only_ace": test["b_only"],
                              "playbook_size": len(adapted) if adapted else 0,
                              "playbook_tokens": adapted.tokens() if adapted else 0,
                              "val_accuracy": val["accuracy"] if val else None, **stats})
                loop.writer.write({"kind": "summary", "of": f"epoch{epoch}", **table[-1]})
                print(describe(f"epoch {epoch} ({table[-1]['mode']}, {test_split})", summary, adapted)
                      + (f", McNemar p={test['p_value']:.3g} vs epoch 0" if epoch else ""))
        except Paused:
            print(f"paused; continue with: {loop.resume_command('lab ace epochs')}")
            return loop.pause()
        if not config.online:
            shutil.copyfile(directory / f"playbook_epoch{-best[1]}.jsonl", directory / "playbook_best.jsonl")
            print(f"best val epoch: {-best[1]} (val accuracy {best[0]:.3f}); its playbook: "
                  f"{directory / 'playbook_best.jsonl'}")
        write_table(directory / "epoch_summary", table)
        print(markdown_table(table, EPOCH_COLUMNS))
    return loop.exit_status


EPOCH_COLUMNS = ["epoch", "mode", "split", "num_samples", "accuracy", "mcnemar_p", "f1", "val_accuracy",
                 "latency_p50_ms", "latency_p95_ms", "reflection_p50_ms", "playbook_size", "playbook_tokens"]


def write_table(stem: Path, rows: list[dict]) -> None:
    """`rows` as <stem>.csv (every key) and <stem>.md (the main columns)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with stem.with_suffix(".csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    stem.with_suffix(".md").write_text(markdown_table(rows, EPOCH_COLUMNS) + "\n", encoding="utf-8")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    columns = [c for c in columns if any(c in row for row in rows)]

    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.3f}" if not math.isnan(value) else "nan"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


