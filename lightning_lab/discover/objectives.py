"""TTT's objectives: per-rollout advantages from a group's rewards (TTT-Discover, arXiv 2601.16175).

Entropic (the default). The objective log E[exp(beta r)] favours the best rollouts of a group far more
than the mean does. Its policy gradient weighs rollout i by

    w_i = exp(beta r_i) / mean_{j != i} exp(beta r_j)          (leave-one-out: i is not in its own baseline)

and the per-token advantage is ``w_i - 1 - lambda * (log pi(token) - log pi_base(token))``, the base
being the model with its adapter off (`token_advantages`). Exponents are shifted by their maximum
(logsumexp: the weights do not change; nothing overflows). A group needs at least 3 rollouts: with 2,
KL = ln 2 is reached only as beta grows without bound, and the better rollout's weight with it.

Adaptive beta (`adaptive_beta`): per group, the beta at which the softmax of beta * r sits at KL
divergence ln 2 from the uniform distribution over the group, found by bisection. It depends only on
the rewards' ranks and gaps, not on their offset or scale, so the weights do not either. When the
target cannot be reached (a group of two, or half the group tied at the best reward: the KL never
exceeds ln(n / ties)) beta is as large as the bisection goes (`MAX_NORMALISED_BETA` / the reward
range): the weight falls on the best rollouts.

Expected (the ablation): the plain mean-reward policy gradient, advantage ``r_i - mean_{j != i} r_j``.
"""

from __future__ import annotations

import math

import torch

TARGET_KL = math.log(2.0)
MAX_NORMALISED_BETA = 1e4  # beta * (max r - min r) never exceeds this
BISECTION_STEPS = 100


def _as_tensor(rewards) -> torch.Tensor:
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    if rewards.dim() != 1 or len(rewards) == 0:
        raise ValueError(f"rewards: a non-empty 1-D list per group, got shape {tuple(rewards.shape)}")
    return rewards


def kl_to_uniform(rewards, beta: float) -> float:
    """KL(softmax(beta r) || uniform) = ln n + sum q log q, in nats."""
    rewards = _as_tensor(rewards)
    log_q = torch.log_softmax(beta * (rewards - rewards.max()), dim=0)
    return float(math.log(len(rewards)) + (log_q.exp() * log_q).sum())


def adaptive_beta(rewards, target: float = TARGET_KL) -> float:
    """The beta >= 0 with KL(softmax(beta r) || uniform) = `target` (0 for a group of equal rewards)."""
    rewards = _as_tensor(rewards)
    spread = float(rewards.max() - rewards.min())
    if spread == 0.0:
        return 0.0  # every beta gives uniform weights
    normalised = (rewards - rewards.min()) / spread  # in [0, 1]: the bisection works on beta * spread
    low, high = 0.0, 1.0
    while kl_to_uniform(normalised, high) < target and high < MAX_NORMALISED_BETA:
        low, high = high, min(2 * high, MAX_NORMALISED_BETA)
    if kl_to_uniform(normalised, high) < target:
        return high / spread  # unreachable target: as peaked as allowed
    for _ in range(BISECTION_STEPS):  # KL grows with beta
        middle = (low + high) / 2
        low, high = (middle, high) if kl_to_uniform(normalised, middle) < target else (low, middle)
    return (low + high) / 2 / spread


def entropic_weights(rewards, beta: float) -> torch.Tensor:
    """Leave-one-out weights w_i = exp(beta r_i) / mean_{j != i} exp(beta r_j); all ones for a group of one.

    Computed in log space, every exponent shifted by the largest of its terms, so large rewards or a
    large beta do not overflow where the weight itself is finite."""
    rewards = _as_tensor(rewards)
    n = len(rewards)
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    scaled = beta * rewards
    others = scaled[None, :].expand(n, n).masked_fill(torch.eye(n, dtype=torch.bool), -math.inf)
    log_mean_others = torch.logsumexp(others, dim=1) - math.log(n - 1)
    return torch.exp(scaled - log_mean_others)


def expected_advantages(rewards) -> torch.Tensor:
    """r_i - mean_{j != i} r_j (zero for a group of one)."""
    rewards = _as_tensor(rewards)
    n = len(rewards)
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    return rewards - (rewards.sum() - rewards) / (n - 1)


def group_advantages(rewards, objective: str, beta: float | None) -> tuple[torch.Tensor, float]:
    """(per-rollout advantages, the beta used) for one group: entropic ``w - 1`` with `beta` (None: adaptive),
    or expected ``r - mean of the others`` (beta reported as 0)."""
    if objective == "expected":
        return expected_advantages(rewards), 0.0
    if objective != "entropic":
        raise ValueError(f"objective={objective!r}: entropic or expected")
    beta = adaptive_beta(rewards) if beta is None else beta
    return entropic_weights(rewards, beta) - 1.0, beta


def token_advantages(sequence_advantages: torch.Tensor, logprobs: torch.Tensor, base_logprobs: torch.Tensor | None,
                     kl_coef: float) -> torch.Tensor:
    """(rows, C) per-token advantage: the rollout's advantage minus kl_coef * log(pi / pi_base) at that token
    (no KL term when `base_logprobs` is None). Detached: it multiplies log pi in the loss."""
    advantages = sequence_advantages.to(logprobs)[:, None].expand_as(logprobs)
    if base_logprobs is not None and kl_coef:
        advantages = advantages - kl_coef * (logprobs - base_logprobs)
    return advantages.detach()


def policy_loss(logprobs: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """-mean over completion tokens of advantage * log pi (the policy-gradient surrogate)."""
    return -(advantages * logprobs * mask).sum() / mask.sum().clamp(min=1)
