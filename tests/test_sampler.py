"""The sampler against transformers' own forward pass and generate: tokens, signals, attention, cache, seeds."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from lightning_lab.sampling import cpu_kernels
from lightning_lab.sampling.kv_cache import KVCache
from lightning_lab.sampling.weight_packing import PackedLinears
from lightning_lab.sampling.sampler import (INCOMPLETE, SamplingParams, Sampler, draw, evaluation_mode, lookup_draft,
                                            sampling_weights)
from lightning_lab.models.loading import LoadedModel, load_causal_lm

PROMPTS = ["What is 2 + 3?", "Natalia sold clips to 48 of her friends in April.", "The answer"]
HEADS = [(1, 3), (0, 0), (1, 1)]  # deliberately not in layer order; head 3 shares a kv head with head 2
# the CPU kernels build wherever torch's C++ extensions do (a compiler and ninja); the decoder's default then
# uses them, so every test of the decoder below runs them (the tiny models' head_dim is 16)
needs_kernel = pytest.mark.skipif(cpu_kernels.load() is None, reason="the CPU kernels did not build")


def varied(loaded: LoadedModel, std: float = 0.3, seed: int = 0) -> LoadedModel:
    """Re-draw the matrices with a larger spread so greedy paths change token by token (a random model with the
    usual 0.02 init repeats one token, which would make the comparisons weak)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in loaded.model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, std)
    return loaded


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir) -> LoadedModel:
    return varied(load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32"))


@pytest.fixture(scope="module", params=["llama_decoder", "transformers"])
def sampler(tiny, request) -> Sampler:
    """Both engines: the written-out Llama forward (the default for this model) and transformers' forward."""
    return Sampler(tiny, llama_decoder=request.param == "llama_decoder")


def full_pass(model, ids: list[int]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Logits (positions, vocab) and eager attention maps (per layer: heads, positions, positions) of one pass."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return out.logits[0].float(), tuple(attention[0] for attention in out.attentions)


def hf_greedy(loaded: LoadedModel, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers.generate on the left-padded batch, each row cut after its first EOS."""
    tokenizer, width = loaded.tokenizer, max(map(len, prompt_ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids])
    out = loaded.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=pad)
    eos = loaded.model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    rows = []
    for row in out[:, width:].tolist():
        ends = [i for i, token in enumerate(row) if token in eos]
        rows.append(row[:ends[0] + 1] if ends else row)
    return rows


@contextlib.contextmanager
def count_model_inputs(model):
    """Yields the list of shapes of every input_ids batch the model embeds inside the block (a forward pre-hook
    on the input embeddings, removed on exit)."""
    shapes = []
    handle = model.get_input_embeddings().register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        yield shapes
    finally:
        handle.remove()


# ---- greedy equals transformers.generate --------------------------------------------------------


def test_greedy_batch_with_left_padding_equals_generate(tiny, sampler):
    out = sampler.generate(PROMPTS, greedy=True, max_new_tokens=12, chat=False)
    prompt_ids = [result.prompt_token_ids for result in out.prompts]
    assert len({len(ids) for ids in prompt_ids}) == 3  # three lengths: two rows are left-padded
    expected = hf_greedy(tiny, prompt_ids, 12)
    assert [result.completions[0].token_ids for result in out.prompts] == expected
    assert len({tuple(row) for row in expected}) == 3 and all(len(set(row)) > 3 for row in expected)


def test_chat_prompts_go_through_the_template(tiny, sampler):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    templated = tiny.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert sampler.encode(messages) == sampler.encode("What is 2 + 3?") == sampler.encode(templated, chat=False)
    assert sampler.encode("What is 2 + 3?", chat=False) == tiny.tokenizer("What is 2 + 3?")["input_ids"]
    with pytest.raises(ValueError, match="chat=False"):
        sampler.encode(messages, chat=False)


# ---- one prefill for n samples -------------------------------------------------------------------


def test_n_samples_share_one_prefill(tiny, sampler):
    with count_model_inputs(tiny.model) as shapes:
        out = sampler.generate(PROMPTS[:2], n=4, max_new_tokens=5, temperature=1.0, ignore_eos=True, chat=False)
    width = max(len(result.prompt_token_ids) for result in out.prompts)
    assert shapes[0] == (2, width)  # both prompts, once each
    assert shapes[1:] == [(8, 1)] * 4  # then one token per sequence per step (the last token is never fed)
    assert all(len(c.token_ids) == 5 for result in out.prompts for c in result.completions)
    assert out.timing.new_tokens == 40 and out.timing.prefill_s > 0 and out.timing.decode_s > 0


@pytest.mark.parametrize("llama_decoder", [True, False])
def test_packed_weights_follow_in_place_updates_and_leave_the_model_alone(tiny_llama_dir, llama_decoder):
    # bf16: the tiny model's output layer is big enough to take the packed path, and bit-identical to F.linear
    loaded = varied(load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="bf16"), seed=1)
    sampler = Sampler(loaded, pack_weights=True, llama_decoder=llama_decoder)
    head = loaded.model.lm_head

    def greedy(chosen):
        return chosen.generate(PROMPTS[0], greedy=True, max_new_tokens=8, chat=False).prompts[0].completions[0].token_ids

    before = greedy(sampler)
    if llama_decoder:
        assert sampler.decoder.head.packed
    else:
        assert sampler.decoder is None and head in PackedLinears.of(loaded.model).packed
    assert all("forward" not in module.__dict__ for module in loaded.model.modules())  # unpatched after the call
    with torch.no_grad():  # what an optimizer step does between two sampling calls
        head.weight.mul_(-1.0)
    after = greedy(sampler)
    assert after == greedy(Sampler(loaded, pack_weights=False, llama_decoder=llama_decoder)) != before


def test_cache_repeat_and_select_keep_the_rows_and_what_they_share():
    cache = KVCache(num_layers=1, capacity=6)
    keys = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).view(2, 1, 3, 2)
    cache.update(keys, -keys, 0)
    assert cache.shared_prefix is None
    cache.batch_repeat_interleave(3)
    assert torch.equal(cache.layers[0].keys, keys.repeat_interleave(3, dim=0))
    sources, length = cache.shared_prefix  # rows 0-2 are copies of row 0, rows 3-5 of row 3, in 3 positions
    assert sources.tolist() == [0, 0, 0, 3, 3, 3] and length == 3
    cache.batch_select_indices(torch.tensor([5, 3, 0]))
    assert torch.equal(cache.layers[0].values, -keys[[1, 1, 0]])
    assert cache.shared_prefix[0].tolist() == [0, 0, 2] and cache.shared_prefix[1] == 3
    more = torch.ones(3, 1, 5, 2)  # past the capacity: the buffers grow; the rows' new positions are their own
    full_keys, _ = cache.update(more, more, 0)
    assert cache.get_seq_length() == 8 and torch.equal(full_keys[:, :, :3], keys[[1, 1, 0]])
    assert cache.shared_prefix[1] == 3
    cache.crop(-6)
    assert cache.get_seq_length() == 2 and torch.equal(cache.layers[0].keys, keys[[1, 1, 0], :, :2])
    assert cache.shared_prefix[1] == 2
    cache.crop(-2)  # nothing in common any more; the rows then diverge, and a new repeat groups by today's rows
    cache.update(torch.randn(3, 1, 1, 2), torch.randn(3, 1, 1, 2), 0)
    cache.batch_repeat_interleave(2)
    assert cache.shared_prefix[0].tolist() == [0, 0, 2, 2, 4, 4] and cache.shared_prefix[1] == 1
    cache.reset()
    assert cache.shared_prefix is None


@needs_kernel
def test_samples_that_finish_apart_read_the_shared_prompt_right(tiny, monkeypatch):
    """n samples of left-padded prompts, rows dropped as they stop: the kernel gets each row's source row for
    the prompt (checked against the cache's own copies), and the log-probs equal a full pass."""
    from lightning_lab.sampling import llama_decoder

    calls = []
    original = llama_decoder.kernels.decode_layer

    def checked(*args):  # each layer of a one-token step: its attention reads the cache's buffers
        key_buffer, shared_prefix = args[6], args[10]
        if shared_prefix is not None:
            sources, length = shared_prefix
            assert torch.equal(key_buffer[sources, :, :length], key_buffer[:, :, :length])  # the same prompt
            calls.append(len(sources))
        return original(*args)

    monkeypatch.setattr(llama_decoder.kernels, "decode_layer", checked)
    sampler = Sampler(tiny, cpu_kernels=True)
    out = sampler.generate(PROMPTS[:2], n=5, max_new_tokens=12, temperature=1.0, seed=0, chat=False, logprobs=True,
                           stop=["e", "a"])
    assert calls[0] == 10 and min(calls) < 10  # all rows at first, fewer once some stopped
    for result in out.prompts:
        for completion in result.completions:
            assert distance_from_fp32(tiny.model, result.prompt_token_ids, completion) < 1e-4


# ---- a prefix shared by the prompts of a batch ----------------------------------------------------

HEAD = "Natalia sold clips to 48 of her friends in April. The answer is 72. "  # 20+ tokens every prompt begins with
SHARED = [HEAD + "What is 2 + 3?", HEAD + "The answer", HEAD + "user assistant system question answer is 5."]


def test_a_shared_prefix_is_prefilled_once_and_decodes_as_without(tiny, sampler):
    """fp32 greedy with ragged suffixes: the prefix on one row, the suffixes right-aligned after it (padding in
    between), the same tokens and log-probs as prefilling every prompt whole."""
    with count_model_inputs(tiny.model) as shapes:
        out = sampler.generate(SHARED, greedy=True, max_new_tokens=12, chat=False, logprobs=True)
    prompt_ids = [result.prompt_token_ids for result in out.prompts]
    shared = len(os.path.commonprefix(prompt_ids))  # the head's tokens (the prompts have one more in common)
    assert shared >= 16 and len({len(ids) for ids in prompt_ids}) == 3
    assert shapes[:2] == [(1, shared), (3, max(map(len, prompt_ids)) - shared)]
    assert out.prompts[0].timing.shared_prompt_tokens == shared and out.timing.shared_prompt_tokens == 3 * shared
    whole = sampler.generate(SHARED, greedy=True, max_new_tokens=12, chat=False, logprobs=True, prefix_cache=False)
    assert whole.timing.shared_prompt_tokens == 0
    mine, reference = [c for c, in out.completions], [c for c, in whole.completions]
    assert [c.token_ids for c in mine] == [c.token_ids for c in reference]
    assert [c.text for c in mine] == [c.text for c in reference] and len({c.text for c in mine}) == 3
    for ours, theirs in zip(mine, reference):
        assert torch.allclose(torch.tensor(ours.logprobs), torch.tensor(theirs.logprobs), atol=1e-5)
    assert [c.token_ids for c in mine] == hf_greedy(tiny, prompt_ids, 12)


def test_a_shared_prefix_keeps_signals_attention_and_samples(tiny, sampler):
    """n samples per prompt after a shared prefix: the same draws as without it, and signals and attention rows
    (padding removed) equal a full pass."""
    settings = dict(n=2, max_new_tokens=8, temperature=1.0, seed=3, chat=False, logprobs=True, entropy=True,
                    margin=True, capture_heads=HEADS, capture_rows=True)
    out = sampler.generate(SHARED, **settings)
    whole = sampler.generate(SHARED, prefix_cache=False, **settings)
    assert [[c.token_ids for c in row] for row in out.completions] == \
        [[c.token_ids for c in row] for row in whole.completions]
    for result in out.prompts:
        for c in result.completions:
            check_against_full_pass(tiny.model, result.prompt_token_ids, c.token_ids, c.logprobs, c.entropies,
                                    c.margins, c.attention, c.attention_rows)


def test_a_kept_prefix_is_continued_across_calls_until_the_model_changes(tiny_llama_dir):
    """keep_prefix: the next call's prefix is computed only past what it has in common with the kept one; the
    same tokens as a sampler that keeps nothing; a weight update drops the kept prefix."""
    loaded = varied(load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32"))
    keeping, plain = Sampler(loaded, keep_prefix=True), Sampler(loaded)
    longer = [HEAD + "What is 2 + 3? " + tail for tail in ("It is 5.", "The answer is 72.", "user")]

    def greedy(sampler, prompts):
        with count_model_inputs(loaded.model) as shapes:
            out = sampler.generate(prompts, greedy=True, max_new_tokens=8, chat=False)
        return [c.token_ids for c, in out.completions], shapes, out

    first, shapes, out = greedy(keeping, SHARED)
    shared = out.prompts[0].timing.shared_prompt_tokens
    assert shapes[0] == (1, shared) and first == greedy(plain, SHARED)[0]
    again, shapes, _ = greedy(keeping, SHARED)
    assert again == first and shapes[0][0] == 3  # the whole prefix was kept: no pass over it
    extended, shapes, out = greedy(keeping, longer)
    assert shapes[0] == (1, out.prompts[0].timing.shared_prompt_tokens - shared)  # only past the kept part
    assert extended == greedy(plain, longer)[0]
    with torch.no_grad():  # what an optimizer step does between two calls
        loaded.model.model.layers[0].self_attn.q_proj.weight.mul_(-1.0)
    changed, shapes, out = greedy(keeping, longer)
    assert shapes[0] == (1, out.prompts[0].timing.shared_prompt_tokens) and changed == greedy(plain, longer)[0]


# ---- stop strings and finish reasons -------------------------------------------------------------


def test_stop_string_spanning_tokens_cuts_text_and_tokens(tiny, sampler):
    decode = tiny.tokenizer.decode
    ids = sampler.generate(PROMPTS[1], greedy=True, max_new_tokens=16, chat=False, ignore_eos=True).prompts[0] \
        .completions[0].token_ids
    full = decode(ids)
    # a stop string made of the last character of token k and the first of token k+1
    for k in range(2, len(ids) - 1):
        before, after = decode(ids[:k]), decode(ids[:k + 1])
        if full.startswith(after) and len(before) > 0 and len(after) > len(before) and full[len(before) - 1].isprintable():
            stop = full[len(before) - 1:len(before) + 1]
            break
    cut = next(k for k in range(1, len(ids) + 1) if stop in decode(ids[:k]))
    completion = sampler.generate(PROMPTS[1], greedy=True, max_new_tokens=16, chat=False, ignore_eos=True,
                                  stop=["never appears", stop]).prompts[0].completions[0]
    assert completion.finish_reason == "stop" and completion.stop == stop
    assert completion.token_ids == ids[:cut]
    assert completion.text == full[:full.index(stop)]


def test_finish_reasons_eos_and_length(tiny):
    sampler = Sampler(tiny)
    ids = sampler.generate(PROMPTS[0], greedy=True, max_new_tokens=10, chat=False).prompts[0].completions[0].token_ids
    sampler.eos_ids = {ids[4]}  # pretend the fifth greedy token ends the sequence
    first = ids.index(ids[4])
    eos = sampler.generate(PROMPTS[0], greedy=True, max_new_tokens=10, chat=False).prompts[0].completions[0]
    assert eos.finish_reason == "eos" and eos.token_ids == ids[:first + 1]
    forced = sampler.generate(PROMPTS[0], greedy=True, max_new_tokens=10, chat=False, ignore_eos=True)
    assert forced.prompts[0].completions[0].finish_reason == "length"
    assert forced.prompts[0].completions[0].token_ids == ids


# ---- signals and attention against one full forward pass ------------------------------------------


def check_against_full_pass(model, prompt_ids, token_ids, logprobs, entropies, margins, attention, rows=None):
    logits, attentions = full_pass(model, prompt_ids + token_ids)
    start = len(prompt_ids)
    log_probs = torch.log_softmax(logits[start - 1:start - 1 + len(token_ids)], dim=-1)
    expected = log_probs.gather(-1, torch.tensor(token_ids)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(logprobs), expected, atol=1e-3)
    assert torch.allclose(torch.tensor(entropies), -(log_probs.exp() * log_probs).sum(-1), atol=1e-3)
    top2 = log_probs.exp().topk(2, dim=-1).values
    assert torch.allclose(torch.tensor(margins), top2[:, 0] - top2[:, 1], atol=1e-3)
    for t in range(len(token_ids)):
        i = start + t  # generated token t sits at position i; a_{i,i-1} is the sub-diagonal entry
        for j, (layer, head) in enumerate(HEADS):
            assert attention[t][j] == pytest.approx(attentions[layer][head, i, i - 1].item(), abs=1e-5)
            if rows is not None:
                assert torch.allclose(torch.tensor(rows[t][j]), attentions[layer][head, i, :i + 1], atol=1e-5)


def test_signals_and_captured_attention_equal_a_full_pass(tiny, sampler):
    out = sampler.generate(PROMPTS, n=2, max_new_tokens=8, temperature=1.0, seed=3, chat=False, logprobs=True,
                           entropy=True, margin=True, capture_heads=HEADS, capture_rows=True)
    assert out.capture_heads == HEADS
    assert tiny.model.config._attn_implementation == "sdpa"  # switched back after the call
    for result in out.prompts:  # the shorter prompts ran left-padded in the batch
        for c in result.completions:
            assert len(c.attention) == len(c.token_ids)  # the last token too: one extra forward pass
            check_against_full_pass(tiny.model, result.prompt_token_ids, c.token_ids, c.logprobs, c.entropies,
                                    c.margins, c.attention, c.attention_rows)
    json.dumps(__import__("dataclasses").asdict(out))  # results serialise


def test_step_api_signals_and_attention_equal_a_full_pass(tiny, sampler):
    state = sampler.start(PROMPTS[1], temperature=1.0, seed=1, capture_heads=HEADS, capture_rows=True, chat=False)
    outputs = [sampler.step(state) for _ in range(4)] + sampler.append(state, " answer is 72")
    outputs += [sampler.step(state)]
    assert [o.token_id for o in outputs] == state.token_ids
    check_against_full_pass(tiny.model, state.prompt_ids, state.token_ids, [o.logprob for o in outputs],
                            [o.entropy for o in outputs], [o.margin for o in outputs],
                            [o.attention for o in outputs], [o.attention_rows for o in outputs])
    assert state.text == tiny.tokenizer.decode(state.token_ids)
    # the pieces hold back the bytes of a character that is not complete yet (this seed ends inside one)
    assert "".join(o.text for o in outputs) == state.text.rstrip(INCOMPLETE) != state.text


# ---- rollback and append --------------------------------------------------------------------------


def test_rollback_then_greedy_redecode_reproduces_tokens(tiny, sampler):
    state = sampler.start(PROMPTS[0], greedy=True, chat=False)
    first = [sampler.step(state).token_id for _ in range(8)]
    with count_model_inputs(tiny.model) as shapes:
        sampler.rollback(state, 3)
    assert shapes == []  # no forward pass
    assert state.token_ids == first[:5] and state.cache.get_seq_length() == len(state.prompt_ids) + 5
    assert [sampler.step(state).token_id for _ in range(3)] == first[5:]
    with pytest.raises(ValueError, match="rollback"):
        sampler.rollback(state, 9)


def test_append_forces_exactly_the_given_ids(tiny, sampler):
    state = sampler.start(PROMPTS[2], greedy=True, chat=False)
    sampler.step(state)
    forced = [5, 17, 42, 5]
    outputs = sampler.append(state, forced)
    assert [o.token_id for o in outputs] == forced and state.token_ids[1:] == forced
    logits, _ = full_pass(tiny.model, state.prompt_ids + state.token_ids)
    assert torch.allclose(state.logits[-1], logits[-1], atol=1e-4)  # the next step continues after them


# ---- prompt lookup --------------------------------------------------------------------------------


def test_lookup_draft_copies_what_followed_the_latest_match():
    context = [7, 1, 2, 3, 4, 5, 1, 2, 3, 8, 9, 2, 3]
    assert lookup_draft(context, 2) == [8, 9]  # (9 2 3) never occurred before; (2 3) did, latest at index 7
    assert lookup_draft(context + [1, 2, 3], 3) == [8, 9, 2]  # (1 2 3): its latest earlier occurrence wins
    assert lookup_draft([5, 6, 7], 4) == [] and lookup_draft([4, 4], 0) == []
    assert lookup_draft([3, 4, 5, 3], 5) == [4, 5, 3]  # a draft may run up to the end of the context
    assert lookup_draft([6, 6, 6, 6, 6, 6], 3) == [6, 6, 6]  # the latest (6 6 6) is followed by one token only


def test_prompt_lookup_gives_the_greedy_tokens_in_fewer_passes(tiny, sampler):
    plain = sampler.generate(PROMPTS, greedy=True, max_new_tokens=40, chat=False, logprobs=True, entropy=True,
                             margin=True)
    with count_model_inputs(tiny.model) as shapes:
        drafted = sampler.generate(PROMPTS, greedy=True, max_new_tokens=40, chat=False, logprobs=True, entropy=True,
                                   margin=True, prompt_lookup=4)
    for ours, reference in zip(drafted.completions, plain.completions):
        ours, reference = ours[0], reference[0]
        assert ours.token_ids == reference.token_ids and ours.finish_reason == reference.finish_reason
        for name in ("logprobs", "entropies", "margins"):
            assert getattr(ours, name) == pytest.approx(getattr(reference, name), abs=1e-4)
    assert [shape[0] for shape in shapes] == [1] * len(shapes)  # prompts one at a time
    passes, tokens = len(shapes) - len(PROMPTS), drafted.timing.new_tokens  # decode passes, prefills left out
    assert any(shape[1] > 1 for shape in shapes[1:]) and passes < tokens  # this model's drafts are mostly rejected


def test_prompt_lookup_accepts_drafts_of_a_repetitive_model(tiny_llama_dir):
    repetitive = Sampler(load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32"))  # 0.02 init: loops
    plain = repetitive.generate(PROMPTS[0], greedy=True, max_new_tokens=40, chat=False, ignore_eos=True)
    with count_model_inputs(repetitive.model) as shapes:
        drafted = repetitive.generate(PROMPTS[0], greedy=True, max_new_tokens=40, chat=False, ignore_eos=True,
                                      prompt_lookup=4)
    assert drafted.completions[0][0].token_ids == plain.completions[0][0].token_ids
    assert len(shapes) - 1 <= 40 // 2  # up to 5 tokens per decode pass (4 drafted + the model's own)


def test_prompt_lookup_stops_and_ends_like_plain_greedy(tiny):
    sampler = Sampler(tiny)
    ids = sampler.generate(PROMPTS[1], greedy=True, max_new_tokens=30, chat=False, ignore_eos=True).prompts[0] \
        .completions[0].token_ids
    text = tiny.tokenizer.decode(ids)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    sampler.eos_ids = {ids[20]}  # pretend the 21st greedy token ends the sequence
    reasons = []
    for kwargs in (dict(stop=[stop]), dict(), dict(ignore_eos=True)):
        plain, drafted = (sampler.generate(PROMPTS[1], greedy=True, max_new_tokens=30, chat=False, prompt_lookup=lookup,
                                           **kwargs).prompts[0].completions[0] for lookup in (0, 3))
        assert (drafted.token_ids, drafted.text, drafted.finish_reason, drafted.stop) == \
               (plain.token_ids, plain.text, plain.finish_reason, plain.stop)
        reasons.append(drafted.finish_reason)
    assert reasons == ["stop", "eos", "length"]


def test_prompt_lookup_refuses_what_it_cannot_do(sampler):
    for kwargs in (dict(temperature=1.0), dict(greedy=True, n=2), dict(greedy=True, batch_size=2),
                   dict(greedy=True, capture_heads=HEADS), dict(greedy=True, prompt_lookup=-1)):
        with pytest.raises(ValueError, match="prompt_lookup"):
            sampler.generate("x", chat=False, **{"prompt_lookup": 4, **kwargs})


# ---- sampling ------------------------------------------------------------------------------------


def test_same_seed_same_samples_different_seed_different(sampler):
    def texts(seed):
        out = sampler.generate(PROMPTS[0], n=4, max_new_tokens=8, temperature=1.0, seed=seed, chat=False)
        return [c.token_ids for c in out.prompts[0].completions]

    assert texts(7) == texts(7)
    assert texts(7) != texts(8)
    assert len({tuple(ids) for ids in texts(7)}) > 1  # the n samples differ from each other


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 0.9), (1.0, 20, 0.8), (1.3, 50, 1.0), (1.0, 0, 0.5)])
# per-row spread of the logits: flat rows need the full sort for top-p, peaked ones take the shortcut, a mix pads
@pytest.mark.parametrize("spreads", [(0.05, 0.05, 0.05), (4.0, 4.0, 4.0), (4.0, 0.05, 4.0)])
def test_sampling_distribution_equals_transformers_warpers(temperature, top_k, top_p, spreads):
    torch.manual_seed(0)
    logits = torch.randn(3, 2000) * torch.tensor(spreads)[:, None]
    reference = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        reference = TopKLogitsWarper(top_k)(None, reference)
    if top_p < 1:
        reference = TopPLogitsWarper(top_p)(None, reference)
    weights, indices = sampling_weights(logits, SamplingParams(temperature, top_p, top_k))
    ours = torch.zeros_like(logits).scatter_add(-1, indices, weights / weights.sum(-1, keepdim=True))  # padding: weight 0
    assert torch.allclose(ours, reference.softmax(-1), atol=1e-5)


@pytest.mark.parametrize("width", [1, 7, 1024, 2500])
def test_draw_follows_the_weights(width):
    """20000 draws from one distribution (whole blocks, padding, zero weights, and for 2500 tokens a block whose
    weights are all zero): zero weights are never drawn, each token's count is within 5 sigma of its expectation,
    and the counts pass a chi-square test."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.rand(width, generator=generator) ** 4
    weights[1::3] = 0
    weights[1024:2048] = 0
    weights[0] = max(weights[0], 0.01)
    chunks, rows = 10, 2000
    drawn = torch.cat([draw(weights.expand(rows, width).contiguous(), generator) for _ in range(chunks)])
    counts = torch.bincount(drawn, minlength=width).double()
    expected = chunks * rows * weights.double() / weights.sum()
    assert len(counts) == width and counts[weights == 0].sum() == 0
    assert ((counts - expected).abs() <= 5 * (expected * (1 - expected / (chunks * rows))).sqrt() + 1).all()
    large = expected >= 5  # the chi-square approximation needs >= 5 expected per bin: the rest are lumped into one
    observed = torch.cat([counts[large], counts[~large].sum()[None]])
    expected = torch.cat([expected[large], expected[~large].sum()[None]])
    chi_square, freedom = float(((observed - expected) ** 2 / expected.clamp(min=1e-9)).sum()), len(observed) - 1
    assert chi_square <= freedom + 5 * (2 * freedom) ** 0.5 + 10


def test_draw_edge_rows_and_seed(monkeypatch):
    """Mass on the first or last token only (the last one in a padded block), or on one token per block; a
    uniform number of 1 (what rounding can make of one just below it) still lands on the last token with weight;
    a seeded generator repeats its draws."""
    weights = torch.zeros(4, 2049)
    weights[0, 0] = 1.0
    weights[1, -1] = 1e-30
    weights[2, ::1024] = 1.0
    weights[3, :1500] = torch.rand(1500)
    weights[3, 1400:1450] = 0  # the last token with weight: 1499, in the second block
    for _ in range(20):
        drawn = draw(weights, None)
        assert drawn[0] == 0 and drawn[1] == 2048 and int(drawn[2]) in (0, 1024, 2048) and weights[3, drawn[3]] > 0
    monkeypatch.setattr(torch, "rand", lambda *size, **options: torch.ones(*size, dtype=options["dtype"]))
    assert draw(weights, None).tolist() == [0, 2048, 2048, 1499]
    monkeypatch.undo()
    probs = torch.randn(32, 3000).softmax(-1)
    first, second = (draw(probs, torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(first, second)
    for broken in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="NaN, infinite or all zero"):
            draw(probs.index_fill(1, torch.tensor([5]), broken), None)
    with pytest.raises(ValueError, match="all zero"):
        draw(torch.zeros(2, 10), None)


def test_invalid_arguments_name_the_argument(sampler):
    with pytest.raises(ValueError, match="top_p"):
        sampler.generate("x", top_p=0.0, chat=False)
    with pytest.raises(ValueError, match="capture_heads"):
        sampler.generate("x", capture_heads=[(7, 0)], chat=False)


# ---- the written-out Llama forward ------------------------------------------------------------------


@pytest.mark.parametrize("dtype, kernel", [("bf16", False), pytest.param("fp32", True, marks=needs_kernel),
                                           ("fp32", False)])
def test_llama_decoder_equals_transformers_forward(tiny_llama_dir, dtype, kernel):
    """Left-padded prefill, one-token steps, and several tokens appended to a cache: the same numbers on both
    engines (bf16 without the CPU kernels: bit for bit; fp32: to rounding, the packed products and the kernels
    sum in another order). bf16 with the kernels: `test_bf16_cpu_kernels_are_as_close_to_fp32_as_torch`."""
    loaded = varied(load_causal_lm(str(tiny_llama_dir), device="cpu", dtype=dtype), seed=2)
    ours, theirs = Sampler(loaded, cpu_kernels=kernel), Sampler(loaded, llama_decoder=False)
    assert ours.decoder is not None and theirs.decoder is None

    def same(a: list[float], b: list[float]):
        assert a == b if dtype == "bf16" else a == pytest.approx(b, abs=1e-4)

    batch = [sampler.generate(PROMPTS, greedy=True, max_new_tokens=10, chat=False, logprobs=True, entropy=True)
             for sampler in (ours, theirs)]
    for mine, reference in zip(*(generation.prompts for generation in batch)):
        assert mine.completions[0].token_ids == reference.completions[0].token_ids
        same(mine.completions[0].logprobs, reference.completions[0].logprobs)
        same(mine.completions[0].entropies, reference.completions[0].entropies)
    forced = []
    for sampler in (ours, theirs):
        state = sampler.start(PROMPTS[1], greedy=True, chat=False)
        forced.append([sampler.step(state).logprob] + [o.logprob for o in sampler.append(state, [5, 17, 42])])
    same(*forced)


def with_and_without(monkeypatch, switch: str, kernel: str, loaded: LoadedModel, prompts,
                     **generate) -> tuple[list, list, int]:
    """`generate`'s completions (flattened) with `LlamaDecoder`'s method ``switch`` as it is and with it returning
    False (that path off), and how many times ``cpu_kernels.<kernel>`` ran in all."""
    from lightning_lab.sampling.llama_decoder import LlamaDecoder

    calls, decoded = [], []
    with monkeypatch.context() as patch:  # undone on return, so that the next call finds the method as it is
        real_kernel = getattr(cpu_kernels, kernel)
        patch.setattr(cpu_kernels, kernel, lambda *args: calls.append(1) or real_kernel(*args))
        for method in (getattr(LlamaDecoder, switch), lambda *args: False):
            patch.setattr(LlamaDecoder, switch, method)
            completions = Sampler(loaded).generate(prompts, **generate).completions
            decoded.append([completion for per_prompt in completions for completion in per_prompt])
    return decoded[0], decoded[1], len(calls)


@needs_kernel
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("prompts, n", [(PROMPTS[1], 1), (PROMPTS[:2], 1), (PROMPTS, 4)],
                         ids=["one row", "two rows padded", "twelve rows sharing prompts"])
def test_one_call_per_layer_equals_the_layer_by_layer_loop(tiny_llama_dir, monkeypatch, dtype, prompts, n):
    """One-token steps on the kernels run each layer as one `decode_layer` call (one- and two-row products; fp32
    panels), taken with padding, shared prompts and captured heads; the same numbers as `forward`'s own loop.
    bf16 beyond two rows has oneDNN's products, which the call does not make: the loop runs there."""
    loaded = varied(load_causal_lm(str(tiny_llama_dir), device="cpu", dtype=dtype), seed=2)
    ours, loop, calls = with_and_without(monkeypatch, "_layers_in_one_call", "decode_layer", loaded, prompts, n=n,
                                         max_new_tokens=6, chat=False, seed=3, logprobs=True, capture_heads=HEADS,
                                         ignore_eos=True)
    rows = (1 if isinstance(prompts, str) else len(prompts)) * n
    assert calls == (0 if dtype == "bf16" and rows > 2 else 2 * 6)  # 2 layers, 6 one-token steps
    for a, b in zip(ours, loop):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        assert torch.allclose(torch.tensor(a.attention), torch.tensor(b.attention), atol=1e-6)


needs_bf16_screen = pytest.mark.skipif(cpu_kernels.load() is None or not cpu_kernels.compiled().avx512_bf16,
                                       reason="the screen is oneDNN's bf16 product, used where the CPU has "
                                              "AVX512-BF16 (and the kernels build)")
SCREENING = ("_screens", "screened_top_k")  # `with_and_without`'s switch and kernel for the screened output layer


@needs_bf16_screen
# stop strings that end some rows early (with this model and seed)
@pytest.mark.parametrize("sampling", [dict(greedy=True, stop=[" an"]),
                                      dict(temperature=0.9, top_k=5, top_p=0.9, stop=["Ap", "I"])],
                         ids=["greedy", "top-k"])
def test_screened_output_layer_chooses_the_tokens_of_every_logit(tiny_llama_dir, monkeypatch, sampling):
    """fp32 steps of three rows and more, greedy or with top-k, and no per-token signals: the decoder returns
    only the k largest logits, screened through bf16 (`LlamaDecoder._screens`); the same tokens as with every
    logit computed, finished rows dropped along the way. Signals need every logit: no screening then."""
    loaded = varied(load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32"), seed=4)
    settings = dict(n=4, max_new_tokens=12, chat=False, seed=5, **sampling)
    ours, every, screened_steps = with_and_without(monkeypatch, *SCREENING, loaded, PROMPTS, **settings)
    assert screened_steps >= 6
    assert [c.token_ids for c in ours] == [c.token_ids for c in every]
    assert {c.finish_reason for c in every} == {"stop", "length"}  # rows finished apart, and were dropped
    assert with_and_without(monkeypatch, *SCREENING, loaded, PROMPTS, logprobs=True, **settings)[2] == 0


def fp32_twin(loaded: LoadedModel, source: str) -> torch.nn.Module:
    """The model of `source` in fp32 holding `loaded`'s (bf16) weights exactly."""
    exact = load_causal_lm(source, device="cpu", dtype="fp32").model
    with torch.no_grad():
        for target, weight in zip(exact.parameters(), loaded.model.parameters()):
            target.copy_(weight.float())
    return exact


def gaps_from_fp32(exact: torch.nn.Module, prompt_ids: list[int], completion) -> torch.Tensor:
    """The gaps between a completion's log-probs and a full fp32 pass's over the same tokens, token by token."""
    ids = completion.token_ids
    logits, _ = full_pass(exact, prompt_ids + ids)
    start = len(prompt_ids) - 1
    reference = torch.log_softmax(logits[start:start + len(ids)], -1)[torch.arange(len(ids)), ids]
    return (torch.tensor(completion.logprobs) - reference).abs()


def distance_from_fp32(exact: torch.nn.Module, prompt_ids: list[int], completion) -> float:
    """The largest gap between a completion's log-probs and a full fp32 pass's over the same tokens."""
    return gaps_from_fp32(exact, prompt_ids, completion).max().item()


def assert_kernels_as_close_as_torch(exact: torch.nn.Module, with_kernels: list, with_torch: list) -> None:
    """In bf16 the CPU kernels' numbers are not torch's (attention keeps the softmax in fp32 where SDPA rounds
    the probabilities to bf16; norms and products sum in another order): their log-probs, each side's over its
    own greedy tokens, are about as close to the fp32 model's as torch's, over every token of every prompt. Not
    token for token: which side is closer on one prompt, and even the greedy tokens after a near-tie (the
    second GSM8K question's first token), are a matter of where bf16 rounding happens to tip."""
    gaps = {}
    for side, generations in (("kernels", with_kernels), ("torch", with_torch)):
        gaps[side] = torch.cat([gaps_from_fp32(exact, result.prompt_token_ids, result.completions[0])
                                for generation in generations for result in generation.prompts])
    kernels_mean, torch_mean = gaps["kernels"].mean().item(), gaps["torch"].mean().item()
    assert kernels_mean <= 1.5 * torch_mean + 1e-3, (kernels_mean, torch_mean)


@needs_kernel
def test_bf16_cpu_kernels_are_as_close_to_fp32_as_torch(tiny_llama_dir):
    loaded = varied(load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="bf16"), seed=2)
    runs = [[Sampler(loaded, cpu_kernels=kernels).generate(prompts, greedy=True, max_new_tokens=10, chat=False,
                                                            logprobs=True) for prompts in (PROMPTS, PROMPTS[0])]
            for kernels in (True, False)]  # a batch, and one row (the one-row products)
    assert_kernels_as_close_as_torch(fp32_twin(loaded, str(tiny_llama_dir)), *runs)


def tiny_qwen2(tiny: LoadedModel, **settings) -> LoadedModel:
    """A tiny random Qwen2 (fp32, varied weights) on the tiny model's tokenizer and EOS; `settings` go to its config."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tiny.tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        **settings)).eval()
    qwen.generation_config.eos_token_id = tiny.model.generation_config.eos_token_id
    return varied(LoadedModel(qwen, tiny.tokenizer, "qwen2", torch.device("cpu"), torch.float32))


def greedy_on_both(ours: Sampler, theirs: Sampler) -> list:
    """Each sampler's greedy decode of PROMPTS (8 tokens, with log-probs)."""
    return [sampler.generate(PROMPTS, greedy=True, max_new_tokens=8, chat=False, logprobs=True)
            for sampler in (ours, theirs)]


def assert_same_decode(outs: list) -> None:
    """Two engines' decodes (`greedy_on_both`): the same tokens, log-probs to fp32 rounding."""
    for mine, reference in zip(*(out.prompts for out in outs)):
        assert mine.completions[0].token_ids == reference.completions[0].token_ids
        assert mine.completions[0].logprobs == pytest.approx(reference.completions[0].logprobs, abs=1e-4)


def test_llama_decoder_runs_qwen2_with_its_qkv_biases(tiny):
    loaded = tiny_qwen2(tiny)
    qwen = loaded.model
    with torch.no_grad():  # biases that matter (transformers starts them at zero)
        for name, parameter in qwen.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.3)
    ours, theirs = Sampler(loaded), Sampler(loaded, llama_decoder=False)
    outs = greedy_on_both(ours, theirs)
    assert ours.decoder is not None and ours.decoder.layers[0]["qkv"].bias is not None
    assert_same_decode(outs)
    with torch.no_grad():  # an in-place bias update (an optimizer step) reaches the stacked biases
        for layer in qwen.model.layers:
            layer.self_attn.k_proj.bias.mul_(-3.0)
    after = greedy_on_both(ours, theirs)
    assert [p.completions[0].logprobs for p in after[0].prompts] != [p.completions[0].logprobs for p in outs[0].prompts]
    for mine, reference in zip(*(out.prompts for out in after)):
        assert mine.completions[0].logprobs == pytest.approx(reference.completions[0].logprobs, abs=1e-4)


def test_llama_decoder_keeps_a_model_s_own_activation(tiny):
    """The kernels fuse silu(gate) * up; a model with another activation keeps its own (and its numbers)."""
    loaded = tiny_qwen2(tiny, hidden_act="gelu_pytorch_tanh")
    ours, theirs = Sampler(loaded), Sampler(loaded, llama_decoder=False)
    outs = greedy_on_both(ours, theirs)
    assert not ours.decoder.layers[0]["silu"] and Sampler(tiny_qwen2(tiny)).decoder.layers[0]["silu"]
    assert_same_decode(outs)


def test_a_sliding_window_model_decodes_on_a_dynamic_cache_and_refuses_prompt_lookup(tiny):
    from transformers import DynamicCache

    from lightning_lab.sampling.kv_cache import new_cache

    loaded = tiny_qwen2(tiny, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    qwen = loaded.model
    assert qwen.config.layer_types == ["full_attention", "sliding_attention"]
    assert isinstance(new_cache(qwen.config, 8), DynamicCache)
    sampler = Sampler(loaded)
    assert sampler.decoder is None  # a sliding layer: transformers' forward
    out = sampler.generate(PROMPTS, greedy=True, max_new_tokens=12, chat=False)
    prompt_ids = [result.prompt_token_ids for result in out.prompts]
    assert max(map(len, prompt_ids)) > 4  # the window cuts into a prompt, and into every 12-token answer
    windowed = [result.completions[0].token_ids for result in out.prompts]
    assert windowed == hf_greedy(loaded, prompt_ids, 12)
    unwindowed = Sampler(tiny_qwen2(tiny)).generate(PROMPTS, greedy=True, max_new_tokens=12, chat=False)
    assert windowed != [result.completions[0].token_ids for result in unwindowed.prompts]  # the window is in effect
    with pytest.raises(ValueError, match="prompt_lookup=3: Qwen2ForCausalLM has layers that are not full attention"):
        sampler.generate(PROMPTS[0], greedy=True, chat=False, prompt_lookup=3)


def test_models_the_decoder_cannot_run_fall_back_to_transformers(tiny):
    from lightning_lab.sampling.llama_decoder import unsupported_reason
    from lightning_lab.models.gpt import LabGPTConfig, LabGPTForCausalLM

    lab = LabGPTForCausalLM(LabGPTConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert "model_type" in unsupported_reason(lab)
    lab_loaded = LoadedModel(lab.eval(), tiny.tokenizer, "lab-gpt", torch.device("cpu"), torch.float32)
    assert Sampler(lab_loaded).decoder is None
    with pytest.raises(ValueError, match="llama_decoder=True.*model_type"):
        Sampler(lab_loaded, llama_decoder=True)
    with pytest.raises(ValueError, match="cpu_kernels=True.*model_type"):  # the kernels run in the decoder
        Sampler(lab_loaded, cpu_kernels=True)
    with pytest.raises(ValueError, match="cpu_kernels=True.*llama_decoder=False"):
        Sampler(tiny, llama_decoder=False, cpu_kernels=True)
    decoder = Sampler(tiny).decoder
    with pytest.raises(ValueError, match="cpu_kernels=True.*torch.float16"):  # a dtype the kernels lack
        decoder._use_kernels(True, torch.zeros(1, dtype=torch.float16))
    assert not decoder._use_kernels(None, torch.zeros(1, dtype=torch.float16))  # the default: torch's operations


# ---- the lab GPT ---------------------------------------------------------------------------------


def test_lab_gpt_decodes_and_captures_through_the_sampler(tiny):
    from lightning_lab.models.gpt import LabGPTConfig, LabGPTForCausalLM

    torch.manual_seed(0)
    config = LabGPTConfig(vocab_size=len(tiny.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                          eos_token_id=tiny.tokenizer.eos_token_id, pad_token_id=tiny.tokenizer.pad_token_id)
    lab = LoadedModel(LabGPTForCausalLM(config).eval(), tiny.tokenizer, "lab-gpt", torch.device("cpu"), torch.float32)
    sampler = Sampler(lab)
    out = sampler.generate(PROMPTS, greedy=True, max_new_tokens=8, chat=False, logprobs=True, entropy=True,
                           margin=True, capture_heads=HEADS)
    prompt_ids = [result.prompt_token_ids for result in out.prompts]
    assert [result.completions[0].token_ids for result in out.prompts] == hf_greedy(lab, prompt_ids, 8)
    for result in out.prompts:
        c = result.completions[0]
        check_against_full_pass(lab.model, result.prompt_token_ids, c.token_ids, c.logprobs, c.entropies, c.margins,
                                c.attention)


# ---- the real model --------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_greedy_equals_generate(gsm8k_path):
    loaded = load_causal_lm("smollm2-135m", device="cpu", dtype="fp32")
    questions = [json.loads(line)["question"] for line in gsm8k_path.open().readlines()[:2]]
    sampler = Sampler(loaded)
    out = sampler.generate(questions, greedy=True, max_new_tokens=32)
    prompt_ids = [result.prompt_token_ids for result in out.prompts]
    assert prompt_ids[0] == sampler.encode([{"role": "user", "content": questions[0]}])
    expected = hf_greedy(loaded, prompt_ids, 32)
    assert [result.completions[0].token_ids for result in out.prompts] == expected
    with count_model_inputs(loaded.model) as shapes:
        drafted = sampler.generate(questions, greedy=True, max_new_tokens=32, prompt_lookup=5)
    assert [result.completions[0].token_ids for result in drafted.prompts] == expected
    assert len(shapes) - 2 < drafted.timing.new_tokens  # drafts accepted: fewer decode passes than tokens


@pytest.mark.slow
def test_smollm2_shared_prefix_decodes_as_without(gsm8k_path):
    """ACE's shape of batch: the chat template's head and a playbook, then different questions (ragged); fp32
    greedy gives the same tokens with the prefix prefilled once as with every prompt prefilled whole."""
    loaded = load_causal_lm("smollm2-135m", device="cpu", dtype="fp32")
    with gsm8k_path.open() as lines:
        questions = [json.loads(next(lines))["question"] for _ in range(4)]
    playbook = ("Playbook of lessons:\n[str-00001] helpful=2 harmful=0 :: Percent change is (new - old) / old * 100.\n"
                "[str-00002] helpful=1 harmful=0 :: Read the unit line and answer in the unit the question names.")
    prompts = [f"{playbook}\n\nQuestion: {question}" for question in questions]
    sampler = Sampler(loaded)
    with count_model_inputs(loaded.model) as shapes:
        out = sampler.generate(prompts, greedy=True, max_new_tokens=24, logprobs=True)
    assert shapes[0][0] == 1 and shapes[0][1] > 40 and shapes[1][0] == 4  # the head and playbook once
    whole = sampler.generate(prompts, greedy=True, max_new_tokens=24, logprobs=True, prefix_cache=False)
    assert [c[0].token_ids for c in out.completions] == [c[0].token_ids for c in whole.completions]
    for (mine,), (reference,) in zip(out.completions, whole.completions):
        assert torch.allclose(torch.tensor(mine.logprobs), torch.tensor(reference.logprobs), atol=1e-3)


@needs_bf16_screen
@pytest.mark.slow
def test_smollm2_screened_output_layer_chooses_the_tokens_of_every_logit(gsm8k_path, monkeypatch):
    """The screen's bound on SmolLM2's own weights and hidden states (fp32): three GSM8K questions, n=2 (six
    rows), greedy and top-k 50 sampling, 24 tokens each: the same tokens as with every logit computed."""
    loaded = load_causal_lm("smollm2-135m", device="cpu", dtype="fp32")
    with gsm8k_path.open() as lines:
        questions = [json.loads(next(lines))["question"] for _ in range(3)]
    for sampling in (dict(greedy=True), dict(temperature=0.8, top_k=50, top_p=0.95)):
        ours, every, screened_steps = with_and_without(monkeypatch, *SCREENING, loaded, questions, n=2,
                                                       max_new_tokens=24, ignore_eos=True, seed=7, **sampling)
        assert screened_steps == 23  # every step after the prompts'
        assert [c.token_ids for c in ours] == [c.token_ids for c in every]


@pytest.mark.slow
def test_smollm2_bf16_decoder_equals_transformers_forward(gsm8k_path):
    loaded = load_causal_lm("smollm2-135m", device="cpu", dtype="bf16")
    with gsm8k_path.open() as lines:
        questions = [json.loads(next(lines))["question"] for _ in range(4)]
    engines = [dict(llama_decoder=True, cpu_kernels=False), dict(llama_decoder=False), dict()]
    # one question at a time: one-row steps, as the RAUQ controller and n=1 greedy decode
    outs = [[Sampler(loaded, **engine).generate(question, greedy=True, max_new_tokens=24, logprobs=True)
             for question in questions] for engine in engines]
    for torch_ops, transformers_forward in zip(outs[0], outs[1]):  # bit for bit
        mine, reference = torch_ops.prompts[0].completions[0], transformers_forward.prompts[0].completions[0]
        assert mine.token_ids == reference.token_ids and mine.logprobs == reference.logprobs
    # the default: the CPU kernels where they build
    assert_kernels_as_close_as_torch(fp32_twin(loaded, "smollm2-135m"), outs[2], outs[0])


@pytest.mark.parametrize("llama_decoder", [True, False])
def test_a_peft_model_decodes_through_its_base_with_the_adapter_on(tiny_llama_dir, llama_decoder):
    from lightning_lab.models.lora import LoraSettings, add_lora

    loaded = varied(load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32"))
    peft_model = add_lora(loaded.model, LoraSettings(rank=2))
    torch.manual_seed(0)
    with torch.no_grad():  # a LoRA that changes the function (peft starts B at zero)
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    sampler = Sampler(LoadedModel(peft_model, loaded.tokenizer, loaded.spec, loaded.device, loaded.dtype),
                      llama_decoder=llama_decoder)
    assert sampler.model is peft_model.get_base_model() and sampler._has_logits_to_keep
    # the decoder multiplies by the LoRA layers' folded weights; transformers' forward runs peft's layers
    assert sampler.engine_info()["engine"] == ("decoder" if llama_decoder else "transformers")
    assert sampler.engine_info()["adapter"]
    adapted = sampler.generate(PROMPTS, greedy=True, max_new_tokens=10, chat=False, logprobs=True)
    with torch.no_grad(), evaluation_mode(peft_model):  # peft adds its layers in training mode (LoRA dropout on)
        expected = [full_pass(peft_model, result.prompt_token_ids + result.completions[0].token_ids)[0]
                    for result in adapted.prompts]
    for result, logits in zip(adapted.prompts, expected):
        completion, start = result.completions[0], len(result.prompt_token_ids)
        reference = torch.log_softmax(logits[start - 1:-1], dim=-1)
        assert completion.token_ids == reference.argmax(dim=-1).tolist()[:len(completion.token_ids)]
        chosen = reference.gather(-1, torch.tensor(completion.token_ids)[:, None]).squeeze(-1)
        assert completion.logprobs == pytest.approx(chosen.tolist(), abs=1e-3)
    with peft_model.disable_adapter():  # the adapter really is on in the comparison above
        plain = sampler.generate(PROMPTS, greedy=True, max_new_tokens=10, chat=False)
    assert [c[0].token_ids for c in plain.completions] != [c[0].token_ids for c in adapted.completions]


# ---- the bench ------------------------------------------------------------------------------------


def test_bench_interleaves_the_two_sides_of_a_ratio():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "sampler.py"
    spec = importlib.util.spec_from_file_location("bench_sampler", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    medians = bench.paired_median_seconds([lambda k: calls.append(("a", k)), lambda k: calls.append(("b", k))],
                                          steps=128, reps=3)
    assert calls == [("a", 8), ("b", 8)] + [("a", 128), ("b", 128)] * 3  # warm-ups, then A B A B A B
    assert len(medians) == 2 and all(seconds >= 0 for seconds in medians)
