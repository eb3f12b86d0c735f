"""Teacher-forced scoring: what a model thinks of completions it is given, in one forward pass.

    from lightning_lab.models.scoring import score

    scores = score(model, prompt_ids, completion_ids)                   # ragged lists of token ids
    scores.logprobs        # (rows, C): log p(completion token j | prompt, completion[:j]); 0 at padding
    scores.mask            # (rows, C): True where row r has a token j (j < len(completion_ids[r]))
    scores.mean_nll()      # mean negative log-likelihood over every completion token (the SFT loss)
    scores.sequence_logprobs()   # (rows,): log p(whole completion | prompt)

    score(peft_model, p, c, adapter=False)        # the base model: peft's disable_adapter(), no second copy
    score(model, p, c, temperature=0.7, entropy=True, grad=True)        # RL / distillation
    score(model, p, c, heads="all")               # a_{i,i-1} of every (layer, head): RAUQ head selection

Every stage and method that needs the log-probability of given tokens uses this function (SFT's loss,
RL's policy ratio and KL, pretraining's loss, TTT, SDFT, retention perplexity, RAUQ head selection,
Quiet-STaR); nothing else computes token cross-entropy. Decoding new tokens is the sampler's job
(sampling/sampler.py); this module only reads tokens that already exist.

Inputs. ``prompt_ids`` and ``completion_ids`` are per-row lists of token ids (ragged: rows may differ in
length; a prompt needs at least one token, a completion may be empty) or two 2-D LongTensors (every row
the same lengths: no padding, e.g. pretraining windows). `model` is any causal LM module: a plain
Hugging Face model, the lab GPT, or a peft model (``adapter=False`` scores its base with the adapter
disabled for this call). The model runs in whatever mode it is in (train mode: dropout active) and on
the device of its parameters; the result is on that device.

Layout. Each row is its prompt, left-padded to the longest prompt P, then its completion, right-padded
to the longest completion C, so that every completion starts at column P and only the logits of the
last C + 1 columns are computed (``logits_to_keep``). Position ids count from each row's first real
token, as the sampler counts them, and padding is masked, so a row scores the same alone as in a batch
(up to floating-point rounding).

Outputs (`Scores`; tensors of shape (rows, C, ...), index j = the j-th completion token, zero where
``mask`` is False):

- ``logprobs``: log softmax(logits / temperature) at the completion token, fp32. Temperature 1 is the
  model's own distribution; another temperature is the distribution a sampler at that temperature draws
  from (before top-k / top-p).
- ``entropy`` (``entropy=True``): -sum p log p of that same tempered next-token distribution, in nats.
- ``logits`` (``logits=True``): the raw logits (before temperature) that predict completion token j, fp32.
- ``hidden`` (``hidden=True``): the model's last hidden state (after its final norm) at the position that
  predicts completion token j, i.e. the vector whose output-layer product is ``logits[:, j]``.
- ``attention`` (``heads=[(layer, head), ...]`` or ``"all"``): (rows, heads, C), the RAUQ convention of
  the sampler's attention capture: a_{i,i-1} = A[i, i-1] of this full forward pass, the weight the query
  at completion token j (position i = prompt length + j) puts on the token before it (for j = 0 the last
  prompt token). ``attention_rows=True`` also returns each such query's whole row, (rows, heads, C, L)
  over the row's own positions 0..L-1 (L = the longest prompt + completion; zero past i). Heads are in
  the order asked (``"all"``: layer-major), listed in ``Scores.heads``. Attention is read from eager
  attention (``output_attentions=True``; the model's attention implementation is switched to "eager"
  for the call and restored), which forms every head's map: fine for scoring, costly for long sequences.

Branches. ``score(..., keep_cache=True)`` also returns the KV cache of the pass (``Scores.cache``);
`score_branches` then reads many short continuations that branch off those rows at chosen positions, all in
one batched pass over the cache (row r continues text ``texts[r]`` right after its token ``positions[r]``,
seeing none of that text's later tokens): Quiet-STaR's thoughts after every token of a text, without
reading the text once per position.

Gradients: ``grad=False`` (default) runs under ``torch.no_grad()``; ``grad=True`` under
``torch.enable_grad()``, so losses built from the outputs backpropagate into the model (not inside
``torch.inference_mode``, where Lightning runs validation).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

Heads = Sequence[tuple[int, int]] | str | None
TokenRows = Sequence[Sequence[int]] | torch.Tensor


@dataclass
class Scores:
    """What `score` returns; see the module docstring for each field's meaning and shape."""

    logprobs: torch.Tensor  # (rows, C) fp32
    mask: torch.Tensor  # (rows, C) bool
    prompt_lengths: list[int]
    completion_lengths: list[int]
    entropy: torch.Tensor | None = None  # (rows, C) fp32
    logits: torch.Tensor | None = None  # (rows, C, vocab) fp32
    hidden: torch.Tensor | None = None  # (rows, C, hidden_size), the model's dtype
    attention: torch.Tensor | None = None  # (rows, heads, C) fp32: a_{i,i-1}
    attention_rows: torch.Tensor | None = None  # (rows, heads, C, L) fp32
    heads: list[tuple[int, int]] | None = None  # the (layer, head) of each attention entry
    cache: object | None = None  # keep_cache=True: the pass's KV cache (transformers `Cache`), for score_branches

    def sequence_logprobs(self) -> torch.Tensor:
        """(rows,) log-probability of each whole completion (the sum over its tokens)."""
        return (self.logprobs * self.mask).sum(dim=1)

    def mean_nll(self) -> torch.Tensor:
        """Mean negative log-likelihood over every completion token of every row (exp of it: perplexity)."""
        return -(self.logprobs * self.mask).sum() / self.mask.sum().clamp(min=1)

    @property
    def num_tokens(self) -> int:
        return sum(self.completion_lengths)


def score(model: torch.nn.Module, prompt_ids: TokenRows, completion_ids: TokenRows, *, temperature: float = 1.0,
          entropy: bool = False, logits: bool = False, hidden: bool = False, heads: Heads = None,
          attention_rows: bool = False, adapter: bool = True, grad: bool = False, keep_cache: bool = False) -> Scores:
    """Teacher-forced log-probabilities of `completion_ids` after `prompt_ids` (see the module docstring)."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: scoring needs a distribution (temperature > 0)")
    if not adapter and not hasattr(model, "disable_adapter"):
        raise ValueError(f"adapter=False: {type(model).__name__} is not a peft model, it has no adapter to disable")
    device = next(model.parameters()).device
    batch = padded_batch(prompt_ids, completion_ids, device)
    width = batch["completion_width"]
    pairs = head_pairs(model, heads) if heads is not None else None
    want_attention = pairs is not None

    adapter_off = model.disable_adapter() if not adapter else contextlib.nullcontext()
    gradients = torch.enable_grad() if grad else torch.no_grad()
    eager = eager_attention(model) if want_attention else contextlib.nullcontext()
    with adapter_off, gradients, eager:
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=keep_cache, logits_to_keep=width + 1,
                       output_hidden_states=hidden, output_attentions=want_attention)
        raw = output.logits[:, -(width + 1):-1].float()  # column P-1+j predicts completion token j
        tempered = raw / temperature if temperature != 1.0 else raw
        mask = batch["completion_mask"]
        targets = batch["input_ids"][:, batch["prompt_width"]:]
        log_normaliser = tempered.logsumexp(dim=-1)
        logprobs = (tempered.gather(-1, targets[..., None]).squeeze(-1) - log_normaliser) * mask
        scores = Scores(logprobs=logprobs, mask=mask, prompt_lengths=batch["prompt_lengths"],
                        completion_lengths=batch["completion_lengths"], cache=output.cache if keep_cache else None)
        if entropy:
            probabilities = torch.softmax(tempered, dim=-1)
            scores.entropy = (log_normaliser - (probabilities * tempered).sum(dim=-1)) * mask
        if logits:
            scores.logits = raw * mask[..., None]
        if hidden:
            last = output.hidden_states[-1]
            scores.hidden = last[:, last.shape[1] - width - 1:-1] * mask[..., None].to(last.dtype)
        if want_attention:
            scores.heads = pairs
            scores.attention, rows = attention_of(output.attentions, pairs, batch, attention_rows)
            scores.attention_rows = rows
    return scores


def score_branches(model: torch.nn.Module, scores: Scores, texts: torch.Tensor, positions: torch.Tensor,
                   tokens: torch.Tensor, *, hidden: bool = False, grad: bool = False, cache: DynamicCache | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, DynamicCache]:
    """Teacher-forced logits of continuations that branch off rows a `score(..., keep_cache=True)` call read.

    Row r of ``tokens`` (rows, T) continues row ``texts[r]`` of that call's batch right after its column
    ``positions[r]`` (a column of the batch: prompt width - prompt length + token index; with one-token,
    unpadded prompts the token index itself): it sees the cached keys up to that column and none after, its
    own tokens causally, at position ids ``positions[r] + 1 ...``. One pass for every branch, through an
    explicit 4D mask (models whose attention takes one: eager and SDPA, the lab GPT and transformers'
    models). Returns fp32 logits (rows, T, vocab), column t predicting the token after ``tokens[:, t]``; with
    ``hidden`` the last hidden states (rows, T, hidden_size); and the branches' cache, which a next call
    given it as ``cache`` (same texts and positions) continues from, reading only its new tokens (decoding).
    With ``grad`` the gradient flows into the model through these tokens and the cached keys of the texts.
    """
    if scores.cache is None:
        raise ValueError("score_branches: the scores hold no cache; score(..., keep_cache=True) first")
    device = next(model.parameters()).device
    texts, positions, tokens = texts.to(device), positions.to(device), tokens.to(device)
    rows, count = tokens.shape
    text_width = scores.cache.get_seq_length()
    if cache is None:  # each branch gets its own copy of its text's keys and values; the scores' stay as they were
        cache = DynamicCache(ddp_cache_data=[(layer.keys.index_select(0, texts), layer.values.index_select(0, texts))
                                             for layer in scores.cache.layers])
    read = cache.get_seq_length() - text_width  # branch tokens already in the cache
    visible = torch.cat([torch.arange(text_width, device=device)[None] <= positions[:, None],
                         torch.ones(rows, read + count, dtype=torch.bool, device=device)], dim=1)
    width = text_width + read + count
    causal = torch.ones(count, width, dtype=torch.bool, device=device).tril(text_width + read)
    dtype = scores.cache.layers[0].keys.dtype
    mask = torch.zeros(rows, 1, count, width, dtype=dtype, device=device)
    mask.masked_fill_(~(visible[:, None, None, :] & causal), torch.finfo(dtype).min)
    position_ids = positions[:, None] + 1 + read + torch.arange(count, device=device)
    forward_arguments = inspect.signature(pretrained_model(model).forward).parameters
    argument = "cache" if "cache" in forward_arguments else "past_key_values"  # the name before transformers 5.24
    with torch.enable_grad() if grad else torch.no_grad():
        output = model(input_ids=tokens, attention_mask=mask, position_ids=position_ids, use_cache=True,
                       output_hidden_states=hidden, **{argument: cache})
    return output.logits.float(), output.hidden_states[-1] if hidden else None, cache


def padded_batch(prompt_ids: TokenRows, completion_ids: TokenRows, device: torch.device) -> dict:
    """input_ids with prompts left-padded to width P and completions right-padded after them (module docstring);
    for two tensors (no padding) attention_mask and position_ids are None, so the model takes its causal fast path."""
    if isinstance(prompt_ids, torch.Tensor) and isinstance(completion_ids, torch.Tensor):
        if prompt_ids.dim() != 2 or completion_ids.dim() != 2 or len(prompt_ids) != len(completion_ids):
            raise ValueError(f"prompt_ids {tuple(prompt_ids.shape)} and completion_ids {tuple(completion_ids.shape)}: "
                             "tensors must be 2-D with the same number of rows")
        if prompt_ids.shape[1] < 1:
            raise ValueError("prompt_ids: every row needs at least one token (nothing predicts a first token)")
        rows, width = completion_ids.shape
        return {"input_ids": torch.cat([prompt_ids, completion_ids], dim=1).to(device), "attention_mask": None,
                "position_ids": None, "prompt_width": prompt_ids.shape[1], "completion_width": width,
                "completion_mask": torch.ones(rows, width, dtype=torch.bool, device=device),
                "prompt_lengths": [prompt_ids.shape[1]] * rows, "completion_lengths": [width] * rows}
    prompts, completions = [list(map(int, ids)) for ids in prompt_ids], [list(map(int, ids)) for ids in completion_ids]
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"{len(prompts)} prompts and {len(completions)} completions: need one completion per prompt")
    empty = [row for row, ids in enumerate(prompts) if not ids]
    if empty:
        raise ValueError(f"prompt_ids: rows {empty[:5]} are empty; every prompt needs at least one token")
    prompt_width, completion_width = max(map(len, prompts)), max(map(len, completions))
    input_ids = torch.zeros(len(prompts), prompt_width + completion_width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros(len(prompts), completion_width, dtype=torch.bool)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        start, end = prompt_width - len(prompt), prompt_width + len(completion)
        input_ids[row, start:end] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[row, start:end] = 1
        completion_mask[row, :len(completion)] = True
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "position_ids": position_ids.to(device), "prompt_width": prompt_width,
            "completion_width": completion_width, "completion_mask": completion_mask.to(device),
            "prompt_lengths": list(map(len, prompts)), "completion_lengths": list(map(len, completions))}


def pretrained_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_pairs(model: torch.nn.Module, heads: Heads) -> list[tuple[int, int]]:
    """``"all"`` -> every (layer, head) in layer-major order; a list -> itself, checked against the model's shape."""
    config = pretrained_model(model).config
    layers, per_layer = config.num_hidden_layers, config.num_attention_heads
    if heads == "all":
        return [(layer, head) for layer in range(layers) for head in range(per_layer)]
    if isinstance(heads, str):
        raise ValueError(f"heads={heads!r}: pass 'all' or a list of (layer, head) pairs")
    pairs = [(int(layer), int(head)) for layer, head in heads]
    outside = [pair for pair in pairs if not (0 <= pair[0] < layers and 0 <= pair[1] < per_layer)]
    if outside or not pairs:
        raise ValueError(f"heads: {outside or 'none given'}; the model has {layers} layers x {per_layer} heads")
    return pairs


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module):
    """Run `model` with eager attention for the duration (SDPA cannot return attention weights)."""
    inner = pretrained_model(model)
    previous = inner.config._attn_implementation
    if previous != "eager":
        inner.set_attn_implementation("eager")
    try:
        yield
    finally:
        if previous != "eager":
            inner.set_attn_implementation(previous)


def attention_of(maps: Sequence[torch.Tensor], pairs: list[tuple[int, int]], batch: dict,
                 keep_rows: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """From per-layer maps (rows, heads, T, T): a_{i,i-1} per completion token (rows, pairs, C) and, if asked,
    each completion query's row over the row's own positions (rows, pairs, C, L)."""
    prompt_width, width = batch["prompt_width"], batch["completion_width"]
    chosen = torch.stack([maps[layer][:, head] for layer, head in pairs], dim=1).float()  # (rows, pairs, T, T)
    queries = chosen[:, :, prompt_width:prompt_width + width]  # (rows, pairs, C, T)
    columns = torch.arange(width, device=chosen.device) + prompt_width - 1
    previous = queries.gather(-1, columns.view(1, 1, width, 1).expand(*queries.shape[:2], width, 1)).squeeze(-1)
    mask = batch["completion_mask"][:, None]
    previous = previous * mask
    if not keep_rows:
        return previous, None
    length = max(p + c for p, c in zip(batch["prompt_lengths"], batch["completion_lengths"]))
    rows = queries.new_zeros(*queries.shape[:3], length)
    for row, prompt_length in enumerate(batch["prompt_lengths"]):
        start = prompt_width - prompt_length  # the row's first real token
        kept = min(queries.shape[-1] - start, length)
        rows[row, :, :, :kept] = queries[row, :, :, start:start + kept]
    return previous, rows * mask[..., None]
