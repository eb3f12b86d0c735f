"""The lab GPT: a small decoder-only transformer, optionally with mHC residual streams.

Architecture (Llama-style, so tools written for Llama work on it unchanged):
RMSNorm pre-norm blocks, rotary position embeddings (RoPE), SwiGLU MLP, tied input/output
embeddings, no biases, causal attention with optional grouped-query heads (``num_key_value_heads``).
Linear layers carry Llama's names (``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``)
so peft LoRA ``target_modules`` lists written for Llama apply as is.

It is a Hugging Face ``PreTrainedModel`` registered with the Auto classes at import
(``model_type = "lab_gpt"``): ``generate`` (with the ``DynamicCache`` KV cache, incl. ``crop``),
``save_pretrained``/``from_pretrained``, ``AutoModelForCausalLM`` and peft all work. Attention goes
through transformers' attention registry, so ``attn_implementation`` can be "sdpa" (default),
"eager" or any function registered with ``transformers.AttentionInterface``.
``output_attentions=True`` always runs eager attention for that call (SDPA never forms the
weights) and returns per-layer weights of shape (batch, heads, query_len, key_len).

mHC (manifold-constrained hyper-connections, DeepSeek, arXiv 2512.24880), switched by
``mhc.enabled``: the residual stream is widened to ``n_streams`` copies of the embedding.
Around each sublayer F (attention, MLP) the streams x (n x C per token) are updated as

    x' = H_res x + H_post^T F(H_pre x)

with H_pre = sigmoid(.) (1 x n: reads the sublayer input from the streams), H_post = 2 sigmoid(.)
(1 x n: writes the sublayer output back) and H_res = Sinkhorn-Knopp(.) (n x n, doubly stochastic:
mixes the streams without growing or shrinking the signal). Each is a static learned logit plus a
small input-dependent term (a linear map of the RMS-normalised flattened streams, scaled by a
learned gate initialised to 0.01). At the end the streams are averaged before the final norm
(``output_hidden_states`` also reports the stream average per layer, so shapes match the plain model).
Initialisation makes the model start as the plain residual model: the streams are identical,
H_pre = 1/n per stream (reads their mean), H_post = 1 (adds F to every stream), and any doubly
stochastic H_res maps identical streams to themselves. With ``mhc.enabled: false`` the model is
the plain GPT, so the architectural ablation is this one flag.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
    initialization as init,
)
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

MHC_DEFAULTS = {"enabled": False, "n_streams": 4, "sinkhorn_iters": 20, "dynamic": True}


class LabGPTConfig(PreTrainedConfig):
    """Sizes of the lab GPT. ``mhc`` is a dict with keys of ``MHC_DEFAULTS`` (missing keys take those defaults)."""

    model_type = "lab_gpt"

    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # None: as many as query heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    mhc: dict | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        unknown = set(self.mhc or {}) - set(MHC_DEFAULTS)
        if unknown:
            raise ValueError(f"LabGPTConfig.mhc: unknown keys {sorted(unknown)}; expected {sorted(MHC_DEFAULTS)}")
        self.mhc = {**MHC_DEFAULTS, **(self.mhc or {})}
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"LabGPTConfig: hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LabGPTConfig: num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"LabGPTConfig: head_dim={self.head_dim} must be even for RoPE")
        if self.mhc["enabled"] and self.mhc["n_streams"] < 2:
            raise ValueError(f"LabGPTConfig.mhc.n_streams={self.mhc['n_streams']}: mHC needs at least 2 streams")
        super().__post_init__(**kwargs)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class LabGPTRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 (bf16 sums of squares lose precision), return in the input dtype
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (batch, seq, head_dim) for the given absolute positions (fp32).

    Computed per call rather than cached in a buffer: it is a few thousand flops, and a
    non-persistent buffer would need re-initialising whenever transformers builds the model on
    the meta device.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids[..., None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); cos/sin: (batch, seq, head_dim). Llama's half-rotation layout."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * n_rep, seq, dim) for grouped-query attention."""
    if n_rep == 1:
        return x
    batch, kv_heads, seq, dim = x.shape
    return x[:, :, None].expand(batch, kv_heads, n_rep, seq, dim).reshape(batch, kv_heads * n_rep, seq, dim)


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """Attention with explicit weights. Accepts every mask format transformers builds: an additive
    float mask (eager), a boolean mask (sdpa) or None (sdpa's "plain causal" shortcut), so it can
    stand in for SDPA when a call asks for ``output_attentions``."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is None:
        # causal, aligned to the end: query i of q_len sees keys up to kv_len - q_len + i
        q_len, kv_len = query.shape[2], key.shape[2]
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    if attention_mask.dtype == torch.bool:
        # finfo.min rather than -inf so fully masked rows (left padding) give uniform weights, not NaN
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


class LabGPTAttention(nn.Module):
    def __init__(self, config: LabGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True  # read by transformers' SDPA / flash attention functions
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, cache: Cache | None, attn_implementation: str,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq, _ = x.shape
        query = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        if cache is not None:
            # keys are cached after RoPE, so cached positions never need rotating again
            key, value = cache.update(key, value, self.layer_idx)

        # "eager" (not in the registry) gives our eager_attention_forward; "sdpa" and registered names their function
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(attn_implementation, eager_attention_forward)
        output, weights = attention(self, query, key, value, attention_mask, scaling=self.scaling, dropout=0.0,
                                    **kwargs)
        return self.o_proj(output.reshape(batch, seq, -1)), weights


class LabGPTMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LabGPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------------------------
# mHC: manifold-constrained hyper-connections
# ---------------------------------------------------------------------------------------------


class SinkhornKnopp(torch.autograd.Function):
    """The unrolled Sinkhorn-Knopp iterations with a hand-written backward through each of them.

    The same gradient as autograd's through the loop, in about half the time: autograd backpropagates
    every ``matrix / sums`` as a division by a tensor (gradients for numerator and denominator, a sum
    to undo the broadcast, an accumulation) where one normalisation y = x / x.sum(dim) needs only
    dx = (dy - (dy * y).sum(dim)) / x.sum(dim). The max shift gets no gradient: the output does not
    depend on it.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int) -> torch.Tensor:
        matrix = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
        saved = [matrix]  # exp(logits), then (normalised matrix, the sums it was divided by) per half-step
        for _ in range(iters):
            for dim in (-1, -2):  # rows, then columns
                sums = matrix.sum(dim=dim, keepdim=True)
                matrix = matrix / sums
                saved += [matrix, sums]
        ctx.save_for_backward(*saved)
        return matrix

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        exp_logits, *steps = ctx.saved_tensors
        for half_step in reversed(range(len(steps) // 2)):
            normalised, sums = steps[2 * half_step], steps[2 * half_step + 1]
            dim = -1 if half_step % 2 == 0 else -2
            grad = (grad - (grad * normalised).sum(dim=dim, keepdim=True)) / sums
        return grad * exp_logits, None


def sinkhorn(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Sinkhorn-Knopp: map logits (..., n, n) to a doubly stochastic matrix (rows and columns sum to 1).

    exp of the logits (shifted by their max, which the normalisation cancels), then alternately
    normalise rows and columns ``iters`` times, for all leading dimensions (tokens) at once.
    Differentiable; computed in fp32.
    """
    return SinkhornKnopp.apply(logits.float(), iters)


class HyperConnection(nn.Module):
    """The mHC residual around one sublayer: ``read`` the sublayer input from n streams, ``write`` its output back."""

    def __init__(self, config: LabGPTConfig):
        super().__init__()
        n = config.mhc["n_streams"]
        self.n_streams = n
        self.sinkhorn_iters = config.mhc["sinkhorn_iters"]
        self.eps = config.rms_norm_eps
        # static logits; values are set in LabGPTPreTrainedModel._init_weights
        self.static_pre = nn.Parameter(torch.zeros(n))
        self.static_post = nn.Parameter(torch.zeros(n))
        self.static_res = nn.Parameter(torch.zeros(n, n))
        if config.mhc["dynamic"]:
            # input-dependent logits from all streams of a token: n (pre) + n (post) + n*n (res)
            self.dynamic_proj = nn.Linear(n * config.hidden_size, 2 * n + n * n, bias=False)
            self.dynamic_gate = nn.Parameter(torch.zeros(3))  # scales of the pre / post / res terms
        else:
            self.dynamic_proj = None

    def coefficients(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """H_pre (..., n), H_post (..., n), H_res (..., n, n) in fp32; per token when dynamic, else shared."""
        n = self.n_streams
        pre, post, res = self.static_pre, self.static_post, self.static_res
        if self.dynamic_proj is not None:
            flat = streams.flatten(-2)
            # the projection of the RMS-normalised streams, computed as the projection scaled by the
            # per-token 1/rms: the same numbers without a normalised copy of the n-times-wide streams
            inv_rms = torch.rsqrt(torch.linalg.vector_norm(flat, dim=-1, dtype=torch.float32).pow(2) / flat.shape[-1]
                                  + self.eps)
            dynamic = self.dynamic_proj(flat).float() * inv_rms.unsqueeze(-1)
            pre = pre + self.dynamic_gate[0] * dynamic[..., :n]
            post = post + self.dynamic_gate[1] * dynamic[..., n:2 * n]
            res = res + self.dynamic_gate[2] * dynamic[..., 2 * n:].unflatten(-1, (n, n))
        return torch.sigmoid(pre), 2 * torch.sigmoid(post), sinkhorn(res, self.sinkhorn_iters)

    def read(self, streams: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """streams x (batch, seq, n, C) -> the sublayer input H_pre x (batch, seq, C), and (H_res x, H_post)
        for ``write``. H_pre x and H_res x come from one batched product of the (n + 1) x n matrix
        [H_pre; H_res] with x: H_res x does not depend on the sublayer, so it is formed here with H_pre x."""
        pre, post, res = self.coefficients(streams)
        read_and_mix = torch.cat([pre.unsqueeze(-2), res], dim=-2).to(streams.dtype) @ streams
        # split, not indexing: its backward is one cat, where two index backwards each zero-fill a full-size grad
        layer_input, mixed = read_and_mix.split([1, self.n_streams], dim=-2)
        return layer_input.squeeze(-2), (mixed, post.to(streams.dtype))

    def write(self, layer_output: torch.Tensor, mixed_and_post: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x' = H_res x + H_post^T F(H_pre x), from ``read``'s (H_res x, H_post) and F's output (batch, seq, C)."""
        mixed, post = mixed_and_post
        return mixed + post.unsqueeze(-1) * layer_output.unsqueeze(-2)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class LabGPTBlock(GradientCheckpointingLayer):
    def __init__(self, config: LabGPTConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LabGPTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LabGPTAttention(config, layer_idx)
        self.post_attention_layernorm = LabGPTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LabGPTMLP(config)
        mhc = config.mhc["enabled"]
        self.attn_hc = HyperConnection(config) if mhc else None
        self.mlp_hc = HyperConnection(config) if mhc else None

    def forward(self, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache: Cache | None = None,
                attn_implementation: str = "sdpa", **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden: (batch, seq, C), or (batch, seq, n_streams, C) with mHC."""

        def attention(x):
            return self.self_attn(self.input_layernorm(x), position_embeddings, attention_mask, cache,
                                  attn_implementation, **kwargs)

        if self.attn_hc is None:
            attn_output, attn_weights = attention(hidden)
            hidden = hidden + attn_output
            return hidden + self.mlp(self.post_attention_layernorm(hidden)), attn_weights

        layer_input, mixed_and_post = self.attn_hc.read(hidden)
        attn_output, attn_weights = attention(layer_input)
        hidden = self.attn_hc.write(attn_output, mixed_and_post)
        layer_input, mixed_and_post = self.mlp_hc.read(hidden)
        hidden = self.mlp_hc.write(self.mlp(self.post_attention_layernorm(layer_input)), mixed_and_post)
        return hidden, attn_weights


class LabGPTPreTrainedModel(PreTrainedModel):
    config_class = LabGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LabGPTBlock"]
    _supports_sdpa = True
    # flash / flex attention are left out: their masks (2D padding, BlockMask) are not what the eager
    # fallback for output_attentions reads, and neither is tested here
    _supports_attention_backend = True  # functions registered with transformers.AttentionInterface

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)  # Linear / Embedding ~ N(0, initializer_range), norms = 1
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        if isinstance(module, LabGPTAttention):
            # GPT-2 style: projections that write into the residual stream start smaller with depth
            init.normal_(module.o_proj.weight, mean=0.0, std=residual_std)
        elif isinstance(module, LabGPTMLP):
            init.normal_(module.down_proj.weight, mean=0.0, std=residual_std)
        elif isinstance(module, HyperConnection):
            n = module.n_streams
            init.constant_(module.static_pre, -math.log(n - 1))  # sigmoid = 1/n: read the mean of the streams
            init.zeros_(module.static_post)  # 2 * sigmoid(0) = 1: add the output to every stream
            # identity-leaning H_res (diag ~0.87 for n=4); any doubly stochastic matrix is exact at init
            # because the streams start identical, so this only sets where learning begins
            init.copy_(module.static_res, 3.0 * torch.eye(n))
            if module.dynamic_proj is not None:
                init.constant_(module.dynamic_gate, 0.01)


class LabGPTModel(LabGPTPreTrainedModel):
    """Embeddings + blocks + final norm; returns hidden states (no LM head)."""

    def __init__(self, config: LabGPTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LabGPTBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = LabGPTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                past_key_values: Cache | None = None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("LabGPTModel.forward: pass exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values  # the name transformers used before 5.24
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (self.config.output_hidden_states if output_hidden_states is None
                                else output_hidden_states)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_length = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past_length, past_length + inputs_embeds.shape[1],
                                        device=inputs_embeds.device).unsqueeze(0)
        # the mask follows config._attn_implementation; eager_attention_forward reads any of its formats
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        attn_implementation = "eager" if output_attentions else self.config._attn_implementation
        position_embeddings = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)

        mhc = self.config.mhc["enabled"]
        hidden = inputs_embeds
        if mhc:  # copy the embedding into n residual streams: (batch, seq, n, C)
            hidden = hidden.unsqueeze(-2).expand(-1, -1, self.config.mhc["n_streams"], -1)
        all_hidden, all_attentions = [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden.mean(-2) if mhc else hidden)
            hidden, attn_weights = layer(hidden, position_embeddings, attention_mask=mask, cache=cache,
                                         attn_implementation=attn_implementation, **kwargs)
            all_attentions.append(attn_weights)
        if mhc:
            hidden = hidden.mean(-2)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )


class LabGPTForCausalLM(LabGPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LabGPTConfig):
        super().__init__(config)
        self.model = LabGPTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """``labels`` follow the Hugging Face convention: aligned with ``input_ids`` (shifted inside),
        -100 = ignored. ``logits_to_keep=k`` computes logits for the last k positions only (0 = all)."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)


AutoConfig.register(LabGPTConfig.model_type, LabGPTConfig, exist_ok=True)
AutoModelForCausalLM.register(LabGPTConfig, LabGPTForCausalLM, exist_ok=True)
