"""The lab GPT as a Hugging Face model: forward/backward, KV cache, generate, mHC, save/load, peft."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from lightning_lab.models import gpt
from lightning_lab.models.gpt import LabGPTConfig, LabGPTForCausalLM, SinkhornKnopp, sinkhorn

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
VOCAB = 97
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def small_model(mhc: bool = False, seed: int = 0, **overrides) -> LabGPTForCausalLM:
    torch.manual_seed(seed)
    return LabGPTForCausalLM(LabGPTConfig(**{**SMALL, "mhc": {"enabled": mhc}, **overrides}))


def varied_model(mhc: bool = False) -> LabGPTForCausalLM:
    """Larger init so greedy decoding does not collapse to one repeated token (a weak cache test)."""
    return small_model(mhc, initializer_range=0.3).eval()


@pytest.mark.parametrize("name", ["gpt_tiny", "gpt_tiny_mhc"])
def test_gpt_tiny_forward_backward(name):
    fields = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    torch.manual_seed(0)
    model = LabGPTForCausalLM(LabGPTConfig(vocab_size=512, **fields))
    assert 2.5e6 < sum(p.numel() for p in model.parameters()) < 4e6
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert all(not isinstance(m, torch.nn.Linear) or m.bias is None for m in model.modules())  # no biases
    input_ids = torch.randint(0, 512, (2, 32))
    out = model(input_ids, labels=input_ids, use_cache=False)
    assert out.logits.shape == (2, 32, 512)
    assert abs(out.loss.item() - math.log(512)) < 0.5  # near-uniform predictions at init
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing}"


@pytest.mark.parametrize("mhc", [False, True])
def test_greedy_generate_with_cache_equals_full_recompute(mhc):
    model = varied_model(mhc)
    prompt = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
        sequence = prompt  # greedy by hand, recomputing the whole prefix every step (no cache)
        for _ in range(16):
            next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)
    assert len(set(sequence[0, 7:].tolist())) > 3  # the test means something only if the tokens vary


def test_left_padded_batch_generates_like_unpadded_rows():
    model = varied_model()
    prompt = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    padded, mask = prompt.clone(), torch.ones_like(prompt)
    padded[1, :3], mask[1, :3] = 0, 0
    with torch.no_grad():
        batch = model.generate(padded, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        alone = model.generate(prompt[1:, 3:], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(batch[1, 8:], alone[0, 5:])


def test_cache_crop_then_continue_equals_full_forward():
    model = varied_model()
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        model(tokens, cache=cache, use_cache=True)
        cache.crop(-4)  # roll back the last 4 tokens
        assert cache.get_seq_length() == 8
        continued = model(tokens[:, 8:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(continued, full[:, 8:], atol=1e-5, rtol=1e-4)


def test_eager_matches_sdpa_and_returns_causal_attention_rows():
    model = varied_model()
    tokens = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        sdpa = model(tokens, use_cache=False).logits
        out = model(tokens, use_cache=False, output_attentions=True)  # eager for this call
        model.set_attn_implementation("eager")
        eager = model(tokens, use_cache=False).logits
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits, sdpa, atol=1e-5, rtol=1e-4)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 10, 10)
    weights = out.attentions[1]
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 10))
    assert weights.triu(1).abs().max() == 0  # no weight on future tokens


def test_sinkhorn_is_doubly_stochastic():
    logits = torch.randn(64, 4, 4, generator=torch.Generator().manual_seed(5))
    for matrix in (sinkhorn(logits, 20), sinkhorn(3.0 * torch.eye(4) + 0.1 * logits, 20)):
        assert (matrix >= 0).all()
        assert (matrix.sum(-1) - 1).abs().max() < 1e-4
        assert (matrix.sum(-2) - 1).abs().max() < 1e-4


def reference_sinkhorn(logits, iters=20):
    """Sinkhorn-Knopp as a plain loop, autograd through every step (what gpt.sinkhorn computes), in the input dtype."""
    matrix = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        matrix = matrix / matrix.sum(dim=-1, keepdim=True)
        matrix = matrix / matrix.sum(dim=-2, keepdim=True)
    return matrix


def test_sinkhorn_backward_matches_autograd_through_the_loop():
    logits = torch.randn(3, 5, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6),
                         requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: SinkhornKnopp.apply(x, 3), (logits,))
    weights = torch.randn(3, 5, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    ours = torch.autograd.grad((SinkhornKnopp.apply(logits, 20) * weights).sum(), logits)[0]
    looped = torch.autograd.grad((reference_sinkhorn(logits, 20) * weights).sum(), logits)[0]
    torch.testing.assert_close(ours, looped, atol=1e-10, rtol=1e-8)


def test_mhc_matches_the_reference_formula(monkeypatch):
    """The model's mHC (one product for H_pre x and H_res x, hand-written Sinkhorn backward) computes
    the same logits and gradients as the formula x' = H_res x + H_post^T F(H_pre x) written term by term."""
    torch.manual_seed(2)
    model = small_model(mhc=True, initializer_range=0.3)
    with torch.no_grad():  # move every mHC coefficient away from its identity-like initialisation
        for hc in [m for m in model.modules() if isinstance(m, gpt.HyperConnection)]:
            for param in (hc.static_pre, hc.static_post, hc.static_res):
                param.add_(torch.randn_like(param))
            hc.dynamic_gate.fill_(0.5)
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(8))

    def logits_and_grads():
        model.zero_grad()
        logits = model(tokens, use_cache=False).logits
        (logits * torch.linspace(-1, 1, VOCAB)).sum().backward()
        return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    logits, grads = logits_and_grads()

    def reference_read(hc, streams):
        pre, post, res = hc.coefficients(streams)
        return (pre.unsqueeze(-2) @ streams).squeeze(-2), (streams, post, res)

    def reference_write(hc, layer_output, saved):
        streams, post, res = saved
        return torch.einsum("...ij,...jc->...ic", res, streams) + post.unsqueeze(-1) * layer_output.unsqueeze(-2)

    monkeypatch.setattr(gpt, "sinkhorn", reference_sinkhorn)
    monkeypatch.setattr(gpt.HyperConnection, "read", reference_read)
    monkeypatch.setattr(gpt.HyperConnection, "write", reference_write)
    reference_logits, reference_grads = logits_and_grads()
    assert logits.std() > 0.1  # the coefficients are far from identity, so a wrong formula would show
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=1e-4)
    # fp32 sums in another order, and gradients up to ~100 here: agreement relative to the largest one
    scale = max(grad.abs().max().item() for grad in reference_grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-6 * scale, rtol=1e-4, msg=name)


def test_mhc_starts_as_the_plain_residual_model():
    """Static gates only: mHC at init computes the plain model (identical streams, H_pre = 1/n, H_post = 1)."""
    plain = small_model(mhc=False).eval()
    torch.manual_seed(1)
    streams = LabGPTForCausalLM(LabGPTConfig(**SMALL, mhc={"enabled": True, "dynamic": False})).eval()
    missing, unexpected = streams.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("_hc." in name for name in missing)
    tokens = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(streams(tokens).logits, plain(tokens).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mhc", [False, True])
def test_training_steps_lower_the_loss(mhc):
    model = small_model(mhc)
    pattern = torch.arange(32) % 11 + 3  # a periodic sequence: learnable in a few steps
    batch = torch.stack([pattern.roll(shift) for shift in range(4)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    if mhc:  # the mHC parameters receive gradient and move
        hc = model.model.layers[0].attn_hc
        assert not torch.allclose(hc.static_res, 3.0 * torch.eye(4))


@pytest.mark.parametrize("mhc", [False, True])
def test_save_pretrained_round_trip_with_auto_classes(tmp_path, mhc):
    model = small_model(mhc).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == "lab_gpt" and config.mhc["enabled"] is mhc
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LabGPTForCausalLM)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    tokens = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, atol=0, rtol=0)
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"


def test_peft_lora_wraps_the_llama_named_linears():
    from peft import LoraConfig, get_peft_model

    model = varied_model()
    tokens = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        base_logits = model(tokens).logits
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(targets) * 2 and all("lora_" in name for name in trainable)
    loss = peft_model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0).step()
    with torch.no_grad():
        adapted = peft_model(input_ids=tokens).logits
        with peft_model.disable_adapter():
            torch.testing.assert_close(peft_model(input_ids=tokens).logits, base_logits)
    assert not torch.allclose(adapted, base_logits)
    assert peft_model.generate(input_ids=tokens, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (2, 9)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="mhc: unknown keys"):
        LabGPTConfig(**SMALL, mhc={"enable": True})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LabGPTConfig(**{**SMALL, "num_key_value_heads": 3})
