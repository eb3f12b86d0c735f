"""Baking: the quietstar objective's first step is the base model's, star raises the traces' likelihood, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_lab.cli import main as lab_main
from lightning_lab.data.benchmarks import Sample
from lightning_lab.errors import UserError
from lightning_lab.models.loading import load_causal_lm
from lightning_lab.models.lora import LoraSettings
from lightning_lab.models.scoring import score
from lightning_lab.quietstar.baking import QuietStarModule, ThoughtSampling, mix, mixing_head, thought_places
from lightning_lab.quietstar.tokens import add_thought_tokens
from lightning_lab.sampling.prompts import encode_prompt

TEXTS = ["Natalia sold clips to 48 of her friends in April. The answer is 72.",
         "What is 2 + 3? It is 5. The answer is 5.", "user assistant system question answer. The answer is 72."]
TRACES = [{"prompt": "What is 2 + 3?", "completion": "<|startofthought|>2 plus 3<|endofthought|>It is 5."},
          {"prompt": "Natalia sold clips.", "completion": "<|startofthought|>48 and 24<|endofthought|>The answer is 72."}]
SMALL = ThoughtSampling(per_position=2, length=3, lookahead=3)  # a thought after every token


def bake_argv(model_dir, train: Path, root: Path, name: str, *extra: str) -> list[str]:
    return ["quietstar", "fit", "--config", "configs/quietstar/tiny.yaml", "--model.model", str(model_dir),
            "--data.train_path", str(train), "--run.root", str(root), "--run.name", name, *extra]


def metrics(run_dir: Path, key: str) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record[key] for record in records if key in record]


def test_mixing_head_starts_at_zero_so_the_first_output_is_the_base_models():
    head = mixing_head(8)
    base, post = torch.randn(3, 4, 50), torch.randn(3, 4, 50)
    mixed, weight = mix(head, base, post, torch.randn(3, 4, 8), torch.randn(3, 4, 8))
    assert torch.equal(mixed, base) and torch.equal(weight, torch.zeros(3, 4))


def test_every_token_mode_places_one_thought_after_each_eligible_token():
    every = ThoughtSampling(lookahead=3)
    assert every.positions == "all"  # the paper's setting is the default
    assert thought_places([6, 4, 2], every) == [(0, 0), (0, 1), (0, 2), (1, 0)]  # j + 3 < length; text 2: none
    torch.manual_seed(0)
    sampled = thought_places([30, 30], ThoughtSampling(positions=4, lookahead=3))
    assert len(sampled) == len(set(sampled)) == 8 and all(j < 27 for _, j in sampled)
    with pytest.raises(UserError, match="positions: 'some' must be 'all' or a number >= 1"):
        ThoughtSampling(positions="some")


@pytest.mark.parametrize("positions", ["all", 2])
@pytest.mark.parametrize("model_dir", ["tiny_llama_dir", "tiny_lab_gpt_dir"])
def test_one_quietstar_step_is_finite_and_starts_at_the_base_model(model_dir, positions, request):
    torch.manual_seed(0)
    thoughts = ThoughtSampling(positions=positions, per_position=2, length=3, lookahead=3)
    module = QuietStarModule(model=str(request.getfixturevalue(model_dir)), objective="quietstar", thoughts=thoughts)
    module.configure_model()
    values = module.losses([Sample(str(i), text, "") for i, text in enumerate(TEXTS)], grad=True)
    assert all(math.isfinite(float(value.detach())) for value in values.values())
    assert float(values["mixing_weight"].detach()) == 0.0
    # the head at zero: the mixed logits are the base model's exactly, so thoughts change nothing yet
    assert float(values["thought_gain"].detach()) == 0.0
    values["loss"].backward()
    assert module.mixing_head[2].weight.grad.abs().sum() > 0  # the head learns from the first step
    assert module.model.get_input_embeddings().weight.grad is not None


def test_star_baking_raises_the_likelihood_of_the_kept_traces(tiny_llama_dir, tmp_path):
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps(trace) + "\n" for trace in TRACES))
    assert lab_main(bake_argv(tiny_llama_dir, traces, tmp_path / "runs", "star", "--trainer.max_steps", "8")) == 0
    baked_dir = tmp_path / "runs" / "quietstar" / "star" / "baked_model"

    def trace_nll(loaded) -> float:
        thoughts = add_thought_tokens(loaded.model, loaded.tokenizer)  # the base gets them, the baked has them
        prompts = [encode_prompt(loaded.tokenizer, t["prompt"]) for t in TRACES]
        completions = [loaded.tokenizer(t["completion"], add_special_tokens=False)["input_ids"] for t in TRACES]
        assert all(thoughts.start_id in ids for ids in completions)
        return float(score(loaded.model, prompts, completions).mean_nll())

    before = trace_nll(load_causal_lm(tiny_llama_dir, device="cpu", dtype="fp32"))
    after = trace_nll(load_causal_lm(baked_dir, device="cpu", dtype="fp32"))
    assert after < before - 0.5, (before, after)
    checkpoint = torch.load(baked_dir.parent / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["objective"] == "star"

    # predict: the baked model's answers, thoughts listed beside the text and never in it
    predict = ["quietstar", "predict", *bake_argv(tiny_llama_dir, traces, tmp_path / "runs", "star")[2:],
               "--data.val_path", str(traces), "--ckpt_path", "last", "--model.predict.max_new_tokens", "8"]
    assert lab_main(predict) == 0
    lines = [json.loads(line) for line in (baked_dir.parent / "predictions.jsonl").read_text().splitlines()]
    assert "header" in lines[0] and len(lines) == 1 + len(TRACES)
    for line in lines[1:]:
        completion = line["completions"][0]
        assert "<|startofthought|>" not in completion["text"] and isinstance(completion["thoughts"], list)
    assert lab_main(predict) == 2  # an existing predictions file is never overwritten


def test_quietstar_pause_then_resume_equals_an_uninterrupted_run(tiny_lab_gpt_dir, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS * 2) + "\n")
    common = ["--model.objective", "quietstar", "--trainer.max_steps", "5"]  # thoughts after every token
    root = tmp_path / "runs"
    assert lab_main(bake_argv(tiny_lab_gpt_dir, texts, root, "straight", *common)) == 0
    assert lab_main(bake_argv(tiny_lab_gpt_dir, texts, root, "paused", *common,
                              "--trainer.callbacks+=conftest.SigintAtStep", "--trainer.callbacks.step=2")) == 0
    heartbeat = json.loads((root / "quietstar" / "paused" / "_run_tracker" / "heartbeat.json").read_text())
    assert (heartbeat["status"], heartbeat["step"]) == ("paused", 2)
    assert not (root / "quietstar" / "paused" / "baked_model").exists()  # baked when the run finishes
    assert lab_main(bake_argv(tiny_lab_gpt_dir, texts, root, "paused", *common, "--ckpt_path", "last")) == 0

    straight_dir, paused_dir = root / "quietstar" / "straight", root / "quietstar" / "paused"
    assert metrics(paused_dir, "train_loss") == metrics(straight_dir, "train_loss")
    resumed = load_file(paused_dir / "baked_model" / "model.safetensors")
    straight = load_file(straight_dir / "baked_model" / "model.safetensors")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)
    head = torch.load(straight_dir / "baked_model" / "mixing_head.pt", weights_only=True)
    assert head["2.weight"].abs().sum() > 0  # the mixing head moved off zero


def test_bad_baking_settings_are_clear_errors(tiny_llama_dir, tmp_path, capsys):
    with pytest.raises(UserError, match="per_position=1 >= 2"):
        ThoughtSampling(per_position=1)
    traces = tmp_path / "traces.jsonl"
    traces.write_text(json.dumps(TRACES[0]) + "\n")
    assert lab_main(bake_argv(tiny_llama_dir, traces, tmp_path / "runs", "bad", "--model.objective", "dream")) == 2
    assert "model.objective: 'dream' is not one of star, quietstar" in capsys.readouterr().err


@pytest.mark.slow
def test_one_quietstar_step_on_smollm2_with_lora(gsm8k_path):
    torch.manual_seed(0)
    module = QuietStarModule(model="smollm2-135m", objective="quietstar", lora=LoraSettings(rank=4), thoughts=SMALL,
                             max_length=32)  # 29 positions x 2 thoughts
    module.configure_model()
    record = json.loads(gsm8k_path.open().readline())
    values = module.losses([Sample("gsm", record["question"], record["answer"].split("####")[-1].strip(),
                                   {"solution": record["answer"]})], grad=True)
    assert float(values["mixing_weight"].detach()) == 0.0 and float(values["thought_gain"].detach()) == 0.0
    assert math.isfinite(float(values["loss"].detach()))
    values["loss"].backward()
    assert module.mixing_head[2].weight.grad.abs().sum() > 0
