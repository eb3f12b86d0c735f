"""Test-time training (TTT-Discover, arXiv 2601.16175): one LoRA adapter trained on one task at test time.

Per task the adapter starts from the same initial weights (B = 0: the base model) and takes `steps`
steps. A step:

1. chooses ``groups`` start states: with reuse, the archive's best by PUCT (archive.py; at first only
   the root, the empty answer, exists); without, the root for every group;
2. samples ``rollouts / groups`` answers per start state through the sampler, with the adapter active.
   A rollout from an archived state continues a prefix of that state's answer, cut at a random token
   (seeded by run, task and step); its full answer is verified and archived as the state's child;
3. turns each group's rewards into advantages (objectives.py: entropic with adaptive or fixed beta, or
   expected), and per token subtracts ``kl_coef * log(pi / pi_base)`` (the base: the adapter off, scored
   by models/scoring.py without a second copy of the weights);
4. takes one AdamW step on the surrogate ``-mean(advantage * log pi)`` over the rollouts' generated tokens,
   scored teacher-forced at the sampling temperature.

The product is the best answer any rollout found (`run.Rollout`). Each step appends a line to
``metrics.jsonl`` (rewards, betas, loss, KL, the start states, seconds spent sampling / scoring /
in the backward pass / elsewhere) and, with ``save_adapters``, writes ``adapters/step_NNN/`` (peft format,
loadable with ``lab adapter merge`` or `models.lora.load_adapter`). ``progress.pt`` (adapter and optimizer
state, archive, counters) is saved after each step, so a resumed run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import torch

from lightning_lab.discover.archive import Archive
from lightning_lab.discover.objectives import group_advantages, policy_loss, token_advantages
from lightning_lab.discover.run import (Budget, DiscoverConfig, Rollout, derived_seed, linear_weights, load_progress,
                                        prompt_ids, sample_rollouts, save_progress, task_result)
from lightning_lab.discover.tasks import DiscoveryTask
from lightning_lab.models.lora import LoraSettings, add_lora, save_adapter
from lightning_lab.models.scoring import score


class TestTimeTrainer:
    """Holds the LoRA model (built once) and trains its adapter afresh for each task."""

    def __init__(self, loaded, config: DiscoverConfig):
        self.config = config
        self.tokenizer, self.spec = loaded.tokenizer, loaded.spec
        torch.manual_seed(derived_seed(config.seed, "lora"))  # the same initial adapter for every task
        self.model = add_lora(loaded.model, LoraSettings(rank=config.lora_rank, alpha=config.lora_alpha, dropout=0.0))
        self.trainable = dict((name, p) for name, p in self.model.named_parameters() if p.requires_grad)
        self.initial = {name: p.detach().clone() for name, p in self.trainable.items()}
        self.weights = linear_weights(self.model)
        self.lora_weights = linear_weights(self.model, lora_only=True)

    def solve(self, sampler, task: DiscoveryTask, task_dir: Path, pause) -> dict | None:
        """Train on `task` until `steps` steps are done (or an exact answer with stop_on_exact); its result,
        or None when paused (progress.pt holds the finished steps)."""
        config = self.config
        ids = prompt_ids(sampler, task, config.chat)
        optimizer = torch.optim.AdamW(list(self.trainable.values()), lr=config.learning_rate)
        progress_path, metrics_path = task_dir / "progress.pt", task_dir / "metrics.jsonl"
        progress = load_progress(progress_path)
        with torch.no_grad():
            for name, parameter in self.trainable.items():
                parameter.copy_(progress["lora"][name] if progress else self.initial[name])
        if progress:
            optimizer.load_state_dict(progress["optimizer"])
            archive = Archive.from_dict(progress["archive"])
            rollouts = [Rollout(**r) for r in progress["rollouts"]]
            budget, betas, step = Budget(**progress["budget"]), progress["betas"], progress["step"]
        else:
            archive = Archive(config.exploration, config.max_children)
            rollouts, budget, betas, step = [], Budget(), [], 0
        keep_metrics(metrics_path, step)  # lines of steps after the last saved one were never part of the run

        while step < config.steps and not (config.stop_on_exact and any(r.exact for r in rollouts)):
            if pause.requested:
                return None
            group_rollouts, metrics = self.step(sampler, task, ids, archive, step, optimizer, budget)
            rollouts += [r for group in group_rollouts for r in group]
            betas.append(metrics["betas"])
            metrics["best_reward"] = max(r.reward for r in rollouts)
            with metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
            if config.save_adapters:
                save_adapter(self.model, self.tokenizer, task_dir / "adapters" / f"step_{step:03d}", self.spec)
            step += 1
            save_progress(progress_path, {
                "step": step, "lora": {name: p.detach().clone() for name, p in self.trainable.items()},
                "optimizer": optimizer.state_dict(), "archive": archive.to_dict(),
                "rollouts": [dataclasses.asdict(r) for r in rollouts], "budget": dataclasses.asdict(budget),
                "betas": betas})
        best = max(rollouts, key=lambda r: r.reward)  # the earliest among ties
        return task_result(task, config, sampler.tokenizer.decode(ids), [r.reward for r in rollouts], best, budget,
                           self.weights, self.lora_weights, exacts=[r.exact for r in rollouts], steps=step,
                           betas=betas, archive_states=len(archive.states))

    def step(self, sampler, task: DiscoveryTask, ids: list[int], archive: Archive, step: int,
             optimizer: torch.optim.Optimizer, budget: Budget) -> tuple[list[list[Rollout]], dict]:
        """One TTT step (module docstring); updates the archive and the budget in place."""
        config = self.config
        started = time.perf_counter()
        chosen = archive.select(config.groups) if config.reuse else [archive.root]
        starts = [chosen[group % len(chosen)] for group in range(config.groups)]
        cuts = random.Random(derived_seed(config.seed, task.id, step, "cuts"))
        prefixes = [state.token_ids[:cuts.randrange(len(state.token_ids))] if state.token_ids else []
                    for state in starts]
        rows = [ids + prefix for prefix in prefixes]
        groups, sampled_tokens = sample_rollouts(sampler, task, rows, prefixes, config.rollouts // config.groups,
                                                 config, derived_seed(config.seed, task.id, step))
        sampled = time.perf_counter()

        advantages, betas = [], []
        for start, group in zip(starts, groups):
            archive.visit(start)
            for rollout in group:
                archive.add(start, rollout.token_ids, rollout.text, rollout.reward)
            fixed_beta = None if config.adaptive_beta else config.beta
            group_advantage, beta = group_advantages([r.reward for r in group], config.objective, fixed_beta)
            advantages.append(group_advantage)
            betas.append(beta)
        prompt_rows = [row for row, group in zip(rows, groups) for _ in group]
        completions = [rollout.completion_ids for group in groups for rollout in group]
        base = None
        if config.kl_coef:
            base = score(self.model, prompt_rows, completions, temperature=config.temperature, adapter=False).logprobs
        policy = score(self.model, prompt_rows, completions, temperature=config.temperature, grad=True)
        token_advantage = token_advantages(torch.cat(advantages), policy.logprobs, base, config.kl_coef)
        loss = policy_loss(policy.logprobs, policy.mask, token_advantage)
        scored = time.perf_counter()

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), config.max_grad_norm)
        optimizer.step()
        finished = time.perf_counter()

        read_tokens = sum(len(p) + len(c) for p, c in zip(prompt_rows, completions))
        budget.samples += len(completions)
        budget.prompt_tokens += sum(map(len, rows))
        budget.new_tokens += sum(map(len, completions))
        budget.sampling_tokens += sampled_tokens
        budget.scored_tokens += read_tokens * (2 if base is not None else 1)
        budget.backward_tokens += read_tokens
        budget.seconds += finished - started
        rewards = [rollout.reward for group in groups for rollout in group]
        kl = None
        if base is not None:
            kl = float(((policy.logprobs.detach() - base) * policy.mask).sum() / policy.mask.sum().clamp(min=1))
        metrics = {"step": step, "mean_reward": sum(rewards) / len(rewards), "max_reward": max(rewards),
                   "exact": any(r.exact for group in groups for r in group), "betas": betas,
                   "loss": float(loss.detach()), "kl": kl, "starts": [state.id for state in starts],
                   "start_rewards": [state.reward for state in starts], "prefix_tokens": list(map(len, prefixes)),
                   "seconds": {"sampling": sampled - started, "scoring": scored - sampled,
                               "backward": finished - scored, "total": finished - started}}
        return groups, metrics


def keep_metrics(path: Path, steps: int) -> None:
    """Keep only the metrics lines of steps before `steps`: a kill can leave the line of a step whose progress
    was never saved (that step runs again), or a torn last line."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] < steps:
                kept.append(line + "\n")
        except json.JSONDecodeError:
            continue  # torn by a kill mid-write
    path.write_text("".join(kept), encoding="utf-8")
