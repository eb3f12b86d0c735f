"""LoRA RL: the reward rises on a learnable toy task, bad rewards stop the run by sample id, resume is exact."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_lab.cli import main as lab_main
from lightning_lab.data.benchmarks import Sample
from lightning_lab.sampling.sampler import Sampler
from lightning_lab.models.loading import load_causal_lm
from lightning_lab.models.lora import load_adapter
from lightning_lab.training.rl import RewardError, checked_reward, load_reward, policy_loss_terms, rloo_advantages

PROMPTS = [
    {"id": "p1", "prompt": "What is 2 + 3?", "reference": "5"},
    {"id": "p2", "prompt": "The answer is", "reference": "72"},
    {"id": "p3", "prompt": "question", "reference": "1"},
    {"id": "p4", "prompt": "Natalia sold clips", "reference": "48"},
]

REWARDS = '''
def contains_digit(sample, completion):
    return float(any(character.isdigit() for character in completion))

def fails_on_p3(sample, completion):
    if sample.id == "p3":
        raise ValueError("boom")
    return 0.0

def out_of_range_on_p2(sample, completion):
    return 1.5 if sample.id == "p2" else 0.0
'''


@pytest.fixture(scope="module")
def expressive_tiny_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny fixture with its (tied) embeddings scaled x5. At the fixture's init (std 0.02, width 64)
    every logit stays within about +-1.3, so no adapter can make any token likely; x5 gives the
    output layer the range a toy reward needs, and nothing else changes."""
    loaded = load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32")
    with torch.no_grad():
        loaded.model.get_input_embeddings().weight.mul_(5.0)
    path = tmp_path_factory.mktemp("expressive_tiny")
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def task(tmp_path, monkeypatch) -> dict[str, Path]:
    (tmp_path / "toy_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))  # so `toy_rewards:contains_digit` imports as a module
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(record) + "\n" for record in PROMPTS))
    return {"prompts": prompts, "rewards": tmp_path / "toy_rewards.py", "root": tmp_path / "runs"}


def rl_argv(model_dir: Path, task: dict[str, Path], name: str, reward: str, *extra: str) -> list[str]:
    return ["rl", "fit", "--config", "configs/rl/tiny.yaml", "--model.model", str(model_dir),
            "--data.path", str(task["prompts"]), "--model.reward", reward, "--run.root", str(task["root"]),
            "--run.name", name, *extra]


def metrics(run_dir: Path) -> list[dict]:
    """The logged training metrics per step (without the wall-clock time)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in record.items() if key != "time"} for record in records
            if "train_reward" in record]


def test_rloo_advantages_and_ratio_clipping():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    advantages = rloo_advantages(rewards)
    torch.testing.assert_close(advantages[0], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))  # r_i - mean of the others
    assert (advantages[1] == 0).all()  # a group of equal rewards teaches nothing
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    old = torch.log(torch.tensor([[0.25, 0.5]]))  # first token's ratio is 2: clipped to 1.2 for A > 0
    loss, kl, clipped = policy_loss_terms(logp, old, logp, torch.tensor([[1.0]]), clip_eps=0.2, kl_coef=0.1)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -1.0]]))
    assert clipped.tolist() == [[1.0, 0.0]] and (kl == 0).all()


def test_reward_specs(task):
    sample = Sample("s1", "What is 6 x 7?", "42")
    assert load_reward("builtin:gsm8k")(sample, "6 x 7 = 42\n#### 42") == 1.0
    assert load_reward("builtin:numeric")(sample, "41") == 0.0
    assert load_reward("toy_rewards:contains_digit")(sample, "a1") == 1.0
    assert load_reward(f"{task['rewards']}:contains_digit")(sample, "none") == 0.0
    with pytest.raises(ValueError, match="exact_match"):
        load_reward("builtin:f1")
    with pytest.raises(ValueError, match="no function 'missing'"):
        load_reward(f"{task['rewards']}:missing")
    with pytest.raises(RewardError, match="returned nan for sample 's1'"):
        checked_reward(lambda sample, completion: float("nan"), "nan_reward", sample, "x")


def test_rl_raises_the_reward_on_a_learnable_toy_task(expressive_tiny_dir, task):
    assert lab_main(rl_argv(expressive_tiny_dir, task, "toy", "toy_rewards:contains_digit")) == 0
    run_dir = task["root"] / "rl" / "toy"
    steps = metrics(run_dir)
    rewards = [step["train_reward"] for step in steps]
    assert len(steps) == 10 and rewards[0] < 0.3 and sum(rewards[-3:]) / 3 > 0.8, rewards
    assert all(0.0 <= step["train_groups_all_equal"] <= 1.0 for step in steps)
    assert steps[-1]["train_kl"] > 0  # the reference (adapter disabled) differs from the trained policy

    # the saved adapter, sampled on its own, earns the reward; the base model does not
    prompts = [record["prompt"] for record in PROMPTS]
    reward = load_reward("toy_rewards:contains_digit")

    def mean_reward(loaded) -> float:
        generation = Sampler(loaded).generate(prompts, n=8, max_new_tokens=6, seed=123)
        texts = [completion.text for completions in generation.completions for completion in completions]
        return sum(reward(None, text) for text in texts) / len(texts)

    adapted = mean_reward(load_adapter(run_dir / "adapters" / "final", device="cpu", dtype="fp32"))
    base = mean_reward(load_causal_lm(str(expressive_tiny_dir), device="cpu", dtype="fp32"))
    assert adapted > 0.7 and base < 0.3, (adapted, base)


@pytest.mark.parametrize("function, expected", [
    ("fails_on_p3", r"sample 'p3': ValueError: boom"),
    ("out_of_range_on_p2", r"returned 1.5 for sample 'p2'"),
])
def test_bad_reward_stops_the_run_naming_the_sample(tiny_llama_dir, task, capsys, function, expected):
    reward = f"{task['rewards']}:{function}"
    assert lab_main(rl_argv(tiny_llama_dir, task, function, reward, "--trainer.max_steps", "2")) == 1
    error = capsys.readouterr().err
    assert "lab rl: error: reward" in error
    assert re.search(expected, error), error
    heartbeat = json.loads((task["root"] / "rl" / function / "_run_tracker" / "heartbeat.json").read_text())
    assert heartbeat["status"] == "failed"


def test_rl_step_on_the_lab_gpt_with_mhc(tiny_lab_gpt_dir, task, tmp_path):
    argv = rl_argv(tiny_lab_gpt_dir, task, "gpt", "toy_rewards:contains_digit", "--trainer.max_steps", "2")
    assert lab_main(argv) == 0
    steps = metrics(task["root"] / "rl" / "gpt")
    assert len(steps) == 2 and steps[-1]["train_kl"] > 0
    assert (task["root"] / "rl" / "gpt" / "adapters" / "final" / "adapter_model.safetensors").is_file()

    # predict: sampled generations of the checkpoint, each with its reward
    predict = ["rl", "predict", *argv[2:], "--ckpt_path", "last", "--data.predict_split", "all",
               "--model.predict.n", "3", "--model.predict.greedy", "false", "--model.predict.max_new_tokens", "4"]
    assert lab_main(predict) == 0
    lines = [json.loads(line) for line in (task["root"] / "rl" / "gpt" / "predictions.jsonl").read_text().splitlines()]
    assert "header" in lines[0] and [line["id"] for line in lines[1:]] == [record["id"] for record in PROMPTS]
    reward = load_reward("toy_rewards:contains_digit")
    for line in lines[1:]:
        assert len(line["completions"]) == 3
        assert all(c["reward"] == reward(None, c["text"]) and 1 <= c["num_tokens"] <= 4 for c in line["completions"])


def test_resume_from_a_mid_run_checkpoint_equals_an_uninterrupted_run(expressive_tiny_dir, task):
    # two updates per batch, so the clipped ratio is exercised; 4 optimizer steps = 2 batches
    common = ["--trainer.max_steps", "4", "--model.updates_per_batch", "2", "--model.micro_batch_size", "8",
              "--run.checkpoint_every_n_steps", "2"]
    reward = "toy_rewards:contains_digit"
    assert lab_main(rl_argv(expressive_tiny_dir, task, "straight", reward, *common)) == 0
    step2 = task["root"] / "rl" / "straight" / "checkpoints" / "step=0000002.ckpt"
    checkpoint = torch.load(step2, weights_only=True)
    assert all("lora_" in key for key in checkpoint["state_dict"])
    assert len(checkpoint["optimizer_states"][0]["state"]) == len(checkpoint["state_dict"])  # Adam moments per LoRA weight
    assert lab_main(rl_argv(expressive_tiny_dir, task, "resumed", reward, *common, "--ckpt_path", str(step2))) == 0

    straight = load_file(task["root"] / "rl" / "straight" / "adapters" / "final" / "adapter_model.safetensors")
    resumed = load_file(task["root"] / "rl" / "resumed" / "adapters" / "final" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)
    straight_steps = metrics(task["root"] / "rl" / "straight")
    assert metrics(task["root"] / "rl" / "resumed") == [s for s in straight_steps if s["step"] > 2] != []
    assert any(step["train_clip_frac"] > 0 for step in straight_steps)
