"""The discovery suite runner: best-of-N or test-time training (TTT) on every task of a task file.

    lab discover run --tasks data/discover/heldout.jsonl --model smollm2-135m --mode bestofn --seed 0
    lab discover run --tasks data/discover/heldout.jsonl --model smollm2-135m --mode ttt --seed 0 --name ttt-s0
    lab discover run --config runs/discover/ttt-s0/config.yaml --resume true          # after a kill or Ctrl+C

Both arms give the model the same prompt ids for a task (`prompt_ids`: the task's ``Q: ... A:`` through
the sampler's one prompt encoder; each result.json records the decoded prompt) and score every sample
with the task's verifier (`tasks.verify`). Best-of-N draws ``samples`` (default ``steps x rollouts``,
the TTT arm's sample count) in calls of ``rollouts``; TTT (ttt.py) takes ``steps`` LoRA steps of
``rollouts`` samples each. With ``stop_on_exact`` either arm stops a task at its first exact answer.

A run is ``<output_dir>/<name>/`` (the loop convention, loops.py): config.yaml, ``summary.jsonl`` (a
header, then one line per finished task), ``_run_tracker/``, and per task ``tasks/<id>/``:
``result.json`` (best answer found, its reward, exact or not, mean reward, samples and tokens used,
FLOPs, seconds, every sample's reward in order), ``progress.pt`` while the task is unfinished, and for
TTT ``metrics.jsonl`` (one line per step) and ``adapters/step_NNN/`` (peft). ``--resume true`` skips
finished tasks and continues an unfinished one from its last completed step (or call of best-of-N),
with the same random draws as an uninterrupted run.

FLOPs are counted as 2 x (weights of the linear layers) per token a forward pass reads: prompt tokens
once per sampling call (the n samples share one prefill), every generated token, and for TTT the
teacher-forced passes (prompt + completion per rollout: the policy, and the adapter-off base when
``kl_coef > 0``). A backward pass costs 2 x linear weights per token (the gradient with respect to the
activations, through every layer) + 2 x LoRA weights per token (their weight gradients; the frozen base
needs none). Attention's own products are left out (short sequences).
"""

from __future__ import annotations

import dataclasses
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_lab.discover.tasks import DiscoveryTask, extract_answer, read_tasks, verify
from lightning_lab.errors import UserError, check_input_file
from lightning_lab.loops import (LoopConfig, LoopRun, check_choice, check_count, check_number,
                                 check_sampling, engine_info)

MODES = ("bestofn", "ttt")
OBJECTIVES = ("entropic", "expected")
STOP = ["\n"]  # an answer is one line (tasks.extract_answer)


@dataclass
class DiscoverConfig(LoopConfig):
    """`lab discover run`: best-of-N or TTT over a discovery task file."""

    output_dir: str = "runs/discover"
    """runs go to <output_dir>/<name>/"""
    tasks: str = ""
    """discovery task file (JSONL from `lab data discovery-tasks`)"""
    model: str = "smollm2-135m"
    """any load_causal_lm spec: alias, HF directory, GGUF, lab checkpoint (.ckpt)"""
    mode: str = "bestofn"
    """bestofn | ttt"""
    seed: int = 0
    """seeds every draw (sampling, LoRA initialisation, warm-start cuts)"""
    limit: int | None = None
    """only the first N tasks of the file"""
    steps: int = 4
    """TTT steps per task (best-of-N: samples default to steps x rollouts)"""
    rollouts: int = 8
    """samples per TTT step (best-of-N: samples per sampling call)"""
    groups: int = 2
    """TTT: start states per step; each gets rollouts / groups samples (at least 3)"""
    samples: int = 0
    """best-of-N samples per task; 0: steps x rollouts (sample-matched); more: a FLOP-matched budget"""
    max_new_tokens: int = 24
    """tokens per sample"""
    temperature: float = 1.0
    """sampling temperature (TTT scores its rollouts at the same temperature)"""
    top_p: float = 1.0
    """nucleus sampling (1: off)"""
    chat: bool | None = None
    """frame the prompt with the tokenizer's chat template: None = when it has one"""
    stop_on_exact: bool = True
    """stop a task at its first exact answer"""
    objective: str = "entropic"
    """TTT objective: entropic | expected (the plain mean-reward policy gradient)"""
    reuse: bool = True
    """TTT: warm-start rollouts from archived states chosen by PUCT (off: every group starts from the prompt)"""
    adaptive_beta: bool = True
    """entropic: beta per group by bisection (KL to uniform = ln 2); off: the fixed `beta`"""
    beta: float = 1.0
    """entropic beta when adaptive_beta is off"""
    kl_coef: float = 0.1
    """lambda of the per-token KL penalty log(pi / pi_base); 0: off"""
    learning_rate: float = 5e-4
    """AdamW learning rate of the LoRA weights"""
    lora_rank: int = 8
    """LoRA rank"""
    lora_alpha: float = 16.0
    """LoRA alpha (the update is scaled by alpha / rank)"""
    max_grad_norm: float = 1.0
    """gradient clipping (0: off)"""
    exploration: float = 1.0
    """PUCT exploration constant c"""
    max_children: int = 4
    """archived children kept per state"""
    save_adapters: bool = True
    """TTT: save the adapter after every step (tasks/<id>/adapters/step_NNN)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tasks:
            raise UserError("tasks: a discovery task file is required (--tasks FILE)")
        check_input_file(self.tasks, "tasks:")
        check_choice("mode", self.mode, MODES)
        check_choice("objective", self.objective, OBJECTIVES)
        for key in ("steps", "rollouts", "groups", "max_new_tokens", "lora_rank", "max_children"):
            check_count(key, getattr(self, key))
        check_count("samples", self.samples, minimum=0)
        if self.limit is not None:
            check_count("limit", self.limit)
        check_sampling(self.temperature, self.top_p)
        for key in ("beta", "kl_coef", "max_grad_norm", "exploration"):
            check_number(key, getattr(self, key), 0.0)
        check_number("learning_rate", self.learning_rate, 0.0, low_open=True)
        check_number("lora_alpha", self.lora_alpha, 0.0, low_open=True)
        if self.mode == "ttt":
            if self.temperature == 0:
                raise UserError("temperature: TTT samples and scores a distribution; use temperature > 0")
            if self.rollouts // self.groups < 3:
                raise UserError(f"rollouts={self.rollouts}, groups={self.groups}: each group needs at least 3 "
                                "rollouts (rollouts >= 3 x groups)")

    @property
    def samples_per_task(self) -> int:
        return self.samples or self.steps * self.rollouts


# ---- shared by both arms ---------------------------------------------------------------------------------


def derived_seed(*parts) -> int:
    """A stable 31-bit seed from the run seed, a task id and a step (the same on every machine and rerun)."""
    return zlib.crc32(":".join(map(str, parts)).encode())


def prompt_ids(sampler, task: DiscoveryTask, chat: bool | None) -> list[int]:
    """The token ids both arms give the model for `task` (the sampler's one prompt encoder)."""
    return sampler.encode(task.prompt, chat)


def linear_weights(model: torch.nn.Module, lora_only: bool = False) -> int:
    """Weights of the model's linear layers (LoRA's A and B among them), or of LoRA's alone."""
    return sum(module.weight.numel() for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and (not lora_only or ".lora_" in name))


@dataclass
class Rollout:
    """One sample: the answer's token ids (warm-start prefix + generated), its text and its verdict."""

    token_ids: list[int]
    text: str
    exact: bool
    reward: float
    new_tokens: int
    completion_ids: list[int]  # the generated ids alone (what a TTT step trains on)


def sample_rollouts(sampler, task: DiscoveryTask, rows: list[list[int]], prefixes: list[list[int]], n: int,
                    config: DiscoverConfig, seed: int) -> tuple[list[list[Rollout]], int]:
    """`n` rollouts for each prompt row (prompt ids + a warm-start prefix), verified; and the forward FLOPs
    of the call in tokens read (prompt rows once, every generated token)."""
    generation = sampler.generate(rows, n=n, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                  top_p=config.top_p, stop=STOP, seed=seed)
    groups, tokens = [], sum(map(len, rows))
    for prefix, completions in zip(prefixes, generation.completions):
        group = []
        for completion in completions:
            ids = prefix + completion.token_ids
            text = sampler.tokenizer.decode(ids, skip_special_tokens=True)
            exact, reward = verify(text, task.answer)
            if completion.finish_reason in ("eos", "stop"):
                ids = ids[:-1]  # the token that ended the answer is not part of it
            group.append(Rollout(ids, extract_answer(text), exact, reward, len(completion.token_ids),
                                 completion.token_ids))
            tokens += len(completion.token_ids)
        groups.append(group)
    return groups, tokens


@dataclass
class Budget:
    """What a task has used so far."""

    samples: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    sampling_tokens: int = 0  # tokens read by the sampler's forward passes
    scored_tokens: int = 0  # tokens read by TTT's teacher-forced forward passes
    backward_tokens: int = 0
    seconds: float = 0.0


def task_result(task: DiscoveryTask, config: DiscoverConfig, prompt_text: str, rewards: list[float],
                best: Rollout | None, budget: Budget, weights: int, lora_weights: int, **extra) -> dict:
    """result.json of one task."""
    forward_tokens = budget.sampling_tokens + budget.scored_tokens
    return {
        "id": task.id, "family": task.family, "difficulty": task.difficulty, "mode": config.mode, "seed": config.seed,
        "prompt": prompt_text, "answer": task.answer,
        "best": dataclasses.asdict(best) if best else None,
        "reward": best.reward if best else 0.0, "exact": bool(best and best.exact),
        "mean_reward": sum(rewards) / len(rewards) if rewards else 0.0,
        "samples": budget.samples, "prompt_tokens": budget.prompt_tokens, "new_tokens": budget.new_tokens,
        "tokens": budget.prompt_tokens + budget.new_tokens,
        "flops": {"sampling": 2 * weights * budget.sampling_tokens, "forward": 2 * weights * forward_tokens,
                  "backward": 2 * (weights + lora_weights) * budget.backward_tokens},
        "flops_per_token": 2 * weights, "seconds": budget.seconds, "rewards": rewards, **extra,
    }


def summary_line(result: dict) -> dict:
    keys = ("id", "family", "difficulty", "mode", "seed", "reward", "exact", "mean_reward", "samples", "tokens",
            "seconds")
    return {**{key: result[key] for key in keys}, "forward_flops": result["flops"]["forward"],
            "backward_flops": result["flops"]["backward"]}


def save_progress(path: Path, progress: dict) -> None:
    """Write progress.pt atomically (a kill leaves the old file or the new one)."""
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(progress, temporary)
    os.replace(temporary, path)


def load_progress(path: Path) -> dict | None:
    return torch.load(path, weights_only=True) if path.is_file() else None


# ---- best-of-N ---------------------------------------------------------------------------------------------


def best_of_n(sampler, task: DiscoveryTask, config: DiscoverConfig, task_dir: Path, weights: int,
              pause) -> dict | None:
    """Sample up to `samples_per_task` answers in calls of `rollouts`; the result (None: paused, resumable)."""
    ids = prompt_ids(sampler, task, config.chat)
    progress_path = task_dir / "progress.pt"
    progress = load_progress(progress_path) or {"call": 0, "rollouts": [], "budget": dataclasses.asdict(Budget())}
    rollouts = [Rollout(**r) for r in progress["rollouts"]]
    budget = Budget(**progress["budget"])
    total = config.samples_per_task
    call = progress["call"]
    while len(rollouts) < total and not (config.stop_on_exact and any(r.exact for r in rollouts)):
        if pause.requested:
            return None
        started = time.perf_counter()
        n = min(config.rollouts, total - len(rollouts))
        (group,), tokens = sample_rollouts(sampler, task, [ids], [[]], n, config,
                                           derived_seed(config.seed, task.id, call))
        rollouts += group
        call += 1
        budget.samples += n
        budget.prompt_tokens += len(ids)
        budget.new_tokens += sum(r.new_tokens for r in group)
        budget.sampling_tokens += tokens
        budget.seconds += time.perf_counter() - started
        save_progress(progress_path, {"call": call, "rollouts": [dataclasses.asdict(r) for r in rollouts],
                                      "budget": dataclasses.asdict(budget)})
    best = max(rollouts, key=lambda r: r.reward)  # the earliest among ties
    return task_result(task, config, sampler.tokenizer.decode(ids), [r.reward for r in rollouts], best, budget,
                       weights, 0, exacts=[r.exact for r in rollouts])


# ---- the suite ------------------------------------------------------------------------------------------------


def run(config: DiscoverConfig) -> int:
    """Run every task of the file not yet finished in this run; returns the loop exit status."""
    from tqdm import tqdm

    from lightning_lab.callbacks.pause import PauseFlag
    from lightning_lab.data.io import write_json_atomic
    from lightning_lab.models.loading import LoadedModel, load_causal_lm
    from lightning_lab.sampling.sampler import Sampler

    with LoopRun(config, method="discover", results_file="summary.jsonl") as loop:
        tasks = read_tasks(config.tasks)[:config.limit]
        unsafe = [task.id for task in tasks if Path(task.id).name != task.id or task.id.startswith(".")]
        if unsafe:
            raise UserError(f"{config.tasks}: task ids {unsafe[:3]} cannot name a directory (no '/', no leading '.')")
        loaded = load_causal_lm(config.model, device=config.device, dtype=config.dtype)
        if config.mode == "ttt":
            from lightning_lab.discover.ttt import TestTimeTrainer

            arm = TestTimeTrainer(loaded, config)
            loaded = LoadedModel(arm.model, loaded.tokenizer, loaded.spec, loaded.device, loaded.dtype)
        sampler = Sampler(loaded)
        sampler.generate([prompt_ids(sampler, tasks[0], config.chat)], max_new_tokens=1)  # first-call costs (a
        # kernel build, lazy initialisation) stay outside every task's seconds, so the arms' wall-clocks compare
        weights = linear_weights(loaded.model)
        loop.start(total=len(tasks), header={"engine": engine_info(sampler), "model_spec": loaded.spec,
                                             "linear_weights": weights, "tasks_file": str(config.tasks)})
        bar = tqdm(total=len(tasks), initial=len(loop.done), unit="task", desc=config.mode, disable=not config.progress)
        with PauseFlag() as pause, bar:
            for task in tasks:
                if task.id in loop.done:
                    continue
                if pause.requested:
                    return loop.pause()
                task_dir = loop.directory / "tasks" / task.id
                task_dir.mkdir(parents=True, exist_ok=True)
                if config.mode == "ttt":
                    result = arm.solve(sampler, task, task_dir, pause)
                else:
                    result = best_of_n(sampler, task, config, task_dir, weights, pause)
                if result is None:
                    return loop.pause()
                write_json_atomic(task_dir / "result.json", result)
                loop.write(summary_line(result))
                (task_dir / "progress.pt").unlink(missing_ok=True)
                bar.update()
    print(summary_text(loop.results_path))
    return loop.exit_status


def summary_text(path: Path) -> str:
    """One line: tasks done, mean best reward, exact rate, samples and seconds (from summary.jsonl)."""
    from lightning_lab.data.io import read_jsonl

    lines = [record for _, record in read_jsonl(path) if record.get("kind") != "header"]
    if not lines:
        return f"{path}: no finished task"
    count = len(lines)
    return (f"{path}: {count} tasks, mean best reward {sum(r['reward'] for r in lines) / count:.3f}, "
            f"exact {sum(r['exact'] for r in lines)}/{count}, {sum(r['samples'] for r in lines)} samples, "
            f"{sum(r['seconds'] for r in lines):.1f} s")
