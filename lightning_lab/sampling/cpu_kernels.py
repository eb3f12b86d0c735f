"""The decoder's CPU kernels (``cpu_kernels.cpp``: one-token attention, RMSNorm, the rotary embedding, the MLP's
activation, linear layers for one or two rows and for fp32 batches), compiled on first use.

`LlamaDecoder` calls them on CPU when they build: `decode_attention` for one-token steps, `rms_norm` for
every norm, `rotary` and `silu_mul` for the steps between the products, `small_linear` for every product of
a pass over one or two rows, `panel_linear` for the other fp32 products where the build has AVX-512, and
`decode_layer` to run a whole layer of a one-token step in one call from them, and `screened_top_k` for an
fp32 step's k largest logits when that is all the sampler needs; the sampler takes its top-k candidates from
`top_k`. Elsewhere (CUDA, MPS, no C++ compiler) they keep torch's SDPA, `F.rms_norm`, `topk`
and the oneDNN products of ``weight_packing.py``. The build (torch's `cpp_extension.load`: a C++ compiler and ninja)
takes ~40 s once; the library is then cached under torch's extension directory (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``), under a name that says which CPU features and which source it was built
for (`library_name`), and loads in well under a second. ``python -m
lightning_lab.sampling.cpu_kernels`` builds it ahead of time (the Makefile does).

Why kernels of our own, measured on the 2-core development CPU (bf16, SmolLM2-135M, 32 rows sharing a
69-token prompt): SDPA's CPU kernel takes ~20 ms of a ~75 ms decode step, most of it spent per tiny block;
the attention kernel takes a third to a half of that, and reading the prompt's positions once per group of
rows (the shared prefix, see the C++ source) saves more. The 61 RMSNorms of a step take ~4 ms as torch
operations. At one row a step's 121 products (211 weights) took 35.9 ms through oneDNN in fp32 and 24.5 ms
through `small_linear` (bf16 with AVX512-BF16: 17.9 and 15.7 ms); n=1 greedy decoding went from 41.8 to 30.1 ms
per token in fp32, 24.2 to 22.0 in bf16. The README's sampler section has the figures.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
HEAD_DIMS = (16, 32, 64, 128)
SMALL_LINEAR_ROWS = 2  # small_linear takes up to this many rows (at 4 it was no faster than oneDNN)
DTYPES = (torch.bfloat16, torch.float32)
log = logging.getLogger(__name__)


def build_flags(portable: bool = False) -> list[str]:
    """Compiler flags: optimised for this machine's CPU (the library is built here, for here)."""
    flags = ["-O3", "-ffast-math"]  # fast-math: vectorised exp (glibc's libmvec) and sums in any order
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-march=native")
    if sys.platform.startswith("linux"):
        flags.append("-fopenmp")  # torch's at::parallel_for runs its tasks on OpenMP threads
    if portable:
        flags.append("-DLAB_PORTABLE")
    return flags


def cpu_features() -> str:
    """This CPU's instruction-set features, as the kernel reports them (Linux: the ``flags`` or ``Features`` line
    of /proc/cpuinfo), else the machine type and torch's CPU capability."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("flags", "features"):
                return " ".join(sorted(value.split()))
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {torch.backends.cpu.get_cpu_capability()}"


def library_name(flags: list[str]) -> str:
    """The compiled library's name in torch's extension cache: torch's version (a library built against other
    torch headers is rebuilt, not loaded), a digest of the CPU's instruction-set features (``-march=native``
    builds for this CPU: a cache shared by machines with other CPUs must never hand one of them this build)
    and a digest of the source, its path and the flags (torch runs the build again in every new process, and
    ninja recompiles when the source or its command line changed: checkouts sharing the cache would otherwise
    rebuild over each other's library, ~40 s each time)."""
    cpu = hashlib.sha256(cpu_features().encode()).hexdigest()[:12]
    source = hashlib.sha256(SOURCE.read_bytes() + f"{SOURCE.resolve()} {' '.join(flags)}".encode()).hexdigest()[:12]
    version = re.sub(r"\W", "_", torch.__version__)
    return f"lightning_lab_cpu_kernels_{version}_isa{cpu}_src{source}" + ("_portable" if "-DLAB_PORTABLE" in flags else "")


@functools.cache
def load(portable: bool = False):
    """The compiled module, or None (with one warning saying why) when it cannot be built here.
    ``portable``: the plain C++ loops even where AVX-512 is available (tests compare the two)."""
    from torch.utils import cpp_extension

    flags = build_flags(portable)
    name = library_name(flags)
    try:
        log.info("loading %s (compiled from C++ the first time: ~40 s)", name)
        return cpp_extension.load(name, sources=[str(SOURCE)], extra_cflags=flags,
                                  extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [])
    except Exception as error:  # no compiler, no ninja, a compiler that rejects a flag: torch's operations then
        lines = str(error).strip().splitlines() or [""]
        reason = next((line for line in lines if "error" in line.lower() and "Error building" not in line), lines[-1])
        warnings.warn(f"the CPU kernels ({SOURCE.name}) did not build, so decoding uses torch's own operations: "
                      f"{type(error).__name__}: {reason.strip()}", stacklevel=2)
        return None


def supports(tensor: torch.Tensor, head_dim: int) -> bool:
    """Whether the kernels take a model with `tensor`'s device and dtype: CPU, bf16 or fp32, head_dim in HEAD_DIMS."""
    return tensor.device.type == "cpu" and tensor.dtype in DTYPES and head_dim in HEAD_DIMS


def compiled(portable: bool = False):
    """The compiled module; a RuntimeError where it did not build (`load` has warned why)."""
    module = load(portable)
    if module is None:
        raise RuntimeError(f"the CPU kernels ({SOURCE.name}) are not available on this machine")
    return module


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, shared_prefix: tuple[torch.Tensor, int] | None = None,
                     portable: bool = False) -> torch.Tensor:
    """softmax(query . keys^T * scale + mask) . values for one query per row, in fp32 inside.

    query (rows, kv_heads, groups, head_dim): each key/value head's query heads; keys, values (rows, kv_heads,
    length, head_dim) as a `KVCache` holds them; mask: additive (rows, length) or None; shared_prefix
    (source rows (rows,) int64, length): row r's first `length` positions are read from row source[r].
    Returns (rows, kv_heads, groups, head_dim) in the query's dtype."""
    rows, prefix = shared_prefix if shared_prefix is not None else (None, 0)
    return compiled(portable).decode_attention(query, keys, values, mask, rows, prefix, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, portable: bool = False) -> torch.Tensor:
    """transformers' LlamaRMSNorm over the last dimension, in one pass: normalised in fp32, rounded to x's dtype,
    times the weight, rounded again. The sum of squares adds in another order than torch's, so in bf16 an
    element now and then rounds the other way."""
    return compiled(portable).rms_norm(x, weight, eps)


def small_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: torch.Tensor | None = None,
                 portable: bool = False) -> torch.Tensor:
    """``x`` (..., in_features) with at most `SMALL_LINEAR_ROWS` rows, times each of ``weights`` (out_features_i,
    in_features), the outputs side by side (..., sum of out_features_i), plus ``bias``: the stacked layers of a
    `weight_packing.FusedLinear` without stacking them. Summed in fp32 and rounded once to x's dtype, like oneDNN's
    products, in another order."""
    out = compiled(portable).small_linear(x.reshape(-1, x.shape[-1]), list(weights), bias)
    return out.view(*x.shape[:-1], out.shape[-1])


def rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, portable: bool = False) -> torch.Tensor:
    """The rotary embedding of x (rows, heads, tokens, head_dim; each head's values contiguous), in one pass:
    x * cos + roll(x, head_dim / 2) * signed_sin, with cos and signed_sin (rows, 1, tokens, head_dim) and the
    sine's first half negated (`llama_decoder.rotate`'s arguments). Contiguous; in bf16 each product and the sum
    are rounded as torch rounds them."""
    return compiled(portable).rotary(x, cos.contiguous(), signed_sin.contiguous())


def silu_mul(gate_up: torch.Tensor, portable: bool = False) -> torch.Tensor:
    """silu(gate) * up for gate_up (..., 2 * intermediate), the gate's values first: the MLP's step between its
    products, in one pass (torch rounds silu's bf16 result before the product, and so does this)."""
    return compiled(portable).silu_mul(gate_up)


def top_k(logits: torch.Tensor, k: int, portable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` largest logits (rows, vocabulary; fp32) and their ids, best first: ``logits.topk(k)``'s
    values, ids of equal values in ascending order. A row holding NaN gets NaN values (torch ranks NaN first)."""
    values, ids = compiled(portable).top_k(logits, k)  # pybind returns a list
    return values, ids


def screening_norms(weight: torch.Tensor) -> torch.Tensor:
    """(3, out_features) fp32 for `screened_top_k`: per row of the weight, |w - bf16(w)|, |w| and |bf16(w)|, each
    computed in fp64 and rounded up."""
    exact = weight.detach().double()
    rounded = weight.detach().bfloat16().double()
    norms = torch.stack([(exact - rounded).norm(dim=1), exact.norm(dim=1), rounded.norm(dim=1)])
    return (norms * (1 + 1e-6)).float().contiguous()


def screened_top_k(x: torch.Tensor, weight: torch.Tensor, weight_norms: torch.Tensor, approx: torch.Tensor,
                   k: int, portable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` largest of ``x @ weight.T`` (x (rows, in_features), weight (out_features, in_features),
    fp32) and their ids, as `top_k` returns them, computing in fp32 only the outputs that can be among them:
    ``approx`` is the same product from bf16-rounded operands (rows, out_features; bf16) and
    ``weight_norms`` `screening_norms(weight)`; each approximate value's error is bounded (the C++ source has the
    bound), and only the outputs whose upper bound reaches the k-th largest lower bound are computed exactly."""
    values, ids = compiled(portable).screened_top_k(x, weight, weight_norms, approx, k)
    return values, ids


def pack_panels(weight: torch.Tensor, portable: bool = False) -> torch.Tensor:
    """An fp32 weight (out_features, in_features) laid out for `panel_linear` (a copy, zero-padded to whole panels)."""
    return compiled(portable).pack_panels(weight)


def panel_linear(x: torch.Tensor, panels: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None, portable: bool = False) -> torch.Tensor:
    """``x`` (..., in_features), fp32, times the weight that `pack_panels` made ``panels`` of, plus ``bias``, then
    plus ``residual`` (..., out_features): (..., out_features). Each output is one fp32 sum in order of in_features
    (oneDNN sums in another order)."""
    flat_residual = None if residual is None else residual.reshape(-1, out_features)
    out = compiled(portable).panel_linear(x.reshape(-1, x.shape[-1]), panels, out_features, bias, flat_residual)
    return out.view(*x.shape[:-1], out_features)


# (weights, bias, out_features): a product as `linear` and `decode_layer` take it, the weights either the
# unstacked (out_features_i, in_features) matrices (`small_linear`, one or two rows) or [panels] (`panel_linear`)
Product = tuple[list[torch.Tensor], torch.Tensor | None, int]


def linear(x: torch.Tensor, product: Product, residual: torch.Tensor | None = None,
           portable: bool = False) -> torch.Tensor:
    """``x`` (..., in_features) times ``product``, through `small_linear` or `panel_linear` as its weights say,
    plus ``residual`` (..., out_features) when given: (..., out_features)."""
    out_features = product[2]
    flat_residual = None if residual is None else residual.reshape(-1, out_features)
    out = compiled(portable).linear(x.reshape(-1, x.shape[-1]), product, flat_residual)
    return out.view(*x.shape[:-1], out_features)


def decode_layer(hidden: torch.Tensor, input_norm: tuple[torch.Tensor, float],
                 post_attention_norm: tuple[torch.Tensor, float], products: Sequence[Product], cos: torch.Tensor,
                 signed_sin: torch.Tensor, key_buffer: torch.Tensor, value_buffer: torch.Tensor, position: int,
                 mask: torch.Tensor | None, shared_prefix: tuple[torch.Tensor, int] | None, scale: float,
                 portable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One Llama decoder layer (SiLU MLP) over one new token per row, in one call: `LlamaDecoder.forward`'s
    operations for that case, the same kernels in the same order, without ~30 dispatches from Python a layer.

    hidden (rows, width); the norms (weight, eps); products: the layer's qkv, out, gate_up and down `Product`s;
    cos, signed_sin (rows, 1, 1, head_dim) as `rotary` takes them; key_buffer, value_buffer (rows, kv_heads,
    capacity, head_dim): the new key and value are written at ``position`` and attention reads positions
    0..position; mask (rows, position + 1) additive or None; shared_prefix as `decode_attention` takes it.
    Returns the layer's output (rows, width) and the rotated queries (rows, heads, 1, head_dim)."""
    rows, prefix = shared_prefix if shared_prefix is not None else (None, 0)
    hidden, query = compiled(portable).decode_layer(hidden, input_norm, post_attention_norm, *products, cos, signed_sin,
                                                    key_buffer, value_buffer, position, mask, rows, prefix, scale)
    return hidden, query


def panels_are_faster(x: torch.Tensor) -> bool:
    """Whether `panel_linear` is the faster product for ``x`` (three rows and more): fp32 in the AVX-512 build
    (oneDNN's bf16 products use AVX512-BF16 instructions, and the portable loops are only a fallback)."""
    return x.dtype == torch.float32 and compiled().avx512


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print("CPU kernels:", "built" if load() is not None else "not available (decoding uses torch's own operations)")
