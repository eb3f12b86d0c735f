"""LoRA SFT: the loss falls, checkpoints hold only the adapter, resume is exact, merge equals the adapter."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lightning_lab.cli import main as lab_main
from lightning_lab.data.benchmarks import Sample, load_benchmark
from lightning_lab.data.io import DataError
from lightning_lab.errors import UserError
from lightning_lab.sampling.sampler import Sampler
from lightning_lab.models.loading import load_causal_lm
from lightning_lab.models.lora import adapter_base_spec, load_adapter
from lightning_lab.sampling.prompts import encode_prompt
from lightning_lab.training.common import SampleBatches, SampleDataModule
from lightning_lab.training.sft import completion_text, sft_example

PAIRS = [
    {"id": "a", "prompt": "What is 2 + 3?", "completion": "It is 5."},
    {"id": "b", "prompt": "Natalia sold clips.", "completion": "The answer is 72."},
    {"id": "c", "prompt": "question", "completion": "answer user"},
    {"id": "d", "prompt": "What is 2 + 3? question", "completion": "The answer is 5."},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def sft_argv(model_dir: Path, data: Path, root: Path, name: str, *extra: str) -> list[str]:
    return ["sft", "fit", "--config", "configs/sft/tiny.yaml", "--model.model", str(model_dir),
            "--data.path", str(data), "--run.root", str(root), "--run.name", name, *extra]


def train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["train_loss"] for record in records if "train_loss" in record]


def test_prompts_are_tokenized_as_the_sampler_tokenizes_them(tiny_llama_dir):
    loaded = load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32")
    sampler = Sampler(loaded)
    assert encode_prompt(loaded.tokenizer, "What is 2 + 3?") == sampler.encode("What is 2 + 3?")
    loaded.tokenizer.chat_template = None
    assert encode_prompt(loaded.tokenizer, "What is 2 + 3?") == sampler.encode("What is 2 + 3?")


def test_example_is_the_sampler_prompt_then_the_completion_and_eos(tiny_llama_dir):
    tokenizer = load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32").tokenizer
    for pair in PAIRS[:2]:
        sample = Sample(pair["id"], pair["prompt"], pair["completion"])
        prompt_ids, completion_ids = sft_example(tokenizer, sample, max_length=512)
        assert prompt_ids == encode_prompt(tokenizer, sample.prompt)
        assert completion_ids[-1] == tokenizer.eos_token_id and tokenizer.decode(completion_ids[:-1]) == sample.reference
        cut_prompt, cut = sft_example(tokenizer, sample, max_length=len(prompt_ids) + 2)
        assert cut_prompt == prompt_ids and cut == completion_ids[:2]  # cut to max_length, prompt kept whole
    with pytest.raises(DataError, match="model.max_length=3"):
        sft_example(tokenizer, sample, max_length=3)


def test_training_data_never_contains_the_dev_half(tmp_path):
    records = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(20)]
    path = write_jsonl(tmp_path / "gsm.jsonl", records)
    data = SampleDataModule(str(path), val_limit=3, batch_size=4)
    data.setup("fit")
    dev_ids = {sample.id for sample in load_benchmark(path, split="dev")}
    train_ids = {sample.id for sample in data.train_samples}
    assert len(data.val_samples) == 3 and {sample.id for sample in data.val_samples} <= dev_ids
    # the whole dev half is held out, not only the 3 validated on
    assert len(dev_ids) == 10 and train_ids == {f"gsm-{line}" for line in range(1, 21)} - dev_ids
    first = data.train_samples[0]
    assert completion_text(first) == first.metadata["solution"] and completion_text(first).endswith(f"#### {first.reference}")

    # two DDP ranks: each trains on its half of every global batch of 2 x 4 (the 2 samples left over are
    # not trained on in this epoch) and validates on its share of the 3 validation samples
    shares, validated = [], []
    for rank in (0, 1):
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        data.setup("fit")
        shares.append([sample.id for batch in data.train_dataloader() for sample in batch])
        validated += [sample.id for batch in data.val_dataloader() for sample in batch]
    assert len(shares[0]) == len(shares[1]) == 4 and not set(shares[0]) & set(shares[1])
    assert sorted(validated) == sorted(sample.id for sample in data.val_samples)
    data.batch_size = 6  # 10 samples cannot fill one global batch of 2 x 6
    with pytest.raises(DataError, match="data.batch_size=6 x 2 processes"):
        data.setup("fit")


def test_batches_resume_where_they_stopped():
    samples = [Sample(str(i), "p", "r") for i in range(5)]
    ids = lambda batch: [sample.id for sample in batch]  # noqa: E731
    uninterrupted = SampleBatches(samples, batch_size=2, shuffle=True, seed=1)
    expected = [ids(batch) for _ in range(2) for batch in uninterrupted]  # two epochs of 3 batches
    interrupted = SampleBatches(samples, batch_size=2, shuffle=True, seed=1)
    iterator = iter(interrupted)
    got = [ids(next(iterator)), ids(next(iterator))]
    resumed = SampleBatches(samples, batch_size=2, shuffle=True, seed=1)
    resumed.load_state_dict(interrupted.state_dict())
    got += [ids(batch) for batch in resumed] + [ids(batch) for batch in resumed]
    assert got == expected and expected[:3] != expected[3:]  # resumed mid-epoch; epochs differ in order
    on_two_ranks = SampleBatches(samples, batch_size=2, shuffle=True, seed=1, world_size=2)
    with pytest.raises(UserError, match="trained on 1 processes, this run has 2"):
        on_two_ranks.load_state_dict(interrupted.state_dict())


def test_sft_loss_falls_and_merged_model_equals_adapter(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert lab_main(sft_argv(tiny_llama_dir, data, tmp_path / "runs", "memorise")) == 0
    run_dir = tmp_path / "runs" / "sft" / "memorise"
    losses = train_losses(run_dir)
    assert losses[-1] < losses[0] - 0.5, losses

    validate = ["sft", "validate", *sft_argv(tiny_llama_dir, data, tmp_path / "runs", "memorise")[2:],
                "--data.val_split", "all", "--ckpt_path", "last"]
    assert lab_main(validate) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "val_loss" in records[-1] and records[-1]["val_loss"] < losses[0] - 0.5  # the trained adapter was loaded

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"] and all("lora_" in key for key in checkpoint["state_dict"])
    assert checkpoint["hyper_parameters"]["model"] == str(tiny_llama_dir)

    adapter = run_dir / "adapters" / "final"
    assert adapter_base_spec(adapter) == str(Path(tiny_llama_dir).resolve())
    merged_dir = tmp_path / "merged"
    assert lab_main(["adapter", "merge", "--adapter", str(adapter), "--out", str(merged_dir)]) == 0
    ids = torch.tensor([[5, 17, 42, 99, 7, 200]])
    with torch.no_grad():
        adapted = load_adapter(adapter, device="cpu", dtype="fp32").model(ids).logits
        merged = load_causal_lm(str(merged_dir), device="cpu", dtype="fp32").model(ids).logits
        base = load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32").model(ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert (adapted - base).abs().max() > 1e-2  # the adapter did change the model

    # predict: the checkpoint's greedy generations through the sampler, as JSONL; the saved adapter gives the same
    predict = ["sft", "predict", *sft_argv(tiny_llama_dir, data, tmp_path / "runs", "memorise")[2:],
               "--data.predict_split", "all", "--model.predict.max_new_tokens", "6"]
    assert lab_main([*predict, "--ckpt_path", "last"]) == 0
    lines = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    header = lines[0]["header"]
    assert header["ckpt_path"].endswith("last.ckpt") and header["predict"]["greedy"] and header["engine"]["threads"] > 0
    assert [line["id"] for line in lines[1:]] == [pair["id"] for pair in PAIRS]
    expected = Sampler(load_adapter(adapter, device="cpu", dtype="fp32")).generate(
        [pair["prompt"] for pair in PAIRS], max_new_tokens=6, greedy=True)
    assert [line["completions"][0]["text"] for line in lines[1:]] == [c[0].text for c in expected.completions]
    assert lab_main([*predict, "--ckpt_path", "last"]) == 2  # an existing predictions file is never overwritten
    assert lab_main([*predict, "--model.adapter", str(adapter), "--model.predict.output", "from_adapter.jsonl"]) == 0
    from_adapter = [json.loads(line) for line in (run_dir / "from_adapter.jsonl").read_text().splitlines()]
    assert [line["completions"] for line in from_adapter[1:]] == [line["completions"] for line in lines[1:]]


def test_resume_from_a_mid_run_checkpoint_equals_an_uninterrupted_run(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    common = ["--trainer.max_steps", "6", "--data.batch_size", "2", "--model.lora.dropout", "0.1",
              "--run.checkpoint_every_n_steps", "3"]
    root = tmp_path / "runs"
    assert lab_main(sft_argv(tiny_llama_dir, data, root, "straight", *common)) == 0
    step3 = root / "sft" / "straight" / "checkpoints" / "step=0000003.ckpt"
    assert step3.is_file()
    assert lab_main(sft_argv(tiny_llama_dir, data, root, "resumed", *common, "--ckpt_path", str(step3))) == 0

    straight = load_file(root / "sft" / "straight" / "adapters" / "final" / "adapter_model.safetensors")
    resumed = load_file(root / "sft" / "resumed" / "adapters" / "final" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)
    assert train_losses(root / "sft" / "resumed") == train_losses(root / "sft" / "straight")[3:]


def test_ctrl_c_pause_then_resume_equals_an_uninterrupted_run(tiny_llama_dir, tmp_path):
    # 10 pairs in batches of 2: the pause (after step 3) lands mid-epoch and the run crosses into epoch 2
    data = write_jsonl(tmp_path / "pairs.jsonl", [{**pair, "id": f"{pair['id']}{i}"} for i in range(3)
                                                  for pair in PAIRS][:10])
    common = ["--trainer.max_steps", "8", "--data.batch_size", "2", "--model.lora.dropout", "0.1"]
    root = tmp_path / "runs"
    assert lab_main(sft_argv(tiny_llama_dir, data, root, "straight", *common)) == 0
    assert lab_main(sft_argv(tiny_llama_dir, data, root, "paused", *common,
                             "--trainer.callbacks+=conftest.SigintAtStep", "--trainer.callbacks.step=3")) == 0
    heartbeat = json.loads((root / "sft" / "paused" / "_run_tracker" / "heartbeat.json").read_text())
    assert (heartbeat["status"], heartbeat["step"]) == ("paused", 3)
    assert lab_main(sft_argv(tiny_llama_dir, data, root, "paused", *common, "--ckpt_path", "last")) == 0

    straight = load_file(root / "sft" / "straight" / "adapters" / "final" / "adapter_model.safetensors")
    resumed = load_file(root / "sft" / "paused" / "adapters" / "final" / "adapter_model.safetensors")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)
    assert train_losses(root / "sft" / "paused") == train_losses(root / "sft" / "straight")


def test_sft_on_the_lab_gpt_with_mhc(tiny_lab_gpt_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    argv = sft_argv(tiny_lab_gpt_dir, data, tmp_path / "runs", "gpt", "--trainer.max_steps", "10")
    assert lab_main(argv) == 0
    run_dir = tmp_path / "runs" / "sft" / "gpt"
    losses = train_losses(run_dir)
    assert losses[-1] < losses[0], losses
    adapter = run_dir / "adapters" / "final"
    targets = set(json.loads((adapter / "adapter_config.json").read_text())["target_modules"])
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # not mHC's
    merged_dir = tmp_path / "merged"
    assert lab_main(["adapter", "merge", "--adapter", str(adapter), "--out", str(merged_dir)]) == 0
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        adapted = load_adapter(adapter, device="cpu", dtype="fp32").model(ids).logits
        merged = load_causal_lm(str(merged_dir), device="cpu", dtype="fp32")
        assert type(merged.model).__name__ == "LabGPTForCausalLM"
        torch.testing.assert_close(merged.model(ids).logits, adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sft_on_smollm2_with_real_gsm8k(gsm8k_path, tmp_path):
    root = tmp_path / "runs"
    argv = ["sft", "fit", "--config", "configs/sft/gsm8k_smollm2.yaml", "--data.path", str(gsm8k_path),
            "--data.train_limit", "4", "--data.batch_size", "2", "--data.val_limit", "2", "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false", "--run.root", str(root),
            "--run.name", "slow"]
    assert lab_main(argv) == 0
    run_dir = root / "sft" / "slow"
    losses = train_losses(run_dir)
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    assert any("val_loss" in json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    adapter = run_dir / "adapters" / "final"
    assert adapter_base_spec(adapter) == "smollm2-135m"
    loaded = load_adapter(adapter, device="cpu", dtype="fp32")
    lora_b = [p for name, p in loaded.model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # trained weights came back, not a fresh adapter
    with torch.no_grad():
        logits = loaded.model(**loaded.tokenizer("Natalia sold clips", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()

    predict = ["sft", "predict", *argv[2:], "--ckpt_path", "last", "--data.predict_limit", "2",
               "--model.predict.max_new_tokens", "24"]
    assert lab_main(predict) == 0
    lines = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(line["completions"][0]["num_tokens"] > 0 for line in lines[1:])
