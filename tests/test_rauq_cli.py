"""`lab rauq score | select-heads | fit-threshold` on the tiny llama: what they write, and what they refuse."""

from __future__ import annotations

import json

import pytest

from lightning_lab.cli import main as lab


def label_by_id(completion: str, reference: str, sample) -> bool:
    """A `--scorer module:function` for tests: problems with an even line number count as solved."""
    return int(sample.id.rsplit("-", 1)[1]) % 2 == 0


@pytest.fixture()
def calibration(tmp_path):
    path = tmp_path / "calibration.jsonl"
    rows = [("What is 2 + 3?", "It is 5."), ("Natalia sold clips to 48 friends.", "The answer is 72."),
            ("What is 1 + 1?", "It is 2."), ("question answer", "The answer is 48 of her friends.")]
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows))
    return path


def test_select_heads_then_score_with_them(tiny_llama_dir, calibration, tmp_path, capsys):
    from lightning_lab.models.loading import load_causal_lm
    from lightning_lab.rauq.heads import HeadSelection, calibration_pairs, load_heads
    from lightning_lab.rauq.scoring import completion_attention
    from lightning_lab.sampling.prompts import encode_prompt

    model = str(tiny_llama_dir)
    heads_path = tmp_path / "heads.json"
    assert lab(["rauq", "select-heads", "--model", model, "--device", "cpu", "--dtype", "fp32",
                "--calibration", str(calibration), "--num_examples", "3", "--output", str(heads_path)]) == 0
    heads = load_heads(heads_path, model, 2, 4)
    assert heads.layers == [0, 1] and heads.alpha == 0.5 and heads.num_examples == 3  # a chat template: instruct
    # the same choice by hand over the same three pairs
    loaded = load_causal_lm(model, device="cpu", dtype="fp32")
    rows = [(encode_prompt(loaded.tokenizer, prompt),
             loaded.tokenizer(completion, add_special_tokens=False)["input_ids"])
            for _, prompt, completion in calibration_pairs(calibration, "all", 3)]
    selection = HeadSelection(2, 4)
    for _, attention in completion_attention(loaded.model, [p for p, _ in rows], [c for _, c in rows]):
        selection.add(attention)
    assert heads.heads == selection.heads([0, 1])

    out = tmp_path / "scores.jsonl"
    assert lab(["rauq", "score", "--model", model, "--device", "cpu", "--input", str(calibration), "--output",
                str(out), "--heads", str(heads_path), "--convention", "lm-polygraph", "--alpha", "0.3"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4 and all(line["heads"] == {str(k): v for k, v in heads.heads.items()} for line in lines)
    assert all(line["score"] == max(line["layer_scores"].values()) and line["score"] >= 1 for line in lines)
    assert lines[0]["alpha"] == 0.3 and lines[0]["convention"] == "lm-polygraph"
    # nothing is overwritten
    assert lab(["rauq", "score", "--model", model, "--input", str(calibration), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_fit_threshold_on_running_token_scores(tiny_llama_dir, calibration, tmp_path, capsys):
    model = str(tiny_llama_dir)
    heads_path = tmp_path / "heads.json"
    assert lab(["rauq", "select-heads", "--model", model, "--device", "cpu", "--dtype", "fp32",
                "--calibration", str(calibration), "--output", str(heads_path)]) == 0
    theta_path = tmp_path / "theta.json"
    common = ["--model", model, "--device", "cpu", "--dtype", "fp32", "--calibration", str(calibration),
              "--heads", str(heads_path), "--max_new_tokens", "6"]
    assert lab(["rauq", "fit-threshold", *common, "--scorer", "test_rauq_cli:label_by_id", "--max_samples", "20",
                "--output", str(theta_path)]) == 0
    theta = json.loads(theta_path.read_text())
    assert theta["unit"] == "token" and theta["num_samples"] == 20 and theta["num_outputs"] == 4
    assert 20 - 12 <= theta["num_wrong"] <= 12  # 20 drawn from 24 tokens, 12 of them from the wrong lines 1 and 3
    assert theta["model"] == model and theta["alpha"] == 0.5 and theta["heads_hash"].startswith("sha256:")
    sequence = tmp_path / "theta_sequence.json"
    assert lab(["rauq", "fit-threshold", *common, "--scorer", "test_rauq_cli:label_by_id", "--unit", "sequence",
                "--output", str(sequence)]) == 0
    assert json.loads(sequence.read_text())["num_samples"] == 4
    # a random model solves nothing: one class, and the message says what to change
    assert lab(["rauq", "fit-threshold", *common, "--scorer", "exact", "--output", str(tmp_path / "t.json")]) == 2
    assert "are wrong, so no threshold separates" in capsys.readouterr().err


def test_bad_inputs_are_named(tiny_llama_dir, calibration, tmp_path, capsys):
    model = str(tiny_llama_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "2 + 3?", "completion": "5"}\n\n{"prompt": "1 + 1?", "completion": " "}\n')
    assert lab(["rauq", "select-heads", "--model", model, "--calibration", str(bad), "--output",
                str(tmp_path / "h.json")]) == 2
    assert f"{bad}:3: empty or missing reference 'completion'" in capsys.readouterr().err
    other = tmp_path / "other_heads.json"
    other.write_text(json.dumps({"heads": {"10": 3}, "layers": [10], "alpha": 0.5, "model": "smollm2-135m",
                                 "num_layers": 30, "num_heads": 9, "convention": "paper", "data_hash": "sha256:x",
                                 "num_examples": 512}))
    assert lab(["rauq", "score", "--model", model, "--input", str(calibration), "--output", str(tmp_path / "s.jsonl"),
                "--heads", str(other)]) == 2
    err = capsys.readouterr().err
    assert "'smollm2-135m'" in err and repr(model) in err
    assert lab(["rauq", "score", "--model", model, "--input", str(calibration), "--output", "x.jsonl",
                "--convention", "paper2"]) == 2
    assert "convention: 'paper2' is not one of paper, lm-polygraph" in capsys.readouterr().err
