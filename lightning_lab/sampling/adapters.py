"""peft LoRA adapters on the decoder's fast path: each adapted linear layer's weight, folded.

A peft ``lora.Linear`` computes ``base(x) + sum over active adapters of B(A(dropout(x))) * scaling``. When decoding
(no dropout) that is ``x @ (W + sum scaling * B @ A)^T + bias``, so `LlamaDecoder` multiplies by the folded weight
``W + sum scaling * B @ A`` (`folded_weight`: a private copy, computed in fp32 and rounded once to the model's
dtype, peft's own `get_delta_weight`; the model's weights are never touched) and keeps every fast path of a plain
model (stacked and prepacked products, the CPU kernels, the screened output layer). The copy is made again
whenever anything it depends on changed (`weight_stamp`: the base weight, A, B, the scaling, the active adapters,
`disable_adapter()`), i.e. once after each optimizer step of a LoRA being trained, at the next decoding call.

In fp32 the folded product equals peft's two products up to summation order. In bf16 the folded weight is
rounded to bf16 as the base weights are; peft adds the adapter's fp32 output to the rounded base output instead,
so a bf16 decode with an adapter may differ from peft's forward by bf16 rounding, and an update smaller than
half a bf16 step of a weight (about 0.2% of it) is lost in the fold.

Supported: vanilla LoRA on ``nn.Linear`` layers (any number of active adapters). Not supported (the sampler then
uses transformers' forward, which runs peft's layers): DoRA and other LoRA variants, a LoRA bias, an adapter
merged into the base weights while disabled, any other peft tuner.
"""

from __future__ import annotations

import sys

import torch


def _is_peft_layer(module: torch.nn.Module) -> bool:
    """Whether `module` is one of peft's tuner layers (peft unimported: none can exist)."""
    if "peft" not in sys.modules:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def active_lora(module: torch.nn.Module) -> list[str]:
    """The names of the LoRA adapters that change `module`'s output now ([] for a plain layer, a disabled or a
    merged adapter)."""
    if not _is_peft_layer(module) or module.disable_adapters or module.merged:
        return []
    return [name for name in module.active_adapters if name in getattr(module, "lora_A", {})]


def unsupported_linear_reason(module: torch.nn.Module) -> str | None:
    """Why the decoder cannot multiply by `module`'s (folded) weight; None: a plain ``nn.Linear`` or a vanilla
    peft LoRA layer over one."""
    if type(module) is torch.nn.Linear:
        return None
    if not _is_peft_layer(module):
        return f"{type(module).__name__} is not a plain nn.Linear (quantisation, a custom layer, ...)"
    from peft.tuners.lora import Linear as LoraLinear

    if type(module) is not LoraLinear or type(module.base_layer) is not torch.nn.Linear:
        return f"peft layer {type(module).__name__} over {type(module.get_base_layer()).__name__} (only LoRA on nn.Linear)"
    if module.disable_adapters and module.merged:
        return "a LoRA adapter merged into the weights while disabled"
    for name in active_lora(module):
        if name in module.lora_variant or module.lora_B[name].bias is not None or module.fan_in_fan_out:
            return f"LoRA adapter {name!r} is a variant (DoRA, ...), has a bias or is fan-in-fan-out"
    return None


def linear_bias(module: torch.nn.Module) -> torch.Tensor | None:
    """The bias `module` adds (a LoRA layer's is its base layer's)."""
    return module.get_base_layer().bias if _is_peft_layer(module) else module.bias


def folded_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight that `module` multiplies by when decoding: its own, or W + sum scaling * B @ A of its active
    LoRA adapters (a private copy; see the module docstring)."""
    weight = module.get_base_layer().weight if _is_peft_layer(module) else module.weight
    names = active_lora(module)
    if not names:
        return weight.detach().contiguous()
    folded = weight.detach().float()
    for name in names:
        folded = folded + module.get_delta_weight(name).float()
    return folded.to(weight.dtype).contiguous()


def weight_stamp(module: torch.nn.Module) -> tuple:
    """Changes whenever `folded_weight(module)` or `linear_bias(module)` may: every tensor they read (its storage
    and version counter) and the adapters' scaling."""
    tensors = [module.get_base_layer().weight if _is_peft_layer(module) else module.weight, linear_bias(module)]
    scalings = []
    for name in active_lora(module):
        tensors += [module.lora_A[name].weight, module.lora_B[name].weight]
        scalings.append((name, module.scaling[name]))
    return tuple(stamp(tensor) for tensor in tensors if tensor is not None) + tuple(scalings)


def stamp(tensor: torch.Tensor) -> tuple[int, int]:
    """Changes when the tensor does: its storage, or its version counter (bumped by in-place updates)."""
    try:
        return tensor.data_ptr(), tensor._version
    except RuntimeError:  # tensors created under inference_mode keep no version counter
        return tensor.data_ptr(), -1


def adapter_active(model: torch.nn.Module) -> bool:
    """Whether any peft adapter layer in `model` changes its output now (enabled; merged into the weights or not)."""
    if "peft" not in sys.modules:
        return False
    for module in model.modules():
        if _is_peft_layer(module) and not module.disable_adapters:  # merged or not, it changes the output
            adapters = getattr(module, "lora_A", None)
            if adapters is None or any(name in adapters for name in module.active_adapters):
                return True
    return False
