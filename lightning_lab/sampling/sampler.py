"""One sampler: the only place in the lab that decodes.

    sampler = Sampler(load_causal_lm("smollm2-135m"))
    out = sampler.generate(["What is 2 + 3?"], n=8, max_new_tokens=128, temperature=0.8, top_p=0.95,
                           stop=["\\n\\n"], logprobs=True)
    out.prompts[0].completions[3].text, out.timing.new_tokens

Batch decoding (`generate`)
- Prompts are plain text, chat messages (``[{"role": ..., "content": ...}]``) or token ids. ``chat=None``
  (default) frames text *and* messages with the tokenizer's chat template when it has one (an instruct
  model answers a bare question badly), and uses text verbatim when it has none; ``chat=False`` always
  uses text verbatim (for text that is already templated, or base-model continuation; messages are then
  an error); ``chat=True`` requires a template. Token ids are always used as given.
- Up to ``batch_size`` prompts share each forward pass, left-padded, with position ids counted from each
  prompt's first real token. The n samples of a prompt share one prefill: the prompt's KV cache is
  computed once and its rows repeated n times.
- Prompts that begin with the same tokens (a chat template's head, the ACE playbook before different questions)
  share their prefill (``prefix_cache``, on by default): the batch's longest common token prefix, when it has
  `MIN_SHARED_PREFIX` tokens or more (each prompt keeps at least one of its own), is computed once on one row and
  its cache rows repeated; the rest of each prompt follows it right-aligned, the padding in between masked out and
  positions counted over real tokens, so every row attends to what it would alone. fp32 greedy decoding gives the
  tokens of whole-prompt prefills (the logits differ in the last bits: attention sums over other key layouts).
  Decode steps on the CPU kernels then read the prefix's keys once for all rows (`KVCache.shared_prefix`).
  ``Sampler(keep_prefix=True)`` also keeps the last batch's prefix (one row of cache) for the next call, which
  computes only the tokens its own prefix adds after the part the two have in common (ACE's generator: the same
  playbook before every batch of a frozen pass, and before each call of a batch).
- The KV cache is preallocated (``kv_cache.py``: one buffer per layer, written in place, cropped by moving a
  length) instead of growing by concatenation, which would copy the whole cache at every step.
  Rows that finished (EOS / stop string / length) are dropped from the batch and the cache once a
  quarter of the rows in the batch have finished.
- Sampling runs on the device, batched: temperature, then top-k, then top-p (the order of
  ``transformers.generate``), then a draw from the remaining weights (`draw`, one uniform number per row).
  Top-p is exact but avoids sorting the whole vocabulary: it looks at the top `TOP_P_CANDIDATES` tokens, and
  sorts the whole vocabulary only for the rows whose candidates hold less than ``top_p`` of the mass.
  ``greedy=True`` (or ``temperature=0``) takes the argmax. When choosing a token needs only the k largest
  logits (top-k of at most 64, or greedy; no per-token signals asked: `screened_k`), an fp32 decoder step
  of three rows and more computes only those (`LlamaDecoder.forward`'s ``top_k``): the same tokens, but
  for ties within fp32 rounding.
- Finish reasons: ``eos`` (an end-of-sequence token of the tokenizer or generation config was produced;
  it is the last of ``token_ids`` and left out of ``text``), ``stop`` (a stop string appeared: ``text``
  ends just before it, ``token_ids`` end with the token that completed it, ``stop`` names it; stop strings
  are matched in the decoded text, so they may span token boundaries) and ``length`` (``max_new_tokens``).
  ``ignore_eos=True`` treats EOS as an ordinary token so that every sample runs to ``max_new_tokens``
  (benchmarks); stop strings still apply.

Prompt lookup (``prompt_lookup=k``, greedy with n=1 only)
A one-row decode step costs the time to read every weight once, and checking a few more tokens in the same
pass costs about the same (SmolLM2 bf16, 2-core CPU: 29.5-33.9 ms for 1 to 8 tokens). So each pass feeds the
last chosen token plus a draft of up to k tokens: what followed the latest earlier occurrence of the last
3 tokens (else 2, else 1) in the prompt and the text so far (`lookup_draft`). The model's argmax after each
fed token decides: the draft tokens it agrees with are kept, with its own next token after them, and the
rest are cropped from the cache. In exact arithmetic the tokens are those of plain greedy decoding; in
fp32 they were on 8 GSM8K questions (128 tokens each). In bf16 a pass over several tokens rounds
differently from one-token passes, so after a near-tie (top-2 margins of 0-0.07 where it happened) the text
may go another way: 5 of those 8 questions left plain greedy within 128 tokens, as 3 of 8 did when decoded
in one batch instead of alone. Signals are computed as usual. Prompts decode one at a time: for many
prompts, batched decoding makes more tokens per second.

Per-token signals (when asked) describe the model's own next-token distribution at that position,
p = softmax(logits) at temperature 1 before any top-k/top-p filtering: ``logprobs`` log p(token),
``entropies`` -sum p log p (nats), ``margins`` p(top-1) - p(top-2) (probabilities, in [0, 1]).

Attention capture (``capture_heads=[(layer, head), ...]``)
The RAUQ paper's convention: a_{i,i-1} is the weight the query at token position i puts on
the key at position i-1, i.e. the sub-diagonal ``A[i, i-1]`` of the attention matrix of one full forward
pass over the sequence (positions count the prompt's tokens, then the generated ones; the chosen head's
softmax row, scaled by 1/sqrt(head_dim), after the causal and padding masks). During incremental
decoding, row i of the matrix only exists at the forward pass that *consumes* token i, i.e. one step
after token i was sampled. The sampler records it there for every generated token: ``attention[t][j]``
is a_{i,i-1} of generated token t (i = prompt length + t) for head ``capture_heads[j]``; its previous
token is the last prompt token when t = 0. To have it for the last generated token too, a capture run
does one extra forward pass at the end (one step more than a plain run; nothing else is recomputed).
``capture_rows=True`` also keeps the whole row (``attention_rows[t][j]``: the weights of query i over
positions 0..i of the sequence, padding removed). Heads are computed only for the chosen (layer, head)
pairs: a custom attention function registered with ``transformers.AttentionInterface`` as
``"lab_capture"`` runs the model's usual SDPA attention and, for those heads alone, softmax(q kᵀ/√d +
mask) for the new query rows. The model runs under that implementation only for the capture call.

Step-wise decoding (controllers)
A controller reads top to bottom::

    state = sampler.start(prompt, greedy=True, stop=["\\n\\n"])   # prefill once; one row
    out = sampler.step(state)                                    # StepOutput: token, text piece, signals
    out = sampler.step(state, temperature=0.7, top_p=0.9)        # this step only: a sampled token
    outs = sampler.append(state, "<thought>")                    # forced tokens, one forward pass
    sampler.rollback(state, 3)                                   # forget the last 3 tokens (no forward pass)
    branches = sampler.fork(state, 4)                            # 4 rows sharing the state's KV cache
    outs = sampler.step(branches, temperature=1.0, candidates=5) # one forward pass, one StepOutput per row
    best = sampler.select(branches, 2)                           # row 2 as a one-row state, to go on with

``step`` chooses each row's next token from the state's last logits, feeds it to the model and returns it with
its text piece ("" while a multi-byte character is unfinished), log-prob, entropy, margin and a_{i,i-1} of the
captured heads for that same token (available at once, because step consumes the token it sampled); keyword
sampling parameters override the state's for that step only (`SamplingParams.override`). ``finish_reason`` is
"eos" when the token is an end-of-sequence token and "stop" when it completed one of the stop strings (the
state's, or the step's ``stop``); decoding does not end there: the controller decides (step on, rollback,
select). ``candidates=k`` adds the k best tokens of the distribution the token was chosen from, with their
log-probs (temperature 1, before top-k/top-p). ``append`` forces tokens (an injected thought) in one forward
pass and returns their signals; ``rollback(state, k)`` crops the KV cache (the state keeps the next-token logits
of every position, vocab_size * 4 bytes per token and row). ``fork(state, n)`` returns a new state of n rows per
row of `state` (which stays usable): their cache rows are copies of its rows, nothing is recomputed, and each
step feeds every row in one batched forward pass; ``select(state, rows)`` keeps some rows. The rows of a state
move in lockstep (``step``, ``append`` and ``rollback`` act on all of them), so they need no padding; a state
made by ``fork`` (or ``select`` with a list) returns one result per row, a state made by ``start`` (or ``select``
with one index) returns results as for one sequence.

Ragged rows (``start_rows`` / ``step_rows`` / ``rollback_row`` / ``select_rows``): rows after *different* prompts,
each moving on its own in one batch (a controller decoding several problems). Each forward pass feeds one token per
row at one shared cache slot; the caller chooses each row's token (greedy, sampled with `choose_tokens`, forced) or
None (the row idles, its slot masked out); ``rollback_row`` masks a row's last tokens out (holes in the shared cache)
instead of cropping it. Attention goes through a 2D (rows, slots) mask and per-row position ids, and the captured
a_{i,i-1} is read on each row's previous *valid* slot. ``select_rows`` drops finished rows or forks one.

Reproducibility: with the same ``seed``, prompts, batch composition (``n``, ``batch_size``, order),
sampling parameters (``prompt_lookup`` among them), model, dtype, device, thread count and library
versions, ``generate`` returns the same samples (one `torch.Generator`, seeded per call, is shared by the
whole batch). Not reproducible: the same prompt in a different batch (its random draws and its padding
change; in fp32, its logits are summed in another order at one or two rows than at three and more, and
screened or not as logprobs are asked or not), across devices, dtypes or library versions, or fp32 runs
with ``pack_weights`` on versus off (the arithmetic differs in the last bits; bf16 packed products are
bit-identical). Greedy decoding does not depend on the seed, only on the arithmetic; the step-wise API
draws from its own generator, seeded in `start`.

Engines: on CPU, Llama-family models (SmolLM2 among them) run through `LlamaDecoder`, the same forward pass
written out with fewer operations (``llama_decoder.py``; ``llama_decoder=False`` uses transformers' forward
instead), peft LoRA adapters included: the decoder multiplies by each adapted layer's folded weight W + scaling
* B @ A, a private copy made again when the adapter changes (``adapters.py``). Every other model and device,
and other adapters (DoRA, ...), run through transformers' forward. The engine is chosen at every call, for the
model as it is then: an adapter added, switched off or trained, or embeddings resized after the sampler was
built are decoded as they are now (`Sampler.engine_info` says which engine that is). The sampler never changes
the model: during a call every module is in evaluation mode (dropout off) and each is set back to its own mode
afterwards (`evaluation_mode`); it never calls ``.eval()``. On CPU the decoder runs its norms, rotary embedding,
activation, one-token attention and products (one- or two-row passes; fp32 batches) through ``cpu_kernels.cpp``
when it builds (``cpu_kernels``), and so does the sampling's top-k; with ``cpu_kernels=False`` both engines give
the same bf16 logits bit for bit, with the kernels they differ by bf16 rounding.

Speed (``bench/sampler.py`` measures it against ``transformers.generate``): shared prefill (of a prompt's n samples
and of a batch's common prefix); the preallocated
cache; the written-out forward; a 4D decode mask that keeps SDPA on its fast grouped-query path
(`Sampler._decode_mask`); oneDNN-prepacked linear weights on CPU (``weight_packing.py``, ``pack_weights``); CPU
kernels for one-token attention (the n samples of a prompt read its keys once, `KVCache.shared_prefix`),
RMSNorm, rotary, silu(gate) * up, top-k, the products of one-row passes and fp32 products from packed
panels (``cpu_kernels.cpp``, ``cpu_kernels``); in fp32 only the k logits top-k needs, screened by a bf16
output layer (`screened_k`); batched on-device sampling with the top-k shortcut for top-p
and an inverse-CDF draw (`draw`); dropping finished rows; one host sync per step; attention capture batched
over layers; prompt lookup for greedy single sequences (opt-in). Measured and not kept (2-core CPU, figures
in the README): ``torch.compile`` (of the whole one-token step with frozen weights: 12-15% faster at one row
after a 54-76 s compile, not faster at 32 rows, stale after a weight update, no attention capture; of the
small operations between the products: 33-45 us per compiled call against 11-53 us eager); SDPA over a
prompt's keys once for its n samples, merged by log-sum-exp (4-12% off a 32-row step; the attention kernel
does this better); two threads of half the rows each (the same tokens/s as one batch).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lightning_lab.sampling import adapters
from lightning_lab.sampling import cpu_kernels as kernels
from lightning_lab.sampling import weight_packing as packed
from lightning_lab.sampling.kv_cache import KVCache, full_attention_layers, new_cache, take_rows
from lightning_lab.sampling.llama_decoder import LlamaDecoder, TopLogits, unsupported_reason
from lightning_lab.sampling.prompts import Prompt, encode_prompt
from lightning_lab.sampling.weight_packing import PackedLinears

TOP_P_CANDIDATES = 256  # top-p looks at this many best tokens first; sorts the whole vocabulary only if they fall short
DRAW_BLOCK = 1024  # `draw` finds a block of this many tokens, then the token within it
DROP_FINISHED_FRACTION = 0.25  # compact the batch once this fraction of its rows has finished
ROWS_PER_BATCH = 64  # default batch_size = max(1, ROWS_PER_BATCH // n) prompts per forward pass
CAPTURE_ATTENTION = "lab_capture"  # attention implementation name registered below
INCOMPLETE = "\ufffd"  # what decoding shows for the bytes of a character that is not complete yet
LOOKUP_NGRAM = 3  # prompt lookup matches the last 3 tokens, then 2, then 1
MASK_4D_IMPLEMENTATIONS = {"sdpa", "eager", CAPTURE_ATTENTION}  # take an additive (batch, 1, queries, keys) mask
MIN_SHARED_PREFIX = 16  # a batch's common first tokens are prefilled once (`Sampler._shared_prefix`) from this many



# ---- results ------------------------------------------------------------------------------------


@dataclass
class Completion:
    """One sample. Lists of signals have one entry per token of ``token_ids``; None when not asked for."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    stop: str | None = None  # the stop string that ended it
    seconds: float = 0.0  # from the start of its batch (prefill included) until it finished
    logprobs: list[float] | None = None
    entropies: list[float] | None = None
    margins: list[float] | None = None
    attention: list[list[float]] | None = None  # [token][head]: a_{i,i-1}, heads in capture_heads order
    attention_rows: list[list[list[float]]] | None = None  # [token][head][position 0..i]


@dataclass
class Timing:
    """Wall-clock seconds and token counts. For a `Generation`: the whole call. For a `PromptResult`:
    the seconds of the batch it was decoded in (shared with ``batch_prompts`` prompts) and its own tokens."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    new_tokens: int = 0
    batch_prompts: int = 0
    shared_prompt_tokens: int = 0  # of the prompt tokens, those prefilled once for a whole batch (its common prefix)

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of prefill + decode."""
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else 0.0


@dataclass
class PromptResult:
    prompt: str | list
    prompt_token_ids: list[int]
    completions: list[Completion]
    timing: Timing


@dataclass
class Generation:
    """What `Sampler.generate` returns: one `PromptResult` per prompt, in order, and the call's timing.
    Serialise with `dataclasses.asdict`."""

    prompts: list[PromptResult]
    timing: Timing
    capture_heads: list[tuple[int, int]] | None = None

    @property
    def completions(self) -> list[list[Completion]]:
        """Per prompt, its n completions."""
        return [result.completions for result in self.prompts]


@dataclass
class StepOutput:
    """One token of step-wise decoding (sampled by `step` or forced by `append`) and its signals."""

    token_id: int
    text: str  # the text this token added ("" while it leaves a multi-byte character unfinished)
    logprob: float
    entropy: float
    margin: float
    is_eos: bool
    attention: list[float] | None = None  # a_{i,i-1} of this token per captured head
    attention_rows: list[list[float]] | None = None
    finish_reason: str | None = None  # "eos" | "stop" (this token completed a stop string) | None
    stop: str | None = None  # the stop string it completed
    candidates: list[tuple[int, float]] | None = None  # (token id, log p) of the best tokens, when asked for


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: must be a finite number")
    return value


@dataclass
class SamplingParams:
    """How a token is chosen: argmax (``greedy``, or ``temperature=0``), else temperature -> top-k -> top-p -> draw."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    greedy: bool = False

    def __post_init__(self):
        _finite("temperature", self.temperature)
        _finite("top_p", self.top_p)
        if self.temperature == 0:
            self.greedy = True
        if not self.greedy and self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0 (or 0 / greedy=True for argmax)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}: must be an integer >= 0 (0 disables top-k)")

    def override(self, greedy: bool | None = None, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None) -> SamplingParams:
        """These parameters with the given ones replaced (for one `Sampler.step`). Passing a temperature, top_p or
        top_k without ``greedy`` means sampling: ``step(state, temperature=0.7)`` samples from a greedy state."""
        if greedy is None and (temperature, top_p, top_k) == (None, None, None):
            return self
        sampling = greedy if greedy is not None else False
        return SamplingParams(self.temperature if temperature is None else temperature,
                              self.top_p if top_p is None else top_p, self.top_k if top_k is None else top_k,
                              sampling)


def check_count(name: str, value, minimum: int = 1) -> int:
    """`value` checked to be an integer >= `minimum` (a ValueError naming it otherwise)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")
    return int(value)


@dataclass
class Row:
    """One sequence being decoded (a sample of `generate`, a row of a `DecodeState`): what it holds after its
    prompt, and, in `generate`, how it ended. Signals, attention and rows are filled only when asked for."""

    token_ids: list[int] = field(default_factory=list)
    signals: list[list[float]] = field(default_factory=list)  # per token: log p, entropy, margin
    attention: list[list[float]] = field(default_factory=list)  # per token: a_{i,i-1} per captured head
    attention_rows: list[list[list[float]]] = field(default_factory=list)
    finish: str | None = None  # "eos" | "stop" | "length" (generate)
    seconds: float = 0.0  # from the start of its batch until it finished
    text: str = ""  # token_ids decoded (special tokens skipped; step-wise decoding)
    emitted: int = 0  # characters of `text` already returned as StepOutput.text pieces


@dataclass
class DecodeState:
    """Rows decoded step by step after one prompt, in lockstep: every row holds the same number of tokens.
    ``logits[j]`` (rows, vocab; fp32) are each row's next-token logits after the prompt and its first j tokens;
    ``len(logits) == tokens + 1``. `Sampler.start` makes a state of one row, `Sampler.fork` one of several."""

    prompt_ids: list[int]
    cache: Cache
    params: SamplingParams
    generator: torch.Generator
    capture: AttentionCapture | None
    rows: list[Row]
    logits: list[torch.Tensor]
    stop: list[str] = field(default_factory=list)
    forked: bool = False  # made by fork: step and append return one result per row

    @property
    def tokens(self) -> int:
        """Tokens each row holds after the prompt."""
        return len(self.rows[0].token_ids)

    @property
    def length(self) -> int:
        """Positions in the KV cache: prompt plus everything sampled or appended."""
        return len(self.prompt_ids) + self.tokens

    @property
    def token_ids(self) -> list[int]:
        """The tokens after the prompt, of a state of one row (a fork's: ``rows[i].token_ids``)."""
        return self._single().token_ids

    @property
    def text(self) -> str:
        """`token_ids` decoded, of a state of one row (a fork's: ``rows[i].text``)."""
        return self._single().text

    def _single(self) -> Row:
        if len(self.rows) != 1:
            raise ValueError(f"this state has {len(self.rows)} rows: read state.rows[i]")
        return self.rows[0]


@dataclass
class RaggedState:
    """Rows after different prompts in one KV cache, each stepped, fed and rolled back on its own (`Sampler.start_rows`).

    Every forward pass feeds one token per row at the same cache slot; a row that has nothing to feed idles
    (its slot is masked out), and a rollback masks the row's last slots out instead of cropping the shared
    cache. ``valid[r]`` says which slots row r attends to; ``slots[r]`` holds the slot of each of its tokens,
    prompt included, so its position id is ``len(slots[r])`` and its previous token sits at ``slots[r][-1]``.
    ``logits[r][j]`` (vocab,) are its next-token logits after its prompt and its first j tokens."""

    prompt_ids: list[list[int]]
    cache: Cache
    capture: AttentionCapture | None
    valid: torch.Tensor  # (rows, capacity) bool
    slots: list[list[int]]
    logits: list[list[torch.Tensor]]
    rows: list[Row]

    @property
    def length(self) -> int:
        """Slots in the KV cache (every row's, holes included)."""
        return self.cache.get_seq_length()


# ---- attention capture --------------------------------------------------------------------------


class AttentionCapture:
    """Records, at every forward pass, the attention rows of a few (layer, head) pairs.

    Attached to the attention modules of the chosen layers (attribute ``_lab_capture``) while the model
    runs with the ``"lab_capture"`` attention implementation. During the pass, `capture_attention_forward`
    only keeps references to the chosen heads' queries and keys (`record`); `collect` then computes all
    their attention rows at once, as transformers' eager attention would (scores in the model dtype,
    mask added, softmax in fp32): a few batched operations per step instead of a few per layer.
    """

    def __init__(self, heads: Sequence[tuple[int, int]], num_layers: int, num_heads: int, rows: bool = False):
        heads = [(int(layer), int(head)) for layer, head in heads]
        for layer, head in heads:
            if not (0 <= layer < num_layers and 0 <= head < num_heads):
                raise ValueError(f"capture_heads: ({layer}, {head}) is outside the model's "
                                 f"{num_layers} layers x {num_heads} heads")
        if len(set(heads)) != len(heads):
            raise ValueError(f"capture_heads: duplicate (layer, head) pairs in {heads}")
        self.heads = heads
        self.keep_rows = rows
        self.heads_by_layer = {layer: sorted(h for l, h in heads if l == layer) for layer in sorted({l for l, _ in heads})}
        # position of each requested head in the layer-major order the rows are computed in
        layer_major = [(layer, head) for layer, layer_heads in self.heads_by_layer.items() for head in layer_heads]
        self.order = torch.tensor([layer_major.index(pair) for pair in heads])
        self.enabled = True
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, object, float]] = []

    def record(self, module, query: torch.Tensor, key: torch.Tensor, attention_mask, scaling: float | None) -> None:
        """Keep this layer's chosen query heads (batch, h, queries, dim) and their key heads (batch, h, keys, dim)."""
        if not self.enabled:
            return
        heads = self.heads_by_layer[module.layer_idx]
        groups = query.shape[1] // key.shape[1]
        if len(heads) == 1:  # views, no copy
            query = query[:, heads[0]:heads[0] + 1]
            key = key[:, heads[0] // groups:heads[0] // groups + 1]
        else:
            index = torch.tensor(heads, device=query.device)
            query, key = query.index_select(1, index), key.index_select(1, index // groups)
        self.pending.append((module.layer_idx, query, key, attention_mask, scaling or query.shape[-1] ** -0.5))

    def collect(self, previous_slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(batch, heads, queries) a_{i,i-1} and, if kept, (batch, heads, queries, keys) rows of the last forward
        pass; heads in the order they were requested. ``previous_slots`` (batch,): for a one-query pass over a cache
        with holes (`RaggedState`), the key index of each row's previous token, read instead of the slot before."""
        pending = sorted(self.pending, key=lambda item: item[0])
        self.pending = []
        if [layer for layer, *_ in pending] != list(self.heads_by_layer):
            raise RuntimeError("attention capture: the last forward pass did not run every captured layer once")
        probs = []
        # layers that share a mask and a scale (all of them, in a plain full-attention model) in one batch
        for _, group in itertools.groupby(pending, key=lambda item: (id(item[3]), item[4])):
            group = list(group)
            query, key = torch.cat([item[1] for item in group], dim=1), torch.cat([item[2] for item in group], dim=1)
            probs.append(attention_probs(query, key, group[0][3], group[0][4]))
        probs = torch.cat(probs, dim=1).index_select(1, self.order.to(query.device))
        queries, keys = probs.shape[-2:]
        if previous_slots is not None:
            index = previous_slots.to(probs.device)[:, None, None, None].expand(-1, probs.shape[1], 1, 1)
            return probs.gather(-1, index)[..., 0], probs if self.keep_rows else None
        # query j sits at key position keys - queries + j; its previous token at keys - queries + j - 1
        first = keys - queries - 1
        if first >= 0:
            previous = torch.diagonal(probs[..., first:first + queries], dim1=-2, dim2=-1)
        else:  # the sequence's first token has no previous one
            previous = torch.diagonal(probs[..., :queries - 1], dim1=-2, dim2=-1)
            previous = torch.cat([previous.new_full((*previous.shape[:-1], 1), float("nan")), previous], dim=-1)
        return previous, probs if self.keep_rows else None


def attention_probs(query: torch.Tensor, key: torch.Tensor, attention_mask, scaling: float) -> torch.Tensor:
    """softmax(q kᵀ * scaling + mask) in fp32, (batch, heads, queries, keys), as transformers' eager attention.

    `attention_mask` as attention functions receive it: None (SDPA's causal flag: a lower-right aligned
    causal mask when there are several queries), boolean (True = attend) or additive.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    queries, keys = scores.shape[-2:]
    if attention_mask is None and queries > 1:
        allowed = torch.ones(queries, keys, dtype=torch.bool, device=scores.device).tril(keys - queries)
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    elif attention_mask is not None:
        scores = scores + attention_mask
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


def capture_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """The model's SDPA attention, plus the rows of the captured heads when this layer has a capture."""
    output = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    capture = getattr(module, "_lab_capture", None)
    if capture is not None:
        capture.record(module, query, key, attention_mask, kwargs.get("scaling"))
    return output


AttentionInterface.register(CAPTURE_ATTENTION, capture_attention_forward)
AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)  # the same masks SDPA gets


# ---- sampling -----------------------------------------------------------------------------------


def choose_tokens(logits: torch.Tensor | TopLogits, params: SamplingParams, generator: torch.Generator | None,
                  cpu_kernels: bool | None = None) -> torch.Tensor:
    """Next token per row from fp32 logits (rows, vocab): argmax, or temperature -> top-k -> top-p -> draw.
    `TopLogits` (the decoder's, asked for with `screened_k`) stand for the logits. ``cpu_kernels`` False: torch's
    top-k (see `top_logits`)."""
    if params.greedy:
        return logits.ids[:, 0] if isinstance(logits, TopLogits) else logits.argmax(dim=-1)
    weights, indices = sampling_weights(logits, params, cpu_kernels)
    choice = draw(weights, generator)
    return choice if indices is None else indices.gather(-1, choice[:, None]).squeeze(-1)


def screened_k(params: SamplingParams, signals: dict | None) -> int:
    """How many of each row's largest logits choosing a token needs (the decoder may compute only those, see
    `LlamaDecoder.forward`): 1 for greedy decoding, top_k for sampling with one; 0 (every logit) for sampling
    without top-k, and whenever log-probs, entropy or margin are asked for."""
    if signals:
        return 0
    return 1 if params.greedy else params.top_k


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of `weights` (rows, width; >= 0, each row with some positive weight), index i with
    probability weights[i] / row sum: an inverse-CDF draw from one uniform number per row.

    `torch.multinomial` draws one exponential number per weight (argmax of weights / Exp(1)), serially on CPU:
    35 ms for 32 rows over SmolLM2's 49152 tokens, a third of a decode step. Here the row's weights are summed
    in blocks of `DRAW_BLOCK` (fp32, vectorised), the uniform number picks a block from their running sum and
    then a token from the running sum of that block's weights alone (both in fp64, on small tensors; fp32 on
    MPS, which has no fp64). A token's probability is off by fp32 rounding of its block's sum (~1e-7
    relative), and a zero weight is never drawn."""
    rows, width = weights.shape
    exact = torch.float32 if weights.device.type == "mps" else torch.float64
    block = min(width, DRAW_BLOCK)
    padded = torch.nn.functional.pad(weights, (0, -width % block)) if width % block else weights
    blocks = padded.reshape(rows, -1, block)
    block_ends = blocks.sum(-1).to(exact).cumsum(-1)  # (rows, blocks)
    total = block_ends[:, -1:].contiguous()
    if not bool((total > 0).all() & total.isfinite().all()):  # what torch.multinomial refuses too
        raise ValueError("cannot sample: a row's weights are NaN, infinite or all zero (the model's logits are not "
                         "finite?)")
    target = torch.rand(rows, 1, generator=generator, dtype=exact, device=weights.device) * total
    # the first block whose running sum passes the target; rounding may carry it past the last block with weight
    chosen = torch.minimum(torch.searchsorted(block_ends, target, right=True), torch.searchsorted(block_ends, total))
    block_start = torch.where(chosen > 0, block_ends.gather(-1, (chosen - 1).clamp(min=0)), 0.0)
    ends = blocks[torch.arange(rows, device=weights.device), chosen[:, 0]].to(exact).cumsum(-1)  # (rows, block)
    within = torch.minimum(torch.searchsorted(ends, target - block_start, right=True),
                           torch.searchsorted(ends, ends[:, -1:].contiguous()))
    return (chosen * block + within).squeeze(-1)


def sampling_weights(logits: torch.Tensor | TopLogits, params: SamplingParams,
                     cpu_kernels: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unnormalised sampling weights (rows, candidates) and the candidates' token ids (None: the whole vocabulary).

    Rows may carry zero-weight padding at the end (a row that needed fewer candidates than another)."""
    if isinstance(logits, TopLogits):  # the top_k largest already (see `screened_k`)
        values, indices = logits.values, logits.ids
    elif not params.top_k and params.top_p >= 1:
        return (logits / params.temperature).softmax(dim=-1), None
    else:
        candidates = min(params.top_k or TOP_P_CANDIDATES, logits.shape[-1])
        # sorted, best first (a temperature keeps the order)
        values, indices = top_logits(logits, candidates, cpu_kernels)
    values = values / params.temperature
    if params.top_k:  # renormalise within the top k
        probs = values.softmax(dim=-1)
    else:  # probabilities under the full vocabulary, so the candidates' mass is known
        scaled = logits / params.temperature
        log_total = scaled.logsumexp(dim=-1, keepdim=True)
        probs = (values - log_total).exp()
        if params.top_p < 1:
            short = (probs.sum(dim=-1) < params.top_p).nonzero().squeeze(-1)
            if len(short):
                probs, indices = _widen_short_rows(scaled, log_total, probs, indices, short, params.top_p)
    if params.top_p < 1:
        # keep a token while the mass strictly before it is below top_p (so the best one always stays)
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= params.top_p, 0.0)
    return probs, indices


def top_logits(logits: torch.Tensor, count: int, cpu_kernels: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits.topk(count)``: on CPU through the kernel of ``cpu_kernels.cpp`` where it builds, unless
    ``cpu_kernels`` is False (0.2 ms against torch's 1.9 ms for 32 rows of SmolLM2's 49,152 logits; equal values
    may come in another order)."""
    if (cpu_kernels is not False and logits.device.type == "cpu" and logits.dtype == torch.float32
            and kernels.load() is not None):
        return kernels.top_k(logits, count)
    return logits.topk(count, dim=-1)


def _widen_short_rows(scaled: torch.Tensor, log_total: torch.Tensor, probs: torch.Tensor, indices: torch.Tensor,
                      short: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates for the rows whose top `TOP_P_CANDIDATES` hold less than `top_p`: only those rows are sorted in
    full (sorting all 64 rows of a SmolLM2 batch and drawing from the whole vocabulary took ~180 ms, more than
    the decode step itself), and every row is cut to the widest nucleus among them; the others are padded with
    zero weights."""
    sorted_values, sorted_indices = scaled[short].sort(dim=-1, descending=True)
    sorted_probs = (sorted_values - log_total[short]).exp()
    nucleus = ((sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p).sum(dim=-1)
    width = max(int(nucleus.max()), probs.shape[-1])
    wide_probs = probs.new_zeros(len(probs), width)
    wide_indices = indices.new_zeros(len(indices), width)
    wide_probs[:, :probs.shape[-1]] = probs
    wide_indices[:, :indices.shape[-1]] = indices
    wide_probs[short] = sorted_probs[:, :width]
    wide_indices[short] = sorted_indices[:, :width]
    return wide_probs, wide_indices


def token_signals(logits: torch.Tensor, tokens: torch.Tensor, entropy: bool = True, margin: bool = True) -> torch.Tensor:
    """(rows, 3): log p(token), entropy (nats), p(top-1) - p(top-2) under softmax(logits) at temperature 1.

    A signal not asked for is NaN (each costs a pass over the vocabulary)."""
    log_total = logits.logsumexp(dim=-1)
    chosen = logits.gather(-1, tokens[:, None]).squeeze(-1) - log_total
    missing = torch.full_like(chosen, float("nan"))
    spread = missing
    if entropy:  # H = log Z - sum p * logit
        spread = log_total - ((logits - log_total[:, None]).exp() * logits).sum(dim=-1)
    gap = missing
    if margin:
        top2 = (logits.topk(2, dim=-1).values - log_total[:, None]).exp()
        gap = top2[:, 0] - top2[:, 1]
    return torch.stack([chosen, spread, gap], dim=-1)


def lookup_draft(context: list[int], max_tokens: int, max_ngram: int = LOOKUP_NGRAM) -> list[int]:
    """Prompt-lookup draft: the `max_tokens` tokens that followed the latest earlier occurrence of the last
    `max_ngram` tokens of `context` (then of the last max_ngram - 1, ..., 1 tokens). An occurrence too close to
    the end to be followed by `max_tokens` tokens (in a loop, the latest one is) gives way to an earlier one;
    failing any, the longest continuation found. [] when the tokens never occurred before."""
    if max_tokens <= 0:
        return []
    for size in range(min(max_ngram, len(context) - 1), 0, -1):
        tail, best = context[-size:], []
        for start in range(len(context) - size - 1, -1, -1):
            if context[start:start + size] == tail:
                draft = context[start + size:start + size + max_tokens]
                if len(draft) == max_tokens:
                    return draft
                best = max(best, draft, key=len)
        if best:
            return best
    return []


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many first tokens all `sequences` have in common."""
    length = 0
    for column in zip(*sequences):
        if any(token != column[0] for token in column):
            break
        length += 1
    return length


def find_stop(text: str, stop: Sequence[str]) -> tuple[int, str] | None:
    """(index, stop string) of the earliest stop string in `text`, or None."""
    found = [(text.find(s), s) for s in stop if s in text]
    return min(found) if found else None


# ---- the sampler --------------------------------------------------------------------------------


class Sampler:
    """Decodes with a `LoadedModel` (see the module docstring for the conventions).

    ``pack_weights``: prepack linear weights for oneDNN (default: on CPU). ``llama_decoder``: run the
    written-out Llama forward (default: when the model supports it; True makes an unsupported model an error).
    ``cpu_kernels``: the decoder's norms, rotary embedding, activation, one-token attention and products, and the
    sampling's top-k, on CPU through ``cpu_kernels.cpp`` (default: when it builds and takes the model; True makes
    that an error otherwise; False keeps torch's operations, whose bf16 logits equal transformers' bit for bit).
    ``keep_prefix``: keep the last batch's common prefix for the next `generate` call (module docstring), for a
    caller that does not change the model between calls; a change of a parameter's storage or version counter (an
    optimizer step, loaded weights), of the engine or of adapters switched on or off drops it. It holds one row
    of KV cache.

    The sampler never changes the model: every call decodes the model as it is at that moment (its weights,
    adapters and modules; the engine is chosen again at each call) and leaves its train/eval mode as it was
    (module docstring, "Engines").
    """

    def __init__(self, loaded, pack_weights: bool | None = None, llama_decoder: bool | None = None,
                 cpu_kernels: bool | None = None, keep_prefix: bool = False):
        model = loaded.model
        if hasattr(model, "get_base_model"):  # a peft model: its base holds the adapter layers and takes every argument
            model = model.get_base_model()
        self.model = model
        self.tokenizer = loaded.tokenizer
        self.device = torch.device(loaded.device)
        self.dtype = next(self.model.parameters()).dtype
        config = self.model.config.get_text_config(decoder=True)
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        eos = self.model.generation_config.eos_token_id if self.model.generation_config is not None else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = set(eos)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._held = False  # inside `holding`: the model is already set up for the calls
        parameters = inspect.signature(self.model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in parameters
        self.pack_weights = packed.available(self.device) if pack_weights is None else pack_weights
        self.llama_decoder, self.cpu_kernels = llama_decoder, cpu_kernels
        self.decoder = self._current_decoder()  # chosen again at every call (`_running`)
        self.keep_prefix = keep_prefix
        self._kept_prefix: tuple[list[int], Cache, tuple] | None = None  # (ids, one-row cache, `_model_stamp`)
        # attention modules by layer, for attaching a capture (transformers' convention: `layer_idx`, `head_dim`)
        self.attention_modules = {}
        for module in self.model.modules():
            if getattr(module, "layer_idx", None) is not None and hasattr(module, "head_dim"):
                self.attention_modules.setdefault(module.layer_idx, module)

    def _current_decoder(self) -> LlamaDecoder | None:
        """The written-out decoder for the model as it is now, or None for transformers' forward (checking the
        ``llama_decoder`` and ``cpu_kernels`` settings against it)."""
        reason = unsupported_reason(self.model)
        if self.llama_decoder and reason is not None:
            raise ValueError(f"llama_decoder=True, but {type(self.model).__name__} is not supported: {reason}")
        decoder = None
        if self.llama_decoder is not False and reason is None:
            decoder = LlamaDecoder.of(self.model, self.pack_weights)
        if self.cpu_kernels and decoder is None:
            raise ValueError("cpu_kernels=True needs the written-out decoder, which does not run "
                             f"{type(self.model).__name__}" + (f": {reason}" if reason else " with llama_decoder=False"))
        return decoder

    def engine_info(self) -> dict:
        """What decodes the model as it is now, for run headers (two runs' figures compare when these match):
        ``engine`` "decoder" (`LlamaDecoder`) or "transformers" (transformers' forward); ``cpu_kernels``: the
        forward pass runs ``cpu_kernels.cpp``; ``packed_weights``: oneDNN-prepacked linear weights; ``dtype``,
        ``device``, ``torch_threads``; ``adapter``: a peft adapter is active (decoded through its folded weights on
        the decoder, see ``adapters.py``)."""
        decoder = self._current_decoder()
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        return {"engine": "decoder" if decoder is not None else "transformers",
                "cpu_kernels": decoder is not None and decoder._use_kernels(self.cpu_kernels, probe),
                "packed_weights": bool(self.pack_weights) and packed.available(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
                "torch_threads": torch.get_num_threads(), "adapter": adapters.adapter_active(self.model)}

    # ---- prompts ----

    def encode(self, prompt: Prompt, chat: bool | None = None) -> list[int]:
        """Token ids of one prompt with this sampler's tokenizer (`encode_prompt`)."""
        return encode_prompt(self.tokenizer, prompt, chat)

    # ---- batch decoding ----

    @torch.inference_mode()
    def generate(self, prompts: Prompt | Sequence[Prompt], n: int = 1, max_new_tokens: int = 256,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, greedy: bool = False,
                 stop: Sequence[str] | None = None, seed: int | None = 0, logprobs: bool = False,
                 entropy: bool = False, margin: bool = False,
                 capture_heads: Sequence[tuple[int, int]] | None = None, capture_rows: bool = False,
                 ignore_eos: bool = False, chat: bool | None = None, batch_size: int | None = None,
                 progress: bool = False, prompt_lookup: int = 0, prefix_cache: bool = True) -> Generation:
        """Sample `n` completions for each prompt. A single prompt (text or one message list) is accepted too.

        ``batch_size``: prompts per forward pass (default ``max(1, 64 // n)``); each pass decodes
        ``batch_size * n`` sequences. ``seed=None`` draws a fresh seed. ``prompt_lookup``: for greedy decoding
        with n=1, check up to this many drafted tokens per forward pass (module docstring); prompts then
        decode one at a time. ``prefix_cache``: prefill the first tokens that all prompts of a batch share once
        (module docstring); False prefills every prompt whole.
        """
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (dict, numbers.Integral))):
            prompts = [prompts]
        n, max_new_tokens = check_count("n", n), check_count("max_new_tokens", max_new_tokens)
        if batch_size is not None:
            batch_size = check_count("batch_size", batch_size)
        params = SamplingParams(temperature, top_p, top_k, greedy)
        stop = [s for s in (stop or []) if s]
        if prompt_lookup:
            self._check_prompt_lookup(prompt_lookup, params, n, capture_heads, batch_size)
            batch_size = 1
        batch_size = batch_size or max(1, ROWS_PER_BATCH // n)
        # which per-token signals to compute (None: none); log p comes with any of them
        signals = {"entropy": entropy, "margin": margin} if logprobs or entropy or margin else None
        capture, generator = self._capture(capture_heads, capture_rows), self._generator(seed)

        encoded = [self.encode(prompt, chat) for prompt in prompts]
        empty = [index for index, ids in enumerate(encoded) if not ids]
        if empty:
            raise ValueError(f"prompts {empty}: no tokens to condition on (empty text without a chat template)")
        results: list[PromptResult] = []
        total = Timing()
        batches = range(0, len(prompts), batch_size)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="generate", unit="batch")
        with self._running(capture):
            for start in batches:
                if prompt_lookup:
                    completion, timing = self._generate_lookup(encoded[start], max_new_tokens, prompt_lookup, stop,
                                                               ignore_eos, signals)
                    batch = [([completion], timing)]
                else:
                    batch = self._generate_batch(encoded[start:start + batch_size], n, max_new_tokens, params, stop,
                                                 ignore_eos, signals, capture, generator, prefix_cache)
                for offset, (completions, timing) in enumerate(batch):
                    results.append(PromptResult(prompts[start + offset], encoded[start + offset], completions, timing))
                    total.new_tokens += timing.new_tokens
                    total.prompt_tokens += timing.prompt_tokens
                    total.shared_prompt_tokens += timing.shared_prompt_tokens
                total.prefill_s += batch[0][1].prefill_s
                total.decode_s += batch[0][1].decode_s
        total.batch_prompts = min(batch_size, len(prompts))
        for result in results:
            for completion in result.completions:
                if not logprobs:
                    completion.logprobs = None
                if not entropy:
                    completion.entropies = None
                if not margin:
                    completion.margins = None
        return Generation(results, total, capture.heads if capture else None)

    def _capture(self, heads: Sequence[tuple[int, int]] | None, rows: bool) -> AttentionCapture | None:
        """The capture of `heads` (None when no heads are asked for)."""
        return AttentionCapture(heads, self.num_layers, self.num_heads, rows) if heads else None

    def _generator(self, seed: int | None) -> torch.Generator:
        """The sampling generator: seeded with `seed`, or with a fresh seed when it is None."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else int(torch.seed() % 2**63))
        return generator

    def _check_prompt_lookup(self, prompt_lookup: int, params: SamplingParams, n: int, capture_heads,
                             batch_size: int | None) -> None:
        check_count("prompt_lookup", prompt_lookup, minimum=0)
        if not params.greedy or n != 1 or capture_heads or (batch_size or 1) != 1:
            raise ValueError(f"prompt_lookup={prompt_lookup} works for greedy=True, n=1, batch_size=1 and no "
                             f"capture_heads (got greedy={params.greedy}, n={n}, batch_size={batch_size}, "
                             f"capture_heads={capture_heads})")
        if full_attention_layers(self.model.config) is None:
            raise ValueError(f"prompt_lookup={prompt_lookup}: {type(self.model).__name__} has layers that are not full "
                             "attention, whose cache cannot drop rejected draft tokens")

    def _generate_batch(self, prompt_ids: list[list[int]], n: int, max_new_tokens: int, params: SamplingParams,
                        stop: list[str], ignore_eos: bool, signals: dict | None, capture: AttentionCapture | None,
                        generator: torch.Generator, prefix_cache: bool = True) -> list[tuple[list[Completion], Timing]]:
        started = time.perf_counter()
        prompt_len = max(len(ids) for ids in prompt_ids)
        padding = [prompt_len - len(ids) for ids in prompt_ids]
        # the first `shared` tokens of every prompt are the same: prefilled once, on one row, whose cache rows are
        # then repeated; each row's padding sits after them (none without a shared prefix: left padding)
        shared = self._shared_prefix(prompt_ids) if prefix_cache else 0
        input_ids = torch.tensor([ids[:shared] + [self.pad_id] * pad + ids[shared:]
                                  for pad, ids in zip(padding, prompt_ids)], device=self.device)
        capacity = prompt_len + max_new_tokens + 1
        # the 2D padding mask of every position a row can reach (generated positions are always real)
        mask = torch.ones(len(prompt_ids), capacity, dtype=torch.bool, device=self.device)
        for row, pad in enumerate(padding):
            mask[row, shared:shared + pad] = False
        has_padding = any(padding)
        positions = (mask[:, :prompt_len].long().cumsum(-1) - 1).clamp(min=0)  # counted over real tokens

        if capture is not None:
            capture.enabled = False  # prompt rows are not needed
        if shared:
            cache = self._prefix_rows(input_ids[0, :shared], capacity, len(prompt_ids))
        else:
            cache = new_cache(self.model.config, capacity)
        logits = self._run(input_ids[:, shared:], cache, positions[:, shared:],
                           mask[:, :prompt_len] if has_padding else None, capture=capture)[:, -1]
        if capture is not None:
            capture.enabled = True
        if n > 1:  # one prefill, n samples: repeat the prompt's cache rows
            cache.batch_repeat_interleave(n)
            logits, mask = logits.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)
            positions = positions.repeat_interleave(n, dim=0)
        next_position = positions[:, -1] + 1
        cache_length = prompt_len
        decode_mask = self._decode_mask(cache, mask, has_padding)
        prefill_s = time.perf_counter() - started

        rows = [Row() for _ in range(len(prompt_ids) * n)]  # prompt-major: prompt i, sample j -> i * n + j
        live = list(range(len(rows)))  # batch index -> index in rows
        decode_started = time.perf_counter()
        for _ in range(max_new_tokens):
            tokens = choose_tokens(logits, params, generator, self.cpu_kernels)
            values = token_signals(logits, tokens, **signals).tolist() if signals else None
            for index, token in enumerate(tokens.tolist()):
                row = rows[live[index]]
                if row.finish is not None:
                    continue
                row.token_ids.append(token)
                if values is not None:
                    row.signals.append(values[index])
                row.finish = self._finish_reason(row.token_ids, stop, ignore_eos, max_new_tokens)[0]
                if row.finish is not None:
                    row.seconds = time.perf_counter() - started
            all_finished = all(rows[index].finish is not None for index in live)
            if all_finished and capture is None:
                break
            # consume the sampled tokens: next-token logits, and row i of the attention for the captured heads
            logits = self._run(tokens[:, None], cache, next_position[:, None],
                               None if decode_mask is None else decode_mask[..., :cache_length + 1],
                               capture=capture, top_k=screened_k(params, signals))[:, -1]
            cache_length += 1
            next_position += 1
            if capture is not None:
                previous, attention_rows = capture.collect()
                for index, values in enumerate(previous[:, :, 0].tolist()):
                    row = rows[live[index]]
                    if len(row.attention) < len(row.token_ids):  # finished rows stay until compacted
                        row.attention.append(values)
                        if attention_rows is not None:  # the row's own positions, without padding
                            real = mask[live[index], :cache_length]
                            row.attention_rows.append(attention_rows[index, :, 0, :cache_length][:, real].tolist())
            if all_finished:
                break
            finished_here = [index for index, row in enumerate(live) if rows[row].finish is not None]
            if len(finished_here) >= max(1, DROP_FINISHED_FRACTION * len(live)):
                keep = [index for index, row in enumerate(live) if rows[row].finish is None]
                keep_index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(keep_index)
                logits = logits[keep_index]
                decode_mask = None if decode_mask is None else decode_mask[keep_index]
                next_position = next_position[keep_index]
                live = [live[index] for index in keep]
        decode_s = time.perf_counter() - decode_started

        results = []
        for prompt_index, ids in enumerate(prompt_ids):
            completions = [self._completion(row, stop, capture) for row in rows[prompt_index * n:(prompt_index + 1) * n]]
            timing = Timing(prefill_s, decode_s, len(ids), sum(len(c.token_ids) for c in completions), len(prompt_ids),
                            shared)
            results.append((completions, timing))
        return results

    def _shared_prefix(self, prompt_ids: list[list[int]]) -> int:
        """How many first tokens a batch prefills once for all its prompts: the tokens every prompt begins with
        (each keeps at least one of its own, whose logits it needs), when there are `MIN_SHARED_PREFIX` or more
        of them and several prompts; else 0. Only on the preallocated cache (full attention): a sliding window
        would count the padding after the prefix as positions."""
        if len(prompt_ids) < 2 or full_attention_layers(self.model.config) is None:
            return 0
        length = min(common_prefix_length(prompt_ids), min(map(len, prompt_ids)) - 1)
        return length if length >= MIN_SHARED_PREFIX else 0

    def _prefix_rows(self, prefix: torch.Tensor, capacity: int, rows: int) -> Cache:
        """A cache of `rows` rows that hold the token ids `prefix`, computed once on one row. With ``keep_prefix``,
        that row continues the prefix kept from the last call as far as the two begin alike (and the model has not
        changed since: `_model_stamp`), and is kept in its place."""
        ids = prefix.tolist()
        stamp = self._model_stamp() if self.keep_prefix else None
        kept, start = self._kept_prefix if self.keep_prefix else None, 0
        if kept is not None and kept[2] == stamp:
            start = common_prefix_length([kept[0], ids])
        if start >= MIN_SHARED_PREFIX:
            row = take_rows(kept[1], torch.zeros(1, dtype=torch.long, device=self.device))
            row.crop(start - len(kept[0]))
        else:
            row, start = new_cache(self.model.config, capacity), 0
        if start < len(ids):
            self._run(prefix[None, start:], row, torch.arange(start, len(ids), device=self.device)[None], None)
        self._kept_prefix = (ids, row, stamp) if self.keep_prefix else None
        return take_rows(row, torch.zeros(rows, dtype=torch.long, device=self.device))

    def _model_stamp(self) -> tuple:
        """Changes when the model's output may: the engine, and every parameter's storage and version counter (an
        optimizer step, loaded weights), and whether an adapter is active."""
        return (self.decoder is not None, tuple(adapters.stamp(p) for p in self.model.parameters()),
                adapters.adapter_active(self.model))

    def _finish_reason(self, generated: list[int], stop: list[str], ignore_eos: bool,
                       max_new_tokens: int | None = None) -> tuple[str | None, str | None]:
        """(why a sequence ends with its last token, the stop string it completed) (see the module docstring);
        (None, None) if it goes on. A stop string counts when the last token completed it (a stop string earlier
        in the text, which step-wise decoding may have gone past, does not end it again)."""
        if generated[-1] in self.eos_ids and not ignore_eos:
            return "eos", None
        if stop:
            window = max(len(s) for s in stop) + 4  # tokens: each decodes to >= 1 character
            text = self.tokenizer.decode(generated[-window:], skip_special_tokens=True)
            found = [s for s in stop if s in text]
            if found:
                before = self.tokenizer.decode(generated[-window:-1], skip_special_tokens=True)
                completed = [s for s in found if s not in before]
                if completed:
                    return "stop", min(completed, key=text.find)
        return ("length", None) if len(generated) == max_new_tokens else (None, None)

    def _completion(self, row: Row, stop: list[str], capture: AttentionCapture | None = None) -> Completion:
        """A finished row as a `Completion`: its text cut before its stop string."""
        text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
        stop_string = None
        if row.finish == "stop":
            found = find_stop(text, stop)
            if found is not None:
                text, stop_string = text[:found[0]], found[1]
        signals = row.signals
        completion = Completion(text=text, token_ids=row.token_ids, finish_reason=row.finish, stop=stop_string,
                                seconds=row.seconds,
                                logprobs=[values[0] for values in signals] if signals else None,
                                entropies=[values[1] for values in signals] if signals else None,
                                margins=[values[2] for values in signals] if signals else None)
        if capture is not None:
            completion.attention = row.attention
            completion.attention_rows = row.attention_rows if capture.keep_rows else None
        return completion

    def _generate_lookup(self, prompt_ids: list[int], max_new_tokens: int, draft_tokens: int, stop: list[str],
                         ignore_eos: bool, signals: dict | None) -> tuple[Completion, Timing]:
        """Greedy decoding of one sequence with prompt-lookup drafts (module docstring): each forward pass feeds the
        last chosen token and a draft of up to `draft_tokens` tokens copied from earlier in the sequence, keeps the
        draft tokens that the model's argmax agrees with, and crops the rest from the cache."""
        started = time.perf_counter()
        cache, logits = self._prefill(prompt_ids, len(prompt_ids) + max_new_tokens + draft_tokens + 1)
        logits = logits[None]
        prefill_s = time.perf_counter() - started
        row, draft = Row(), []
        while True:
            # logits[j]: the next-token logits after the last chosen token (j = 0), then after draft[j - 1]
            choices = logits.argmax(dim=-1).tolist()
            accepted = 0
            while accepted < len(draft) and draft[accepted] == choices[accepted]:
                accepted += 1
            new_tokens = choices[:accepted + 1]  # the draft tokens the model agrees with, then its own next token
            if signals:
                chosen = torch.tensor(new_tokens, device=self.device)
                row.signals += token_signals(logits[:accepted + 1], chosen, **signals).tolist()
            for token in new_tokens:
                row.token_ids.append(token)
                row.finish = self._finish_reason(row.token_ids, stop, ignore_eos, max_new_tokens)[0]
                if row.finish is not None:
                    break
            if row.finish is not None:
                break
            cache.crop(accepted - len(draft))
            generated = row.token_ids
            draft = lookup_draft(prompt_ids + generated, min(draft_tokens, max_new_tokens - len(generated) - 1))
            logits = self._feed(torch.tensor([generated[-1:] + draft], device=self.device), cache,
                                len(prompt_ids) + len(generated) - 1)[0]
        row.seconds = time.perf_counter() - started
        row.signals = row.signals[:len(row.token_ids)]
        completion = self._completion(row, stop)
        return completion, Timing(prefill_s, row.seconds - prefill_s, len(prompt_ids), len(row.token_ids), 1)

    def _decode_mask(self, cache: Cache, mask: torch.Tensor, has_padding: bool) -> torch.Tensor | None:
        """The attention mask for one-token decode steps, to be cut to the cache length + 1.

        transformers' forward on the preallocated cache: an additive 4D mask (rows, 1, 1, capacity), 0 or the
        dtype's minimum, which the model passes to attention as is. Passing a mask even without padding
        matters: with none, transformers' SDPA attention takes torch's `enable_gqa` kernel, which on CPU runs
        bf16 decode ~7x slower than the grouped-query packing it uses when a mask is given. The decoder
        (which always groups the queries itself) and other caches (sliding windows, ...) get the 2D padding
        mask, or none without padding.
        """
        if not self._takes_4d_mask(cache):
            return mask if has_padding else None
        additive = torch.zeros(mask.shape[0], 1, 1, mask.shape[1], dtype=self.dtype, device=self.device)
        return additive.masked_fill_(~mask[:, None, None, :], torch.finfo(self.dtype).min)

    def _takes_4d_mask(self, cache: Cache) -> bool:
        """Whether one-token steps of transformers' forward on `cache` take an additive 4D mask (SDPA's fast path)."""
        return (self.decoder is None and isinstance(cache, KVCache)
                and self.model.config._attn_implementation in MASK_4D_IMPLEMENTATIONS)

    def _run(self, input_ids: torch.Tensor, cache: Cache, position_ids: torch.Tensor,
             attention_mask: torch.Tensor | None, logits_to_keep: int = 1,
             capture: AttentionCapture | None = None, top_k: int = 0) -> torch.Tensor | TopLogits:
        """One forward pass extending `cache`; fp32 logits of the last `logits_to_keep` positions (0: all), or
        where the decoder screens them (``top_k`` > 0, see `LlamaDecoder.forward`) their `top_k` largest.
        Inside `_running(capture)`: transformers' forward finds the capture on its attention modules."""
        if self.decoder is not None:
            return self.decoder.forward(input_ids, position_ids, cache, attention_mask, logits_to_keep, capture,
                                        self.cpu_kernels, top_k)
        kwargs = {self._cache_argument: cache, "use_cache": True}
        if self._has_logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               **kwargs).logits
        if logits_to_keep and logits.shape[1] > logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return logits.float()

    def _prefill(self, prompt_ids: list[int], capacity: int) -> tuple[Cache, torch.Tensor]:
        """A new cache for `capacity` positions holding one prompt; the fp32 next-token logits after it (vocab,)."""
        cache = new_cache(self.model.config, capacity)
        positions = torch.arange(len(prompt_ids), device=self.device)[None]
        logits = self._run(torch.tensor([prompt_ids], device=self.device), cache, positions, None)
        return cache, logits[0, -1]

    def _feed(self, tokens: torch.Tensor, cache: Cache, length: int,
              capture: AttentionCapture | None = None) -> torch.Tensor:
        """Feed `tokens` (rows, count) to rows without padding whose `cache` holds `length` positions; fp32
        next-token logits after each of them (rows, count, vocab)."""
        rows, count = tokens.shape
        positions = torch.arange(length, length + count, device=self.device)[None].expand(rows, count)
        # one token: a 4D mask keeps SDPA on its fast grouped-query path (see _decode_mask); several: causal
        mask = (torch.zeros(rows, 1, 1, length + 1, dtype=self.dtype, device=self.device)
                if count == 1 and self._takes_4d_mask(cache) else None)
        return self._run(tokens, cache, positions, mask, logits_to_keep=count, capture=capture)

    # ---- the model as it is now ----

    def _running(self, capture: AttentionCapture | None) -> contextlib.ExitStack:
        """The model as the sampler runs it for one call: the engine chosen for the model as it is now (its
        weights, adapters and modules) and up to date with it, every module in evaluation mode (no dropout)
        and restored to its own mode afterwards; on transformers' forward, packed linear weights (if on) and the
        capture (if any) attached. Inside `holding`, nothing: that block set it up once."""
        stack = contextlib.ExitStack()
        if self._held:
            return stack
        stack.enter_context(evaluation_mode(self.model))
        self.decoder = self._current_decoder()
        if self.decoder is not None:
            self.decoder.refresh()
            return stack
        if self.pack_weights and packed.available(self.device):
            stack.enter_context(PackedLinears.of(self.model))
        stack.enter_context(_CaptureContext(self.model, self.attention_modules, capture))
        return stack

    @contextlib.contextmanager
    def holding(self, state: RaggedState):
        """The model set up once (`_running`: engine, evaluation mode, the state's capture) for every `step_rows`
        call inside the block, instead of once per call: a controller's decode loop saves the checks of the
        model (~4 ms per SmolLM2 step on the 2-core CPU). The model must not change inside the block."""
        with self._running(state.capture):
            self._held = True
            try:
                yield
            finally:
                self._held = False

    # ---- step-wise decoding ----

    @torch.inference_mode()
    def start(self, prompt: Prompt, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
              greedy: bool = False, seed: int | None = 0, capture_heads: Sequence[tuple[int, int]] | None = None,
              capture_rows: bool = False, chat: bool | None = None, stop: Sequence[str] | None = None) -> DecodeState:
        """Prefill one prompt and return the one-row state that `step`, `append`, `rollback`, `fork` and `select`
        work on. The sampling parameters and ``stop`` strings are the state's defaults; `step` may override them."""
        prompt_ids = self.encode(prompt, chat)
        params = SamplingParams(temperature, top_p, top_k, greedy)
        capture, generator = self._capture(capture_heads, capture_rows), self._generator(seed)
        with self._running(None):  # prompt rows are not needed
            cache, logits = self._prefill(prompt_ids, len(prompt_ids) + 256)
        return DecodeState(prompt_ids, cache, params, generator, capture, rows=[Row()], logits=[logits[None]],
                           stop=[s for s in (stop or []) if s])

    @torch.inference_mode()
    def step(self, state: DecodeState, greedy: bool | None = None, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None, stop: Sequence[str] | None = None,
             candidates: int = 0) -> StepOutput | list[StepOutput]:
        """Choose each row's next token, feed it to the model (one forward pass for all rows), return it with its
        signals: a `StepOutput`, or for a fork one per row. Sampling parameters given here apply to this step only
        (`SamplingParams.override`); ``stop`` replaces the state's stop strings for this step; ``candidates``: also
        return each token's distribution's best ``candidates`` tokens with their log-probs."""
        params = state.params.override(greedy, temperature, top_p, top_k)
        tokens = choose_tokens(state.logits[-1], params, state.generator, self.cpu_kernels)
        outputs = self._consume(state, tokens[:, None], stop, candidates)
        return [row[0] for row in outputs] if state.forked else outputs[0][0]

    @torch.inference_mode()
    def append(self, state: DecodeState, text_or_ids: str | Sequence[int], stop: Sequence[str] | None = None,
               candidates: int = 0) -> list[StepOutput] | list[list[StepOutput]]:
        """Force tokens (text is encoded without special tokens) after every row, in one forward pass; their
        signals (for a fork: one list per row)."""
        if isinstance(text_or_ids, str):
            ids = self.tokenizer(text_or_ids, add_special_tokens=False)["input_ids"]
        else:
            ids = [int(token) for token in text_or_ids]
        if not ids:
            return [[] for _ in state.rows] if state.forked else []
        tokens = torch.tensor(ids, device=self.device)[None].expand(len(state.rows), -1)
        outputs = self._consume(state, tokens, stop, candidates)
        return outputs if state.forked else outputs[0]

    def rollback(self, state: DecodeState, k: int) -> None:
        """Forget the last k sampled or appended tokens of every row: crop the KV cache by k; nothing is
        recomputed."""
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= state.tokens:
            raise ValueError(f"rollback(k={k!r}): must be an integer in 0..{state.tokens} (the tokens after the prompt)")
        if k == 0:
            return
        state.cache.crop(-k)
        del state.logits[-k:]
        for row in state.rows:
            del row.token_ids[-k:]
            row.text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
            row.emitted = min(row.emitted, len(row.text.rstrip(INCOMPLETE)))

    @torch.inference_mode()
    def fork(self, state: DecodeState, n: int) -> DecodeState:
        """A state of ``n`` branches of each row of `state` (row i's copies at i * n .. i * n + n - 1), which
        `state` itself is left as it was. The branches share what `state` computed: their KV cache rows are
        copies of its rows (nothing is recomputed; the CPU attention kernel reads their common positions once),
        and each `step` feeds all of them in one forward pass. The fork draws from its own generator, a copy of
        the state's."""
        n = check_count("n", n)
        return self._take(state, torch.arange(len(state.rows)).repeat_interleave(n), forked=True)

    @torch.inference_mode()
    def select(self, state: DecodeState, rows: int | Sequence[int]) -> DecodeState:
        """A new state of the chosen rows of `state` (one index: a one-row state, as `start` makes; a list: a
        fork of those rows, in that order); `state` is left as it was."""
        single = isinstance(rows, numbers.Integral)
        indices = [int(rows)] if single else [int(row) for row in rows]
        if not indices or any(not 0 <= index < len(state.rows) for index in indices):
            raise ValueError(f"select(rows={rows!r}): this state has rows 0..{len(state.rows) - 1}")
        return self._take(state, torch.tensor(indices), forked=not single)

    def _take(self, state: DecodeState, indices: torch.Tensor, forked: bool) -> DecodeState:
        """A new state whose row j is a copy of `state`'s row ``indices[j]``."""
        generator = torch.Generator(device=self.device)
        generator.set_state(state.generator.get_state())
        device_indices = indices.to(self.device)
        return DecodeState(state.prompt_ids, take_rows(state.cache, device_indices), state.params, generator,
                           state.capture, rows=[copy.deepcopy(state.rows[index]) for index in indices.tolist()],
                           logits=[logits.index_select(0, device_indices) for logits in state.logits],
                           stop=list(state.stop), forked=forked)

    def _consume(self, state: DecodeState, tokens: torch.Tensor, stop: Sequence[str] | None,
                 candidates: int) -> list[list[StepOutput]]:
        """Feed `tokens` (rows, count) after the state's rows; record their logits; per row, a `StepOutput` per
        token."""
        rows, count = tokens.shape
        candidates = check_count("candidates", candidates, minimum=0)
        stop = state.stop if stop is None else [s for s in stop if s]
        with self._running(state.capture):
            new_logits = self._feed(tokens, state.cache, state.length, state.capture)  # (rows, count, vocab)
        # the distribution each token was drawn from: the state's last logits, then the new ones but the last
        before = torch.cat([state.logits[-1][:, None], new_logits[:, :-1]], dim=1).flatten(0, 1)
        values = token_signals(before, tokens.flatten()).view(rows, count, 3).tolist()
        best = None
        if candidates:
            top = before.topk(min(candidates, before.shape[-1]), dim=-1)
            best_logprobs = (top.values - before.logsumexp(dim=-1, keepdim=True)).view(rows, count, -1).tolist()
            best = [[list(zip(ids, logprobs)) for ids, logprobs in zip(row_ids, row_logprobs)]
                    for row_ids, row_logprobs in zip(top.indices.view(rows, count, -1).tolist(), best_logprobs)]
        attention = attention_rows = None
        if state.capture is not None:
            previous, all_rows = state.capture.collect()
            attention = previous.transpose(1, 2).tolist()  # (rows, tokens, heads)
            if all_rows is not None:
                attention_rows = [[all_rows[r, :, j, :state.length + j + 1].tolist() for j in range(count)]
                                  for r in range(rows)]
        state.logits += list(new_logits.unbind(1))
        outputs = []
        for r, (row, row_tokens) in enumerate(zip(state.rows, tokens.tolist())):
            outputs.append([])
            for j, token in enumerate(row_tokens):
                row.token_ids.append(token)
                row.text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
                piece = ""  # a token that ends inside a multi-byte character shows nothing until the character is whole
                if not row.text.endswith(INCOMPLETE):
                    piece, row.emitted = row.text[row.emitted:], len(row.text)
                finish, stop_string = self._finish_reason(row.token_ids, stop, ignore_eos=False)
                outputs[-1].append(StepOutput(
                    token, piece, *values[r][j], is_eos=token in self.eos_ids,
                    attention=attention[r][j] if attention is not None else None,
                    attention_rows=attention_rows[r][j] if attention_rows is not None else None,
                    finish_reason=finish, stop=stop_string, candidates=best[r][j] if best is not None else None))
        return outputs


    # ---- ragged rows: per-row step, append and rollback in one batch ----

    @torch.inference_mode()
    def start_rows(self, prompts: Sequence[Prompt], capture_heads: Sequence[tuple[int, int]] | None = None,
                   chat: bool | None = None) -> RaggedState:
        """Prefill several prompts (left-padded, one forward pass) into a `RaggedState`, whose rows `step_rows`,
        `rollback_row` and `select_rows` then move each on its own (controllers that batch problems)."""
        prompt_ids = [self.encode(prompt, chat) for prompt in prompts]
        length = max(len(ids) for ids in prompt_ids)
        padding = [length - len(ids) for ids in prompt_ids]
        valid = torch.ones(len(prompt_ids), 2 * length + 256, dtype=torch.bool, device=self.device)
        for row, pad in enumerate(padding):
            valid[row, :pad] = False
        input_ids = torch.tensor([[self.pad_id] * pad + ids for pad, ids in zip(padding, prompt_ids)], device=self.device)
        positions = (valid[:, :length].long().cumsum(-1) - 1).clamp(min=0)
        cache = new_cache(self.model.config, valid.shape[1])
        with self._running(None):  # prompt rows are not needed
            logits = self._run(input_ids, cache, positions, valid[:, :length] if any(padding) else None)[:, -1]
        return RaggedState(prompt_ids, cache, self._capture(capture_heads, False), valid,
                           [list(range(pad, length)) for pad in padding], [[row] for row in logits], 
                           [Row() for _ in prompt_ids])

    @torch.inference_mode()
    def step_rows(self, state: RaggedState, tokens: Sequence[int | None]) -> list[StepOutput | None]:
        """Feed one token per row (None: the row idles this pass) in one forward pass; per row, the token's
        `StepOutput` (log-prob, entropy and margin under the row's last logits, a_{i,i-1} on the row's previous
        token for the captured heads), None for an idle row. Choosing the tokens is the caller's (`choose_tokens`
        on ``state.logits[r][-1]``), so rows may be greedy, sampled or forced each on its own."""
        fed = [r for r, token in enumerate(tokens) if token is not None]
        if not fed:
            return [None] * len(tokens)
        slot = state.length
        if slot + 1 > state.valid.shape[1]:  # room for more slots (the cache grows by itself)
            state.valid = torch.cat([state.valid, torch.zeros_like(state.valid)], dim=1)
        state.valid[:, slot] = False
        state.valid[fed, slot] = True
        ids = torch.tensor([[self.pad_id if token is None else token] for token in tokens], device=self.device)
        positions = torch.tensor([[len(slots)] for slots in state.slots], device=self.device)
        previous = torch.tensor([slots[-1] for slots in state.slots], device=self.device)
        window = state.valid[:, :slot + 1]
        mask = self._decode_mask(state.cache, window, has_padding=not bool(window.all()))
        before = torch.stack([state.logits[r][-1] for r in fed])
        with self._running(state.capture):
            new_logits = self._run(ids, state.cache, positions, mask, capture=state.capture)[:, -1]
        values = token_signals(before, ids[fed, 0]).tolist()
        attention = state.capture.collect(previous)[0][:, :, 0].tolist() if state.capture is not None else None
        outputs: list[StepOutput | None] = [None] * len(tokens)
        for index, r in enumerate(fed):
            row, token = state.rows[r], tokens[r]
            state.slots[r].append(slot)
            state.logits[r].append(new_logits[r])
            row.token_ids.append(token)
            row.text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
            piece = ""  # a token that ends inside a multi-byte character shows nothing until the character is whole
            if not row.text.endswith(INCOMPLETE):
                piece, row.emitted = row.text[row.emitted:], len(row.text)
            outputs[r] = StepOutput(token, piece, *values[index], is_eos=token in self.eos_ids,
                                    attention=attention[r] if attention is not None else None,
                                    finish_reason="eos" if token in self.eos_ids else None)
        return outputs

    @torch.inference_mode()
    def rollback_row(self, state: RaggedState, row: int, k: int) -> None:
        """Forget the last k tokens of one row: its slots are masked out (holes), nothing is recomputed."""
        held = len(state.rows[row].token_ids)
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= held:
            raise ValueError(f"rollback_row(k={k!r}): must be an integer in 0..{held} (row {row}'s tokens after its prompt)")
        if k == 0:
            return
        state.valid[row, state.slots[row][-k:]] = False
        del state.slots[row][-k:], state.logits[row][-k:]
        target = state.rows[row]
        del target.token_ids[-k:]
        target.text = self.tokenizer.decode(target.token_ids, skip_special_tokens=True)
        target.emitted = min(target.emitted, len(target.text.rstrip(INCOMPLETE)))

    @torch.inference_mode()
    def select_rows(self, state: RaggedState, rows: Sequence[int]) -> RaggedState:
        """A new `RaggedState` of the chosen rows, in that order (repeats fork a row: the copies share what it
        computed; a subset drops finished rows); `state` is left as it was."""
        indices = [int(row) for row in rows]
        if not indices or any(not 0 <= index < len(state.rows) for index in indices):
            raise ValueError(f"select_rows(rows={rows!r}): this state has rows 0..{len(state.rows) - 1}")
        device_indices = torch.tensor(indices, device=self.device)
        return RaggedState([state.prompt_ids[i] for i in indices], take_rows(state.cache, device_indices),
                           state.capture, state.valid.index_select(0, device_indices),
                           [list(state.slots[i]) for i in indices], [list(state.logits[i]) for i in indices],
                           [copy.deepcopy(state.rows[i]) for i in indices])


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module):
    """Every module of `model` in evaluation mode (dropout off) inside the block; each module that was training
    is set back to training on exit. Only the ``training`` flags change, for the duration of the block: the
    sampler never calls ``model.eval()``, which would leave a model being trained in evaluation mode."""
    training = [module for module in model.modules() if module.training]
    for module in training:
        module.training = False
    try:
        yield
    finally:
        for module in training:
            module.training = True


class _CaptureContext:
    """Runs the model with the "lab_capture" attention and `capture` attached to the chosen layers' attention
    modules; restores the previous implementation afterwards. Does nothing when `capture` is None."""

    def __init__(self, model, attention_modules: dict, capture: AttentionCapture | None):
        self.model, self.capture = model, capture
        if capture is not None:
            missing = sorted(set(capture.heads_by_layer) - set(attention_modules))
            if missing:
                raise RuntimeError(f"{type(model).__name__}: no attention module with layer_idx {missing} "
                                   "(capture needs transformers-style attention modules with `layer_idx`)")
            self.modules = [attention_modules[layer] for layer in capture.heads_by_layer]

    def __enter__(self):
        if self.capture is None:
            return self
        self.previous_implementation = self.model.config._attn_implementation
        self.model.set_attn_implementation(CAPTURE_ATTENTION)
        if self.model.config._attn_implementation != CAPTURE_ATTENTION:
            raise RuntimeError(f"{type(self.model).__name__} cannot switch its attention implementation "
                               "(it must call transformers' ALL_ATTENTION_FUNCTIONS), so heads cannot be captured")
        for module in self.modules:
            module._lab_capture = self.capture
        return self

    def __exit__(self, *exc):
        if self.capture is None:
            return False
        for module in self.modules:
            del module._lab_capture
        self.model.set_attn_implementation(self.previous_implementation)
        return False
