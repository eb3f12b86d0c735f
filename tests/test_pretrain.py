"""The pretraining stage end to end on a tiny corpus: it learns, pauses on SIGINT, resumes exactly, exports."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_lab.data.corpus import CorpusConfig, write_corpus
from lightning_lab.data.packed import pack
from lightning_lab.data.tokenizer import train_tokenizer
from lightning_lab.training.pretrain import PretrainModule, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MICRO_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Corpus -> 400-piece tokenizer -> packed train/val, with the data stage's own functions."""
    root = tmp_path_factory.mktemp("pretrain_data")
    paths = write_corpus(CorpusConfig(seed=0, train_lines=4000, val_lines=200), root / "train.txt", root / "val.txt")
    tokenizer = train_tokenizer(paths["train"], root / "tokenizer", vocab_size=400)
    for split in ("train", "val"):
        pack(tokenizer, paths[split], root / f"{split}.bin")
    model_yaml = root / "micro.yaml"
    model_yaml.write_text(yaml.safe_dump(MICRO_MODEL))
    return {"root": root, "tokenizer": tokenizer, "train": root / "train.bin", "val": root / "val.bin",
            "micro": model_yaml}


def fit_args(data, run_root: Path, name: str, *extra: str) -> list[str]:
    return ["fit", "--config", str(CONFIGS / "pretrain" / "tiny.yaml"),
            "--model.tokenizer", str(data["tokenizer"]), "--data.tokenizer", str(data["tokenizer"]),
            "--data.train_path", str(data["train"]), "--data.val_path", str(data["val"]),
            "--run.root", str(run_root), "--run.name", name,
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_gpt_tiny_learns(data, tmp_path):
    """configs/pretrain/tiny.yaml with gpt_tiny, shortened (80 steps of 1024 tokens): validation loss ends below
    half of ln(vocab) (uniform guessing), well under the ~0.75 ln(vocab) of a unigram model of this corpus."""
    main(fit_args(data, tmp_path, "learn", "--model.model_config", str(CONFIGS / "model" / "gpt_tiny.yaml"),
                  "--trainer.max_steps", "80", "--trainer.val_check_interval", "40",
                  "--data.seq_len", "64", "--data.batch_size", "16", "--data.val_batches", "4",
                  "--model.warmup_steps", "10", "--trainer.log_every_n_steps", "5"))
    run = tmp_path / "pretrain" / "learn"
    metrics = read_jsonl(run / "metrics.jsonl")
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    train = [m["train_loss"] for m in metrics if "train_loss" in m]
    assert len(val) == 2 and train and all("train_ppl" in m and "lr" in m for m in metrics if "train_loss" in m)
    assert val[-1] < 0.5 * math.log(400), val
    model_config = json.loads((run / "model_config.json").read_text())
    assert model_config["model_type"] == "lab_gpt" and model_config["vocab_size"] == 400
    assert model_config["hidden_size"] == 256  # configs/model/gpt_tiny.yaml
    assert json.loads((run / "pretrain_config.json").read_text())["tokenizer"] == str(data["tokenizer"])
    assert (run / "csv" / "metrics.csv").is_file() and (run / "checkpoints" / "last.ckpt").is_file()


def test_sigint_pause_and_resume_equals_uninterrupted_run(data, tmp_path):
    common = ("--model.model_config", str(data["micro"]), "--trainer.precision", "32-true",
              "--trainer.max_steps", "12", "--trainer.val_check_interval", "6", "--data.seq_len", "32",
              "--data.batch_size", "4", "--data.val_batches", "2", "--model.warmup_steps", "3")
    main(fit_args(data, tmp_path, "straight", *common))
    main(fit_args(data, tmp_path, "paused", *common, "--trainer.callbacks+=conftest.SigintAtStep",
                  "--trainer.callbacks.step=5"))
    paused_run = tmp_path / "pretrain" / "paused"
    heartbeat = json.loads((paused_run / "_run_tracker" / "heartbeat.json").read_text())
    assert heartbeat["status"] == "paused"
    assert torch.load(paused_run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 5

    main(fit_args(data, tmp_path, "paused", *common, "--ckpt_path", "last"))
    straight = torch.load(tmp_path / "pretrain" / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    resumed = torch.load(paused_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == straight["global_step"] == 12
    assert resumed["state_dict"].keys() == straight["state_dict"].keys()
    for name, tensor in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], tensor, atol=1e-6, rtol=1e-5, msg=name)
    assert resumed["lr_schedulers"][0]["last_epoch"] == 12
    assert json.loads((paused_run / "_run_tracker" / "heartbeat.json").read_text())["status"] == "completed"
    events = read_jsonl(paused_run / "_run_tracker" / "events.jsonl")
    pause_events = [(e["event"], e["step"]) for e in events if e["event"] in ("pause", "resume")]
    assert pause_events == [("pause", 5), ("resume", 5)]


def test_ddp_on_two_cpu_processes_shards_pauses_together_and_resumes(data, tmp_path):
    """`lab pretrain fit --trainer.devices 2 --trainer.strategy ddp` on CPU (gloo), run as a user runs it. Each
    rank trains on its own slice of every global batch (checked window by window against the sampler); a SIGINT
    that reaches only rank 1 after step 3 stops both ranks after step 3; `--ckpt_path last` continues both
    ranks with exactly their next slices."""
    from lightning_lab.data.packed import EpochShuffleBatchSampler, PackedDataset

    def run(*extra: str) -> None:
        args = fit_args(data, tmp_path, "ddp", "--model.model_config", str(data["micro"]), "--trainer.precision",
                        "32-true", "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy",
                        "ddp", "--trainer.max_steps", "6", "--trainer.val_check_interval", "6", "--data.seq_len",
                        "32", "--data.batch_size", "4", "--data.val_batches", "1", "--model.warmup_steps", "2",
                        "--trainer.callbacks+=conftest.RecordBatches", *extra)
        tests_dir = str(Path(__file__).parent)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": tests_dir + os.pathsep + os.environ.get("PYTHONPATH", "")}
        # its own session, so that a hang (ranks disagreeing on a collective) kills both ranks, not only rank 0
        process = subprocess.Popen([sys.executable, "-m", "lightning_lab.cli", "pretrain", *args], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, stderr = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail("the DDP run hung for 240 s")
        assert process.returncode == 0, stderr[-3000:]

    run("--trainer.callbacks+=conftest.SigintAtStep", "--trainer.callbacks.step=3", "--trainer.callbacks.rank=1")
    run_dir = tmp_path / "pretrain" / "ddp"
    assert json.loads((run_dir / "_run_tracker" / "heartbeat.json").read_text())["status"] == "paused"
    paused = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert paused["global_step"] == 3 and paused["PackedDataModule"]["world_size"] == 2
    assert [len(read_jsonl(run_dir / f"batches.rank{rank}.jsonl")) for rank in (0, 1)] == [3, 3]

    run("--ckpt_path", "last")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    dataset = PackedDataset(data["train"], 32)
    for rank in (0, 1):
        expected = iter(EpochShuffleBatchSampler(len(dataset), 4, seed=0, start_batch=lambda: 0, rank=rank,
                                                 world_size=2))
        recorded = read_jsonl(run_dir / f"batches.rank{rank}.jsonl")
        assert [line["step"] for line in recorded] == [1, 2, 3, 4, 5, 6]
        for line in recorded:
            assert line["rows"] == [dataset[index][0][:4].tolist() for index in next(expected)], (rank, line["step"])


def test_progress_bar_of_a_max_steps_run_has_no_negative_epoch_count():
    """Lightning's rich bar shows "Epoch 0/-2" when only max_steps bounds the run; the lab's shows "Epoch 0"."""
    from types import SimpleNamespace

    from lightning_lab.training.common import StepsProgressBar

    bar = StepsProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)
    assert bar._get_train_description(0).strip() == "Epoch 0"
    bar._trainer = SimpleNamespace(max_epochs=3)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"


def test_export_round_trip(data, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from lightning_lab.export import main as export_main
    from lightning_lab.models.loading import load_causal_lm

    main(fit_args(data, tmp_path, "export", "--model.model_config", str(data["micro"]), "--trainer.max_steps", "3",
                  "--trainer.val_check_interval", "3", "--data.seq_len", "32", "--data.batch_size", "4",
                  "--data.val_batches", "1", "--trainer.precision", "32-true"))
    checkpoint = tmp_path / "pretrain" / "export" / "checkpoints" / "last.ckpt"
    out = tmp_path / "exported"
    assert export_main(["--ckpt", str(checkpoint), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()

    from_checkpoint = load_causal_lm(str(checkpoint), device="cpu", dtype="fp32")
    from_directory = load_causal_lm(str(out), device="cpu", dtype="fp32")
    auto = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = "Q: what is 2 plus 3? A:"
    input_ids = from_directory.tokenizer(prompt, return_tensors="pt").input_ids
    assert input_ids.tolist() == from_checkpoint.tokenizer(prompt, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        expected = from_checkpoint.model(input_ids).logits
        torch.testing.assert_close(from_directory.model(input_ids).logits, expected, atol=0, rtol=0)
        torch.testing.assert_close(auto(input_ids).logits, expected, atol=0, rtol=0)
    assert auto.generation_config.eos_token_id == from_directory.tokenizer.eos_token_id

    # predict: greedy continuations of a prompt file, as the sampler continues them from the checkpoint
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Q: what is 2 plus 3? A:\n\nthe cat\n")
    predict = ["predict", *fit_args(data, tmp_path, "export", "--model.model_config", str(data["micro"]),
                                    "--data.seq_len", "32", "--data.batch_size", "4")[1:],
               "--ckpt_path", "last", "--data.prompts", str(prompts), "--model.predict.max_new_tokens", "5"]
    main(predict)
    lines = read_jsonl(tmp_path / "pretrain" / "export" / "predictions.jsonl")
    assert lines[0]["header"]["prompts"] == str(prompts) and "threads" in lines[0]["header"]["engine"]
    assert [(line["id"], line["prompt"]) for line in lines[1:]] == [("prompts-1", prompt), ("prompts-3", "the cat")]
    from lightning_lab.sampling.sampler import Sampler

    expected = Sampler(from_checkpoint).generate([prompt, "the cat"], max_new_tokens=5, greedy=True, chat=False)
    assert [line["completions"][0]["text"] for line in lines[1:]] == [c[0].text for c in expected.completions]

    # the run keeps its own tokenizer copy: the checkpoint loads from another directory, even once the
    # tokenizer it was trained with is gone
    moved = data["root"] / "tokenizer_moved"
    os.replace(data["tokenizer"], moved)
    monkeypatch.chdir(tmp_path / "pretrain")
    try:
        elsewhere = load_causal_lm("export/checkpoints/last.ckpt", device="cpu", dtype="fp32")
    finally:
        os.replace(moved, data["tokenizer"])
    assert elsewhere.tokenizer(prompt).input_ids == input_ids[0].tolist()


def test_vocab_mismatch_is_a_clear_error(data, tmp_path):
    model_yaml = tmp_path / "wrong.yaml"
    model_yaml.write_text(yaml.safe_dump({**MICRO_MODEL, "vocab_size": 999}))
    with pytest.raises(ValueError, match=r"wrong\.yaml: vocab_size=999 but the tokenizer has 400 tokens"):
        PretrainModule(str(model_yaml), str(data["tokenizer"]))
