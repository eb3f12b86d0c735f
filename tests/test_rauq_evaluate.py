"""`lab rauq run | evaluate | ablate` on the tiny llama: outputs, repairs as SFT data, the theta checks."""

from __future__ import annotations

import json

import pytest

from lightning_lab.cli import main as lab


@pytest.fixture()
def problems(tmp_path):
    path = tmp_path / "problems.jsonl"
    rows = [("What is 2 + 3?", "5"), ("Natalia sold clips to 48 friends.", "72"), ("What is 1 + 1?", "2"),
            ("question answer", "48")]
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
    return path


@pytest.fixture()
def heads(tiny_llama_dir, tmp_path):
    from lightning_lab.rauq.heads import HeadsFile

    path = tmp_path / "heads.json"
    HeadsFile({0: 1, 1: 2}, [0, 1], 0.5, str(tiny_llama_dir), 2, 4, "paper", "sha256:x", 4).save(path)
    return path


def common(tiny_llama_dir, heads) -> list[str]:
    return ["--model", str(tiny_llama_dir), "--device", "cpu", "--dtype", "fp32", "--heads", str(heads),
            "--max_new_tokens", "10"]


def test_run_prints_the_completion_and_writes_the_trace(tiny_llama_dir, heads, tmp_path, capsys):
    trace = tmp_path / "trace.json"
    assert lab(["rauq", "run", *common(tiny_llama_dir, heads), "--prompt", "What is 2 + 3?", "--trigger", "margin",
                "--threshold_type", "fixed", "--theta", "-1", "--stability_window", "2", "--max_repairs", "1",
                "--repair", "cot", "--cot_policy", "max20", "--trace_out", str(trace),
                "--trace_png", str(tmp_path / "trace.png")]) == 0
    printed = capsys.readouterr().out
    assert "[1 trigger(s) at answer tokens [2];" in printed
    assert (tmp_path / "trace.png").read_bytes().startswith(b"\x89PNG")
    saved = json.loads(trace.read_text())
    assert saved["trigger_events"][0]["position"] == 2
    assert sum(entry["rolled_back"] for entry in saved["trace"]) == 2
    assert all(entry["rauq"] is None for entry in saved["trace"] if entry["kind"] in ("prompt", "thought"))


def test_evaluate_writes_results_summary_trace_and_repairs(tiny_llama_dir, heads, problems, tmp_path, capsys):
    repairs = tmp_path / "repairs.jsonl"
    args = ["rauq", "evaluate", *common(tiny_llama_dir, heads), "--benchmark", str(problems), "--split", "all",
            "--scorer", "test_rauq_cli:label_by_id", "--trigger", "margin", "--threshold_type", "fixed", "--theta",
            "-1", "--stability_window", "3", "--max_repairs", "1", "--output_dir", str(tmp_path / "runs"), "--name",
            "e", "--progress", "false", "--save_repairs", str(repairs), "--only_correct", "true",
            "--uncertainty", "true"]
    assert lab(args) == 0
    run = tmp_path / "runs" / "e"
    lines = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()[1:]]
    assert [line["id"] for line in lines] == [f"problems-{i}" for i in range(1, 5)]
    assert all(line["trigger_positions"] == [3] and line["thought_tokens"] > 0 for line in lines)
    assert [line["correct"] for line in lines] == [False, True, False, True]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["accuracy"] == 0.5 and summary["trigger_rate"] == 1.0 and summary["problems"] == 4
    assert sorted(summary["auroc_wrong"]) == ["mean_entropy", "msp", "perplexity", "rauq_fixed", "rauq_lm_polygraph",
                                               "rauq_paper", "rauq_running"]
    msp = summary["auroc_wrong"]["msp"]
    assert msp["items"] == 4 and msp["wrong"] == 2 and msp["low"] <= msp["auroc"] <= msp["high"]
    assert (run / "trace.png").stat().st_size > 0
    saved = [json.loads(line) for line in repairs.read_text().splitlines()]
    assert len(saved) == 2 and all(record["correct"] for record in saved)  # only the correct ones
    for record in saved:
        assert record["completion"].startswith(record["prefix"]) and record["completion"].endswith(record["answer"])
        assert record["completion"].count(" Let me think step by step:") == 1
    # four problems decoded together: the same answers and triggers
    batched = args[:args.index("--save_repairs")] + ["--batch_size", "4"]
    batched[batched.index("e")] = "e4"
    assert lab(batched) == 0
    lines4 = [json.loads(line) for line in (tmp_path / "runs" / "e4" / "results.jsonl").read_text().splitlines()[1:]]
    keys = ("id", "completion", "correct", "trigger_positions", "thought_tokens", "answer_tokens")
    assert [[line[k] for k in keys] for line in lines4] == [[line[k] for k in keys] for line in lines]
    # the repairs are SFT data as they are: prompt + completion
    from lightning_lab.data.benchmarks import read_samples
    assert [sample.reference for sample in read_samples(repairs)] == [record["completion"] for record in saved]


def test_a_theta_file_for_another_alpha_or_trigger_is_refused(tiny_llama_dir, heads, tmp_path, capsys):
    from lightning_lab.rauq.heads import file_hash
    from lightning_lab.rauq.threshold import Threshold

    theta = tmp_path / "theta.json"
    Threshold(theta=1.0, trigger="rauq", unit="token", coef=1.0, intercept=0.0, auroc=0.6, youden_j=0.2,
              num_samples=10, num_wrong=5, num_outputs=2, alpha=0.3, model=str(tiny_llama_dir),
              heads_hash=file_hash(heads), data_hash="sha256:d").save(theta)
    base = ["rauq", "run", *common(tiny_llama_dir, heads), "--prompt", "hi", "--theta_file", str(theta)]
    assert lab(base) == 2
    assert "theta was fitted for alpha 0.3 (this run: 0.5)" in capsys.readouterr().err
    assert lab(base + ["--alpha", "0.3", "--trigger", "entropy"]) == 2
    assert "trigger 'rauq' (this run: 'entropy')" in capsys.readouterr().err
    assert lab(base + ["--alpha", "0.3"]) == 0
    assert lab(["rauq", "run", "--prompt", "hi", "--threshold_type", "learned"]) == 2
    assert "theta_file: required" in capsys.readouterr().err


def test_ablate_runs_each_cell_against_greedy(tiny_llama_dir, heads, problems, tmp_path, capsys):
    assert lab(["rauq", "ablate", *common(tiny_llama_dir, heads), "--benchmark", str(problems), "--split", "all",
                "--limit", "2", "--scorer", "exact", "--triggers", "[margin]", "--threshold_types", "[fixed]",
                "--fixed_thetas", "{margin: -1}", "--repairs", "[cot, none]", "--stability_window", "3",
                "--output_dir", str(tmp_path / "runs"), "--name", "a", "--progress", "false", "--batch_size", "2"]) == 0
    summary = json.loads((tmp_path / "runs" / "a" / "summary.json").read_text())
    assert list(summary) == ["greedy", "margin-fixed-cot-rauq-fixed2", "margin-fixed-none-fixed2"]
    assert summary["greedy"]["trigger_rate"] == 0 and summary["margin-fixed-none-fixed2"]["trigger_rate"] == 1
    assert summary["margin-fixed-cot-rauq-fixed2"]["mcnemar_vs_greedy"]["p_value"] == 1.0  # nothing solved anywhere
    assert "margin-fixed-cot-rauq-fixed2" in capsys.readouterr().out
