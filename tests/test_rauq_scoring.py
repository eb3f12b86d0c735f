"""RAUQ's pure parts: the recurrence, both conventions, head selection, the running score, heads and theta files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lightning_lab.errors import UserError
from lightning_lab.rauq.heads import HeadSelection, HeadsFile, load_heads
from lightning_lab.rauq.scoring import (RunningScore, choose_heads, completion_attention, confidences, middle_layers,
                                        previous_token_attention, score_sequence, uncertainties)
from lightning_lab.rauq.threshold import Threshold, fit_threshold, load_threshold


def causal_matrix(size: int, seed: int) -> torch.Tensor:
    """A random causal attention matrix (rows sum to 1 over keys 0..i)."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(size, size, generator=generator) * 4
    scores = scores.masked_fill(torch.ones(size, size).triu(1).bool(), float("-inf"))
    return scores.softmax(-1)


def test_middle_layers_follow_the_reference():
    assert middle_layers(30) == list(range(10, 21))  # SmolLM2-135M: range(10, ceil(20) + 1)
    assert middle_layers(6) == [2, 3, 4]
    assert middle_layers(32) == list(range(10, 23))  # ceil(21.33) + 1 = 23
    assert middle_layers(2) == [0, 1]  # the reference's range(0, 3) reaches past a 2-layer model


def test_conventions_read_the_sub_diagonal_or_the_diagonal_one_step_back():
    # 1 layer, 1 head; prompt of 2 tokens, completion of 3 (positions 2, 3, 4)
    matrix = causal_matrix(5, seed=0)[None, None]
    paper = previous_token_attention(matrix[..., 2:, :], prompt_length=2, convention="paper")[0, 0]
    polygraph = previous_token_attention(matrix[..., 2:, :], prompt_length=2, convention="lm-polygraph")[0, 0]
    a = matrix[0, 0].tolist()
    assert paper.tolist() == pytest.approx([a[2][1], a[3][2], a[4][3]])
    assert math.isnan(polygraph[0]) and polygraph[1:].tolist() == pytest.approx([a[2][2], a[3][3]])


def test_recurrence_and_per_layer_scores_match_hand_computed_values():
    alpha = 0.5
    logprobs = torch.tensor([math.log(0.8), math.log(0.5), math.log(0.9)])
    attention = torch.tensor([[float("nan"), 0.6, 0.2]])  # one head: a_1 = 0.6, a_2 = 0.2
    c = confidences(logprobs, attention, alpha)[0].tolist()
    c0 = 0.8
    c1 = 0.5 * 0.5 + 0.5 * 0.6 * c0  # 0.49
    c2 = 0.5 * 0.9 + 0.5 * 0.2 * c1  # 0.499
    assert c == pytest.approx([c0, c1, c2])
    expected = -(math.log(c0) + math.log(c1) + math.log(c2)) / 3
    # two layers x two heads; layer 0 prefers head 1 (mean 0.7 > 0.4), layer 1 head 0
    full = torch.tensor([[[0.0, 0.3, 0.5], [0.0, 0.6, 0.8]],
                         [[0.0, 0.6, 0.2], [0.0, 0.1, 0.1]]], dtype=torch.float64)
    result = score_sequence(logprobs, full, alpha, layers=[0, 1])
    assert result.heads == {0: 1, 1: 0}
    assert result.layer_scores[1] == pytest.approx(expected)
    c_layer0 = [0.8, 0.25 + 0.5 * 0.6 * 0.8, 0.45 + 0.5 * 0.8 * (0.25 + 0.24)]
    assert result.layer_scores[0] == pytest.approx(-sum(math.log(c) for c in c_layer0) / 3)
    assert result.score == max(result.layer_scores.values())
    polygraph = score_sequence(logprobs, full, alpha, convention="lm-polygraph", layers=[0, 1])
    assert polygraph.layer_scores[1] == pytest.approx(1 + expected)  # the reference's 1 - mean log c
    fixed = score_sequence(logprobs, full, alpha, heads={0: 0, 1: 0})
    assert fixed.heads == {0: 0, 1: 0} and fixed.layer_scores[1] == pytest.approx(expected)


def test_choose_heads_ignores_the_first_token_and_ties_to_the_first_head():
    attention = torch.tensor([[[9.0, 0.1, 0.1], [0.0, 0.2, 0.3]]])
    assert choose_heads(attention).tolist() == [1]
    assert choose_heads(torch.ones(3, 4, 1)).tolist() == [0, 0, 0]


def test_running_score_at_the_last_token_equals_the_offline_score():
    generator = torch.Generator().manual_seed(1)
    layers, heads, tokens = 4, 3, 12
    attention = torch.rand(layers, heads, tokens, generator=generator, dtype=torch.float64)
    logprobs = torch.rand(tokens, generator=generator, dtype=torch.float64).clamp(min=0.05).log()
    fixed = {0: 2, 1: 0, 2: 1, 3: 1}
    offline = score_sequence(logprobs, attention, 0.3, heads=fixed)
    running = RunningScore(0.3, num_layers=4)
    chosen = [attention[layer, head] for layer, head in fixed.items()]
    trace = [running.push(float(logprobs[t]), [float(a[t]) for a in chosen]) for t in range(tokens)]
    assert trace[-1] == pytest.approx(offline.score, rel=1e-12)
    # each prefix's running score is the offline score of that prefix
    prefix = score_sequence(logprobs[:5], attention[..., :5], 0.3, heads=fixed)
    assert trace[4] == pytest.approx(prefix.score, rel=1e-12)
    running.pop(7)  # a rollback to 5 tokens
    assert len(running) == 5 and running.score == pytest.approx(prefix.score, rel=1e-12)
    assert running.push(float(logprobs[5]), [float(a[5]) for a in chosen]) == pytest.approx(trace[5], rel=1e-12)


def test_restart_after_a_thought_starts_a_new_recurrence():
    running = RunningScore(0.5, num_layers=1)
    running.push(math.log(0.5), None)
    score = running.push(math.log(0.25), [0.9], restart=True)
    assert running.confidence[-1] == [0.25]
    assert score == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2)


def reference_rauq(attention_all: np.ndarray, log_likelihoods: list[float], num_layers: int, num_heads: int,
                   alpha: float) -> float:
    """LM-Polygraph's RAUQ.__call__ for one sequence, written out step by step from its source
    (estimators/rauq.py at IINemo/lm-polygraph efea882): reshape, diagonal offset -1, head = argmax of the
    mean, the recurrence with attentions[layer, head, j - 1], 1 - mean log c, max over layers."""
    layers = list(range(num_layers // 3, int(np.ceil(num_layers / 3 * 2) + 1)))
    reshaped = attention_all.reshape(num_layers, num_heads, attention_all.shape[-2], attention_all.shape[-1])
    previous = np.diagonal(reshaped, offset=-1, axis1=2, axis2=3)
    scores = []
    for layer in layers:
        head = previous[layer].mean(-1).argmax()
        c = [np.exp(log_likelihoods[0])]
        for j in range(1, len(log_likelihoods)):
            c.append(alpha * np.exp(log_likelihoods[j]) + (1 - alpha) * previous[layer, head, j - 1] * c[-1])
        scores.append(1 - np.log(c).mean())
    return float(np.max(scores))


def test_lm_polygraph_convention_reproduces_the_reference_on_generate_step_attentions():
    """The reference's stat calculator builds ``attention_all`` from ``generate(output_attentions=True)``; do
    the same on a 6-layer random llama and compare with our full-pass reading."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         attn_implementation="eager")).eval()
    prompt = torch.tensor([[5, 9, 13, 2, 40]])
    prompt_length = prompt.shape[1]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=9, min_new_tokens=9, do_sample=False, output_attentions=True,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
        sequence = out.sequences[0, prompt_length:]
        steps = len(sequence)
        log_likelihoods = [float(torch.log_softmax(out.scores[j][0].float(), -1)[sequence[j]]) for j in range(steps)]
        # greedy_probs.py: attn_mask[:, j, :j] = the last j entries of step j's row, layer-major then head
        attention_all = np.zeros((6 * 4, steps, steps))
        for j in range(1, steps):
            stacked = torch.vstack([out.attentions[j][layer][0][head][0][-j:]
                                    for layer in range(6) for head in range(4)])
            attention_all[:, j, :j] = stacked.numpy()
        expected = reference_rauq(attention_all, log_likelihoods, 6, 4, alpha=0.2)

    # ours: one teacher-forced pass of the shared scoring function over prompt + completion
    (logprobs, attention), = completion_attention(model, prompt.tolist(), [sequence.tolist()], "lm-polygraph")
    ours = score_sequence(logprobs, attention, 0.2, convention="lm-polygraph")
    assert sorted(ours.layer_scores) == [2, 3, 4]
    assert ours.score == pytest.approx(expected, rel=1e-5)
    # the paper's reading is the sub-diagonal of the same pass: one query later than the reference's
    (_, paper), = completion_attention(model, prompt.tolist(), [sequence.tolist()], "paper")
    assert not torch.allclose(paper[..., 1:], attention[..., 1:])
    with torch.no_grad():
        full = model(out.sequences, output_attentions=True).attentions
    assert paper[3, 2, 4] == pytest.approx(float(full[3][0, 2, prompt_length + 4, prompt_length + 3]), rel=1e-5)
    assert attention[3, 2, 4] == pytest.approx(float(full[3][0, 2, prompt_length + 3, prompt_length + 3]), rel=1e-5)
    # in a ragged batch (a longer row pads this one) each row reads its own positions
    batch = completion_attention(model, [[7, 7, 7, 7, 7, 7, 7, 1], prompt[0].tolist()],
                                 [[3, 4], sequence.tolist()], "lm-polygraph")
    assert torch.allclose(batch[1][1][..., 1:], attention[..., 1:], atol=1e-6)
    # the sequence-level uncertainties of the same completion, from one pass
    values = uncertainties(model, prompt[0].tolist(), sequence.tolist(), 0.2, heads={2: 0, 3: 1})
    assert values["rauq_lm_polygraph"] == pytest.approx(expected, rel=1e-5)
    assert values["rauq_paper"] == pytest.approx(score_sequence(logprobs, paper, 0.2).score, rel=1e-6)
    assert values["rauq_fixed"] == pytest.approx(score_sequence(logprobs, paper, 0.2, heads={2: 0, 3: 1}).score)
    assert values["msp"] == pytest.approx(-float(logprobs.sum()), rel=1e-5)
    assert values["perplexity"] == pytest.approx(math.exp(-float(logprobs.mean())), rel=1e-5)


def test_head_selection_pools_completion_tokens():
    selection = HeadSelection(num_layers=2, num_heads=2)
    selection.add(torch.tensor([[[0.0, 0.9], [0.0, 0.1]], [[0.0, 0.1], [0.0, 0.2]]]))
    selection.add(torch.tensor([[[5.0, 0.1, 0.1, 0.1], [0.0, 0.5, 0.5, 0.5]],
                                [[0.0, 0.1, 0.1, 0.1], [0.0, 0.2, 0.2, 0.2]]]))
    # layer 0: head 0 = (0.9 + 0.3) / 4 = 0.3, head 1 = (0.1 + 1.5) / 4 = 0.4
    assert selection.heads([0, 1]) == {0: 1, 1: 1}
    with pytest.raises(UserError, match="no token after their first"):
        HeadSelection(1, 1).heads([0])


def test_heads_file_round_trip_and_refusals(tmp_path):
    heads = HeadsFile({2: 1, 3: 0}, [2, 3], 0.5, "tiny", num_layers=6, num_heads=4, convention="paper",
                      data_hash="sha256:ab", num_examples=3)
    path = tmp_path / "heads.json"
    heads.save(path)
    assert json.loads(path.read_text())["heads"] == {"2": 1, "3": 0}
    loaded = load_heads(path, "tiny", 6, 4)
    assert loaded == heads and loaded.pairs == [(2, 1), (3, 0)]
    with pytest.raises(UserError, match="already exists"):
        heads.save(path)
    with pytest.raises(UserError, match=r"'tiny', not for 'other-model'"):
        load_heads(path, "other-model", 6, 4)
    with pytest.raises(UserError, match=r"chosen on 'tiny' \(6 layers x 4 heads.*\(3, 0\)\]\), "
                                        r"but 'tiny' has 2 layers x 4 heads"):
        load_heads(path, "tiny", 2, 4)
    broken = tmp_path / "broken.json"
    broken.write_text('{"heads": {"2": 1}}')
    with pytest.raises(UserError, match="broken.json: not a heads file"):
        load_heads(broken)


def test_auroc_interval_brackets_the_auroc_and_says_when_one_class_is_missing():
    from lightning_lab.rauq.threshold import auroc_interval

    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.7, 0.3])
    wrong = np.array([0, 0, 1, 1, 0, 1, 1, 0], dtype=bool)
    result = auroc_interval(scores, wrong, resamples=200)
    assert result["auroc"] == pytest.approx(15 / 16) and result["low"] <= 15 / 16 <= result["high"] <= 1.0
    assert auroc_interval(scores, np.zeros(8, dtype=bool))["auroc"] is None


def test_fit_threshold_cuts_at_youden_j_and_refuses_one_class(tmp_path):
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.35])
    wrong = np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=bool)
    fit = fit_threshold(scores, wrong)
    # score > 0.5 flags 3 of 4 wrong and no correct one (J = 0.75); > 0.325 flags all 4 wrong and 1 correct
    assert fit["youden_j"] == pytest.approx(0.75) and 0.4 < fit["theta"] < 0.6
    assert ((scores > fit["theta"]) == np.array([0, 0, 0, 0, 1, 1, 1, 0], dtype=bool)).all()
    assert fit["coef"] > 0 and fit["auroc"] == pytest.approx(15 / 16)
    with pytest.raises(UserError, match="all 3 calibration samples are correct.*--calibration"):
        fit_threshold(np.array([1.0, 2.0, 3.0]), np.zeros(3, dtype=bool))
    threshold = Threshold(trigger="rauq", unit="token", alpha=0.5, model="tiny", heads_hash="sha256:h",
                          data_hash="sha256:d",
                          num_outputs=2, **fit)
    threshold.save(tmp_path / "theta.json")
    loaded = load_threshold(tmp_path / "theta.json")
    assert loaded == threshold
    loaded.check("rauq", 0.5, "tiny", "sha256:h", "theta.json")
    with pytest.raises(UserError, match=r"theta.json: theta was fitted for alpha 0.5 \(this run: 0.3\)"):
        loaded.check("rauq", 0.3, "tiny", "sha256:h", "theta.json")
    with pytest.raises(UserError, match=r"trigger 'rauq' \(this run: 'entropy'\), model 'tiny' \(this run: 'x'\)"):
        loaded.check("entropy", 0.5, "x", "sha256:h", "theta.json")


def test_calibration_pairs_name_the_line_of_an_empty_completion(tmp_path):
    from lightning_lab.rauq.heads import calibration_pairs

    good = tmp_path / "calibration.jsonl"
    good.write_text('{"prompt": "2 + 3?", "completion": "5"}\n{"question": "1 + 1?", "answer": "2"}\n')
    assert calibration_pairs(good) == [("calibration-1", "2 + 3?", "5"), ("calibration-2", "1 + 1?", "2")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "2 + 3?", "completion": "5"}\n{"prompt": "1 + 1?", "completion": ""}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: empty or missing reference 'completion'"):
        calibration_pairs(bad)
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("2 + 3?\t5\n1 + 1?\t\n")
    with pytest.raises(UserError, match=r"bad.tsv:2"):
        calibration_pairs(tsv)
    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text('{"question": "1 + 1?", "answer": "One and one.\\n#### 2"}\n')
    assert calibration_pairs(gsm8k) == [("gsm8k-1", "1 + 1?", "One and one.\n#### 2")]
