"""The CPU kernels (cpu_kernels.cpp): attention and products (one- or two-row, fp32 panels) against float64;
RMSNorm, rotary, silu(gate) * up and top-k against torch's and transformers' own."""

from __future__ import annotations

import pytest
import torch

from lightning_lab.sampling import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason="the CPU kernels did not build")
# what one rounding of the output to the dtype allows, and fp32 sums in another order
TOLERANCE = {torch.bfloat16: 2 ** -7, torch.float32: 1e-5}


def random_cache(rows: int, kv_heads: int, groups: int, length: int, head_dim: int, dtype, capacity: int = 40):
    """A query and keys/values laid out as a KVCache holds them: views of the first `length` of `capacity`."""
    query = torch.randn(rows, kv_heads, groups, head_dim).to(dtype)
    keys = torch.randn(rows, kv_heads, capacity, head_dim).to(dtype)[:, :, :length]
    values = torch.randn(rows, kv_heads, capacity, head_dim).to(dtype)[:, :, :length]
    return query, keys, values


def exact_attention(query, keys, values, mask, scale):
    """softmax(q k^T * scale + mask) v in float64 (rows, kv_heads, groups, head_dim)."""
    scores = query.double() @ keys.double().transpose(-1, -2) * scale
    if mask is not None:
        scores = scores + mask.double()[:, None, None, :]
    return scores.softmax(-1) @ values.double()


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
# groups are taken up to 4 at a time (2 at head_dim 128): 5 runs as 4 + 1
@pytest.mark.parametrize("head_dim, groups", [(16, 1), (64, 3), (128, 2), (32, 5), (128, 3)])
def test_kernel_equals_exact_attention(portable, dtype, head_dim, groups):
    """Both builds (AVX-512 where the CPU has it, and the plain loops other CPUs get), with a padding mask."""
    torch.manual_seed(head_dim)
    query, keys, values = random_cache(rows=3, kv_heads=2, groups=groups, length=29, head_dim=head_dim, dtype=dtype)
    mask = torch.zeros(3, 40, dtype=dtype)
    mask[1, :5] = torch.finfo(dtype).min  # row 1 is left-padded by 5
    mask = mask[:, :29]
    out = cpu_kernels.decode_attention(query, keys, values, mask, 0.125, portable=portable)
    assert out.shape == query.shape and out.dtype == dtype
    expected = exact_attention(query, keys, values, mask, 0.125)
    assert torch.allclose(out.double(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    unmasked = exact_attention(query, keys, values, None, 0.125)
    assert not torch.allclose(out[1].double(), unmasked[1], atol=10 * TOLERANCE[dtype])  # the mask took effect


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
def test_a_shared_prefix_is_read_from_the_source_row(portable):
    """Rows 1 and 2 are copies of row 0 in their first 12 positions: told so, the kernel reads those positions
    from row 0, so garbage in the copies' own prefix changes nothing; their later positions are their own."""
    torch.manual_seed(0)
    query, keys, values = random_cache(rows=4, kv_heads=2, groups=3, length=20, head_dim=64, dtype=torch.float32)
    keys[1:3, :, :12], values[1:3, :, :12] = keys[0, :, :12], values[0, :, :12]
    expected = cpu_kernels.decode_attention(query, keys, values, None, 0.125, portable=portable)
    keys[1:3, :, :12], values[1:3, :, :12] = 1e4, -1e4
    sources = torch.tensor([0, 0, 0, 3])
    shared = cpu_kernels.decode_attention(query, keys, values, None, 0.125, shared_prefix=(sources, 12),
                                               portable=portable)
    # equal up to the order of fp32 sums (the build is free to reorder them, and may per code path)
    assert torch.allclose(shared, expected, atol=1e-6)
    keys[1, :, 15] = 1e4  # a position past the prefix is the row's own
    assert not torch.allclose(cpu_kernels.decode_attention(query, keys, values, None, 0.125,
                                                                shared_prefix=(sources, 12))[1], expected[1])


def test_bad_inputs_are_refused_with_the_reason():
    query, keys, values = random_cache(rows=2, kv_heads=1, groups=2, length=5, head_dim=64, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="share a dtype"):
        cpu_kernels.decode_attention(query, keys.double(), values, None, 0.125)
    with pytest.raises(RuntimeError, match="head_dim 48"):
        cpu_kernels.decode_attention(*(t[..., :48].contiguous() for t in (query, keys, values)), None, 0.125)
    with pytest.raises(RuntimeError, match="mask must be"):
        cpu_kernels.decode_attention(query, keys, values, torch.zeros(2, 4), 0.125)
    with pytest.raises(RuntimeError, match="prefix_rows"):
        cpu_kernels.decode_attention(query, keys, values, None, 0.125, shared_prefix=(torch.tensor([0, 0]), 9))
    with pytest.raises(RuntimeError, match=r"prefix_rows\[1\] = 2 is not a row"):
        cpu_kernels.decode_attention(query, keys, values, None, 0.125, shared_prefix=(torch.tensor([0, 2]), 3))


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_rms_norm_equals_transformers(portable, dtype):
    """transformers' LlamaRMSNorm, rounding for rounding: fp32 to the order of the sums; bf16 the same values
    but for the odd element whose fp32 sum of squares, added in another order, rounds the other way."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(1)
    norm = LlamaRMSNorm(576, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
    x = (torch.randn(32, 3, 576) * 4).to(dtype)
    with torch.no_grad():
        expected = norm(x)
    out = cpu_kernels.rms_norm(x, norm.weight.detach(), norm.variance_epsilon, portable=portable)
    assert out.shape == x.shape and out.dtype == dtype
    if dtype == torch.float32:
        assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    else:
        differ = out != expected
        assert differ.float().mean() < 1e-3
        assert torch.allclose(out.float(), expected.float(), rtol=2 ** -7, atol=0)  # one bf16 step at most
    with pytest.raises(RuntimeError, match="weight must be"):
        cpu_kernels.rms_norm(x, norm.weight.detach()[:100], 1e-5)


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("rows", [1, 2])
# 600 = 18 x 32 + 24: bf16 pairs, then 16 lanes, then 8 one by one; 70 = 4 x 16 + 6; 64: whole lanes only
@pytest.mark.parametrize("in_features", [600, 70, 64])
def test_small_linear_equals_exact_products(portable, dtype, rows, in_features):
    """Weights of 37, 7 and 16 rows side by side (blocks of 16 rows for one input row, of 8 for two, and the rows
    left over), with and without a bias, against float64: within one rounding to the dtype plus fp32 sums in
    another order (tight: in bf16 a product rounded toward zero, or off by 2^-7, fails here, where log-probs
    over a decode would barely show it)."""
    torch.manual_seed(in_features)
    x = torch.randn(rows, 1, in_features).to(dtype)
    weights = [torch.randn(out, in_features).to(dtype) for out in (37, 7, 16)]
    bias = torch.randn(60).to(dtype)
    for with_bias in (None, bias):
        out = cpu_kernels.small_linear(x, weights, with_bias, portable=portable)
        assert out.shape == (rows, 1, 60) and out.dtype == dtype
        assert_within_rounding(out, x, torch.cat(weights), with_bias)


def assert_within_rounding(out, x, weight, bias):
    """out == x weight^T + bias within one rounding to out's dtype (half its eps, relative) and fp32 sums in some
    order (~sqrt(in_features) roundings of the terms), against float64."""
    exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    terms = x.double().abs() @ weight.double().abs().T
    sum_rounding = 4 * x.shape[-1] ** 0.5 * torch.finfo(torch.float32).eps * terms
    allowed = torch.finfo(out.dtype).eps / 2 * exact.abs() + sum_rounding
    assert ((out.double() - exact).abs() <= allowed).all()


def test_small_linear_refuses_what_it_does_not_take():
    weight = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="1 or 2 rows"):
        cpu_kernels.small_linear(torch.randn(3, 16), [weight])
    with pytest.raises(RuntimeError, match="in x's dtype"):
        cpu_kernels.small_linear(torch.randn(1, 16), [weight.bfloat16()])
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu_kernels.small_linear(torch.randn(1, 16), [torch.randn(16, 8).T])
    with pytest.raises(RuntimeError, match="bias must be"):
        cpu_kernels.small_linear(torch.randn(1, 16), [weight], torch.randn(7))


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
# rows 8 at a time: 3 (one block short of 8), 21 (two blocks and 5), 300 (37 blocks and 4)
@pytest.mark.parametrize("rows", [3, 21, 300])
# 100 = 2 x 48 + 4 columns: whole panels, then a panel mostly padding; in_features 70 and 1
@pytest.mark.parametrize("out_features, in_features", [(100, 70), (48, 1)])
def test_panel_linear_equals_exact_products(portable, rows, out_features, in_features):
    torch.manual_seed(rows)
    weight, bias = torch.randn(out_features, in_features), torch.randn(out_features)
    panels = cpu_kernels.pack_panels(weight, portable=portable)
    assert panels.shape == (-(-out_features // 48), in_features, 48)
    x = torch.randn(rows, 1, in_features)
    for with_bias in (None, bias):
        out = cpu_kernels.panel_linear(x, panels, out_features, with_bias, portable=portable)
        assert out.shape == (rows, 1, out_features) and out.dtype == torch.float32
        assert_within_rounding(out, x, weight, with_bias)
    # a residual is added to each output (with the bias, in an order the compiler picks: fp32 rounding apart)
    residual = torch.randn(rows, 1, out_features)
    added = cpu_kernels.panel_linear(x, panels, out_features, bias, residual, portable=portable)
    expected = cpu_kernels.panel_linear(x, panels, out_features, bias, portable=portable) + residual
    assert torch.allclose(added, expected, rtol=1e-6, atol=1e-6) and not torch.allclose(added, expected - residual)


def screened(x: torch.Tensor, weight: torch.Tensor, k: int, portable: bool = False):
    """`screened_top_k` with its screen made as the decoder makes it: the product of x and weight rounded to bf16."""
    approx = torch.nn.functional.linear(x.bfloat16(), weight.bfloat16())
    return cpu_kernels.screened_top_k(x, weight, cpu_kernels.screening_norms(weight), approx, k, portable=portable)


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
# 2000 outputs = 31 blocks of 64 and 16: k 40 takes every output (40 >= 32 blocks)
@pytest.mark.parametrize("k", [1, 7, 40])
def test_screened_top_k_finds_the_exact_products_top_k(portable, k):
    """The k largest of x @ weight.T found through a bf16 screen, against the float64 product's: no output whose
    exact value beats a chosen one by more than fp32 rounding, values within fp32 rounding, best first. 72 inputs,
    so each dot product has a tail of 8. Besides random rows (one with an outlier input), two weights whose 2,000
    products the screen cannot rank: products within ~0.03 of 100, where bf16's spacing is 0.5; products within
    ~0.01 of 0 from weight rows of norm ~34, whose rounding to bf16 moves them by ~0.04 (the bound must allow for
    that rounding, or the screen drops some of the k largest)."""
    torch.manual_seed(k)
    weight = torch.randn(2000, 72) / 72 ** 0.5
    x = torch.randn(5, 72) * 3
    x[1, 5] = 300.0
    crowded = torch.randn(72).repeat(2000, 1) + 1e-3 * torch.randn(2000, 72)
    crowded_x = (100 / crowded[0].dot(crowded[0]) * crowded[0]).repeat(3, 1) + 1e-2 * torch.randn(3, 72)
    level_x = torch.randn(3, 72).bfloat16().float()  # exactly bf16: its own rounding adds nothing
    direction = level_x[0] / level_x[0].norm()
    across = 4 * torch.randn(2000, 72)
    across -= (across @ direction)[:, None] * direction  # orthogonal to level_x[0], but for rounding
    level = across + 1e-3 * torch.randn(2000, 1) * direction
    for inputs, weights in ((x, weight), (crowded_x, crowded), (level_x, level)):
        values, ids = screened(inputs, weights, k, portable)
        exact = inputs.double() @ weights.double().T
        best = exact.topk(k, dim=-1).values
        assert values.shape == ids.shape == (len(inputs), k) and ids.dtype == torch.int64
        assert torch.allclose(exact.gather(1, ids), best, rtol=1e-6, atol=1e-5)  # the k largest, up to rounding
        assert torch.allclose(values.double(), exact.gather(1, ids), rtol=1e-6, atol=1e-5)
        assert (values[:, 1:] <= values[:, :-1]).all()
        assert len(set(ids[0].tolist())) == k
    nan_row = x.clone()
    nan_row[2, 3] = float("nan")
    assert screened(nan_row, weight, k, portable)[0][2].isnan().all()


def test_screened_top_k_refuses_what_it_does_not_take():
    weight, x = torch.randn(300, 16), torch.randn(4, 16)
    norms, approx = cpu_kernels.screening_norms(weight), torch.nn.functional.linear(x, weight).bfloat16()
    with pytest.raises(RuntimeError, match="approx must be"):
        cpu_kernels.screened_top_k(x, weight, norms, approx.float(), 5)
    with pytest.raises(RuntimeError, match="weight_norms must be"):
        cpu_kernels.screened_top_k(x, weight, norms.T.contiguous(), approx, 5)
    with pytest.raises(RuntimeError, match="weight must be"):
        cpu_kernels.screened_top_k(x, weight[:, :8].contiguous(), norms, approx, 5)
    with pytest.raises(RuntimeError, match="k = 301"):
        cpu_kernels.screened_top_k(x, weight, norms, approx, 301)


def test_panel_linear_refuses_what_it_does_not_take():
    weight = torch.randn(50, 16)
    panels = cpu_kernels.pack_panels(weight)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernels.pack_panels(weight.bfloat16())
    with pytest.raises(RuntimeError, match="x must be a CPU float32"):
        cpu_kernels.panel_linear(torch.randn(4, 16).bfloat16(), panels, 50)
    with pytest.raises(RuntimeError, match="pack_panels' output"):
        cpu_kernels.panel_linear(torch.randn(4, 17), panels, 50)
    with pytest.raises(RuntimeError, match="pack_panels' output"):
        cpu_kernels.panel_linear(torch.randn(4, 16), panels, 200)
    with pytest.raises(RuntimeError, match="bias must be"):
        cpu_kernels.panel_linear(torch.randn(4, 16), panels, 50, torch.randn(49))
    with pytest.raises(RuntimeError, match="residual must be"):
        cpu_kernels.panel_linear(torch.randn(4, 16), panels, 50, None, torch.randn(3, 50))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_linear_takes_the_kernel_its_weights_are_laid_out_for(dtype):
    """`linear` (what the decoder calls) runs `small_linear` on unstacked weights and `panel_linear` on panels,
    a residual added after the product is rounded, as torch's ``residual + product`` adds it."""
    torch.manual_seed(0)
    weights, bias = [torch.randn(20, 32).to(dtype), torch.randn(12, 32).to(dtype)], torch.randn(32).to(dtype)
    one_row, residual = torch.randn(1, 32).to(dtype), torch.randn(1, 32).to(dtype)
    small = cpu_kernels.linear(one_row, (weights, bias, 32), residual)
    assert torch.equal(small, cpu_kernels.small_linear(one_row, weights, bias) + residual)
    if dtype == torch.float32:
        panels, rows = cpu_kernels.pack_panels(torch.cat(weights)), torch.randn(5, 32)
        expected = cpu_kernels.panel_linear(rows, panels, 32, bias)
        assert torch.equal(cpu_kernels.linear(rows, ([panels], bias, 32)), expected)


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_rotary_equals_torch(portable, dtype, tokens):
    """On the decoder's own view (q and k heads of a fused qkv product, transposed): bf16 bit for bit (each
    product of two bf16 values is exact in fp32, so the roundings are torch's); fp32 to the last bits (the
    compiler may fuse a product and the sum)."""
    from lightning_lab.sampling.llama_decoder import rotate

    torch.manual_seed(tokens)
    rows, heads, head_dim = 5, 6, 64
    qkv = torch.randn(rows, tokens, heads + 2, head_dim).to(dtype).transpose(1, 2)
    angles = torch.randn(rows, 1, tokens, head_dim)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    out = cpu_kernels.rotary(qkv[:, :heads], cos, sin, portable=portable)
    expected = rotate(qkv[:, :heads], cos, sin)
    assert out.shape == expected.shape and out.is_contiguous()
    if dtype == torch.bfloat16:
        assert torch.equal(out, expected)
    else:
        torch.testing.assert_close(out, expected, rtol=2e-7, atol=2e-7)
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        cpu_kernels.rotary(qkv[:, :heads], cos[:1], sin, portable=portable)


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_silu_mul_equals_torch(portable, dtype):
    """silu(gate) * up against torch's two operations: within one rounding step of the dtype (the exponentials
    differ in the last fp32 bit, which can tip a bf16 rounding)."""
    torch.manual_seed(0)
    gate_up = (4 * torch.randn(3, 2, 2 * 200)).to(dtype)
    out = cpu_kernels.silu_mul(gate_up, portable=portable)
    expected = torch.nn.functional.silu(gate_up[..., :200]) * gate_up[..., 200:]
    assert out.shape == (3, 2, 200) and out.dtype == dtype
    step = 2 ** -7 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(out, expected, rtol=step, atol=1e-6)
    if dtype == torch.bfloat16:  # nearly all bit for bit
        assert (out == expected).float().mean() > 0.99
    with pytest.raises(RuntimeError, match="even"):
        cpu_kernels.silu_mul(gate_up[..., :7], portable=portable)


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
# 1000 = 15 blocks of 64 and 40: k 5 searches the blocks that reach the floor, k 20 takes every logit (20 >= 16
# blocks); k 1000: the whole row
@pytest.mark.parametrize("k", [5, 20, 1000])
def test_top_k_equals_torch(portable, k):
    """Values as torch.topk's, best first; ids of equal values in ascending order. Rows of few distinct values
    (many ties), -inf logits, a row whose best logits sit in one block, a row holding NaN."""
    torch.manual_seed(k)
    logits = torch.randint(-6, 6, (5, 1000)).float()
    logits[1] = torch.randn(1000)
    logits[2, 300:364] = 50 + torch.arange(64.0)  # all of the best in block 4
    logits[3, ::3] = -float("inf")
    values, ids = cpu_kernels.top_k(logits, k, portable=portable)
    expected = logits.topk(k, dim=-1).values
    assert torch.equal(values[:4], expected[:4]) and ids.dtype == torch.int64
    assert torch.equal(logits.gather(1, ids)[:4], values[:4])
    for row in range(4):
        for value in values[row].unique():  # equal values: their lowest ids, ascending
            chosen = ids[row][values[row] == value]
            everywhere = (logits[row] == value).nonzero().squeeze(1)
            assert torch.equal(chosen, everywhere[:len(chosen)])
    logits[4, 7] = float("nan")
    assert cpu_kernels.top_k(logits, k, portable=portable)[0][4].isnan().all()
    with pytest.raises(RuntimeError, match="k = 1001"):
        cpu_kernels.top_k(logits, 1001, portable=portable)


def test_the_library_name_tells_cpus_and_sources_apart(monkeypatch):
    flags = cpu_kernels.build_flags()
    here = cpu_kernels.library_name(flags)
    assert here == cpu_kernels.library_name(flags) and torch.__version__.split("+")[0].replace(".", "_") in here
    assert cpu_kernels.library_name(cpu_kernels.build_flags(portable=True)).endswith("_portable")
    assert cpu_kernels.library_name(flags + ["-DOTHER"]) != here  # other flags: another build
    features = cpu_kernels.cpu_features()
    assert features  # this machine reports some
    monkeypatch.setattr(cpu_kernels, "cpu_features", lambda: features.replace("avx512", "sse"))
    assert cpu_kernels.library_name(flags) != here or "avx512" not in features  # another CPU: another build
    monkeypatch.setattr(cpu_kernels, "cpu_features", lambda: "a cpu without any of those")
    assert cpu_kernels.library_name(flags) != here
