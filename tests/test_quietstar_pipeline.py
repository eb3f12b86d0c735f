"""`lab quietstar bake` / QuietSTaRBaker: inject -> A/B -> bake -> A/B, resumable, with clear errors."""

from __future__ import annotations

import json

import pytest

from lightning_lab.cli import main as lab_main
from lightning_lab.errors import UserError
from lightning_lab.eval.ab import PlainArm
from lightning_lab.quietstar import pipeline
from lightning_lab.quietstar.pipeline import QuietSTaRBaker, QuietSTaRConfig


@pytest.fixture
def items(tmp_path):
    path = tmp_path / "items.jsonl"
    lines = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(16)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def tiny_config(model_dir, items, out, **overrides) -> QuietSTaRConfig:
    settings = dict(model=str(model_dir), out=str(out), eval_dataset=str(items), eval_split="all", eval_samples=4,
                    trace_samples=3, traces_per_item=1, ab_test_rounds=2, max_thought_length=3,
                    thought_probability=1.0, max_new_tokens=6, learning_rate=1e-3, epochs=2, batch_size=2,
                    device="cpu", dtype="fp32")
    return QuietSTaRConfig(**{**settings, **overrides})


def test_pipeline_bakes_only_when_thoughts_win_unless_forced(tiny_llama_dir, items, tmp_path, monkeypatch):
    # the random model solves nothing: no winner, nothing baked
    results = QuietSTaRBaker(tiny_config(tiny_llama_dir, items, tmp_path / "plain")).run()
    assert results["ab_thoughts"]["winner"] is None and results["baked_model"] is None
    assert "did not win" in results["skipped_bake"] and "ab_baked" not in results
    assert json.loads((tmp_path / "plain" / "bake_results.json").read_text())["baked_model"] is None
    assert len(json.loads((tmp_path / "plain" / "trace_quality.json").read_text())["quality"]["values"]) == 3

    # every answer counted correct: the traces are kept and --force bakes them, then the baked model is A/B-tested
    monkeypatch.setattr(pipeline, "score", lambda *args, **kwargs: 1.0)
    out = tmp_path / "forced"
    results = QuietSTaRBaker(tiny_config(tiny_llama_dir, items, out, force=True)).run()
    assert results["traces"]["kept"] == 3
    traces = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    assert all("<|startofthought|>" in trace["completion"] for trace in traces)
    assert results["baked_model"] == str(out / "quietstar" / "bake" / "baked_model")
    assert (out / "quietstar" / "bake" / "baked_model" / "model.safetensors").is_file()
    assert results["ab_baked"]["arms"]["baked"]["class"] == "ThoughtArm"
    assert (out / "ab_baked" / "ab_rounds.png").is_file()
    summary = pipeline.closing_summary(results)
    assert "baked model saved to" in summary and "winner" in summary

    # --resume: every step's results are there, no model is loaded again
    monkeypatch.setattr(PlainArm, "load", lambda *args, **kwargs: pytest.fail("a model was loaded again"))
    again = QuietSTaRBaker(tiny_config(tiny_llama_dir, items, out, force=True, resume=True)).run()
    assert again["ab_baked"]["improvement"] == results["ab_baked"]["improvement"]
    with pytest.raises(UserError, match="exists and is not empty"):
        QuietSTaRBaker(tiny_config(tiny_llama_dir, items, out)).run()


def test_bad_pipeline_input_is_a_clear_error(tiny_llama_dir, items, tmp_path, capsys):
    argv = ["quietstar", "bake", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "x"),
            "--eval_dataset", str(items), "--eval_split", "all"]
    assert lab_main(argv + ["--ab_test_rounds", "0"]) == 2
    assert "--ab_test_rounds: must be >= 1" in capsys.readouterr().err
    no_answers = tmp_path / "questions.jsonl"
    no_answers.write_text(json.dumps({"question": "What is 1 + 1?"}) + "\n")
    assert lab_main(argv[:6] + ["--eval_dataset", str(no_answers), "--eval_split", "all"]) == 2
    assert "questions.jsonl" in capsys.readouterr().err
    assert lab_main(argv + ["--eval_samples", "16"]) == 2  # nothing left for traces
    assert "not enough for 16 A/B items" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written before the inputs were checked


def test_wandb_logs_accuracy_quality_and_the_baked_model(tiny_llama_dir, items, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(pipeline, "score", lambda *args, **kwargs: 1.0)  # traces kept, so a model is baked
    out = tmp_path / "wandb_run"
    results = QuietSTaRBaker(tiny_config(tiny_llama_dir, items, out, force=True, ab_test_rounds=1,
                                         wandb_project="quietstar-test")).run()
    assert results["baked_model"] is not None
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_wandb_project_without_wandb_is_a_clear_error(tiny_llama_dir, items, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="wandb package is not installed"):
        tiny_config(tiny_llama_dir, items, tmp_path / "x", wandb_project="p")
