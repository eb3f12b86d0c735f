"""Thought tokens: added with initialised embeddings, round-trip through save/load, refused when foreign."""

import pytest
import torch
from transformers import AutoTokenizer

from lightning_lab.errors import UserError
from lightning_lab.models.loading import load_causal_lm
from lightning_lab.quietstar.tokens import END_THOUGHT, START_THOUGHT, add_thought_tokens, strip_thoughts


@pytest.mark.parametrize("model_dir", ["tiny_llama_dir", "tiny_lab_gpt_dir"])
def test_added_tokens_round_trip_through_save_and_load(model_dir, request, tmp_path):
    loaded = load_causal_lm(request.getfixturevalue(model_dir), device="cpu", dtype="fp32")
    model, tokenizer = loaded.model, loaded.tokenizer
    rows_before = model.get_input_embeddings().num_embeddings
    dash = tokenizer("---", add_special_tokens=False)["input_ids"]
    expected_row = model.get_input_embeddings().weight[dash].mean(dim=0).detach().clone()

    thoughts = add_thought_tokens(model, tokenizer)
    assert (thoughts.start_id, thoughts.end_id) == (rows_before, rows_before + 1)
    assert model.get_input_embeddings().num_embeddings == rows_before + 2
    assert model.get_output_embeddings().weight.shape[0] == rows_before + 2
    for token_id in (thoughts.start_id, thoughts.end_id):
        assert torch.equal(model.get_input_embeddings().weight[token_id], expected_row)
    # one token each, never split, also inside running text
    ids = tokenizer(f"a{START_THOUGHT}b{END_THOUGHT}c", add_special_tokens=False)["input_ids"]
    assert thoughts.start_id in ids and thoughts.end_id in ids and len(ids) == 5

    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_causal_lm(tmp_path, device="cpu", dtype="fp32")
    again = add_thought_tokens(reloaded.model, reloaded.tokenizer)  # finds them: nothing added
    assert again == thoughts
    assert reloaded.model.get_input_embeddings().num_embeddings == rows_before + 2
    assert torch.equal(reloaded.model.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_tokenizer_with_thought_tokens_at_other_ids_is_refused(tiny_llama_dir):
    loaded = load_causal_lm(tiny_llama_dir, device="cpu", dtype="fp32")
    foreign = AutoTokenizer.from_pretrained(tiny_llama_dir)
    foreign.add_tokens(["<|pad1|>", END_THOUGHT, START_THOUGHT], special_tokens=True)  # other ids
    with pytest.raises(UserError, match="already has thought tokens.*config.thought_token_ids"):
        add_thought_tokens(loaded.model, foreign)
    # and a model that records ids the tokenizer does not have at those places
    add_thought_tokens(loaded.model, loaded.tokenizer)
    with pytest.raises(UserError, match="already has thought tokens"):
        add_thought_tokens(loaded.model, foreign)


def test_markers_reserved_by_the_lab_tokenizer_start_as_new_rows_on_a_lab_gpt(tiny_lab_gpt_dir):
    loaded = load_causal_lm(tiny_lab_gpt_dir, device="cpu", dtype="fp32")
    model, tokenizer = loaded.model, loaded.tokenizer
    tokenizer.add_tokens([START_THOUGHT, END_THOUGHT], special_tokens=True)  # as data/tokenizer.py reserves them
    model.resize_token_embeddings(len(tokenizer))  # pretrained with them: rows its corpus never reached
    dash = tokenizer("---", add_special_tokens=False)["input_ids"]
    thoughts = add_thought_tokens(model, tokenizer)
    assert model.config.thought_token_ids == {START_THOUGHT: thoughts.start_id, END_THOUGHT: thoughts.end_id}
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)  # nothing added
    expected = model.get_input_embeddings().weight[dash].mean(dim=0)
    assert torch.equal(model.get_input_embeddings().weight[thoughts.start_id], expected)
    assert add_thought_tokens(model, tokenizer) == thoughts  # recorded now: found, unchanged


def test_bad_marker_strings_are_refused(tiny_llama_dir):
    loaded = load_causal_lm(tiny_llama_dir, device="cpu", dtype="fp32")
    with pytest.raises(UserError, match="two different"):
        add_thought_tokens(loaded.model, loaded.tokenizer, start="<t>", end="<t>")


def test_strip_thoughts_removes_every_thought_and_keeps_the_rest(tiny_llama_dir):
    loaded = load_causal_lm(tiny_llama_dir, device="cpu", dtype="fp32")
    thoughts = add_thought_tokens(loaded.model, loaded.tokenizer)
    s, e = thoughts.start_id, thoughts.end_id
    assert strip_thoughts([1, s, 2, 3, e, 4, s, 5, e, 6], thoughts) == [1, 4, 6]
    assert strip_thoughts([1, 2, s, 3, 4], thoughts) == [1, 2]  # a thought still open at the end
    assert strip_thoughts([1, e, 2], thoughts) == [1, 2]


@pytest.mark.slow
def test_thought_tokens_on_smollm2(tmp_path):
    loaded = load_causal_lm("smollm2-135m", device="cpu", dtype="fp32")
    vocab = loaded.model.get_input_embeddings().num_embeddings
    thoughts = add_thought_tokens(loaded.model, loaded.tokenizer)
    assert {thoughts.start_id, thoughts.end_id} == {vocab, vocab + 1}
    # tied output layer: the output rows are the input rows
    assert torch.equal(loaded.model.get_output_embeddings().weight[vocab], loaded.model.get_input_embeddings().weight[vocab])
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    reloaded = load_causal_lm(tmp_path, device="cpu", dtype="fp32")
    assert add_thought_tokens(reloaded.model, reloaded.tokenizer) == thoughts
