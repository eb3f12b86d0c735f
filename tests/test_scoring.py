"""Teacher-forced scoring (models/scoring.py) against the model's own forward pass, one row at a time."""

from __future__ import annotations

import pytest
import torch

from lightning_lab.models.loading import load_causal_lm
from lightning_lab.models.lora import LoraSettings, add_lora
from lightning_lab.models.scoring import score, score_branches

PROMPTS = [[5, 17, 42], [7, 8, 9, 10, 11, 12], [99]]
COMPLETIONS = [[3, 4, 5, 6], [1], [20, 21, 22, 23, 24, 25, 26]]


@pytest.fixture
def llama(tiny_llama_dir):
    return load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32").model


def own_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log_softmax of the model's own logits of one unpadded sequence, at the completion tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float() / temperature
    predicting = logits[len(prompt) - 1:-1]
    return torch.log_softmax(predicting, dim=-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_lab_gpt_dir"])
def test_logprobs_are_the_models_own_and_a_ragged_batch_scores_as_rows_alone(fixture, request):
    model = load_causal_lm(str(request.getfixturevalue(fixture)), device="cpu", dtype="fp32").model
    batch = score(model, PROMPTS, COMPLETIONS, entropy=True, logits=True, hidden=True, heads="all",
                  attention_rows=True)
    assert batch.logprobs.shape == batch.mask.shape == (3, 7)
    assert batch.mask.sum(dim=1).tolist() == [4, 1, 7] and batch.completion_lengths == [4, 1, 7]
    for row, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        n = len(completion)
        torch.testing.assert_close(batch.logprobs[row, :n], own_logprobs(model, prompt, completion),
                                   rtol=1e-5, atol=1e-5)
        assert (batch.logprobs[row, n:] == 0).all() and (batch.entropy[row, n:] == 0).all()
        alone = score(model, [prompt], [completion], entropy=True, logits=True, hidden=True, heads="all",
                      attention_rows=True)
        for name in ("logprobs", "entropy", "logits", "hidden", "attention"):
            torch.testing.assert_close(getattr(batch, name)[row, ..., :n] if name == "attention"
                                       else getattr(batch, name)[row, :n], getattr(alone, name)[0],
                                       rtol=1e-4, atol=1e-5, msg=name)
        length = len(prompt) + n
        torch.testing.assert_close(batch.attention_rows[row, :, :n, :length], alone.attention_rows[0],
                                   rtol=1e-4, atol=1e-5)
        assert (batch.attention_rows[row, :, :n, length:] == 0).all()
    # the hidden state is the one the output layer reads
    head = model.get_output_embeddings()
    with torch.no_grad():
        torch.testing.assert_close(head(batch.hidden).float() * batch.mask[..., None], batch.logits,
                                   rtol=1e-5, atol=1e-5)
    assert batch.mean_nll() == pytest.approx(float(-batch.logprobs.sum() / 12))
    torch.testing.assert_close(batch.sequence_logprobs(), batch.logprobs.sum(dim=1))


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_lab_gpt_dir"])
def test_branches_off_the_cache_score_as_the_prefix_read_afresh(fixture, request):
    model = load_causal_lm(str(request.getfixturevalue(fixture)), device="cpu", dtype="fp32").model
    texts = [PROMPTS[1] + COMPLETIONS[0], PROMPTS[0] + COMPLETIONS[2]]  # ragged: the shorter one is right-padded
    read = score(model, [ids[:1] for ids in texts], [ids[1:] for ids in texts], keep_cache=True)
    rows, positions = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 9, 2, 5, 9])
    tokens = torch.tensor([[30, 31, 32], [33, 34, 35], [36, 37, 38], [39, 40, 41], [42, 43, 44]])
    logits, hidden, cache = score_branches(model, read, rows, positions, tokens, hidden=True)
    assert logits.shape[:2] == hidden.shape[:2] == (5, 3)
    # decoding: the branches' cache continues them, one token a pass, as reading them at once does
    first, _, cache = score_branches(model, read, rows, positions, tokens[:, :1])
    for t in range(1, 3):
        step, _, cache = score_branches(model, read, rows, positions, tokens[:, t:t + 1], cache=cache)
        torch.testing.assert_close(step[:, 0], logits[:, t], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first[:, 0], logits[:, 0], rtol=1e-4, atol=1e-4)
    for branch, (row, j) in enumerate(zip(rows.tolist(), positions.tolist())):
        # afresh: the text up to token j, then the branch's tokens (and one more, which nothing here reads)
        alone = score(model, [texts[row][:j + 1]], [tokens[branch].tolist() + [0]], logits=True, hidden=True)
        torch.testing.assert_close(logits[branch], alone.logits[0, 1:], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hidden[branch], alone.hidden[0, 1:], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="keep_cache=True"):
        score_branches(model, score(model, texts[:1], [[1]]), rows, positions, tokens)


def test_temperature_and_entropy(llama):
    scores = score(llama, PROMPTS[:1], COMPLETIONS[:1], temperature=0.5, entropy=True, logits=True)
    torch.testing.assert_close(scores.logprobs[0], own_logprobs(llama, PROMPTS[0], COMPLETIONS[0], 0.5),
                               rtol=1e-5, atol=1e-5)
    tempered = torch.log_softmax(scores.logits[0] / 0.5, dim=-1)
    torch.testing.assert_close(scores.entropy[0], -(tempered.exp() * tempered).sum(-1), rtol=1e-5, atol=1e-5)
    plain = score(llama, PROMPTS[:1], COMPLETIONS[:1], entropy=True)
    assert (scores.entropy[0] < plain.entropy[0]).all()  # a colder distribution is more certain
    with pytest.raises(ValueError, match="temperature"):
        score(llama, PROMPTS, COMPLETIONS, temperature=0)


def test_tensors_without_padding_score_as_lists(llama):
    prompts, completions = torch.tensor([[5, 17], [7, 8]]), torch.tensor([[3, 4, 5], [6, 7, 8]])
    as_tensors = score(llama, prompts, completions, entropy=True)
    as_lists = score(llama, prompts.tolist(), completions.tolist(), entropy=True)
    assert as_tensors.mask.all()
    torch.testing.assert_close(as_tensors.logprobs, as_lists.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(as_tensors.entropy, as_lists.entropy, rtol=1e-5, atol=1e-5)


def test_attention_is_eager_attention_at_the_subdiagonal(tiny_llama_dir, llama):
    eager = load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32").model
    eager.set_attn_implementation("eager")
    prompt, completion = PROMPTS[1], COMPLETIONS[2]
    with torch.no_grad():
        maps = eager(torch.tensor([prompt + completion]), output_attentions=True).attentions
    heads = [(1, 3), (0, 0), (1, 0)]
    scores = score(llama, [prompt], [completion], heads=heads, attention_rows=True)
    assert scores.heads == heads and scores.attention.shape == (1, 3, len(completion))
    assert llama.config._attn_implementation == "sdpa"  # switched for the call only
    for k, (layer, head) in enumerate(heads):
        for j in range(len(completion)):
            i = len(prompt) + j  # the position of completion token j
            assert scores.attention[0, k, j] == pytest.approx(float(maps[layer][0, head, i, i - 1]), abs=1e-6)
            torch.testing.assert_close(scores.attention_rows[0, k, j], maps[layer][0, head, i], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="2 layers x 4 heads"):
        score(llama, [prompt], [completion], heads=[(2, 0)])


def test_adapter_off_is_the_base_model_and_gradients_flow_when_asked(llama):
    base = score(llama, PROMPTS, COMPLETIONS, entropy=True)
    with pytest.raises(ValueError, match="not a peft model"):
        score(llama, PROMPTS, COMPLETIONS, adapter=False)
    adapted = add_lora(llama, LoraSettings(rank=4, dropout=0.0))
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)  # peft starts B at zero: make the adapter change the model
    on = score(adapted, PROMPTS, COMPLETIONS)
    off = score(adapted, PROMPTS, COMPLETIONS, adapter=False, entropy=True)
    torch.testing.assert_close(off.logprobs, base.logprobs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(off.entropy, base.entropy, rtol=1e-5, atol=1e-6)
    assert (on.logprobs - base.logprobs).abs().max() > 1e-2
    assert not on.logprobs.requires_grad

    scores = score(adapted, PROMPTS, COMPLETIONS, grad=True, entropy=True)
    (scores.mean_nll() + scores.entropy.sum()).backward()
    lora = [p for name, p in adapted.named_parameters() if "lora_" in name]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


@pytest.mark.slow
def test_smollm2_scores_its_own_tokens_in_a_ragged_batch():
    loaded = load_causal_lm("smollm2-135m", device="cpu", dtype="fp32")
    tokenizer = loaded.tokenizer
    prompts = [tokenizer("Natalia sold clips to 48 of her friends.").input_ids, tokenizer("2 + 3 =").input_ids]
    completions = [tokenizer(" She sold half as many in May.").input_ids, tokenizer(" 5").input_ids]
    scores = score(loaded.model, prompts, completions, entropy=True, heads=[(3, 1), (20, 5)])
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        torch.testing.assert_close(scores.logprobs[row, :len(completion)],
                                   own_logprobs(loaded.model, prompt, completion), rtol=1e-4, atol=1e-4)
    assert scores.logprobs[1, 0] > -3  # " 5" after "2 + 3 =" is likely for a real model
    assert ((scores.attention > 0) & (scores.attention <= 1))[scores.mask[:, None].expand_as(scores.attention)].all()
