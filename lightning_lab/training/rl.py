"""LoRA RL with a verifiable reward: group-relative policy optimisation.

    lab rl fit --config configs/rl/gsm8k_smollm2.yaml
    lab rl fit --config configs/rl/gsm8k_smollm2.yaml --ckpt_path last               # resume
    lab rl fit --config configs/rl/gsm8k_smollm2.yaml --model.reward my_rewards.py:has_answer_line
    lab rl fit --config configs/rl/gsm8k_smollm2.yaml --model.adapter runs/sft/gsm8k_smollm2/adapters/final
    lab rl predict --config configs/rl/gsm8k_smollm2.yaml --ckpt_path last     # generations + rewards -> JSONL
    lab adapter merge --adapter runs/rl/gsm8k_smollm2/adapters/final --out checkpoints/smollm2_rl_gsm8k

Config keys are LightningCLI's: ``model:`` (`RLModule`), ``data:`` (`SampleDataModule` from
training/common.py: batches of `Sample`s, the dev half held out), ``trainer:``, ``run:``.

One training step, for a batch of B prompts:

1. Rollouts: G samples per prompt from the current policy (adapter on, dropout off) through the lab
   `Sampler` (one shared prefill per prompt), with the model's chat template, ``temperature`` and
   ``top_p``, at most ``max_new_tokens`` each; the seed is a function of ``seed`` and the step, so
   a resumed run draws the samples the uninterrupted run would have drawn.
2. Rewards r in [0, 1] from ``model.reward``:
   ``builtin:gsm8k`` (the answer after ``####`` / "the answer is" / the last number equals the
   reference numerically), ``builtin:numeric`` (the whole completion is a number equal to the
   reference), ``builtin:exact_match`` (normalised exact match), ``builtin:math`` (last \\boxed{}),
   or ``<module>:<function>``, a user function imported from a dotted module or a ``.py`` file and
   called as ``function(sample, completion_text) -> float``. A reward that raises, or returns
   anything but a number in [0, 1], stops the run with a `RewardError` naming the sample id.
3. Advantages, RLOO (leave-one-out): A_i = r_i - mean of the other G-1 rewards of its group
   = G/(G-1) (r_i - group mean). Chosen over GRPO's (r_i - mean) / std because the baseline
   does not contain the sample's own reward (an unbiased policy gradient), and because dividing
   by the group's std gives a prompt that 1 of 8 samples solves the same total push as one that
   4 of 8 solve, and blows up on near-equal rewards (the difficulty bias noted by Dr. GRPO, Liu
   et al. 2025); advantages stay in reward units. A group whose rewards are all equal has zero
   advantage and teaches nothing but the KL term: its share is logged as ``train_groups_all_equal``.
4. ``updates_per_batch`` optimizer steps on these rollouts, each minimising the token-level mean
   over all completion tokens of the batch of

       -min(rho * A, clip(rho, 1 - clip_eps, 1 + clip_eps) * A) + kl_coef * KL

   with rho = pi(token) / pi_old(token) (pi_old: the policy that sampled; rho = 1 on the first
   update, so clipping acts from the second) and KL the k3 estimator exp(q) - q - 1, q = log
   pi_ref - log pi, against the frozen base, computed by the same model with the adapter
   disabled (``with model.disable_adapter():``, no second copy of the weights). Log-probs come from
   the lab's teacher-forced scoring (`models.scoring.score`) at the rollouts' temperature, the
   distribution that was sampled (top-p truncation aside).
   The sequences run in chunks of ``micro_batch_size`` (gradients accumulate within a step).

Manual optimisation (several optimizer steps per batch), so ``trainer.max_steps`` counts optimizer
steps (batches x updates_per_batch), gradient clipping is ``model.max_grad_norm`` and
``trainer.gradient_clip_val`` / ``accumulate_grad_batches`` must stay unset. Use LoRA dropout 0:
with dropout the ratio and the KL would compare two different random sub-networks.

Validation: greedy decoding of the validation prompts, mean reward = ``val_reward`` (a torchmetrics
``MeanMetric``: under DDP each rank decodes its share and the mean is over all of them).
Several processes (``--trainer.devices N --trainer.strategy ddp``) shard every global batch of prompts
across the ranks, as SFT does; the gradients are averaged over the ranks at every update.
``lab rl predict`` writes the generations (``model.predict``) and each completion's reward to
``<run>/predictions.jsonl`` (see `LoraModule`).
Logged per step: ``train_reward``, ``train_groups_all_equal``, ``train_loss``, ``train_kl``,
``train_clip_frac``, ``train_completion_tokens``, ``train_eos_frac``, ``lr``.

Loading (``model.adapter``: start from a saved adapter, e.g. SFT's), dtype, small checkpoints (LoRA
weights only, checked on load), exact resume and the adapter written to
``runs/rl/<name>/adapters/<adapter_name>/`` are those of SFT (`LoraModule`).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import numbers
import sys
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torchmetrics import MeanMetric

from lightning_lab.data.benchmarks import Sample
from lightning_lab.errors import ConfigError
from lightning_lab.eval import metrics
from lightning_lab.models.lora import LoraSettings
from lightning_lab.models.scoring import score
from lightning_lab.training.common import LoraModule, PredictSettings, SampleDataModule, run_stage_cli
from lightning_lab.training.sft import REQUIRED_ARTIFACTS

log = logging.getLogger(__name__)

# builtin:<name> -> the eval.metrics scorer it applies to (completion, sample.reference)
BUILTIN_REWARDS = {"exact_match": "exact", "gsm8k": "gsm8k", "numeric": "numeric", "math": "math"}

Reward = Callable[[Sample, str], float]


# ---- rewards ----------------------------------------------------------------------------------


class RewardError(RuntimeError):
    """A reward function raised or returned something outside [0, 1]; the message names the sample."""


def builtin_reward(scorer: str, sample: Sample, completion: str) -> float:
    return metrics.score(scorer, completion, sample.reference)


def load_reward(spec: str) -> Reward:
    """``builtin:<name>`` or ``<dotted.module | path/to/file.py>:<function>`` (see the module docstring)."""
    usage = (f"expected builtin:<{'|'.join(BUILTIN_REWARDS)}> or <module or file.py>:<function>, "
             f"e.g. my_rewards.py:has_answer")
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_REWARDS:
            raise ConfigError(f"model.reward={spec!r}: unknown builtin {name!r}; {usage}")
        return partial(builtin_reward, BUILTIN_REWARDS[name])
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise ConfigError(f"model.reward={spec!r}: {usage}")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ConfigError(f"model.reward={spec!r}: no such file {path}")
        module_spec = importlib.util.spec_from_file_location(f"lab_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module  # so the function (and anything it defines) can be pickled
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ConfigError(f"model.reward={spec!r}: cannot import {module_name!r} ({error}); "
                             f"a path to the .py file also works") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"model.reward={spec!r}: {module_name} has no function {function_name!r}")
    return function


def checked_reward(reward: Reward, spec: str, sample: Sample, completion: str) -> float:
    """reward(sample, completion) as a float in [0, 1], or a `RewardError` naming the sample."""
    try:
        value = reward(sample, completion)
    except Exception as error:  # noqa: BLE001  (any failure of user code stops the run the same way)
        raise RewardError(f"reward {spec} failed on sample {sample.id!r}: {type(error).__name__}: {error}") from error
    if not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:  # NaN fails the comparison too
        raise RewardError(f"reward {spec} returned {value!r} for sample {sample.id!r}: "
                          f"a reward must be a number in [0, 1]")
    return float(value)


# ---- the policy-gradient pieces ---------------------------------------------------------------


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(prompts, G) rewards -> leave-one-out advantages r_i - mean_{j != i} r_j (G >= 2)."""
    group_size = rewards.shape[1]
    return group_size / (group_size - 1) * (rewards - rewards.mean(dim=1, keepdim=True))


def policy_loss_terms(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
                      advantages: torch.Tensor, clip_eps: float, kl_coef: float) -> tuple[torch.Tensor, ...]:
    """Per-token loss, KL and clipped flag; all (sequences, tokens). `advantages` is (sequences, 1)."""
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    surrogate = torch.minimum(ratio * advantages, clipped_ratio * advantages)
    log_ref_ratio = ref_logp - logp
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0
    clipped = (ratio * advantages > clipped_ratio * advantages).float()
    return -surrogate + kl_coef * kl, kl, clipped


# ---- the module -------------------------------------------------------------------------------


class RLModule(LoraModule):
    """Group-relative policy optimisation (RLOO advantages, clipped ratio, KL to the base) of a LoRA adapter.

    Args:
        model: base model spec for `load_causal_lm` (alias, HF directory, .gguf, lab .ckpt).
        lora: LoRA rank, alpha, dropout (keep 0, see the module docstring), target modules.
        reward: ``builtin:gsm8k|numeric|exact_match|math`` or ``<module or file.py>:<function>``.
        group_size: samples per prompt (G >= 2).
        max_new_tokens: longest completion.
        temperature: sampling temperature of the rollouts (> 0).
        top_p: nucleus sampling of the rollouts (1.0 = off).
        kl_coef: weight of the KL to the base model.
        clip_eps: the ratio is clipped to [1 - clip_eps, 1 + clip_eps].
        updates_per_batch: optimizer steps on each batch of rollouts (1 = plain on-policy).
        micro_batch_size: sequences per forward/backward pass within a step.
        max_grad_norm: gradient clipping (L2 norm over the LoRA weights); 0 = off.
        learning_rate, weight_decay, warmup_steps, min_lr_ratio: AdamW and its warm-up + cosine schedule.
        dtype: dtype the base is loaded in (fp32 default; see training/sft.py).
        adapter_name: the adapter goes to ``<run>/adapters/<adapter_name>/``.
        seed: seeds the rollouts (with the step number).
        adapter: start from this saved peft adapter directory (e.g. an SFT run's) instead of a new LoRA.
        predict: decoding settings of ``lab rl predict`` (`PredictSettings`).
    """

    def __init__(self, model: str = "smollm2-135m", lora: LoraSettings = LoraSettings(dropout=0.0),
                 reward: str = "builtin:gsm8k", group_size: int = 8, max_new_tokens: int = 256,
                 temperature: float = 1.0, top_p: float = 1.0, kl_coef: float = 0.04, clip_eps: float = 0.2,
                 updates_per_batch: int = 1, micro_batch_size: int = 8, max_grad_norm: float = 1.0,
                 learning_rate: float = 2e-5, weight_decay: float = 0.0, warmup_steps: int = 0,
                 min_lr_ratio: float = 1.0, dtype: str = "fp32", adapter_name: str = "final", seed: int = 0,
                 adapter: str | None = None, predict: PredictSettings = PredictSettings()):
        super().__init__(model, lora, learning_rate, weight_decay, warmup_steps, min_lr_ratio, dtype, adapter_name,
                         adapter, predict)
        if group_size < 2:
            raise ConfigError(f"model.group_size={group_size}: group-relative advantages need at least 2 samples")
        if temperature <= 0:
            raise ConfigError(f"model.temperature={temperature}: rollouts must sample (temperature > 0)")
        self.reward_function = load_reward(reward)  # a bad spec fails here, before the model is loaded
        self.automatic_optimization = False
        self.val_reward = MeanMetric()

    # ---- rollouts and rewards ------------------------------------------------------------

    def sample(self, samples: list[Sample], n: int, greedy: bool, seed: int):
        """n completions per sample from the current policy (adapter on), via the lab sampler."""
        generation = self.sampler().generate(
            [sample.prompt for sample in samples], n=n, max_new_tokens=self.hparams.max_new_tokens,
            temperature=self.hparams.temperature, top_p=self.hparams.top_p, greedy=greedy, seed=seed,
            batch_size=len(samples))
        return generation.prompts

    def rewards(self, samples: list[Sample], results) -> torch.Tensor:
        return torch.tensor([[checked_reward(self.reward_function, self.hparams.reward, sample, completion.text)
                              for completion in result.completions] for sample, result in zip(samples, results)])

    def token_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], adapter: bool = True,
                       grad: bool = False):
        """`Scores` of the completions under the policy (or, adapter=False, the base) at the rollout temperature."""
        return score(self.model, prompt_ids, completion_ids, temperature=self.hparams.temperature, adapter=adapter,
                     grad=grad)

    # ---- training ------------------------------------------------------------------------

    def training_step(self, samples: list[Sample], batch_idx: int) -> None:
        group_size = self.hparams.group_size
        seed = zlib.crc32(f"{self.hparams.seed}:{self.global_step}".encode())
        results = self.sample(samples, n=group_size, greedy=False, seed=seed)
        rewards = self.rewards(samples, results).to(self.device)
        advantages = rloo_advantages(rewards).flatten()[:, None]
        completions = [completion for result in results for completion in result.completions]
        prompt_ids = [result.prompt_token_ids for result in results for _ in range(group_size)]
        completion_ids = [completion.token_ids for completion in completions]
        total_tokens = float(max(1, sum(map(len, completion_ids))))

        chunks = [slice(start, start + self.hparams.micro_batch_size)
                  for start in range(0, len(completions), self.hparams.micro_batch_size)]
        ref_logp = [self.token_logprobs(prompt_ids[rows], completion_ids[rows], adapter=False).logprobs
                    for rows in chunks]
        old_logp = ([self.token_logprobs(prompt_ids[rows], completion_ids[rows]).logprobs for rows in chunks]
                    if self.hparams.updates_per_batch > 1 else None)

        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        for _ in range(self.hparams.updates_per_batch):
            optimizer.zero_grad()
            loss_sum = kl_sum = clipped_sum = 0.0
            for chunk, rows in enumerate(chunks):
                scores = self.token_logprobs(prompt_ids[rows], completion_ids[rows], grad=True)
                logp, mask = scores.logprobs, scores.mask
                old = old_logp[chunk] if old_logp is not None else logp.detach()
                token_loss, kl, clipped = policy_loss_terms(logp, old, ref_logp[chunk], advantages[rows],
                                                            self.hparams.clip_eps, self.hparams.kl_coef)
                loss = (token_loss * mask).sum() / total_tokens
                self.manual_backward(loss)
                loss_sum += loss.item()
                kl_sum += (kl.detach() * mask).sum().item()
                clipped_sum += float((clipped * mask).sum())
            if self.hparams.max_grad_norm > 0:
                self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm,
                                    gradient_clip_algorithm="norm")
            optimizer.step()
            schedule.step()

        size = len(samples)
        all_equal = (rewards.max(dim=1).values == rewards.min(dim=1).values).float().mean()
        self.log("train_reward", rewards.mean(), prog_bar=True, batch_size=size)
        self.log("train_groups_all_equal", all_equal, batch_size=size)
        self.log("train_loss", loss_sum, batch_size=size)
        self.log("train_kl", kl_sum / total_tokens, prog_bar=True, batch_size=size)
        self.log("train_clip_frac", clipped_sum / total_tokens, batch_size=size)
        self.log("train_completion_tokens", total_tokens / len(completions), batch_size=size)
        self.log("train_eos_frac", sum(c.finish_reason == "eos" for c in completions) / len(completions),
                 batch_size=size)
        self.log("lr", optimizer.param_groups[0]["lr"], batch_size=size)

    # ---- validation: greedy reward -------------------------------------------------------

    def validation_step(self, samples: list[Sample], batch_idx: int) -> None:
        results = self.sample(samples, n=1, greedy=True, seed=0)
        self.val_reward.update(self.rewards(samples, results).flatten())

    def on_validation_epoch_end(self) -> None:
        self.log("val_reward", self.val_reward.compute(), prog_bar=True)  # compute() reduces across DDP ranks
        self.val_reward.reset()

    # ---- predict: generations and their rewards ------------------------------------------

    def predict_record(self, sample: Sample, result) -> dict:
        record = super().predict_record(sample, result)
        for line, completion in zip(record["completions"], result.completions):
            line["reward"] = checked_reward(self.reward_function, self.hparams.reward, sample, completion.text)
        return record


def main(argv: list[str]) -> int:
    try:
        run_stage_cli(RLModule, SampleDataModule, "rl", argv, required_artifacts=REQUIRED_ARTIFACTS)
    except RewardError as error:
        print(f"lab rl: error: {error}", file=sys.stderr)
        return 1
    return 0
