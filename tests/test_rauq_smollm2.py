"""RAUQ on the real SmolLM2-135M-Instruct: the reference's numbers, and the controller against greedy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_lab.models.loading import load_causal_lm
from lightning_lab.rauq.controller import ControllerConfig, RAUQController
from lightning_lab.rauq.heads import HeadsFile
from lightning_lab.rauq.scoring import completion_attention, middle_layers, score_sequence
from lightning_lab.sampling.sampler import Sampler
from test_rauq_scoring import reference_rauq

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded():
    return load_causal_lm("smollm2-135m", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def question():
    return ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?")


def test_lm_polygraph_convention_reproduces_the_reference_on_smollm2(loaded, question):
    """generate's step attentions through the reference's indexing (attention_all, diagonal offset -1) give the
    same RAUQ as our one teacher-forced pass in the lm-polygraph convention."""
    model, steps = loaded.model, 12
    sampler = Sampler(loaded)
    prompt = torch.tensor([sampler.encode(question)])
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                 output_attentions=True, output_scores=True, return_dict_in_generate=True)
    finally:
        model.set_attn_implementation(previous)
    sequence = out.sequences[0, prompt.shape[1]:]
    log_likelihoods = [float(torch.log_softmax(out.scores[j][0].float(), -1)[sequence[j]]) for j in range(steps)]
    attention_all = np.zeros((layers * heads, steps, steps))
    for j in range(1, steps):
        attention_all[:, j, :j] = torch.vstack([out.attentions[j][layer][0][head][0][-j:]
                                                for layer in range(layers) for head in range(heads)]).numpy()
    expected = reference_rauq(attention_all, log_likelihoods, layers, heads, alpha=0.5)
    (logprobs, attention), = completion_attention(model, prompt.tolist(), [sequence.tolist()], "lm-polygraph")
    ours = score_sequence(logprobs, attention, 0.5, convention="lm-polygraph")
    assert sorted(ours.layer_scores) == middle_layers(30) == list(range(10, 21))
    assert ours.score == pytest.approx(expected, rel=1e-4)


def test_controller_at_infinite_theta_is_greedy_and_its_running_score_is_the_offline_one(loaded, question):
    sampler = Sampler(loaded)
    greedy = sampler.generate([question], greedy=True, max_new_tokens=24).completions[0][0]
    heads = HeadsFile({layer: layer % 9 for layer in range(10, 21)}, list(range(10, 21)), 0.5, loaded.spec, 30, 9,
                      "paper", "sha256:test", 0)
    controller = RAUQController(loaded, ControllerConfig(max_new_tokens=24), heads, math.inf, sampler=sampler)
    out = controller.generate(question)
    assert out.token_ids == greedy.token_ids and out.trigger_events == []
    (logprobs, attention), = completion_attention(loaded.model, [sampler.encode(question)], [out.token_ids])
    assert out.rauq_scores[-1] == pytest.approx(score_sequence(logprobs, attention, 0.5, heads=heads.heads).score,
                                                rel=1e-3)


def test_a_batch_of_four_triggering_problems_gives_what_each_gives_alone(loaded, question):
    """fp32, the rauq trigger at a theta most problems cross, cot repair: the batch's rows trigger, roll back and
    think each on its own, and each gives the tokens, trigger positions and thoughts it gives alone."""
    sampler = Sampler(loaded)
    heads = HeadsFile({layer: layer % 9 for layer in range(10, 21)}, list(range(10, 21)), 0.5, loaded.spec, 30, 9,
                      "paper", "sha256:test", 0)
    questions = [question, "What is 17 times 23?", "A train travels 60 miles in 1.5 hours. What is its speed?",
                 "Tom has 3 apples and buys 5 more. How many apples does he have?"]
    config = ControllerConfig(max_new_tokens=20, stability_window=3, cooldown=4, max_repairs=2, cot_length=6)
    greedy = RAUQController(loaded, config, heads, math.inf, sampler=sampler)
    scores = sorted(s for q in questions for s in greedy.generate(q).rauq_scores)
    quarter = len(scores) * 3 // 4
    controller = RAUQController(loaded, config, heads, (scores[quarter] + scores[quarter + 1]) / 2, sampler=sampler)
    alone = [controller.generate(q) for q in questions]
    assert sum(bool(out.trigger_events) for out in alone) >= 2
    for one, other in zip(alone, controller.generate_batch(questions)):
        assert other.token_ids == one.token_ids and other.repairs == one.repairs
        assert [e["position"] for e in other.trigger_events] == [e["position"] for e in one.trigger_events]
