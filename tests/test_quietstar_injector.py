"""ThoughtInjector: thoughts go where and as often as asked, stay in the model's context, never in the text."""

import math

import pytest
import torch

from lightning_lab.errors import UserError
from lightning_lab.models.loading import load_causal_lm
from lightning_lab.quietstar.injector import InjectorConfig, ThoughtInjector, ThoughtTrace
from lightning_lab.quietstar.quality import gold_ids, trace_quality
from lightning_lab.quietstar.tokens import add_thought_tokens, strip_thoughts
from lightning_lab.sampling.sampler import Sampler


@pytest.fixture(scope="module")
def thinking(tiny_llama_dir):
    loaded = load_causal_lm(tiny_llama_dir, device="cpu", dtype="fp32")
    thoughts = add_thought_tokens(loaded.model, loaded.tokenizer)
    return Sampler(loaded), thoughts


def test_hidden_thoughts_never_reach_the_text(thinking):
    sampler, thoughts = thinking
    # every position is a candidate (the empty boundary ends every piece) and every candidate gets a thought
    config = InjectorConfig(thought_probability=1.0, max_thought_length=4, boundaries=[""])
    trace = ThoughtInjector(sampler, thoughts, config).generate("What is 2 + 3?", max_new_tokens=12, seed=3)
    assert len(trace.thoughts) >= 2
    assert trace.visible_ids == strip_thoughts(trace.token_ids, thoughts)
    assert trace.text == sampler.tokenizer.decode(trace.visible_ids, skip_special_tokens=True)
    assert thoughts.start not in trace.text and thoughts.end not in trace.text
    # the model saw each thought, markers included, at its recorded place
    rebuilt, done = [], 0
    for thought in trace.thoughts:
        rebuilt += trace.visible_ids[done:thought.position] + [thoughts.start_id] + thought.token_ids + [thoughts.end_id]
        done = thought.position
        assert len(thought.token_ids) <= 4
    assert rebuilt + trace.visible_ids[done:] == trace.token_ids

    shown = ThoughtInjector(sampler, thoughts, InjectorConfig(**{**vars(config), "show_thoughts": True}))
    shown_trace = shown.generate("What is 2 + 3?", max_new_tokens=12, seed=3)
    assert shown_trace.token_ids == trace.token_ids  # same draws; only what is shown differs
    assert thoughts.start in shown_trace.text and thoughts.end in shown_trace.text


def test_no_thoughts_is_plain_greedy_decoding(thinking):
    sampler, thoughts = thinking
    trace = ThoughtInjector(sampler, thoughts, InjectorConfig(thought_probability=0.0)).generate(
        "What is 2 + 3?", max_new_tokens=16, greedy=True)
    plain = sampler.generate("What is 2 + 3?", max_new_tokens=16, greedy=True).completions[0][0]
    assert trace.thoughts == [] and trace.token_ids == plain.token_ids and trace.text == plain.text


def test_thought_after_the_question_changes_the_answer_context(thinking):
    sampler, thoughts = thinking
    config = InjectorConfig(thought_probability=1.0, max_thought_length=6, boundaries=[])
    injector = ThoughtInjector(sampler, thoughts, config)
    first = injector.generate("What is 2 + 3?", max_new_tokens=8, greedy=True, seed=1)
    # injected only after the question (no boundary can match); the random model may start thoughts itself
    assert [t.position for t in first.thoughts if t.injected] == [0]
    assert first.token_ids[0] == thoughts.start_id
    assert injector.generate("What is 2 + 3?", max_new_tokens=8, greedy=True, seed=1) == first  # reproducible
    thought = first.thoughts[0]
    assert 1 <= len(thought.token_ids) + (not thought.closed_by_model) and len(thought.token_ids) <= 6


def test_boundaries_skip_decimal_points(thinking):
    sampler, thoughts = thinking
    injector = ThoughtInjector(sampler, thoughts)
    ids = sampler.tokenizer("It is 3.", add_special_tokens=False)["input_ids"]
    assert not injector._is_boundary(ids, ".")
    ids = sampler.tokenizer("It is three.", add_special_tokens=False)["input_ids"]
    assert injector._is_boundary(ids, ".")


def test_bad_injector_settings_are_user_errors():
    with pytest.raises(UserError, match="thought_probability"):
        InjectorConfig(thought_probability=1.5)
    with pytest.raises(UserError, match="max_thought_length"):
        InjectorConfig(max_thought_length=0)


def gold_loglik(model, context: list[int], gold: list[int]) -> float:
    """Mean log p(gold token | context, earlier gold tokens), from one plain forward pass."""
    ids = torch.tensor([context + gold])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(context) - 1 + j, token]) for j, token in enumerate(gold)) / len(gold)


def test_trace_quality_matches_hand_computed_likelihoods(thinking):
    sampler, thoughts = thinking
    model, tokenizer = sampler.model, sampler.tokenizer
    prompt = tokenizer("What is 2 + 3?", add_special_tokens=False)["input_ids"]
    s, e = thoughts.start_id, thoughts.end_id
    # answer "It is" + thought A, then " five" + thought B, then "."
    answer = [tokenizer(piece, add_special_tokens=False)["input_ids"] for piece in ("It is", " five", ".")]
    thought_a, thought_b = [40, 41, 42], [43]
    token_ids = answer[0] + [s] + thought_a + [e] + answer[1] + [s] + thought_b + [e] + answer[2]
    visible = answer[0] + answer[1] + answer[2]
    trace = ThoughtTrace(prompt, token_ids, visible, [], "", "length")
    gold = gold_ids(tokenizer, "5")
    assert gold == tokenizer("\nThe answer is 5.", add_special_tokens=False)["input_ids"]

    quality = trace_quality(model, trace, thoughts, gold)
    with torch.no_grad():
        before_a = prompt + answer[0]
        before_b = before_a + [s] + thought_a + [e] + answer[1]
        expected = [gold_loglik(model, before_a + [s] + thought_a + [e], gold) - gold_loglik(model, before_a, gold),
                    gold_loglik(model, before_b + [s] + thought_b + [e], gold) - gold_loglik(model, before_b, gold)]
    assert quality.per_thought == pytest.approx(expected, abs=1e-4)
    assert quality.mean == pytest.approx(sum(expected) / 2, abs=1e-4)
    assert trace_quality(model, ThoughtTrace(prompt, visible, visible, [], "", "length"), thoughts, gold).mean is None


@pytest.mark.slow
def test_thoughts_on_smollm2_stay_hidden_and_are_scored(gsm8k_path):
    from lightning_lab.data.benchmarks import load_benchmark

    loaded = load_causal_lm("smollm2-135m", device="cpu", dtype="fp32")
    thoughts = add_thought_tokens(loaded.model, loaded.tokenizer)
    sampler = Sampler(loaded)
    sample = load_benchmark(gsm8k_path, split="dev", limit=1)[0]
    config = InjectorConfig(thought_probability=1.0, max_thought_length=8, thought_temperature=0.8)
    trace = ThoughtInjector(sampler, thoughts, config).generate(sample.prompt, max_new_tokens=40, temperature=0.7,
                                                                seed=0)
    assert trace.thoughts and trace.thoughts[0].position == 0 and trace.thoughts[0].injected
    assert trace.visible_ids == strip_thoughts(trace.token_ids, thoughts)
    assert trace.text == loaded.tokenizer.decode(trace.visible_ids, skip_special_tokens=True)
    assert all(thought.text not in trace.text for thought in trace.thoughts if len(thought.text) > 12)
    quality = trace_quality(loaded.model, trace, thoughts, gold_ids(loaded.tokenizer, sample.reference))
    assert len(quality.per_thought) == len(trace.thoughts) and math.isfinite(quality.mean)
