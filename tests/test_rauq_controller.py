"""RAUQController on the tiny random llama: greedy at theta = +inf, rollback and thought at a known trigger,
cooldown and stability window, rerank, and the running score against the offline one."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_lab.errors import UserError
from lightning_lab.models.loading import LoadedModel
from lightning_lab.rauq.controller import ControllerConfig, RAUQController
from lightning_lab.rauq.heads import HeadsFile
from lightning_lab.rauq.scoring import completion_attention, score_sequence
from lightning_lab.sampling.sampler import Sampler
from conftest import build_tiny_tokenizer

PROMPT = "What is 2 + 3?"


@pytest.fixture(scope="module")
def loaded():
    """A tiny random llama whose greedy text varies (weights drawn at std 0.5, untied output layer), so
    that entropies, margins and candidates differ from token to token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=False, initializer_range=0.5)).eval()
    return LoadedModel(model, tokenizer, "tiny-varied", torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def sampler(loaded):
    return Sampler(loaded)


@pytest.fixture(scope="module")
def heads(loaded):
    return HeadsFile({0: 1, 1: 3}, [0, 1], 0.5, loaded.spec, 2, 4, "paper", "sha256:test", 1)


@pytest.fixture(scope="module")
def greedy(sampler):
    out = sampler.generate([PROMPT], greedy=True, max_new_tokens=24, entropy=True, logprobs=True)
    return out.completions[0][0]


def controller(loaded, sampler, heads, threshold=math.inf, **overrides):
    config = ControllerConfig(**{"max_new_tokens": 24, **overrides})
    return RAUQController(loaded, config, heads, threshold, sampler=sampler)


def test_infinite_theta_is_exactly_greedy(loaded, sampler, heads, greedy):
    out = controller(loaded, sampler, heads).generate(PROMPT)
    assert out.token_ids == greedy.token_ids and out.completion == greedy.text
    assert out.trigger_events == [] and out.extra_tokens == 0
    assert len(out.rauq_scores) == len(greedy.token_ids) and all(isinstance(s, float) for s in out.rauq_scores)
    prompt_entries = [entry for entry in out.trace if entry["kind"] == "prompt"]
    assert prompt_entries and all(entry["rauq"] is None for entry in prompt_entries)


def test_running_score_at_the_last_token_equals_the_offline_score(loaded, sampler, heads, greedy):
    out = controller(loaded, sampler, heads).generate(PROMPT)
    (logprobs, attention), = completion_attention(loaded.model, [sampler.encode(PROMPT)], [out.token_ids])
    offline = score_sequence(logprobs, attention, heads.alpha, heads=heads.heads)
    assert out.rauq_scores[-1] == pytest.approx(offline.score, rel=1e-4)


def test_a_trigger_at_a_known_position_rolls_back_and_inserts_the_thought_once(loaded, sampler, heads, greedy):
    # fire on the entropy of the most uncertain greedy token after the stability window
    window = 4
    position = max(range(window, len(greedy.entropies)), key=lambda t: greedy.entropies[t])
    theta = greedy.entropies[position] - 1e-4
    assert all(e <= theta for e in greedy.entropies[window:position])
    out = controller(loaded, sampler, heads, theta, trigger="entropy", rollback=2, max_repairs=1,
                     stability_window=window, cot_open=" Let me think:", cot_length=5).generate(PROMPT)
    assert [(e["position"], e["rolled_back"]) for e in out.trigger_events] == [(position, 2)]
    kept = position + 1 - 2
    assert out.token_ids[:kept] == greedy.token_ids[:kept]
    assert out.completion.count(" Let me think:") == 1
    assert out.repairs[0]["prefix"] == sampler.tokenizer.decode(greedy.token_ids[:kept], skip_special_tokens=True)
    thought = [entry for entry in out.trace if entry["kind"] == "thought" and not entry["rolled_back"]]
    assert thought and all(entry["rauq"] is None and entry["signal"] is None for entry in thought)
    assert [entry["token_id"] for entry in out.trace if entry["rolled_back"]] == greedy.token_ids[kept:position + 1]
    # scores: a value for every answer token of the completion, None for the thought's
    kinds = [entry["kind"] for entry in out.trace if entry["kind"] != "prompt" and not entry["rolled_back"]]
    assert [score is None for score in out.rauq_scores] == [kind == "thought" for kind in kinds]
    assert out.extra_tokens == 2 + out.stats["thought_tokens"]


def test_cooldown_and_stability_window_suppress_retriggers(loaded, sampler, heads):
    out = controller(loaded, sampler, heads, -1.0, trigger="margin", repair="none", stability_window=3, cooldown=5,
                     max_repairs=100).generate(PROMPT)
    assert [event["position"] for event in out.trigger_events] == [3, 9, 15, 21]
    out = controller(loaded, sampler, heads, -1.0, trigger="margin", repair="none", stability_window=0, cooldown=0,
                     max_repairs=3).generate(PROMPT)
    assert [event["position"] for event in out.trigger_events] == [0, 1, 2]


def test_rerank_keeps_the_best_rolled_out_candidate(loaded, sampler, heads, greedy):
    out = controller(loaded, sampler, heads, -1.0, trigger="margin", repair="rerank", rollback=1, stability_window=5,
                     max_repairs=1, rerank_horizon=3).generate(PROMPT)
    assert [e["position"] for e in out.trigger_events] == [5]
    assert out.token_ids[:5] == greedy.token_ids[:5]
    # the kept sixth token is the candidate whose rollout has the best mean log-prob
    prompt_ids = sampler.encode(PROMPT)
    logits = loaded.model(torch.tensor([prompt_ids + greedy.token_ids[:5]])).logits[0, -1]
    means = {}
    for candidate in logits.topk(3).indices.tolist():
        rollout = sampler.generate([prompt_ids + greedy.token_ids[:5] + [candidate]], greedy=True, max_new_tokens=3,
                                   logprobs=True).completions[0][0]
        first = torch.log_softmax(logits, -1)[candidate].item()
        means[candidate] = (first + sum(rollout.logprobs)) / (1 + len(rollout.logprobs))
    assert out.token_ids[5] == max(means, key=means.get)


def test_bad_configs_are_refused(loaded, sampler):
    with pytest.raises(UserError, match="trigger: 'attention' is not one of rauq, entropy, margin"):
        ControllerConfig(trigger="attention")
    with pytest.raises(UserError, match="need a heads file"):
        RAUQController(loaded, ControllerConfig(), None, 1.0, sampler=sampler)


def test_anchor_rollback_goes_back_to_the_last_sentence_or_line_end(loaded, sampler, heads):
    from lightning_lab.rauq.controller import _Token

    anchor = controller(loaded, sampler, heads, rollback_mode="anchor")
    tokens = [_Token(1, text, "answer") for text in ["It", " is", " 5.", " So", " the", "\n", " answer", " is"]]
    assert anchor._rollback_count(tokens, 0) == 2  # back to just after "\n"
    assert anchor._rollback_count(tokens, 6) == 2  # never before the current stretch of answer
    assert anchor._rollback_count(tokens[:5], 0) == 2  # after " 5."
    assert anchor._rollback_count(tokens[:2], 0) == 2  # no boundary: the whole stretch
    fixed = controller(loaded, sampler, heads, rollback=3)
    assert fixed._rollback_count(tokens, 0) == 3 and fixed._rollback_count(tokens, 6) == 2


@pytest.mark.parametrize("trigger,repair", [("entropy", "cot"), ("rauq", "cot"), ("margin", "rerank")])
def test_a_batch_of_four_gives_what_each_gives_alone(loaded, sampler, heads, trigger, repair):
    """Four prompts of different lengths decoded together, each row triggering, rolling back and inserting on
    its own: the same tokens, triggers, thoughts and scores as the controller on each prompt alone (fp32)."""
    prompts = ["What is 2 + 3?", "Natalia sold clips to 48 of her friends.", "The answer is 72.", "question answer"]
    greedy = controller(loaded, sampler, heads, math.inf, trigger=trigger)
    signals = sorted(entry["signal"] for prompt in prompts for entry in greedy.generate(prompt).trace
                     if entry["kind"] == "answer")
    quarter = len(signals) * 3 // 4  # a quarter of the tokens are above theta, none within rounding of it
    theta = (signals[quarter] + signals[quarter + 1]) / 2
    each = controller(loaded, sampler, heads, theta, trigger=trigger, repair=repair, stability_window=3, cooldown=4,
                      max_repairs=2, cot_length=5)
    expected = [each.generate(prompt) for prompt in prompts]
    assert sum(bool(out.trigger_events) for out in expected) >= 2  # the batch really has rows that trigger
    assert sum(e["rolled_back"] for out in expected for e in out.trigger_events) >= 2  # and roll back
    batched = each.generate_batch(prompts)
    for one, other in zip(expected, batched):
        assert other.token_ids == one.token_ids and other.completion == one.completion
        assert [(e["position"], e["rolled_back"]) for e in other.trigger_events] == [
            (e["position"], e["rolled_back"]) for e in one.trigger_events]
        assert [e["score"] for e in other.trigger_events] == pytest.approx(
            [e["score"] for e in one.trigger_events], rel=1e-4)
        assert other.repairs == one.repairs and other.extra_tokens == one.extra_tokens
        assert [entry["token_id"] for entry in other.trace] == [entry["token_id"] for entry in one.trace]
        assert [score is None for score in other.rauq_scores] == [score is None for score in one.rauq_scores]
        assert [s for s in other.rauq_scores if s is not None] == pytest.approx(
            [s for s in one.rauq_scores if s is not None], rel=1e-4)


def test_infinite_theta_in_a_batch_is_greedy(loaded, sampler, heads):
    prompts = ["What is 2 + 3?", "Natalia sold clips to 48 of her friends.", "question answer"]
    expected = sampler.generate(prompts, greedy=True, max_new_tokens=24, batch_size=1).completions
    batched = controller(loaded, sampler, heads).generate_batch(prompts)
    assert [out.token_ids for out in batched] == [completions[0].token_ids for completions in expected]
    assert all(out.trigger_events == [] and out.extra_tokens == 0 for out in batched)
