"""The forward pass of Llama-family models, written out for decoding.

transformers' `LlamaForCausalLM.forward` is general: masks built per call, rotary angles recomputed per call,
q, k and v (and gate and up) as separate products, a dozen small tensor operations per layer that
each cost a few microseconds of dispatch. When a decode step multiplies each weight by one row, that
overhead is a third of the step (SmolLM2-135M, bf16, one row, 2-core CPU, both timed alternately: 44-46 ms
per token through transformers' forward with prepacked weights, 31 ms here). `LlamaDecoder` computes the
same function from the same weights with fewer operations:

- one product for q, k and v and one for gate and up (weights concatenated once; on CPU prepacked for
  oneDNN, see ``weight_packing.py``); the concatenated products are the same dot products. On CPU with the kernels
  of ``cpu_kernels.cpp``, a pass over one or two rows takes its products from `kernels.small_linear` (the
  unstacked weights), and an fp32 pass over more rows from `kernels.panel_linear` (the weights packed in
  panels), both faster there than oneDNN;
- cos/sin of the rotary embedding looked up in a table that the model's own rotary module filled (applied by
  `kernels.rotary` on CPU, and silu(gate) * up by `kernels.silu_mul`, each one pass);
- RMSNorm computed in fp32, rounded once, times the weight (transformers' rounding): `F.rms_norm`, or on CPU
  one pass of ``cpu_kernels.cpp``;
- attention: one-token steps on CPU use the kernel of ``cpu_kernels.cpp`` when it builds (``cpu_kernels``
  below), which reads a prompt shared by several rows once (`KVCache.shared_prefix`); elsewhere SDPA with
  queries grouped per key/value head (its fast CPU path, see `Sampler._decode_mask`). Several tokens use SDPA
  with an explicit causal + padding mask;
- a one-token step on the kernels runs each layer as one `kernels.decode_layer` call (`_decode_layers`): the
  same kernels in the same order as the loop in `forward`, chained in C++, the new key and value written
  straight into the `KVCache`'s buffers (bf16 passes of more than two rows keep the loop: their products
  are oneDNN's);
- ``top_k``: when the caller needs only each row's k largest logits (the sampler's top-k, or greedy), an
  fp32 pass of three rows and more computes the output layer in bf16 (oneDNN, at about twice the fp32
  rate), bounds each logit's error, and computes in fp32 only the logits that can be among the k largest
  (`kernels.screened_top_k`): the output layer is a fifth of a SmolLM2 step's multiply-adds.

With ``cpu_kernels=False``, in bf16 the logits equal transformers' bit for bit; in fp32 they differ in the
last bits where the prepacked products sum in another order (`tests/test_sampler.py` checks both). The kernels
compute attention in fp32 where SDPA rounds the softmax to bf16 before the values, and sum a norm's squares in
another order, and sum the products of one or two rows in another order, so in bf16 their logits differ from
transformers' by bf16 rounding.

`Sampler` uses the decoder for every model that `unsupported_reason` accepts (Llama, Qwen2 and models built
like them, full attention only, on CPU, linear layers that are plain `nn.Linear` or peft LoRA layers over one,
whose adapters it folds into private weights: ``adapters.py``) and transformers' forward otherwise. `refresh`
follows the model as it is at each call: modules replaced (an adapter added, embeddings resized) and weights
changed (an optimizer step) since the last one.

CPU only: its gains are the dispatch overhead of a CPU decode step, and its products read stacked and prepacked
copies of the weights (about as much memory again as the weights themselves); on CUDA or MPS those copies
would cost scarce device memory for no measured gain, so there the sampler runs transformers' forward, which
reads the model's own weights.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from lightning_lab.sampling import adapters
from lightning_lab.sampling import cpu_kernels as kernels
from lightning_lab.sampling import weight_packing as packed
from lightning_lab.sampling.weight_packing import FusedLinear

SUPPORTED_MODEL_TYPES = {"llama", "qwen2"}
# rotary types whose angle at a position does not depend on the sequence length (a table can hold them)
TABLE_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}
SCREENED_TOP_K = 64  # the largest k for which `forward` screens its output layer (see `_screens`)


def unsupported_reason(model) -> str | None:
    """Why `LlamaDecoder` cannot run `model` (None: it can)."""
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return f"model_type {getattr(config, 'model_type', None)!r} is not one of {sorted(SUPPORTED_MODEL_TYPES)}"
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    if any(kind != "full_attention" for kind in layer_types) or getattr(config, "use_sliding_window", False):
        return "a layer does not use full attention"
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") not in TABLE_ROPE_TYPES:
        return f"rotary embedding type {getattr(rotary, 'rope_type', None)!r}"
    if model.lm_head.weight.device.type != "cpu":
        return f"the decoder runs on CPU only, not {model.lm_head.weight.device.type} (see the module docstring)"
    for index, layer in enumerate(model.model.layers):
        for name, module in zip(PROJECTIONS, projections(layer)):
            reason = adapters.unsupported_linear_reason(module) if module is not None else "missing"
            if reason is not None:
                return f"layer {index}: {name}: {reason}"
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if any(not type(norm).__name__.endswith("RMSNorm") or not hasattr(norm, "variance_epsilon") for norm in norms):
            return f"layer {index}: a norm is not an RMSNorm"
    reason = adapters.unsupported_linear_reason(model.lm_head)
    return None if reason is None else f"lm_head: {reason}"


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projections(layer) -> list:
    """A decoder layer's seven linear layers, in `PROJECTIONS` order (None where one is missing)."""
    return [getattr(layer.self_attn, name, None) for name in PROJECTIONS[:4]] + \
        [getattr(layer.mlp, name, None) for name in PROJECTIONS[4:]]


@dataclass
class TopLogits:
    """The k largest of each position's logits, best first (ids of equal values in ascending order), and their
    token ids: values (..., k) fp32, ids (..., k) int64. Indexing selects positions as it would in the logits
    (``logits[:, -1]``, ``logits[rows]``)."""

    values: torch.Tensor
    ids: torch.Tensor

    def __getitem__(self, index) -> TopLogits:
        return TopLogits(self.values[index], self.ids[index])


class LlamaDecoder:
    """`forward(input_ids, positions, cache, mask)`: fp32 logits, written into `cache` as transformers would."""

    def __init__(self, model, pack_weights: bool | None = None):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"LlamaDecoder cannot run {type(model).__name__}: {reason}")
        self.model = model
        self.pack = packed.available(model.lm_head.weight.device) and pack_weights is not False
        self.sources = None
        self.cos = self.sin = None
        self.refresh()

    def _current_modules(self) -> list:
        """Every module the decoder takes weights from, as the model holds them now."""
        found = [self.model.lm_head, self.model.model.norm]
        for layer in self.model.model.layers:
            found += [layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm,
                      *projections(layer)]
        return found

    def _build(self) -> None:
        """The per-layer view of the model's current modules (linear layers fused; their weights made at use)."""
        config, first = self.model.config, self.model.model.layers[0].self_attn
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scaling = first.head_dim, first.scaling
        self.layers = []
        for layer in self.model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            q, k, v, o, gate, up, down = projections(layer)
            self.layers.append(dict(
                attention=attention, act=mlp.act_fn, intermediate=gate.out_features,
                silu=type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation"),  # the kernels' fused silu(gate) * up
                input_norm=layer.input_layernorm, post_attention_norm=layer.post_attention_layernorm,
                qkv=FusedLinear(q, k, v, pack=self.pack), out=FusedLinear(o, pack=self.pack),
                gate_up=FusedLinear(gate, up, pack=self.pack), down=FusedLinear(down, pack=self.pack)))
        self.head = FusedLinear(self.model.lm_head, pack=self.pack)
        self.all_silu = all(layer["silu"] for layer in self.layers)  # `decode_layer` fuses silu(gate) * up

    @classmethod
    def of(cls, model, pack_weights: bool | None = None) -> LlamaDecoder:
        """The model's decoder, shared by every sampler made for it with the same packing (callers that build a
        new `Sampler` per call then stack and pack the weights once, not at every call)."""
        key = pack_weights is not False
        decoders = _DECODERS.setdefault(model, {})
        if key not in decoders:
            decoders[key] = cls(model, pack_weights)
        return decoders[key]

    def refresh(self) -> None:
        """Follow the model as it is now (cheap when nothing changed): rebuild the layer view when a module was
        replaced (a peft adapter added or removed, embeddings resized), and re-fold, re-stack and re-pack any
        weight that changed since the last call (an optimizer step, an adapter switched on or off)."""
        current = self._current_modules()
        if self.sources is None or len(current) != len(self.sources) or \
                any(now is not before for now, before in zip(current, self.sources)):
            self.sources = current
            self._build()
        for layer in self.layers:
            for name in ("qkv", "out", "gate_up", "down"):
                layer[name].refresh()
        self.head.refresh()

    def _rotary_table(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin (positions, head_dim) for positions 0..length-1 at least, from the model's rotary module."""
        if self.cos is None or len(self.cos) < length or self.cos.dtype != dtype:
            size = max(length, 2 * len(self.cos) if self.cos is not None else 1024)
            positions = torch.arange(size, device=self.model.lm_head.weight.device)[None]
            probe = torch.empty(0, dtype=dtype, device=positions.device)
            cos, sin = self.model.model.rotary_emb(probe, positions)
            half = cos.shape[-1] // 2
            # sin with its first half negated: rotate() then needs a roll instead of transformers' neg + cat
            self.cos, self.sin = cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        return self.cos, self.sin

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: Cache,
                attention_mask: torch.Tensor | None, logits_to_keep: int = 1, capture=None,
                cpu_kernels: bool | None = None, top_k: int = 0) -> torch.Tensor | TopLogits:
        """Feed `input_ids` (rows, tokens) at `positions` (rows, tokens) after what `cache` holds.

        ``attention_mask``: None (no padding), the 2D padding mask (rows, cache length + tokens; True = real
        token) or, for one token, an additive (rows, 1, 1, cache length + 1) mask. ``capture``: an
        `AttentionCapture`, given each captured layer's queries and keys. ``cpu_kernels``: the norms, the
        attention of one-token steps and the products of one- or two-row passes through ``cpu_kernels.cpp``
        (None: when it builds and takes the model's dtype and head size; True: an error if it cannot; False:
        torch's operations). Returns fp32 logits of the last ``logits_to_keep`` positions (0: all); with ``top_k``
        > 0 a pass that can screen its output layer (`_screens`) returns their `top_k` largest as `TopLogits`."""
        rows, tokens = input_ids.shape
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        hidden = self.model.model.embed_tokens(input_ids)
        dtype, length = hidden.dtype, cache.get_seq_length() + tokens
        cos_table, sin_table = self._rotary_table(length, dtype)
        cos, sin = cos_table[positions][:, None], sin_table[positions][:, None]  # (rows, 1, tokens, head_dim)
        mask, causal = self._mask(attention_mask, rows, tokens, length, dtype, hidden.device)
        use_kernels = self._use_kernels(cpu_kernels, hidden)
        norm = kernel_rms_norm if use_kernels else rms_norm
        linear = kernel_linear if use_kernels else FusedLinear.__call__
        apply_rotary = kernels.rotary if use_kernels else rotate
        # a one-token step on the kernels: each layer in one call; otherwise each operation from here
        one_call_per_layer = use_kernels and self._layers_in_one_call(hidden, cache)
        if one_call_per_layer:
            hidden = self._decode_layers(hidden, cos, sin, cache, mask, capture)
        for index, layer in enumerate([] if one_call_per_layer else self.layers):
            x = norm(hidden, layer["input_norm"])
            qkv = linear(layer["qkv"], x).view(rows, tokens, heads + 2 * kv_heads, head_dim).transpose(1, 2)
            query_key = apply_rotary(qkv[:, :heads + kv_heads], cos, sin)  # (rows, heads + kv_heads, tokens, head_dim)
            query, key = query_key[:, :heads], query_key[:, heads:]
            attended = self._attend(index, query, key, qkv[:, heads + kv_heads:], cache, mask, causal, capture,
                                    use_kernels)
            hidden = hidden + linear(layer["out"], attended)
            gate_up = linear(layer["gate_up"], norm(hidden, layer["post_attention_norm"]))
            if use_kernels and layer["silu"]:
                activated = kernels.silu_mul(gate_up)
            else:
                activated = layer["act"](gate_up[..., :layer["intermediate"]]) * gate_up[..., layer["intermediate"]:]
            hidden = hidden + linear(layer["down"], activated)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        normed = norm(hidden, self.model.model.norm)
        if top_k and use_kernels and self._screens(normed, top_k):
            return self._top_logits(normed, top_k)
        return linear(self.head, normed).float()

    def _use_kernels(self, cpu_kernels: bool | None, hidden: torch.Tensor) -> bool:
        """Whether this pass runs the CPU kernels (see `forward`)."""
        if cpu_kernels is False:
            return False
        if not kernels.supports(hidden, self.head_dim):
            if cpu_kernels:
                raise ValueError(f"cpu_kernels=True, but they take CPU bf16/fp32 with head_dim in {kernels.HEAD_DIMS}, "
                                 f"not {hidden.device.type} {hidden.dtype} head_dim {self.head_dim}")
            return False
        if kernels.load() is None:
            if cpu_kernels:
                raise RuntimeError("cpu_kernels=True, but the CPU kernels did not build (see the warning)")
            return False
        return True

    def _layers_in_one_call(self, hidden: torch.Tensor, cache: Cache) -> bool:
        """Whether each layer of this kernel pass can be one `kernels.decode_layer` call: one new token per row,
        SiLU MLPs, a cache whose layers take keys and values in place (the sampler's `KVCache`, past its prefill)
        and products that the kernels compute (`kernel_product`)."""
        first = cache.layers[0] if getattr(cache, "layers", None) else None
        return (hidden.shape[1] == 1 and self.all_silu and hasattr(first, "claim")
                and first.is_initialized and kernel_kind(self.head, hidden) is not None)

    def _screens(self, x: torch.Tensor, k: int) -> bool:
        """Whether the k largest logits for the normed ``x`` come from `kernels.screened_top_k`: where the output
        layer is a `panel_linear` product (fp32, three rows and more), without bias, on a CPU with AVX512-BF16
        (oneDNN's bf16 product, the screen, runs at about twice the fp32 rate), k up to `SCREENED_TOP_K` and
        the vocabulary's size. For SmolLM2-135M at 32 rows and k = 50 the output layer and the top-k took
        7.1-8.0 ms there against 9.3-10.5 ms (the README has the figures)."""
        return (k <= min(SCREENED_TOP_K, self.head.out_features) and self.head.bias is None
                and kernel_kind(self.head, x) == "panels" and kernels.compiled().avx512_bf16)

    def _top_logits(self, x: torch.Tensor, k: int) -> TopLogits:
        """The k largest logits for the normed ``x`` (rows, tokens, width): the output layer's product in bf16
        (oneDNN, prepacked) bounds every logit, and only those that can be among the k largest are computed in
        fp32 (`kernels.screened_top_k`); the same k logits as the fp32 product's, up to fp32 rounding."""
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        head = self.head
        approx = packed.packed_linear(flat.bfloat16(), head.layout("onednn bf16", lambda w: packed.pack(w.bfloat16())),
                                      None)
        values, ids = kernels.screened_top_k(flat, head.source_weights[0],
                                             head.layout("screening norms", kernels.screening_norms), approx, k)
        return TopLogits(values.view(*x.shape[:-1], k), ids.view(*x.shape[:-1], k))

    def _decode_layers(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cache,
                       mask: torch.Tensor | None, capture) -> torch.Tensor:
        """Every layer of a one-token pass, each as one `kernels.decode_layer` call that writes the new key and
        value into the cache's buffers: what the loop in `forward` computes, without its dispatches from Python."""
        rows = hidden.shape[0]
        hidden = hidden.view(rows, -1)
        additive = None if mask is None else mask[:, 0, 0]  # (rows, length)
        shared_prefix = getattr(cache, "shared_prefix", None)
        for index, layer in enumerate(self.layers):
            cache_layer = cache.layers[index]
            position = cache_layer.claim(1)
            products = [kernel_product(layer[name], hidden) for name in ("qkv", "out", "gate_up", "down")]
            norms = [(layer[name].weight, layer[name].variance_epsilon)
                     for name in ("input_norm", "post_attention_norm")]
            hidden, query = kernels.decode_layer(hidden, *norms, products, cos, sin, cache_layer.key_buffer,
                                                 cache_layer.value_buffer, position, additive, shared_prefix,
                                                 self.scaling)
            if capture is not None and index in capture.heads_by_layer:
                capture.record(layer["attention"], query, cache_layer.keys, mask, self.scaling)
        return hidden.view(rows, 1, -1)

    def _attend(self, index: int, query, key, value, cache: Cache, mask, causal: bool, capture,
                use_kernels: bool = False) -> torch.Tensor:
        """Append key and value to the cache's layer `index`; the attention output (rows, tokens, heads * head_dim)."""
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        rows, tokens = query.shape[0], query.shape[2]
        keys, values = cache.update(key, value, index)
        if capture is not None and index in capture.heads_by_layer:
            capture.record(self.layers[index]["attention"], query, keys, mask, self.scaling)
        if use_kernels and tokens == 1:
            attended = kernels.decode_attention(query.reshape(rows, kv_heads, heads // kv_heads, head_dim), keys,
                                                values, None if mask is None else mask[:, 0, 0], self.scaling,
                                                getattr(cache, "shared_prefix", None))
        elif tokens == 1 and heads != kv_heads:  # group the query heads of each key/value head: SDPA's fast CPU path
            attended = F.scaled_dot_product_attention(query.reshape(rows, kv_heads, heads // kv_heads, head_dim),
                                                      keys, values, attn_mask=mask, scale=self.scaling)
        else:
            attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=causal,
                                                      scale=self.scaling, enable_gqa=heads != kv_heads)
            attended = attended.transpose(1, 2)  # (rows, tokens, heads, head_dim)
        return attended.reshape(rows, tokens, heads * head_dim)

    @staticmethod
    def _mask(attention_mask, rows: int, tokens: int, keys: int, dtype, device) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for SDPA. One token: none without padding, else additive (rows, 1, 1, keys). Several:
        SDPA's causal flag when they are the whole sequence without padding (what transformers does), else a
        boolean (rows, 1, tokens, keys) mask."""
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask, False
        if tokens == 1:
            if attention_mask is None:
                return None, False
            additive = torch.zeros(rows, 1, 1, keys, dtype=dtype, device=device)
            return additive.masked_fill_(~attention_mask[:, None, None, :keys], torch.finfo(dtype).min), False
        if attention_mask is None and tokens == keys:
            return None, True
        # query j sits at position keys - tokens + j and sees the keys up to it
        allowed = torch.ones(tokens, keys, dtype=torch.bool, device=device).tril(keys - tokens)[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :keys]
            # a padding query that sees nothing would give NaN; let it see itself (its output is never used)
            itself = torch.arange(keys, device=device)[None] == torch.arange(keys - tokens, keys, device=device)[:, None]
            allowed = allowed | itself[None, None]
        return allowed.expand(rows, 1, tokens, keys), False


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in fp32, cast back to the input dtype, then scale. (`F.rms_norm`
    computes a bf16 input in fp32 and rounds once, which is that first step, without two casts around it.)"""
    return F.rms_norm(x, (x.shape[-1],), eps=norm.variance_epsilon) * norm.weight


def kernel_rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """`rms_norm` in one pass of ``cpu_kernels.cpp`` (the same rounding steps; the sum of squares in another order)."""
    return kernels.rms_norm(x, norm.weight, norm.variance_epsilon)


def kernel_kind(fused: FusedLinear, x: torch.Tensor) -> str | None:
    """The kernel that computes `fused`'s product for the input ``x`` where one is the faster: "small" for one or
    two rows (`small_linear`), "panels" for more in fp32 when the weights are packed at all (`panel_linear`);
    None: oneDNN's is the faster."""
    if x.numel() <= kernels.SMALL_LINEAR_ROWS * x.shape[-1]:
        return "small"
    if fused.pack and kernels.panels_are_faster(x):
        return "panels"
    return None


def kernel_product(fused: FusedLinear, x: torch.Tensor) -> kernels.Product | None:
    """`fused` as `kernels.linear` takes it for the input ``x`` (`kernel_kind`): the unstacked weights for
    `small_linear`, the panels for `panel_linear` (packed at first use); None: oneDNN's is the faster."""
    kind = kernel_kind(fused, x)
    if kind is None:
        return None
    weights = list(fused.source_weights) if kind == "small" else [fused.layout("panels", kernels.pack_panels)]
    return weights, fused.bias, fused.out_features


def kernel_linear(fused: FusedLinear, x: torch.Tensor) -> torch.Tensor:
    """`fused`'s product through ``cpu_kernels.cpp`` where a kernel is the faster (`kernel_product`), else oneDNN."""
    product = kernel_product(fused, x)
    return fused(x) if product is None else kernels.linear(x, product)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (rows, heads, tokens, head_dim): transformers' x * cos + rotate_half(x) * sin, where
    rotate_half(x) = (-x2, x1) = roll(x) * (-1, 1), the sign folded into `signed_sin` (the same products)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
