"""RAUQ-CoT: greedy decoding that rolls back and repairs where a token-level uncertainty signal fires.

    controller = RAUQController(loaded, ControllerConfig(repair="cot"), scorer=load_heads("heads.json"),
                                threshold=load_threshold("theta.json").theta)
    out = controller.generate("Natalia sold clips ...")
    out.completion, out.trigger_events, out.rauq_scores, out.extra_tokens, out.stats

    outs = controller.generate_batch(prompts)  # several problems in one batch, each on its own

Decoding is greedy, one token per row and forward pass on the sampler's ragged rows (`Sampler.start_rows` /
`step_rows` / `rollback_row` / `select_rows`: one KV cache for the batch; a row's rollback masks its last
tokens out, nothing is recomputed), so problems of a batch trigger, roll back and think each on its own, and
each decodes as it would alone (its thoughts draw from its own generator, seeded with ``seed``). After each
answer token the trigger signal is compared with theta (``signal > theta`` fires):
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
  (the candidates roll out together on rows forked from the problem's row, which waits; their rows are then
  dropped), then greedy resumes.
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

import torch

from lightning_lab.errors import UserError
from lightning_lab.rauq.heads import HeadsFile
from lightning_lab.rauq.scoring import RunningScore
from lightning_lab.sampling.sampler import (DROP_FINISHED_FRACTION, RaggedState, Sampler, SamplingParams, StepOutput,
                                            choose_tokens)

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


@dataclass(eq=False)
class _Problem:
    """One problem being decoded in a batch: what the controller keeps for it, and where it is.

    ``mode``: ``answer`` (greedy answer tokens), ``open`` / ``close`` (feeding the thought's markers from
    ``queue``), ``thought`` (sampling a thought), ``wait`` (its rerank candidates roll out on forked rows),
    ``best`` (feeding the kept candidate). ``finish`` is set once it is done (its row then idles)."""

    generator: torch.Generator
    tokens: list[_Token] = field(default_factory=list)  # everything after the prompt that is still in the cache
    trace: list[dict] = field(default_factory=list)
    running: RunningScore | None = None
    events: list[dict] = field(default_factory=list)
    repairs: list[dict] = field(default_factory=list)
    answer_count: int = 0
    decoded: int = 0
    thought_budget: int = 0  # thought tokens sampled so far
    segment_start: int = 0  # index in `tokens` where the current stretch of answer began
    last_repair_at: int | None = None  # answer tokens when the last repair happened
    mode: str = "answer"
    queue: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)  # the current thought's text pieces
    thought_running: RunningScore | None = None
    prefix: str = ""  # the answer text before the current thought
    rollouts: list[_Rollout] = field(default_factory=list)
    finish: str | None = None
    seconds: float = 0.0


@dataclass(eq=False)
class _Rollout:
    """A rerank candidate rolled out greedily on a row forked from its problem's row."""

    problem: _Problem
    candidate: int
    outputs: list[StepOutput] = field(default_factory=list)
    done: bool = False


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
        self.thought_params = SamplingParams(config.cot_temperature, config.cot_top_p)
        self.cot_open, self.cot_close = self._ids(config.cot_open), self._ids(config.cot_close)

    def generate(self, prompt) -> ControllerOutput:
        """Decode one prompt (`generate_batch` of one)."""
        return self.generate_batch([prompt])[0]

    def generate_batch(self, prompts: Sequence) -> list[ControllerOutput]:
        """Decode several prompts together, each on its own: one forward pass per step feeds every row's next
        token (a greedy answer token, a sampled thought token or a marker), and each row triggers, rolls back
        and inserts on its own (`Sampler.start_rows`: rows of different lengths in one KV cache; a rollback
        masks the row's last tokens out). A rerank forks its candidates as rows of the same batch. Each row's
        thoughts draw from its own generator seeded with ``config.seed``, so a problem decodes as it would
        alone. ``stats["seconds"]``: from the start of the batch until the problem finished."""
        config = self.config
        started = time.perf_counter()
        state = self.sampler.start_rows(list(prompts), capture_heads=self.scorer.pairs if self.scorer else None)
        problems = []
        for prompt_ids in state.prompt_ids:
            problem = _Problem(torch.Generator(device=self.sampler.device).manual_seed(config.seed))
            problem.trace = [{"token_id": token, "text": self.tokenizer.decode([token]), "kind": "prompt",
                              "rauq": None, "signal": None, "rolled_back": False} for token in prompt_ids]
            problem.running = self._running_score()
            problems.append(problem)
        owners: list[_Problem | _Rollout] = list(problems)  # what each row of the state decodes
        with self.sampler.holding(state):
            self._decode(state, problems, owners, started)
        return [self._output(problem) for problem in problems]

    def _decode(self, state: RaggedState, problems: list[_Problem], owners: list, started: float) -> None:
        """Step every row until every problem is finished (`generate_batch`)."""
        config = self.config
        while any(problem.finish is None for problem in problems):
            tokens = [self._next_token(owner, state.logits[r][-1]) for r, owner in enumerate(owners)]
            for r, (owner, output) in enumerate(zip(owners, self.sampler.step_rows(state, tokens))):
                if output is None:
                    continue
                if isinstance(owner, _Rollout):
                    owner.outputs.append(output)
                    owner.done = output.is_eos or len(owner.outputs) > config.rerank_horizon
                else:
                    self._advance(state, r, owner, output)
                    if owner.finish is not None:
                        owner.seconds = time.perf_counter() - started
            state, owners = self._rerank_rows(state, owners)
            finished = [r for r, owner in enumerate(owners) if isinstance(owner, _Problem) and owner.finish]
            if finished and len(finished) >= DROP_FINISHED_FRACTION * len(owners) and len(finished) < len(owners):
                keep = [r for r in range(len(owners)) if r not in finished]
                state, owners = self.sampler.select_rows(state, keep), [owners[r] for r in keep]

    # ---- one row ----

    def _next_token(self, owner: _Problem | _Rollout, logits: torch.Tensor) -> int | None:
        """The token this row feeds next: forced, sampled (a thought) or greedy; None when it idles."""
        if isinstance(owner, _Rollout):
            if owner.done:
                return None
            return int(logits.argmax()) if owner.outputs else owner.candidate
        if owner.finish is not None or owner.mode == "wait":
            return None
        if owner.queue:
            return owner.queue[0]
        if owner.mode == "thought":
            return int(choose_tokens(logits[None], self.thought_params, owner.generator, self.sampler.cpu_kernels)[0])
        return int(logits.argmax())

    def _advance(self, state: RaggedState, r: int, problem: _Problem, output: StepOutput) -> None:
        """Take in the token row `r` just fed for `problem`, and decide what comes next."""
        config = self.config
        problem.decoded += 1
        if problem.mode in ("open", "close"):
            problem.queue.pop(0)
            self._keep(problem, output)
            if not problem.queue:
                self._start_thought(problem) if problem.mode == "open" else self._end_thought(problem)
        elif problem.mode == "thought":
            if output.is_eos:  # a thought does not end the answer
                self.sampler.rollback_row(state, r, 1)
                self._close_thought(problem)
                return
            self._keep(problem, output)
            problem.pieces.append(output.text)
            if config.cot_policy == "unlimited" and "\n" in output.text:
                self._close_thought(problem)
            elif config.cot_policy == "rauq" and problem.thought_running is not None and \
                    problem.thought_running.push(output.logprob, output.attention) <= self.threshold:
                self._close_thought(problem)
            else:
                self._start_thought(problem)  # goes on, or closes once the thought is long enough
        elif problem.mode == "best":  # the kept rerank candidate: the next answer token, no trigger on it
            problem.queue.pop(0)
            self._keep_answer(problem, output)
            problem.answer_count += 1
            problem.last_repair_at = problem.answer_count
            problem.mode = "answer"
            if output.is_eos:
                problem.finish = "eos"
        else:
            self._answer(state, r, problem, output)
        if problem.finish is None and problem.mode == "answer" and problem.answer_count >= config.max_new_tokens:
            problem.finish = "length"

    def _answer(self, state: RaggedState, r: int, problem: _Problem, output: StepOutput) -> None:
        """A greedy answer token: keep it, and on a trigger roll back and start the repair."""
        config = self.config
        self._keep_answer(problem, output)
        problem.answer_count += 1
        if output.is_eos:
            problem.finish = "eos"
            return
        token = problem.tokens[-1]
        in_window = problem.answer_count <= config.stability_window or (
            problem.last_repair_at is not None and problem.answer_count - problem.last_repair_at <= config.cooldown)
        fires = token.signal is not None and token.signal > self.threshold
        if not fires or in_window or len(problem.events) >= config.max_repairs:
            return
        problem.trace[-1]["trigger"] = True
        count = self._rollback_count(problem.tokens, problem.segment_start)
        event = {"position": problem.answer_count - 1, "score": token.signal, "rolled_back": count,
                 "repair": config.repair}
        problem.events.append(event)
        if config.repair == "none":
            problem.last_repair_at = problem.answer_count
            return
        self.sampler.rollback_row(state, r, count)
        del problem.tokens[len(problem.tokens) - count:]
        if problem.running is not None:
            problem.running.pop(count)
        for item in problem.trace[len(problem.trace) - count:]:
            item["rolled_back"] = True
        problem.answer_count -= count
        problem.last_repair_at = problem.answer_count
        if config.repair == "cot":
            problem.prefix = self._text(problem.tokens)
            problem.repairs.append({"prefix": problem.prefix, "cot": "", "trigger_position": event["position"]})
            problem.mode, problem.queue, problem.pieces = "open", list(self.cot_open), []
            problem.thought_running = self._running_score()
            if not problem.queue:
                self._start_thought(problem)
        else:  # rerank: the candidates are forked after this step (`_rerank_rows`)
            logits = state.logits[r][-1]
            problem.mode = "wait"
            problem.rollouts = [_Rollout(problem, candidate)
                                for candidate in logits.topk(config.rerank_candidates).indices.tolist()]

    def _start_thought(self, problem: _Problem) -> None:
        """Sample (more of) the thought, or close it once its length or the problem's thought budget is spent."""
        limit = {"rauq": self.config.cot_length, "max20": 20, "unlimited": math.inf}[self.config.cot_policy]
        problem.mode = "thought"
        if len(problem.pieces) >= min(limit, self.config.cot_horizon - problem.thought_budget):
            self._close_thought(problem)

    def _close_thought(self, problem: _Problem) -> None:
        problem.thought_budget += len(problem.pieces)
        problem.repairs[-1]["cot"] = "".join(problem.pieces)
        problem.mode, problem.queue = "close", list(self.cot_close)
        if not problem.queue:
            self._end_thought(problem)

    def _end_thought(self, problem: _Problem) -> None:
        problem.repairs[-1]["thought_end"] = len(problem.tokens)
        problem.segment_start = len(problem.tokens)
        problem.mode = "answer"

    def _rerank_rows(self, state: RaggedState, owners: list) -> tuple[RaggedState, list]:
        """Fork the rows of problems whose rerank just started (one row per candidate, in the same batch), and
        for those whose candidates are all rolled out keep the candidate with the best mean log-prob over its
        rollout (AdaDec), drop the candidates' rows and feed the kept one next."""
        starting = [(r, owner) for r, owner in enumerate(owners) if isinstance(owner, _Problem)
                    and owner.mode == "wait" and owner.rollouts and owner.rollouts[0] not in owners]
        if starting:
            forked = [r for r, problem in starting for _ in problem.rollouts]
            state = self.sampler.select_rows(state, list(range(len(owners))) + forked)
            owners = owners + [rollout for _, problem in starting for rollout in problem.rollouts]
        done = [owner for owner in owners if isinstance(owner, _Problem) and owner.mode == "wait"
                and all(rollout.done for rollout in owner.rollouts)]
        if not done:
            return state, owners
        for problem in done:
            means = [sum(o.logprob for o in rollout.outputs) / len(rollout.outputs) for rollout in problem.rollouts]
            problem.decoded += sum(len(rollout.outputs) for rollout in problem.rollouts)
            problem.queue = [problem.rollouts[means.index(max(means))].candidate]
            problem.mode, problem.rollouts = "best", []
        keep = [r for r, owner in enumerate(owners) if not (isinstance(owner, _Rollout) and owner.problem in done)]
        return self.sampler.select_rows(state, keep), [owners[r] for r in keep]

    def _output(self, problem: _Problem) -> ControllerOutput:
        answer_ids = [token.token_id for token in problem.tokens]
        stats = {"answer_tokens": problem.answer_count,
                 "thought_tokens": sum(token.kind == "thought" for token in problem.tokens),
                 "decoded_tokens": problem.decoded, "triggers": len(problem.events), "finish": problem.finish,
                 "seconds": problem.seconds}
        return ControllerOutput(self.tokenizer.decode(answer_ids, skip_special_tokens=True), problem.events,
                                [token.rauq for token in problem.tokens], problem.decoded - problem.answer_count,
                                stats, answer_ids, problem.repairs, problem.trace)

    # ---- pieces ----

    def _running_score(self) -> RunningScore | None:
        return RunningScore(self.scorer.alpha, len(self.scorer.pairs)) if self.scorer else None

    def _rollback_count(self, tokens: list[_Token], segment_start: int) -> int:
        """How many tokens a trigger rolls back: never into a thought or the prompt."""
        available = len(tokens) - segment_start
        if self.config.rollback_mode == "fixed":
            return min(self.config.rollback, available)
        for index in range(len(tokens) - 2, segment_start - 1, -1):  # the triggering token always goes
            if tokens[index].text.rstrip(" ").endswith(ANCHOR_ENDINGS):
                return len(tokens) - index - 1
        return available

    def _keep(self, problem: _Problem, output: StepOutput) -> None:
        """Keep a thought or marker token (no scores)."""
        token = _Token(output.token_id, output.text, "thought")
        problem.tokens.append(token)
        problem.trace.append(self._trace_entry(token))

    def _keep_answer(self, problem: _Problem, output: StepOutput) -> None:
        """Score an answer token (a new recurrence right after a thought) and keep it."""
        after_thought = bool(problem.tokens) and problem.tokens[-1].kind == "thought"
        running = problem.running
        rauq = running.push(output.logprob, output.attention, restart=after_thought) if running is not None else None
        value = signal(self.config.trigger, rauq, output.entropy, output.margin)
        token = _Token(output.token_id, output.text, "answer", rauq, value)
        problem.tokens.append(token)
        problem.trace.append(self._trace_entry(token))

    def _trace_entry(self, token: _Token) -> dict:
        return {"token_id": token.token_id, "text": token.text, "kind": token.kind, "rauq": token.rauq,
                "signal": token.signal, "rolled_back": False}

    def _text(self, tokens: list[_Token]) -> str:
        return self.tokenizer.decode([token.token_id for token in tokens], skip_special_tokens=True)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
