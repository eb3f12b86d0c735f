"""RAUQ (Vazhentsev et al. 2025, arXiv 2505.20045): recurrent attention-based uncertainty of a completion.

Per layer l one head h_l; with P(y_t) the model's probability of completion token t and a_t the weight that
head puts on the previous token (below), the confidence runs

    c_0 = P(y_0),    c_t = alpha * P(y_t) + (1 - alpha) * a_t * c_{t-1},

the layer's uncertainty is u_l = -mean_t log c_t, and the sequence's score is the largest u_l over the
middle third of the layers (`middle_layers`). alpha: 0.2 for base models, 0.5 for instruct models
(`default_alpha`).

Two readings of a_t (`CONVENTIONS`), both causal, one step apart; ``A`` is one head's attention matrix of a
full forward pass over prompt + completion, ``p`` the prompt length, so completion token t sits at p + t:
- ``paper`` (default, and the sampler's ``capture_heads`` convention): a_t = A[p+t, p+t-1], the weight the
  query of token t puts on the key of token t-1 (the sub-diagonal).
- ``lm-polygraph``: what LM-Polygraph's ``estimators/rauq.py`` computes. It reads the attention rows of
  ``generate``'s steps, where the step that *generates* token t consumes token t-1; its ``np.diagonal(...,
  offset=-1)`` of those rows is a_t = A[p+t-1, p+t-1], the diagonal entry of token t-1's row (token t-1's
  query on itself). The reference also reports ``1 - mean log c`` rather than ``-mean log c``; this
  convention does the same, so its numbers equal the reference's.
Only a_t for t >= 1 enters the recurrence (a_0 is NaN in the lm-polygraph reading).

Heads: the paper picks, per layer, the head whose a_t has the largest mean over the completion (t >= 1),
per sequence (`choose_heads`). A controller must be causal, so it fixes the heads beforehand on
calibration data (``heads.py``) and reads the running score (`RunningScore`): after token t, the largest
over the chosen layers of -mean_{s<=t} log c_s, which at the last token equals the offline score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

CONVENTIONS = ("paper", "lm-polygraph")
ALPHA_BASE = 0.2  # the paper's alpha for base models
ALPHA_INSTRUCT = 0.5  # and for instruct models
TINY = 1e-300  # log of a confidence that underflowed to 0 stays finite in float64


def default_alpha(instruct: bool) -> float:
    """The paper's alpha: 0.5 for instruct (chat) models, 0.2 for base models."""
    return ALPHA_INSTRUCT if instruct else ALPHA_BASE


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention {convention!r}: expected one of {', '.join(CONVENTIONS)}")
    return convention


def uncertainty_offset(convention: str) -> float:
    """What the convention adds to -mean log c: 1 for the reference's ``1 - mean log c``, else 0."""
    return 1.0 if check_convention(convention) == "lm-polygraph" else 0.0


def middle_layers(num_layers: int) -> list[int]:
    """The reference's middle third: ``range(L // 3, ceil(L / 3 * 2) + 1)``, without layers a model of fewer
    than three layers does not have (the reference would index past its last layer there)."""
    return [layer for layer in range(num_layers // 3, math.ceil(num_layers / 3 * 2) + 1) if layer < num_layers]


def previous_token_attention(rows: torch.Tensor, prompt_length: int, convention: str = "paper") -> torch.Tensor:
    """a_t of every head and completion token, (..., T) float64, from the attention rows of the completion's
    queries (..., T, S) over the sequence's positions 0..S-1 of one full pass (``models.scoring.score(...,
    attention_rows=True)``, or a full matrix's rows ``[..., prompt_length:, :]``); module docstring."""
    check_convention(convention)
    steps = torch.arange(rows.shape[-2], device=rows.device)
    columns = prompt_length + steps - 1  # the key of token t-1 in both readings
    # the query: token t itself (paper), or token t-1, the one the step that generated token t consumed
    queries = steps if convention == "paper" else steps - 1
    valid = (queries >= 0) & (columns >= 0)
    values = rows[..., queries.clamp(min=0), columns.clamp(min=0)].double()
    return values.masked_fill(~valid, float("nan"))


def confidences(logprobs: torch.Tensor, attention: torch.Tensor, alpha: float) -> torch.Tensor:
    """The recurrence c_t for each leading index of `attention` (..., T); `logprobs` (T,) are log P(y_t)."""
    probs = logprobs.double().exp()
    attention = attention.double()
    running = probs[0].expand(attention.shape[:-1])
    values = [running]
    for t in range(1, probs.shape[0]):
        running = alpha * probs[t] + (1 - alpha) * attention[..., t] * running
        values.append(running)
    return torch.stack(values, dim=-1)


def choose_heads(attention: torch.Tensor) -> torch.Tensor:
    """Per layer, the head whose a_t (t >= 1) has the largest mean: (layers,) from (layers, heads, T).
    A one-token completion has no a_t; every head ties and the first is taken (as ``argmax`` of NaNs does)."""
    if attention.shape[-1] < 2:
        return torch.zeros(attention.shape[0], dtype=torch.long)
    return attention[..., 1:].mean(-1).argmax(-1)


@dataclass
class SequenceScore:
    """RAUQ of one completion: the score, and per layer of the middle third its head and u_l."""

    score: float
    layer_scores: dict[int, float]
    heads: dict[int, int]


def score_sequence(logprobs: torch.Tensor, attention: torch.Tensor, alpha: float, convention: str = "paper",
                   heads: dict[int, int] | None = None, layers: Sequence[int] | None = None) -> SequenceScore:
    """RAUQ of one completion from log P(y_t) (T,) and a_t of every head (layers, heads, T).

    ``heads``: fixed {layer: head} (from a heads file); None chooses them per sequence as the paper does.
    ``layers``: the layers to score (default: the heads' layers, else the middle third).
    """
    if logprobs.shape[0] == 0:
        raise ValueError("RAUQ of an empty completion is undefined")
    if layers is None:
        layers = sorted(heads) if heads is not None else middle_layers(attention.shape[0])
    layers = list(layers)
    chosen = choose_heads(attention[layers]).tolist() if heads is None else [heads[layer] for layer in layers]
    per_head = attention[layers, chosen]  # (layers, T)
    c = confidences(logprobs, per_head, alpha)
    scores = (-c.clamp(min=TINY).log().mean(-1) + uncertainty_offset(convention)).tolist()
    layer_scores = dict(zip(layers, scores))
    return SequenceScore(max(scores), layer_scores, dict(zip(layers, chosen)))


class RunningScore:
    """The causal token-level RAUQ of one sequence for fixed heads, in the paper's convention.

    ``push(logprob, attention)`` takes log P(y_t) and a_t of the chosen heads (one per layer, in a fixed
    order) and returns the running score: max over layers of -mean_{s<=t} log c_s. ``pop(k)`` forgets the
    last k tokens (a rollback). ``push(..., restart=True)`` starts a new recurrence at this token
    (c = P(y_t)), for a token whose previous token is not scored (it follows an inserted thought).
    Plain floats: a decode step pays a few microseconds for it.
    """

    def __init__(self, alpha: float, num_layers: int):
        self.alpha = alpha
        self.num_layers = num_layers
        self.confidence: list[list[float]] = []  # c_t per layer, per pushed token
        self.log_sums: list[list[float]] = []  # sum_{s<=t} log c_s per layer

    def __len__(self) -> int:
        return len(self.confidence)

    def push(self, logprob: float, attention: Sequence[float] | None, restart: bool = False) -> float:
        prob = math.exp(logprob)
        if not self.confidence or restart:
            current = [prob] * self.num_layers
        else:
            current = [self.alpha * prob + (1 - self.alpha) * a * c for a, c in zip(attention, self.confidence[-1])]
        previous = self.log_sums[-1] if self.log_sums else [0.0] * self.num_layers
        self.confidence.append(current)
        self.log_sums.append([s + math.log(max(c, TINY)) for s, c in zip(previous, current)])
        return self.score

    def pop(self, k: int) -> None:
        if not 0 <= k <= len(self):
            raise ValueError(f"pop({k}): only {len(self)} tokens scored")
        del self.confidence[len(self) - k:]
        del self.log_sums[len(self.log_sums) - k:]

    @property
    def score(self) -> float:
        """The running score after the last pushed token (NaN before the first)."""
        if not self.log_sums:
            return float("nan")
        return max(-total / len(self.log_sums) for total in self.log_sums[-1])


def completion_attention(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]],
                         completion_ids: Sequence[Sequence[int]], convention: str = "paper"
                         ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row, log P(y_t) (T,) and a_t of every head (layers, heads, T) from one teacher-forced pass of the
    shared scoring function (``models.scoring.score`` with every head; with its attention rows for the
    lm-polygraph reading, which the sub-diagonal alone does not hold)."""
    from lightning_lab.models.scoring import pretrained_model, score

    config = pretrained_model(model).config.get_text_config(decoder=True)
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    polygraph = check_convention(convention) == "lm-polygraph"
    scores = score(model, prompt_ids, completion_ids, heads="all", attention_rows=polygraph)
    rows = []
    for row, (prompt_length, length) in enumerate(zip(scores.prompt_lengths, scores.completion_lengths)):
        if polygraph:
            attention = previous_token_attention(scores.attention_rows[row, :, :length], prompt_length, convention)
        else:
            attention = scores.attention[row, :, :length].double()
        rows.append((scores.logprobs[row, :length].double(), attention.reshape(layers, heads, length)))
    return rows


def uncertainties(model: torch.nn.Module, prompt_ids: Sequence[int], completion_ids: Sequence[int], alpha: float,
                  heads: dict[int, int] | None = None) -> dict[str, float]:
    """Sequence-level uncertainty of one completion from one teacher-forced pass (higher = less sure): RAUQ in
    both conventions with heads chosen per sequence (and ``rauq_fixed`` with `heads`, the paper's reading),
    the mean token entropy, MSP (-log of the sequence's probability, LM-Polygraph's MaximumSequenceProbability)
    and perplexity."""
    from lightning_lab.models.scoring import pretrained_model, score

    config = pretrained_model(model).config.get_text_config(decoder=True)
    layers, per_layer = config.num_hidden_layers, config.num_attention_heads
    scores = score(model, [list(prompt_ids)], [list(completion_ids)], heads="all", attention_rows=True, entropy=True)
    length = len(completion_ids)
    logprobs = scores.logprobs[0, :length].double()
    rows = scores.attention_rows[0, :, :length].reshape(layers, per_layer, length, -1)
    result = {}
    for convention in CONVENTIONS:
        attention = previous_token_attention(rows, len(prompt_ids), convention)
        result[f"rauq_{convention.replace('-', '_')}"] = score_sequence(logprobs, attention, alpha, convention).score
        if heads is not None and convention == "paper":
            result["rauq_fixed"] = score_sequence(logprobs, attention, alpha, heads=heads).score
    nll = -float(logprobs.sum())
    result.update(mean_entropy=float(scores.entropy[0, :length].mean()), msp=nll, perplexity=math.exp(nll / length))
    return result
