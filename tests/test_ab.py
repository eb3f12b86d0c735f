"""The A/B harness: statistics against hand-computed values, the winner rule, an A/A test, bad input."""

import json
import math
import os
import signal

import numpy as np
import pytest
import yaml

from lightning_lab.data.io import DataError
from lightning_lab.errors import UserError
from lightning_lab.eval.ab import ABConfig, PlainArm, compare, load_arm, run_ab


def paired_table(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """0/1 outcomes (items, 1 round) with the given counts of each paired cell."""
    a = [1] * both + [1] * only_a + [0] * only_b + [0] * neither
    b = [1] * both + [0] * only_a + [1] * only_b + [0] * neither
    return np.array(a)[:, None], np.array(b)[:, None]


def test_mcnemar_and_mde_match_hand_computed_values():
    a, b = paired_table(both=6, only_a=2, only_b=8, neither=4)  # 20 items
    results = compare(a, b, ("base", "think"), alpha=0.05, improvement_threshold=0.02)
    # exact McNemar: 2 * P(X <= 2), X ~ Binomial(10, 1/2) = 2 * (1 + 10 + 45) / 1024
    assert results["mcnemar_p"] == pytest.approx(112 / 1024)
    assert results["mcnemar_discordant"] == {"only_baseline": 2, "only_thoughts": 8}
    assert results["baseline_accuracy"] == pytest.approx(8 / 20) and results["thoughts_accuracy"] == pytest.approx(14 / 20)
    assert results["improvement"] == pytest.approx(0.3) and results["relative_improvement"] == pytest.approx(0.75)
    # (z_0.975 + z_0.8) * sqrt(10/20 / 20)
    assert results["mde"] == pytest.approx((1.959964 + 0.841621) * math.sqrt(0.5 / 20), rel=1e-5)
    assert results["winner"] is None  # +30 points, but p = 0.109 > 0.05

    a, b = paired_table(both=5, only_a=0, only_b=10, neither=5)
    results = compare(a, b, ("base", "think"), alpha=0.05, improvement_threshold=0.02)
    assert results["mcnemar_p"] == pytest.approx(2 / 1024)
    assert results["winner"] == "think"
    results = compare(b, a, ("base", "think"), alpha=0.05, improvement_threshold=0.02)
    assert results["winner"] == "base"  # the baseline significantly better


def test_winner_needs_the_improvement_threshold_too():
    a, b = paired_table(both=400, only_a=5, only_b=30, neither=565)  # 1000 items: +2.5 points, p ~ 1e-5
    assert compare(a, b, ("a", "b"), alpha=0.05, improvement_threshold=0.03)["winner"] is None
    assert compare(a, b, ("a", "b"), alpha=0.05, improvement_threshold=0.02)["winner"] == "b"


def test_paired_bootstrap_matches_the_normal_interval_on_a_large_table():
    a, b = paired_table(both=150, only_a=40, only_b=80, neither=130)  # 400 items
    interval = compare(a, b, ("a", "b"), alpha=0.05, improvement_threshold=0.02, resamples=20_000)["bootstrap_ci"]
    difference = (b - a)[:, 0].astype(float)
    half_width = 1.959964 * difference.std(ddof=1) / math.sqrt(len(difference))
    assert interval == pytest.approx([0.1 - half_width, 0.1 + half_width], abs=0.006)
    # no spread at all: the interval is the point
    a, b = paired_table(both=10, only_a=0, only_b=0, neither=10)
    assert compare(a, b, ("a", "b"), 0.05, 0.02)["bootstrap_ci"] == [0.0, 0.0]


def test_paired_ttest_and_majority_outcomes_across_rounds():
    # differences 0.1, 0.2, 0.3: t = 0.2 / (0.1 / sqrt 3); with 2 degrees of freedom p = 1 - t / sqrt(t^2 + 2)
    t = 0.2 / (0.1 / math.sqrt(3))
    a = np.zeros((10, 3))
    b = np.array([[1, 1, 1]] * 6 + [[0, 1, 1]] + [[0, 0, 1]] + [[0, 0, 0]] * 2)  # rounds: 0.6, 0.7, 0.8
    results = compare(a + np.array([[1, 1, 1]] * 5 + [[0, 0, 0]] * 5), b, ("a", "b"), 0.05, 0.02)  # rounds 0.5 each
    assert [r["thoughts_accuracy"] for r in results["rounds"]] == pytest.approx([0.6, 0.7, 0.8])
    assert results["ttest_p"] == pytest.approx(1 - t / math.sqrt(t * t + 2))
    assert compare(a[:, :1], b[:, :1], ("a", "b"), 0.05, 0.02)["ttest_p"] is None  # one round: no t-test
    # item 0 solved by B in 2 of 3 rounds (majority), item 1 in 1 of 3 (not): one discordant item
    a = np.array([[0, 0, 0], [0, 0, 0]])
    b = np.array([[1, 1, 0], [1, 0, 0]])
    results = compare(a, b, ("a", "b"), alpha=0.05, improvement_threshold=0.02)
    assert results["mcnemar_discordant"] == {"only_baseline": 0, "only_thoughts": 1}
    assert results["improvement"] == pytest.approx(0.5)
    assert [r["thoughts_accuracy"] for r in results["rounds"]] == [1.0, 0.5, 0.0]


@pytest.fixture
def tiny_items(tmp_path):
    path = tmp_path / "items.jsonl"
    lines = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(6)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def write_arm(path, **settings):
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def test_an_a_a_test_is_never_a_winner(tiny_llama_dir, tiny_items, tmp_path):
    arm = {"model": str(tiny_llama_dir), "temperature": 1.0, "max_new_tokens": 8}
    config = ABConfig(a=write_arm(tmp_path / "same.yaml", **arm), b=write_arm(tmp_path / "again.yaml", **arm),
                      dataset=str(tiny_items), split="all", samples=6, rounds=2, output_dir=str(tmp_path / "runs"),
                      name="aa", improvement_threshold=0.0, alpha=0.99, device="cpu", dtype="fp32")
    results = run_ab(config)
    assert results["winner"] is None and results["improvement"] == 0 and results["mcnemar_p"] == 1.0
    for key in ("baseline_accuracy", "thoughts_accuracy", "improvement", "relative_improvement", "mcnemar_p",
                "bootstrap_ci", "ttest_p", "mde", "winner", "rounds"):
        assert key in results
    out = tmp_path / "runs" / "aa"
    assert json.loads((out / "ab_results.json").read_text())["winner"] is None
    assert (out / "ab_rounds.png").stat().st_size > 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 1 + 2 * 2 * 6  # a header, then the outcomes
    with pytest.raises(UserError, match="the run exists"):
        run_ab(config)


def test_resume_runs_only_the_missing_rounds(tiny_llama_dir, tiny_items, tmp_path, monkeypatch):
    arm = {"model": str(tiny_llama_dir), "temperature": 1.0, "max_new_tokens": 8}
    settings = dict(a=write_arm(tmp_path / "a.yaml", **arm), b=write_arm(tmp_path / "b.yaml", **arm, top_p=0.5),
                    dataset=str(tiny_items), split="all", samples=6, rounds=2, output_dir=str(tmp_path / "runs"),
                    device="cpu", dtype="fp32")
    straight = run_ab(ABConfig(**settings, name="straight"))
    calls = []
    original = PlainArm.answers

    def ctrl_c_in_the_third_round(self, samples, seed):
        calls.append((self.name, seed))
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the round finishes; PauseFlag stops before the next one
        return original(self, samples, seed)

    monkeypatch.setattr(PlainArm, "answers", ctrl_c_in_the_third_round)
    assert run_ab(ABConfig(**settings, name="paused")) is None
    assert calls == [("a", 0), ("a", 1), ("b", 0)]
    heartbeat = json.loads((tmp_path / "runs" / "paused" / "_run_tracker" / "heartbeat.json").read_text())
    assert (heartbeat["status"], heartbeat["step"]) == ("paused", 3 * 6)
    calls.clear()
    resumed = run_ab(ABConfig(**settings, name="paused", resume=True))
    assert calls == [("b", 1)]  # only the round that had not run
    for key in ("baseline_accuracy", "thoughts_accuracy", "mcnemar_p", "bootstrap_ci", "rounds"):
        assert resumed[key] == straight[key]


def test_thought_arm_records_thoughts_and_trace_quality(tiny_llama_dir, tiny_items, tmp_path):
    plain = write_arm(tmp_path / "plain.yaml", model=str(tiny_llama_dir), greedy=True, max_new_tokens=6)
    thoughts = write_arm(tmp_path / "thoughts.yaml", class_path="lightning_lab.quietstar.arm.ThoughtArm",
                         init_args={"model": str(tiny_llama_dir), "greedy": True, "max_new_tokens": 6,
                                    "thoughts": {"thought_probability": 1.0, "max_thought_length": 3}})
    config = ABConfig(a=plain, b=thoughts, dataset=str(tiny_items), split="all", samples=4, rounds=1,
                      output_dir=str(tmp_path / "runs"), name="pt", device="cpu", dtype="fp32")
    results = run_ab(config)
    assert results["arms"]["thoughts"]["class"] == "ThoughtArm"
    lines = [json.loads(line) for line in (tmp_path / "runs" / "pt" / "results.jsonl").open()]
    thought_lines = [line for line in lines if line.get("arm") == "thoughts"]
    assert len(thought_lines) == 4
    for line in thought_lines:
        assert line["thoughts"] and line["thoughts"][0]["position"] == 0 and isinstance(line["quality"], float)
        assert "<|startofthought|>" not in line["text"]


def test_bad_input_is_a_clear_error(tiny_llama_dir, tiny_items, tmp_path):
    arm = write_arm(tmp_path / "arm.yaml", model=str(tiny_llama_dir))
    with pytest.raises(UserError, match="rounds: must be an integer >= 1"):
        ABConfig(a=arm, b=arm, rounds=0)
    with pytest.raises(UserError, match="unknown keys \\['temprature'\\]"):
        load_arm(write_arm(tmp_path / "typo.yaml", temprature=0.5), "--a")
    with pytest.raises(UserError, match="is not an arm"):
        load_arm(write_arm(tmp_path / "other.yaml", class_path="lightning_lab.eval.ab.ABConfig"), "--b")
    no_answers = tmp_path / "no_answers.jsonl"
    no_answers.write_text(json.dumps({"question": "What is 1 + 1?"}) + "\n")
    with pytest.raises(DataError, match="no_answers.jsonl"):
        run_ab(ABConfig(a=arm, b=arm, dataset=str(no_answers), split="all", samples=1, output_dir=str(tmp_path)))
    words = tmp_path / "words.jsonl"
    words.write_text(json.dumps({"prompt": "Say hi", "reference": "hi"}) + "\n")
    with pytest.raises(UserError, match="scorer gsm8k needs a number"):
        run_ab(ABConfig(a=arm, b=arm, dataset=str(words), split="all", samples=1, output_dir=str(tmp_path)))
