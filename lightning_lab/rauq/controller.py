"""RAUQ-CoT: greedy decoding that rolls back and repairs where a token-level uncertainty signal fires.

    controller = RAUQController(loaded, ControllerConfig(repair="cot"), scorer=load_heads("heads.json"),
                                threshold=load_threshold("theta.json").theta)
    out = controller.generate("Natalia sold clips ...")
    out.completion, out.trigger_events, out.rauq_scores, out.extra_tokens, out.stats

Decoding is greedy, one token at a time on the sampler's step API (`Sampler.start` / `step` / `append` /
`rollback`: one KV cache; a rollback crops it, nothing is recomputed). After each answer token the trigger
signal is compared with theta (``signal > theta`` fires):
- ``rauq``: the running token-level RAUQ of the answer so far (`scoring.RunningScore` over the heads file's
  heads, the paper's a_{i,i-1}, which the sampler captures for the token it just consumed);
- ``entropy``: the token's next-token entropy (nats); ``margin``: 1 - (p1 - p2), its top-2 margin turned
  into an uncertainty.
A trigger is ignored within the first ``stability_window`` answer tokens (the running mean of a few tokens
is noisy), within ``cooldown`` answer tokens after the last repair, and after ``max_repairs`` repairs.

On a trigger: roll back ``rollback`` answer tokens (``rollback_mode="fixed"``; the triggering token among
them) or back to just after the last answer token that ends a line or a sentence (``"anchor"``; at most to
where the current stretch of answer began), then repair:
- ``cot``: append ``cot_open`` (e.g. " Let me think step by step:"), sample a short thought at
  ``cot_temperature`` / ``cot_top_p``, append ``cot_close``, resume greedy. ``cot_policy`` ends the thought:
  ``rauq`` after ``cot_length`` tokens or as soon as the thought's own running RAUQ is at most theta (the
  model is sure again), ``max20`` after 20 tokens, ``unlimited`` at a newline or EOS; every policy stops
  when the problem's thought budget ``cot_horizon`` is spent, and an EOS inside a thought is taken back.
- ``rerank`` (AdaDec-style): the ``rerank_candidates`` most likely next tokens are each rolled out
  ``rerank_horizon`` greedy tokens; the candidate with the best mean log-prob over its rollout is kept
  (each rollout is rolled back on the same cache), then greedy resumes.
- ``none``: only log the trigger.
The answer's recurrence restarts after an inserted thought (its previous token is not an answer token).

Trace (`ControllerOutput.trace`): one entry per token the model saw, in order: prompt tokens (kind
"prompt"), answer tokens ("answer", with their RAUQ score and trigger signal), thought and marker tokens
("thought", scores null); rolled-back tokens stay in it with ``rolled_back: true``. ``rauq_scores`` has one
value per token of the final completion: the running RAUQ of an answer token, None for thought tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from lightning_lab.errors import UserError
from lightning_lab.rauq.heads import HeadsFile
from lightning_lab.rauq.scoring import RunningScore
from lightning_lab.sampling.sampler import DecodeState, Sampler, SamplingParams, StepOutput

TRIGGERS = ("rauq", "entropy", "margin")
REPAIRS = ("cot", "rerank", "none")
ROLLBACK_MODES = ("fixed", "anchor")
COT_POLICIES = ("rauq", "max20", "unlimited")
ANCHOR_ENDINGS = (".", "?", "!", "\n")


def signal(trigger: str, rauq: float | None, entropy: float, margin: float) -> float | None:
    """What a trigger compares with theta: the running RAUQ, the entropy, or 1 - the top-2 margin."""
    if trigger == "rauq":
        return rauq
    return entropy if trigger == "entropy" else 1.0 - margin


@dataclass
class ControllerConfig:
    trigger: str = "rauq"
    """rauq | entropy | margin: the signal compared with theta (signal > theta fires)"""
    repair: str = "cot"
    """cot | rerank | none: what a trigger does"""
    rollback: int = 2
    """answer tokens rolled back on a trigger (rollback_mode fixed)"""
    rollback_mode: str = "fixed"
    """fixed: `rollback` tokens | anchor: back to the last line or sentence boundary"""
    cot_policy: str = "rauq"
    """rauq | max20 | unlimited: when a thought ends (module docstring)"""
    cot_length: int = 20
    """most tokens of one thought (policy rauq)"""
    cot_horizon: int = 64
    """most thought tokens per problem, all thoughts together"""
    cot_temperature: float = 0.7
    """temperature of thought tokens"""
    cot_top_p: float = 0.95
    """top-p of thought tokens"""
    cot_open: str = " Let me think step by step:"
    """text appended before a thought"""
    cot_close: str = "\n"
    """text appended after a thought"""
    rerank_candidates: int = 3
    """next-token candidates a rerank rolls out"""
    rerank_horizon: int = 4
    """greedy tokens each candidate is rolled out"""
    stability_window: int = 4
    """no trigger within the first this many answer tokens"""
    cooldown: int = 8
    """no trigger within this many answer tokens after a repair"""
    max_repairs: int = 4
    """most triggers acted on per problem"""
    max_new_tokens: int = 256
    """most answer tokens (thought tokens not counted)"""
    seed: int = 0
    """seed of the thought sampling"""

    def __post_init__(self):
        for key, value, choices in (("trigger", self.trigger, TRIGGERS), ("repair", self.repair, REPAIRS),
                                    ("rollback_mode", self.rollback_mode, ROLLBACK_MODES),
                                    ("cot_policy", self.cot_policy, COT_POLICIES)):
            if value not in choices:
                raise UserError(f"{key}: {value!r} is not one of {', '.join(choices)}")
        for key in ("rollback", "stability_window", "cooldown", "max_repairs", "cot_horizon"):
            if getattr(self, key) < 0:
                raise UserError(f"{key}: must be >= 0; got {getattr(self, key)}")
        for key in ("cot_length", "rerank_candidates", "rerank_horizon", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise UserError(f"{key}: must be >= 1; got {getattr(self, key)}")
        if self.cot_temperature <= 0 or not 0 < self.cot_top_p <= 1:
            raise UserError(f"cot_temperature={self.cot_temperature} must be > 0 and cot_top_p={self.cot_top_p} "
                            "in (0, 1]")


def signal_trace(completion, trigger: str, alpha: float, num_layers: int) -> list[float]:
    """The trigger's signal after every token of a sampler `Completion` (with logprobs and the heads' attention
    for rauq, entropies and margins for the others)."""
    if trigger == "rauq":
        running = RunningScore(alpha, num_layers)
        return [running.push(logprob, attention) for logprob, attention in zip(completion.logprobs,
                                                                                completion.attention)]
    return [signal(trigger, None, entropy, margin) for entropy, margin in zip(completion.entropies,
                                                                              completion.margins)]


def first_trigger(signals: Sequence[float], config: ControllerConfig, theta: float) -> int | None:
    """Where the controller would fire first on a greedy answer with these signals (None: nowhere): the first
    token after the stability window whose signal exceeds theta."""
    if config.max_repairs == 0:
        return None
    return next((t for t, value in enumerate(signals) if t >= config.stability_window and value > theta), None)


@dataclass
class ControllerOutput:
    completion: str
    trigger_events: list[dict]  # {position (answer tokens before the trigger), score, rolled_back, repair}
    rauq_scores: list[float | None]  # per token of the final completion; None for thought tokens
    extra_tokens: int  # tokens decoded beyond the final answer's: rolled back, thoughts, rerank rollouts
    stats: dict
    token_ids: list[int] = field(default_factory=list)  # the final completion's tokens (thoughts included)
    repairs: list[dict] = field(default_factory=list)  # per thought: prefix, cot, trigger_position, thought_end
    # (thought_end: index in token_ids just after the thought's closing)
    trace: list[dict] = field(default_factory=list)


@dataclass
class _Token:
    """One token after the prompt, as the controller keeps it."""

    token_id: int
    text: str
    kind: str  # "answer" | "thought"
    rauq: float | None = None
    signal: float | None = None


class RAUQController:
    """Greedy decoding with uncertainty-triggered rollback and repair (module docstring).

    ``scorer``: the heads file (its heads and alpha give the running RAUQ; needed for the rauq trigger and
    the rauq cot policy, optional otherwise). ``threshold``: theta; +inf never triggers (plain greedy).
    """

    def __init__(self, loaded, config: ControllerConfig, scorer: HeadsFile | None, threshold: float,
                 sampler: Sampler | None = None):
        if scorer is None and (config.trigger == "rauq" or (config.repair == "cot" and config.cot_policy == "rauq")):
            raise UserError("the rauq trigger and the rauq cot policy need a heads file (--heads)")
        self.config = config
        self.scorer = scorer
        self.threshold = float(threshold)
        self.sampler = sampler or Sampler(loaded)
        self.tokenizer = self.sampler.tokenizer
        self.greedy = SamplingParams(greedy=True)
        self.thought_params = SamplingParams(config.cot_temperature, config.cot_top_p)

    def generate(self, prompt, prefix: Sequence[int] | None = None) -> ControllerOutput:
        """Decode one prompt. ``prefix``: greedy answer tokens already decoded for it elsewhere (a batched pass,
        `first_trigger`); they are fed in one forward pass and then read one by one as if stepped, and any not
        yet read when a trigger fires are rolled back first, so the result is what stepping would give."""
        config = self.config
        started = time.perf_counter()
        state = self.sampler.start(prompt, greedy=True, seed=config.seed,
                                   capture_heads=self.scorer.pairs if self.scorer else None)
        pending = self.sampler.append(state, list(prefix)[:config.max_new_tokens])[::-1] if prefix else []
        tokens: list[_Token] = []  # everything after the prompt that is still in the cache
        trace = [{"token_id": token, "text": self.tokenizer.decode([token]), "kind": "prompt", "rauq": None,
                  "signal": None, "rolled_back": False} for token in state.prompt_ids]
        running = RunningScore(self.scorer.alpha, len(self.scorer.pairs)) if self.scorer else None
        events, repairs = [], []
        answer_count = decoded = thought_budget = 0
        segment_start = 0  # index in `tokens` where the current stretch of answer began
        last_repair_at = None  # answer tokens when the last repair happened
        finish = "length"
        while answer_count < config.max_new_tokens:
            output = pending.pop() if pending else self._step(state, self.greedy)
            decoded += 1
            self._keep_answer(tokens, trace, running, output)
            token = tokens[-1]
            answer_count += 1
            if output.is_eos:
                finish = "eos"
                break
            in_window = answer_count <= config.stability_window or (
                last_repair_at is not None and answer_count - last_repair_at <= config.cooldown)
            fires = token.signal is not None and token.signal > self.threshold
            if not fires or in_window or len(events) >= config.max_repairs:
                continue
            trace[-1]["trigger"] = True
            count = self._rollback_count(tokens, segment_start)
            event = {"position": answer_count - 1, "score": token.signal, "rolled_back": count, "repair": config.repair}
            events.append(event)
            if config.repair == "none":
                last_repair_at = answer_count
                continue
            self.sampler.rollback(state, count + len(pending))  # the prefix tokens not read yet go too
            pending = []
            del tokens[len(tokens) - count:]
            if running is not None:
                running.pop(count)
            for item in trace[len(trace) - count:]:
                item["rolled_back"] = True
            answer_count -= count
            last_repair_at = answer_count
            if config.repair == "cot":
                before = self._text(tokens)
                thought, used, sampled = self._think(state, tokens, trace, config.cot_horizon - thought_budget)
                decoded += used
                thought_budget += sampled
                repairs.append({"prefix": before, "cot": thought, "trigger_position": event["position"],
                                "thought_end": len(tokens)})
                segment_start = len(tokens)
            else:  # rerank: the chosen token is the next answer token
                used, output = self._rerank(state, running, tokens, trace)
                decoded += used
                answer_count += 1
                last_repair_at = answer_count
                if output.is_eos:
                    finish = "eos"
                    break
        answer_ids = [token.token_id for token in tokens]
        text = self.tokenizer.decode(answer_ids, skip_special_tokens=True)
        seconds = time.perf_counter() - started
        stats = {"answer_tokens": answer_count, "thought_tokens": sum(t.kind == "thought" for t in tokens),
                 "decoded_tokens": decoded, "triggers": len(events), "finish": finish, "seconds": seconds}
        return ControllerOutput(text, events, [token.rauq for token in tokens], decoded - answer_count, stats,
                                answer_ids, repairs, trace)

    def greedy_prefixes(self, prompts: Sequence, batch_size: int | None = None) -> list[list[int]]:
        """One batched greedy pass of the sampler over `prompts` (its `generate`, every row decoded together);
        per prompt, its tokens up to and including the first trigger (`first_trigger`), or all of them. Given to
        `generate` as ``prefix``, they let a batch of problems share the decoding up to their first triggers."""
        config, heads = self.config, self.scorer
        capture = heads.pairs if heads is not None and config.trigger == "rauq" else None
        generation = self.sampler.generate(list(prompts), greedy=True, max_new_tokens=config.max_new_tokens,
                                           logprobs=True, entropy=True, margin=True, capture_heads=capture,
                                           batch_size=batch_size or len(prompts))
        prefixes = []
        for (completion,) in generation.completions:
            signals = signal_trace(completion, config.trigger, heads.alpha if heads else 0.0,
                                   len(heads.pairs) if heads else 0)
            first = first_trigger(signals, config, self.threshold)
            prefixes.append(completion.token_ids if first is None else completion.token_ids[:first + 1])
        return prefixes

    # ---- pieces ----

    def _step(self, state: DecodeState, params: SamplingParams) -> StepOutput:
        """One token under `params` on the same state (greedy answer, sampled thought)."""
        return self.sampler.step(state, greedy=params.greedy, temperature=params.temperature, top_p=params.top_p,
                                 top_k=params.top_k)

    def _rollback_count(self, tokens: list[_Token], segment_start: int) -> int:
        """How many tokens a trigger rolls back: never into a thought or the prompt."""
        available = len(tokens) - segment_start
        if self.config.rollback_mode == "fixed":
            return min(self.config.rollback, available)
        for index in range(len(tokens) - 2, segment_start - 1, -1):  # the triggering token always goes
            if tokens[index].text.rstrip(" ").endswith(ANCHOR_ENDINGS):
                return len(tokens) - index - 1
        return available

    def _think(self, state: DecodeState, tokens: list[_Token], trace: list[dict], budget: int) -> tuple[str, int, int]:
        """Append the opening, sample a thought (at most `budget` tokens), append the closing; returns the
        thought's text, the tokens decoded (markers and a taken-back EOS included) and the thought's tokens."""
        config = self.config
        decoded = 0
        for output in self.sampler.append(state, config.cot_open):
            self._keep(tokens, trace, output)
            decoded += 1
        limit = {"rauq": config.cot_length, "max20": 20, "unlimited": math.inf}[config.cot_policy]
        thought_running = RunningScore(self.scorer.alpha, len(self.scorer.pairs)) if self.scorer else None
        pieces = []
        while len(pieces) < min(limit, budget):
            output = self._step(state, self.thought_params)
            decoded += 1
            if output.is_eos:  # a thought does not end the answer
                self.sampler.rollback(state, 1)
                break
            self._keep(tokens, trace, output)
            pieces.append(output.text)
            if config.cot_policy == "unlimited" and "\n" in output.text:
                break
            if config.cot_policy == "rauq" and thought_running is not None:
                if thought_running.push(output.logprob, output.attention) <= self.threshold:
                    break
        for output in self.sampler.append(state, config.cot_close):
            self._keep(tokens, trace, output)
            decoded += 1
        return "".join(pieces), decoded, len(pieces)

    def _keep(self, tokens: list[_Token], trace: list[dict], output: StepOutput) -> None:
        token = _Token(output.token_id, output.text, "thought")
        tokens.append(token)
        trace.append(self._trace_entry(token))

    def _rerank(self, state: DecodeState, running: RunningScore | None, tokens: list[_Token],
                trace: list[dict]) -> tuple[int, StepOutput]:
        """Roll out the top candidates of the next token and keep the best; (tokens decoded, the kept token)."""
        config = self.config
        logits = state.logits[-1].float().reshape(-1)  # the next-token logits of this one row
        candidates = logits.topk(config.rerank_candidates).indices.tolist()
        decoded, best, best_value = 0, None, -math.inf
        for candidate in candidates:
            outputs = self.sampler.append(state, [candidate])
            for _ in range(config.rerank_horizon):
                if outputs[-1].is_eos:
                    break
                outputs.append(self._step(state, self.greedy))
            decoded += len(outputs)
            value = sum(output.logprob for output in outputs) / len(outputs)
            if value > best_value:
                best, best_value = candidate, value
            self.sampler.rollback(state, len(outputs))
        output = self.sampler.append(state, [best])[0]
        self._keep_answer(tokens, trace, running, output)
        return decoded + 1, output

    def _keep_answer(self, tokens: list[_Token], trace: list[dict], running: RunningScore | None,
                     output: StepOutput) -> None:
        """Score an answer token (a new recurrence right after a thought) and keep it."""
        after_thought = bool(tokens) and tokens[-1].kind == "thought"
        rauq = running.push(output.logprob, output.attention, restart=after_thought) if running is not None else None
        value = signal(self.config.trigger, rauq, output.entropy, output.margin)
        token = _Token(output.token_id, output.text, "answer", rauq, value)
        tokens.append(token)
        trace.append(self._trace_entry(token))

    def _trace_entry(self, token: _Token) -> dict:
        return {"token_id": token.token_id, "text": token.text, "kind": token.kind, "rauq": token.rauq,
                "signal": token.signal, "rolled_back": False}

    def _text(self, tokens: list[_Token]) -> str:
        return self.tokenizer.decode([token.token_id for token in tokens], skip_special_tokens=True)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
