"""The sampler decodes the model as it is now and never changes it: adapters added or trained after the sampler was
built, resized embeddings, train mode kept; LoRA through the written-out decoder; the engine record."""

from __future__ import annotations

import pytest
import torch
from test_sampler import PROMPTS, hf_greedy, varied

from lightning_lab.models.loading import LoadedModel, load_causal_lm
from lightning_lab.models.lora import LoraSettings, add_lora
from lightning_lab.sampling.sampler import Sampler, evaluation_mode


def greedy_ids(sampler: Sampler, max_new_tokens: int = 10) -> list[list[int]]:
    out = sampler.generate(PROMPTS, greedy=True, max_new_tokens=max_new_tokens, chat=False)
    return [result.completions[0].token_ids for result in out.prompts]


def reference(loaded: LoadedModel, model, max_new_tokens: int = 10) -> list[list[int]]:
    """`transformers.generate` greedy on `model` (dropout off for the call)."""
    prompt_ids = [loaded.tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    with evaluation_mode(model):
        return hf_greedy(LoadedModel(model, loaded.tokenizer, loaded.spec, loaded.device, loaded.dtype), prompt_ids,
                         max_new_tokens)


def with_random_lora(model, rank: int, spread: float, seed: int):
    """`model` with a LoRA adapter whose B matrices are drawn with `spread` (peft starts them at zero, a no-op)."""
    torch.manual_seed(seed)  # before add_lora: peft draws the A matrices from torch's generator
    peft_model = add_lora(model, LoraSettings(rank=rank))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, spread)
    return peft_model


def modes(model) -> list[bool]:
    return [module.training for module in model.modules()]


@pytest.mark.parametrize("llama_decoder", [True, False])
def test_adapters_added_and_trained_after_the_sampler_was_built_are_decoded_and_train_mode_kept(tiny_llama_dir,
                                                                                               llama_decoder):
    loaded = varied(load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32"))
    loaded.model.train()  # a model being trained: the sampler must leave it so
    sampler = Sampler(loaded, llama_decoder=llama_decoder)
    before = greedy_ids(sampler)
    assert before == reference(loaded, loaded.model)
    assert sampler.engine_info()["adapter"] is False

    peft_model = with_random_lora(loaded.model, rank=2, spread=0.5, seed=1)  # after the sampler was built
    training = modes(peft_model)
    adapted = greedy_ids(sampler)
    assert modes(peft_model) == training and peft_model.base_model.model.model.layers[0].self_attn.q_proj.training
    assert adapted == reference(loaded, peft_model) != before
    info = sampler.engine_info()
    assert info["adapter"] is True and info["engine"] == ("decoder" if llama_decoder else "transformers")

    # an optimizer step on the LoRA weights (in place), then the adapter switched off and on
    lora = [parameter for name, parameter in peft_model.named_parameters() if "lora_" in name]
    loss = sum((parameter ** 2).sum() for parameter in lora)
    loss.backward()
    torch.optim.SGD(lora, lr=0.2).step()
    stepped = greedy_ids(sampler)
    assert stepped == reference(loaded, peft_model) != adapted
    with peft_model.disable_adapter():
        assert greedy_ids(sampler) == before and sampler.engine_info()["adapter"] is False
    assert greedy_ids(sampler) == stepped


@pytest.mark.parametrize("llama_decoder", [True, False])
def test_resized_embeddings_are_decoded_as_they_are_now(tiny_llama_dir, llama_decoder):
    loaded = varied(load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32"))
    sampler = Sampler(loaded, llama_decoder=llama_decoder)
    greedy_ids(sampler)
    loaded.model.resize_token_embeddings(len(loaded.tokenizer) + 16)
    with torch.no_grad():  # new tokens that greedy decoding picks: only a decoder that sees them can produce them
        loaded.model.get_input_embeddings().weight[-16:].normal_(0.0, 3.0)
    out = greedy_ids(sampler)
    assert out == reference(loaded, loaded.model)
    assert any(token >= len(loaded.tokenizer) for row in out for token in row)


def test_lora_decodes_through_the_decoder_as_peft_generates(tiny_llama_dir):
    """fp32, LoRA on every projection and rank 4: greedy tokens equal peft's generate, sampling equals the
    decoder on transformers' forward for the same seed, and no step runs peft's layers."""
    loaded = varied(load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32"))
    peft_model = with_random_lora(loaded.model, rank=4, spread=0.3, seed=2).eval()
    wrapped = LoadedModel(peft_model, loaded.tokenizer, loaded.spec, loaded.device, loaded.dtype)
    sampler = Sampler(wrapped)
    assert sampler.engine_info()["engine"] == "decoder"
    calls = []
    lora_layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    handle = lora_layer.register_forward_hook(lambda *args: calls.append(1))
    try:
        ours = greedy_ids(sampler, 12)
    finally:
        handle.remove()
    assert calls == []  # the folded weights, not peft's forward
    assert ours == reference(loaded, peft_model, 12)
    sampling = dict(n=3, temperature=1.0, max_new_tokens=8, seed=5, chat=False)
    theirs = Sampler(wrapped, llama_decoder=False).generate(PROMPTS, **sampling)
    ours = sampler.generate(PROMPTS, **sampling)
    assert [[c.token_ids for c in row] for row in ours.completions] == \
        [[c.token_ids for c in row] for row in theirs.completions]


def test_engine_info_names_the_engine(tiny_llama_dir):
    loaded = load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="bf16")
    info = Sampler(loaded).engine_info()
    assert set(info) == {"engine", "cpu_kernels", "packed_weights", "dtype", "device", "torch_threads", "adapter"}
    assert info["engine"] == "decoder" and info["dtype"] == "bfloat16" and info["device"] == "cpu"
    assert info["torch_threads"] == torch.get_num_threads() and info["adapter"] is False
    plain = Sampler(loaded, llama_decoder=False, pack_weights=False).engine_info()
    assert plain["engine"] == "transformers" and plain["cpu_kernels"] is False and plain["packed_weights"] is False
    assert Sampler(loaded, cpu_kernels=False).engine_info()["cpu_kernels"] is False


def test_the_decoder_runs_on_cpu_only(tiny_llama_dir):
    """On CUDA or MPS the sampler runs transformers' forward: no stacked or packed copies of the weights there."""
    from lightning_lab.sampling.llama_decoder import unsupported_reason

    model = load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32").model
    assert unsupported_reason(model) is None
    assert "CPU only, not meta" in unsupported_reason(model.to("meta"))


@pytest.mark.slow
def test_smollm2_with_lora_decodes_on_the_decoder_as_peft_generates(gsm8k_path):
    """The real model in fp32 with a rank-8 LoRA on every projection: the decoder's greedy tokens (one row, and
    four branches of a fork) equal peft's generate."""
    import json

    loaded = load_causal_lm("smollm2-135m", device="cpu", dtype="fp32")
    peft_model = with_random_lora(loaded.model, rank=8, spread=0.05, seed=0).eval()
    wrapped = LoadedModel(peft_model, loaded.tokenizer, loaded.spec, loaded.device, loaded.dtype)
    sampler = Sampler(wrapped)
    assert sampler.engine_info()["engine"] == "decoder" and sampler.engine_info()["adapter"]
    question = json.loads(gsm8k_path.open().readline())["question"]
    prompt_ids = sampler.encode(question)
    expected = hf_greedy(wrapped, [prompt_ids], 24)[0]
    with peft_model.disable_adapter():
        assert hf_greedy(wrapped, [prompt_ids], 24)[0] != expected  # the adapter changes the answer
    out = sampler.generate(question, greedy=True, max_new_tokens=24)
    assert out.prompts[0].completions[0].token_ids == expected
    state = sampler.start(question, greedy=True)
    sampler.step(state)
    branches = sampler.fork(state, 4)
    for _ in range(len(expected) - 1):
        sampler.step(branches)
    assert [row.token_ids for row in branches.rows] == [expected] * 4
