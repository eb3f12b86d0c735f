"""ThoughtInjector: decode an answer through the sampler, inserting short sampled thoughts on the way.

    injector = ThoughtInjector(Sampler(loaded), add_thought_tokens(loaded.model, loaded.tokenizer),
                               InjectorConfig(thought_probability=0.5, max_thought_length=64))
    trace = injector.generate("Natalia sold clips ...", max_new_tokens=256, greedy=True, seed=0)
    trace.text            # the answer a reader sees: no thought, no marker
    trace.thoughts        # [Thought(position, token_ids, text), ...]: where each went and what it said

Where a thought goes: right after the question (``after_question``), and after every answer token whose
text ends a sentence or a line of reasoning (``boundaries``: ``. ? ! : ;`` and newline; a ``.`` right after
a digit is not a boundary, since it may be a decimal point). At each such place a thought is inserted with
probability ``thought_probability`` (drawn from ``random.Random(seed)``, so a trace is reproducible).

A thought is ``<|startofthought|>``, then up to ``max_thought_length`` tokens sampled at the thought's own
temperature / top-p, then ``<|endofthought|>``: sampled by the model (it ends the thought early) or appended
when the thought reaches its length. An end-of-sequence token inside a thought is taken back and the thought
is closed instead (a thought does not end the answer). The thought stays in the KV cache, so the answer after
it is conditioned on it; that is what an internal thought is. A model that starts a thought by itself (a
baked model samples the start marker) is handled the same way: its thought is sampled with the thought
settings and never reaches the visible text.

The answer (``max_new_tokens`` counts its visible tokens only) is sampled with the answer's own settings
(greedy, or temperature / top-p) and ends at EOS, a stop string or the length limit, as `Sampler.generate`'s
completions do. ``show_thoughts=True`` puts the thoughts, with their markers, into ``trace.text``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from lightning_lab.errors import UserError
from lightning_lab.quietstar.tokens import ThoughtTokens
from lightning_lab.sampling.sampler import DecodeState, Sampler, SamplingParams, find_stop

BOUNDARIES = (".", "?", "!", ":", ";", "\n")


@dataclass
class InjectorConfig:
    """Where, how often and how long thoughts are, and how they are sampled.

    Args:
        thought_probability: chance of a thought at each candidate position (0: never, 1: at every one).
        max_thought_length: most tokens a thought may have between its markers.
        thought_temperature: temperature of the tokens inside a thought (independent of the answer's).
        thought_top_p: nucleus of the tokens inside a thought.
        after_question: a candidate position right after the question, before the first answer token.
        boundaries: an answer token whose text ends with one of these makes the position after it a candidate.
        show_thoughts: put the thoughts (with their markers) into the returned text; off: hidden.
    """

    thought_probability: float = 0.5
    max_thought_length: int = 64
    thought_temperature: float = 1.0
    thought_top_p: float = 1.0
    after_question: bool = True
    boundaries: list[str] = field(default_factory=lambda: list(BOUNDARIES))
    show_thoughts: bool = False

    def __post_init__(self):
        if not 0.0 <= self.thought_probability <= 1.0:
            raise UserError(f"thought_probability={self.thought_probability}: must be in [0, 1]")
        if self.max_thought_length < 1:
            raise UserError(f"max_thought_length={self.max_thought_length}: must be >= 1")
        if self.thought_temperature <= 0 or not 0 < self.thought_top_p <= 1:
            raise UserError(f"thought_temperature={self.thought_temperature} must be > 0 and "
                            f"thought_top_p={self.thought_top_p} in (0, 1]")


@dataclass
class Thought:
    """One thought: inserted after ``position`` visible answer tokens; its ids exclude the markers."""

    position: int
    token_ids: list[int]
    text: str
    injected: bool  # inserted by the injector (else the model sampled the start marker itself)
    closed_by_model: bool  # the model sampled the end marker (else it was appended at max_thought_length)


@dataclass
class ThoughtTrace:
    """One answer with its thoughts. ``token_ids`` is everything after the prompt as the model saw it (thoughts
    and markers included); ``visible_ids`` the answer alone; ``text`` what a reader sees."""

    prompt_ids: list[int]
    token_ids: list[int]
    visible_ids: list[int]
    thoughts: list[Thought]
    text: str
    finish_reason: str  # "eos" | "stop" | "length"


class ThoughtInjector:
    """Decodes answers with thoughts inserted (module docstring) through one `Sampler`'s step-wise API."""

    def __init__(self, sampler: Sampler, thoughts: ThoughtTokens, config: InjectorConfig | None = None):
        self.sampler = sampler
        self.tokens = thoughts
        self.config = config or InjectorConfig()
        self.thought_params = SamplingParams(self.config.thought_temperature, self.config.thought_top_p)

    def generate(self, prompt, max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                 greedy: bool = False, stop: Sequence[str] | None = None, seed: int = 0,
                 chat: bool | None = None) -> ThoughtTrace:
        """One answer to `prompt` (text, chat messages or ids) with thoughts inserted; see the module docstring."""
        stop = [s for s in (stop or []) if s]
        answer_params = SamplingParams(temperature, top_p, greedy=greedy)
        state = self.sampler.start(prompt, temperature, top_p, greedy=greedy, seed=seed, chat=chat)
        chance = random.Random(f"thoughts-{seed}")
        visible: list[int] = []
        thoughts: list[Thought] = []
        candidate = self.config.after_question
        finish = "length"
        while len(visible) < max_new_tokens and len(thoughts) <= max_new_tokens:  # bounded if it only thinks
            if candidate and chance.random() < self.config.thought_probability:
                self.sampler.append(state, [self.tokens.start_id])
                thoughts.append(self._think(state, len(visible), injected=True))
            output = self._step(state, answer_params)
            if output.token_id == self.tokens.start_id:  # the model starts a thought itself
                thoughts.append(self._think(state, len(visible), injected=False))
                candidate = False
                continue
            if output.token_id == self.tokens.end_id:  # a stray end marker outside a thought: not text
                candidate = False
                continue
            visible.append(output.token_id)
            if output.is_eos:
                finish = "eos"
                break
            piece = self.sampler.tokenizer.decode([output.token_id], skip_special_tokens=True)
            if stop and find_stop(self.sampler.tokenizer.decode(visible, skip_special_tokens=True), stop):
                finish = "stop"
                break
            candidate = self._is_boundary(visible, piece)
        return self._trace(state, visible, thoughts, finish, stop)

    def _step(self, state: DecodeState, params: SamplingParams):
        """One sampled token under `params` (the answer's or the thought's settings) on the same state."""
        return self.sampler.step(state, greedy=params.greedy, temperature=params.temperature, top_p=params.top_p,
                                 top_k=params.top_k)

    def _think(self, state: DecodeState, position: int, injected: bool) -> Thought:
        """Sample one thought after a start marker already in `state`; close it with the end marker."""
        ids: list[int] = []
        closed_by_model = False
        while len(ids) < self.config.max_thought_length:
            output = self._step(state, self.thought_params)
            if output.token_id == self.tokens.end_id:
                closed_by_model = True
                break
            if output.is_eos or output.token_id == self.tokens.start_id:  # no nested thoughts, no end inside one
                self.sampler.rollback(state, 1)
                break
            ids.append(output.token_id)
        if not closed_by_model:
            self.sampler.append(state, [self.tokens.end_id])
        text = self.sampler.tokenizer.decode(ids, skip_special_tokens=True)
        return Thought(position, ids, text, injected, closed_by_model)

    def _is_boundary(self, visible: list[int], piece: str) -> bool:
        """Whether the position after the last visible token is a candidate for a thought."""
        text = piece.rstrip(" ")
        if not text or not any(text.endswith(b) for b in self.config.boundaries):
            return False
        if text.endswith("."):  # "3." may be the start of "3.5"
            before = self.sampler.tokenizer.decode(visible, skip_special_tokens=True).rstrip(" ")[:-1]
            return not before[-1:].isdigit()
        return True

    def _trace(self, state: DecodeState, visible: list[int], thoughts: list[Thought], finish: str,
               stop: list[str]) -> ThoughtTrace:
        tokenizer = self.sampler.tokenizer
        if self.config.show_thoughts:
            shown = [t for t in state.token_ids if t not in self.sampler.eos_ids]
            text = tokenizer.decode(shown, skip_special_tokens=False)
        else:
            text = tokenizer.decode(visible, skip_special_tokens=True)
        if finish == "stop":
            found = find_stop(text, stop)
            text = text[:found[0]] if found else text
        return ThoughtTrace(list(state.prompt_ids), list(state.token_ids), visible, thoughts, text, finish)

