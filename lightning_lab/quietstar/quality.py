"""Trace quality: how much a thought helps the model toward the gold answer.

For a thought inserted at some place in an answer, let ``context`` be the prompt and everything the model
had seen before that thought (earlier thoughts included), and ``gold`` the tokens of the reference
continuation (``GOLD_TEMPLATE`` filled with the sample's reference: "The answer is 72."). The thought's
quality is

    mean_j log p(gold_j | context, thought, gold_<j)  -  mean_j log p(gold_j | context, gold_<j)

in nats per gold token, where "thought" is the start marker, its tokens and the end marker. Positive: the
model is more sure of the gold answer after thinking. A trace's quality is the mean over its thoughts
(None for a trace without thoughts). Both log-likelihoods come from one teacher-forced batch through the
lab's scoring function (`lightning_lab.models.scoring.score`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_lab.models.scoring import score
from lightning_lab.quietstar.injector import ThoughtTrace
from lightning_lab.quietstar.tokens import ThoughtTokens

GOLD_TEMPLATE = "\nThe answer is {reference}."


@dataclass
class TraceQuality:
    """Per thought: the change in mean gold-token log-likelihood (nats); the trace's mean (None: no thoughts)."""

    per_thought: list[float]
    mean: float | None


def gold_ids(tokenizer, reference: str, template: str = GOLD_TEMPLATE) -> list[int]:
    """The tokens of the reference continuation that trace quality scores."""
    return tokenizer(template.format(reference=reference), add_special_tokens=False)["input_ids"]


def trace_quality(model: torch.nn.Module, trace: ThoughtTrace, thoughts: ThoughtTokens,
                  gold: list[int]) -> TraceQuality:
    """The quality of each thought of `trace` and their mean (module docstring)."""
    if not gold:
        raise ValueError("trace_quality: the gold continuation has no tokens")
    starts = [index for index, token in enumerate(trace.token_ids) if token == thoughts.start_id]
    if not starts:
        return TraceQuality([], None)
    with_thought, without = [], []
    for start in starts:
        end = trace.token_ids.index(thoughts.end_id, start)
        before = trace.prompt_ids + trace.token_ids[:start]
        with_thought.append(before + trace.token_ids[start:end + 1])
        without.append(before)
    scores = score(model, with_thought + without, [gold] * (2 * len(starts)))
    per_token = scores.logprobs.sum(dim=1) / len(gold)
    deltas = (per_token[:len(starts)] - per_token[len(starts):]).tolist()
    return TraceQuality(deltas, sum(deltas) / len(deltas))
