"""oneDNN-prepacked linear weights for decoding on CPU.

On CPU, `F.linear` hands bf16 products (and fp32 ones, with MKL) to libraries that re-lay out the weight
matrix at every call. Decoding multiplies each weight by a handful of rows, so that extra pass over the
weights costs about as much as the product: with the layout done once
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's weight freezing does) SmolLM2-135M's linear
layers take about half the time per bf16 decode step (measured on the 2-core development CPU; fp32: about
2/3 of the time for one row, 1/2 for 32 rows). A packed call has a fixed cost of ~10 us, so weights under
`MIN_ELEMENTS` (tiny test models, whose weights stay in cache) keep plain `F.linear`. bf16 results are
bit-identical to `F.linear`; fp32 ones differ in summation order (~1e-6 relative).

Two users: `FusedLinear` (the `LlamaDecoder`'s products, several layers stacked into one) and
`PackedLinears` (every plain `nn.Linear` of any other model, patched in while the sampler runs
transformers' forward). Both re-pack a weight that changed since it was packed (new storage or an
in-place update, e.g. an optimizer step between two sampling calls), and cost one extra copy of the
weights in memory.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from lightning_lab.sampling import adapters

BATCH_HINT = 32  # oneDNN picks the layout for this many rows; fp32 needs > 1 for batched decode, bf16 ignores it
MIN_ELEMENTS = 2**14


def available(device: torch.device) -> bool:
    """Whether prepacking works on `device` (CPU with oneDNN)."""
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                                                       "_linear_pointwise")


def worth_packing(*weights: torch.Tensor) -> bool:
    """Whether oneDNN's packing pays for these weights stacked: CPU, bf16 or fp32, enough elements."""
    return (weights[0].device.type == "cpu" and weights[0].dtype in (torch.bfloat16, torch.float32)
            and sum(weight.numel() for weight in weights) >= MIN_ELEMENTS)


def pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class FusedLinear:
    """Several linear layers over the same input as one product: their weights (and biases) stacked,
    prepacked when `pack` is true and the stacked weight is worth it (unpacked, stacking copies the
    weights). A layer is a plain `nn.Linear` or a peft LoRA layer over one, whose adapters are folded into a
    private copy of its weight (``adapters.py``). Call `refresh` before use: it drops the stacked copies when
    a source weight, bias or adapter changed, and each is made again at its first use."""

    def __init__(self, *linears: torch.nn.Linear, pack: bool):
        self.linears = linears
        self.pack = pack
        self.stamp = None

    def refresh(self) -> None:
        current = tuple(adapters.weight_stamp(module) for module in self.linears)
        if current == self.stamp:
            return
        self.stamp = current
        # unstacked, as the modules hold them, for the CPU kernels' one-row products (which read rows contiguously)
        self.source_weights = tuple(adapters.folded_weight(module) for module in self.linears)
        self.out_features = sum(weight.shape[0] for weight in self.source_weights)
        biases = [adapters.linear_bias(module) for module in self.linears]
        self.bias = None
        if any(bias is not None for bias in biases):
            self.bias = torch.cat([bias.detach() if bias is not None else weight.new_zeros(weight.shape[0])
                                   for bias, weight in zip(biases, self.source_weights)])
        self.packed = self.pack and worth_packing(*self.source_weights)
        self.layouts = {}  # the stacked weight as each kind of product reads it, made at first use

    def layout(self, name: str, arrange) -> torch.Tensor:
        """The stacked weight as ``arrange`` lays it out (kept under ``name`` until the weights change)."""
        if name not in self.layouts:
            weights = self.source_weights
            self.layouts[name] = arrange(torch.cat(weights) if len(weights) > 1 else weights[0])
        return self.layouts[name]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return packed_linear(x, self.layout("onednn", pack), self.bias)
        return F.linear(x, self.layout("stacked", lambda weight: weight), self.bias)


class PackedLinears:
    """Prepacked copies of a CPU model's plain `nn.Linear` weights, used while the sampler runs.

    Inside ``with packed:`` every such layer the model holds at that moment (layers added or replaced since
    the last time included) computes through its `FusedLinear` of one layer (an instance-level ``forward``,
    removed on exit, so training and other callers never see it).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = weakref.ref(model)  # the cache below is keyed by the model: no strong reference back to it
        self.packed: dict[torch.nn.Linear, FusedLinear] = {}

    @classmethod
    def of(cls, model: torch.nn.Module) -> PackedLinears:
        """The model's packed weights, shared by every sampler made for it (callers that build a new
        `Sampler` per call, like RL rollouts, then pack once, not at every call)."""
        if model not in _PACKED_BY_MODEL:
            _PACKED_BY_MODEL[model] = cls(model)
        return _PACKED_BY_MODEL[model]

    def __enter__(self):
        # plain nn.Linear only (subclasses may compute differently); none whose forward is already
        # replaced on the instance (accelerate's hooks do that); none too small to gain
        self.packed = {module: self.packed.get(module) or FusedLinear(module, pack=True)
                       for module in self.model().modules()
                       if type(module) is torch.nn.Linear and "forward" not in module.__dict__
                       and worth_packing(module.weight)}
        for module, fused in self.packed.items():
            fused.refresh()
            module.forward = _packed_forward(module, fused)
        return self

    def __exit__(self, *exc):
        for module in self.packed:
            module.__dict__.pop("forward", None)
        return False


_PACKED_BY_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _packed_forward(module: torch.nn.Linear, fused: FusedLinear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != module.weight.dtype:  # the module's own path (and cast rules)
            return F.linear(x, module.weight, module.bias)
        return fused(x)

    return forward
