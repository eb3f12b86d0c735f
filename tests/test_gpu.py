"""CUDA: the sampler against transformers.generate, teacher-forced scoring, and SFT, RL and pretraining steps
with ``--trainer.accelerator gpu --trainer.precision bf16-mixed``. Skipped without CUDA; on a GPU machine:

    python -m pytest tests/test_gpu.py -m gpu

Tiny models and data only (the fixtures of conftest.py and test_pretrain.py), so it takes a minute or two."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_pretrain import data, fit_args  # noqa: F401  (data: the packed-corpus fixture)
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from lightning_lab.cli import main as lab_main
from lightning_lab.models.loading import LoadedModel, load_causal_lm
from lightning_lab.models.scoring import score
from lightning_lab.sampling.sampler import Sampler
from lightning_lab.training.pretrain import main as pretrain_main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = [[5, 17, 42, 99, 7], [8, 9], [100, 101, 102, 103, 104, 105, 106]]
PAIRS = [{"id": "a", "prompt": "What is 2 + 3?", "completion": "It is 5."},
         {"id": "b", "prompt": "Natalia sold clips.", "completion": "The answer is 72."},
         {"id": "c", "prompt": "question", "completion": "answer user"},
         {"id": "d", "prompt": "What is 2 + 3? question", "completion": "The answer is 5."}]


@pytest.fixture(scope="module")
def varied_cuda(tiny_llama_dir) -> LoadedModel:
    """The tiny llama on the GPU in fp32, its matrices re-drawn with spread 0.3 so that greedy paths change token
    by token and next-token distributions are peaked (the 0.02 init repeats one token, almost uniformly)."""
    loaded = load_causal_lm(str(tiny_llama_dir), device="cuda", dtype="fp32")
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in loaded.model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.3)
    return loaded


def hf_greedy(loaded: LoadedModel, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers.generate on the left-padded batch, on the GPU; each row cut after its first EOS."""
    batch = loaded.tokenizer.pad({"input_ids": prompt_ids}, padding_side="left", return_tensors="pt").to("cuda")
    out = loaded.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=loaded.tokenizer.pad_token_id)
    eos = loaded.model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    rows = out[:, batch["input_ids"].shape[1]:].tolist()
    return [row[:next((i + 1 for i, token in enumerate(row) if token in eos), len(row))] for row in rows]


def test_greedy_on_cuda_equals_generate(varied_cuda):
    out = Sampler(varied_cuda).generate(PROMPTS, greedy=True, max_new_tokens=24, chat=False)
    ours = [prompt.completions[0].token_ids for prompt in out.prompts]
    assert ours == hf_greedy(varied_cuda, PROMPTS, 24)
    assert len(set(map(tuple, ours))) == len(ours) and len(set(ours[0])) > 3  # not one repeated token


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampling_on_cuda_follows_the_models_distribution(varied_cuda, temperature, top_p):
    """8000 first tokens of one prompt (one prefill, 8000 rows) against softmax of the model's logits after
    transformers' temperature and top-p warpers: total variation distance within sampling noise."""
    n = 8000
    out = Sampler(varied_cuda).generate([PROMPTS[0]], n=n, max_new_tokens=1, temperature=temperature, top_p=top_p,
                                        seed=1, chat=False, ignore_eos=True)
    first = torch.tensor([c.token_ids[0] for c in out.prompts[0].completions])
    with torch.no_grad():
        logits = varied_cuda.model(torch.tensor([PROMPTS[0]], device="cuda")).logits[:, -1].float()
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits)) if top_p < 1 else \
        TemperatureLogitsWarper(temperature)(None, logits)
    expected = warped.softmax(-1)[0].cpu()
    observed = torch.bincount(first, minlength=expected.numel()).float() / n
    distance = 0.5 * (observed - expected).abs().sum()
    noise = 0.5 * (expected * (1 - expected) / n).sqrt().sum()  # about the expected distance of a fair sampler
    assert distance < 3 * noise + 0.005, (float(distance), float(noise))
    assert observed[expected == 0].sum() == 0  # nothing outside the top-p set
    assert expected.max() < 0.9  # a distribution, not a nearly forced token


def test_scoring_on_cuda_equals_cpu(tiny_llama_dir, varied_cuda):
    completions = [[3, 4, 5, 6], [1], [20, 21, 22]]
    on_gpu = score(varied_cuda.model, PROMPTS, completions, entropy=True, heads=[(1, 2)])
    cpu = load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32")
    cpu.model.load_state_dict({k: v.cpu() for k, v in varied_cuda.model.state_dict().items()})
    on_cpu = score(cpu.model, PROMPTS, completions, entropy=True, heads=[(1, 2)])
    for name in ("logprobs", "entropy", "attention"):
        torch.testing.assert_close(getattr(on_gpu, name).cpu(), getattr(on_cpu, name), rtol=1e-3, atol=1e-4)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_sft_and_rl_steps_on_gpu_in_bf16_mixed(tiny_llama_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(pair) + "\n" for pair in PAIRS))
    gpu = ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed"]
    sft = ["--config", "configs/sft/tiny.yaml", "--model.model", str(tiny_llama_dir), "--data.path", str(pairs),
           "--run.root", str(tmp_path / "runs"), "--run.name", "gpu", *gpu]
    assert lab_main(["sft", "fit", *sft, "--trainer.max_steps", "20"]) == 0
    run_dir = tmp_path / "runs" / "sft" / "gpu"
    losses = [line["train_loss"] for line in read_jsonl(run_dir / "metrics.jsonl") if "train_loss" in line]
    assert len(losses) == 20 and all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0] - 0.5
    assert lab_main(["sft", "predict", *sft, "--ckpt_path", "last", "--data.predict_split", "all",
                     "--model.predict.max_new_tokens", "8"]) == 0
    assert len(read_jsonl(run_dir / "predictions.jsonl")) == 1 + len(PAIRS)

    rewards = tmp_path / "rewards.py"
    rewards.write_text("def has_digit(sample, completion):\n    return float(any(c.isdigit() for c in completion))\n")
    assert lab_main(["rl", "fit", "--config", "configs/rl/tiny.yaml", "--model.model", str(tiny_llama_dir),
                     "--data.path", str(pairs), "--model.reward", f"{rewards}:has_digit", "--run.root",
                     str(tmp_path / "runs"), "--run.name", "gpu", "--trainer.max_steps", "3", *gpu]) == 0
    steps = [line for line in read_jsonl(tmp_path / "runs" / "rl" / "gpu" / "metrics.jsonl") if "train_kl" in line]
    assert len(steps) == 3 and all(math.isfinite(step["train_loss"]) for step in steps) and steps[-1]["train_kl"] > 0


def test_pretraining_steps_on_gpu_in_bf16_mixed(data, tmp_path):  # noqa: F811  (the imported fixture)
    pretrain_main(fit_args(data, tmp_path, "gpu", "--model.model_config", str(data["micro"]),
                           "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision",
                           "bf16-mixed", "--trainer.max_steps", "60", "--trainer.val_check_interval", "60",
                           "--data.seq_len", "64", "--data.batch_size", "16", "--data.val_batches", "4",
                           "--model.warmup_steps", "5", "--model.lr", "1e-2"))
    metrics = read_jsonl(tmp_path / "pretrain" / "gpu" / "metrics.jsonl")
    val = [line["val_loss"] for line in metrics if "val_loss" in line]
    train = [line["train_loss"] for line in metrics if "train_loss" in line]
    assert len(val) == 1 and all(math.isfinite(loss) for loss in train)
    assert val[0] < 0.7 * math.log(400), val  # well under uniform guessing over the 400-token vocabulary
    checkpoint = torch.load(tmp_path / "pretrain" / "gpu" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 60
