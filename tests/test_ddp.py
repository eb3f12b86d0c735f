"""SFT and RL on two CPU processes (DDP over gloo), run as a user runs them: `lab sft|rl fit --trainer.strategy ddp
--trainer.devices 2 --trainer.accelerator cpu`. The ranks train on disjoint samples (each its share of every global
batch), a Ctrl+C that reaches one rank stops both after the same step, and `--ckpt_path last` continues exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch import Callback
from safetensors.torch import load_file

from lightning_lab.data.benchmarks import load_benchmark
from lightning_lab.training.common import SampleBatches

TESTS = Path(__file__).parent
DDP = ("--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu")


class RecordSampleIds(Callback):
    """Appends each training batch's sample ids to ``<run dir>/samples.rank<R>.jsonl``, one line per step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        path = Path(trainer.default_root_dir) / f"samples.rank{trainer.global_rank}.jsonl"
        with path.open("a") as file:
            file.write(json.dumps({"step": trainer.global_step, "ids": [sample.id for sample in batch]}) + "\n")


def run_lab(*argv: str, timeout: float = 240) -> None:
    """`python -m lightning_lab.cli ARGV` in a subprocess (DDP starts its ranks as processes of their own)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    # its own session, so that a hang (ranks disagreeing on a collective) kills both ranks, not only rank 0
    process = subprocess.Popen([sys.executable, "-m", "lightning_lab.cli", *argv], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"the DDP run hung for {timeout} s")
    assert process.returncode == 0, stderr[-3000:]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def expected_ids(data: Path, batch_size: int, rank: int, steps: int) -> list[list[str]]:
    """The sample ids rank `rank` of 2 should train on at steps 1..steps (SampleBatches over the epochs)."""
    batches = SampleBatches(load_benchmark(data, split="all"), batch_size, shuffle=True, seed=0, rank=rank,
                            world_size=2)
    ids = []
    while len(ids) < steps:
        ids += [[sample.id for sample in batch] for batch in batches]
    return ids[:steps]


def test_sft_on_two_ranks_shards_pauses_together_and_resumes_exactly(tiny_llama_dir, tmp_path):
    # 10 pairs, 2 per rank: 2 global batches per epoch (2 pairs left out), so 6 steps cross two epoch boundaries
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"What is {i} + 3?", "completion": f"It is {i + 3}."})
                            + "\n" for i in range(10)))

    def fit(name: str, *extra: str) -> Path:
        run_lab("sft", "fit", "--config", "configs/sft/tiny.yaml", "--model.model", str(tiny_llama_dir),
                "--data.path", str(data), "--run.root", str(tmp_path / "runs"), "--run.name", name,
                "--trainer.max_steps", "6", "--data.batch_size", "2", "--model.lora.dropout", "0.1", *DDP,
                "--trainer.callbacks+=test_ddp.RecordSampleIds", *extra)
        return tmp_path / "runs" / "sft" / name

    straight = fit("straight")
    paused = fit("paused", "--trainer.callbacks+=conftest.SigintAtStep", "--trainer.callbacks.step=3",
                 "--trainer.callbacks.rank=1")
    assert json.loads((paused / "_run_tracker" / "heartbeat.json").read_text())["status"] == "paused"
    assert [len(read_jsonl(paused / f"samples.rank{rank}.jsonl")) for rank in (0, 1)] == [3, 3]  # both stopped
    fit("paused", "--ckpt_path", "last")

    for run in (straight, paused):
        recorded = [read_jsonl(run / f"samples.rank{rank}.jsonl") for rank in (0, 1)]
        for rank in (0, 1):
            assert [line["step"] for line in recorded[rank]] == [1, 2, 3, 4, 5, 6]
            assert [line["ids"] for line in recorded[rank]] == expected_ids(data, 2, rank, 6)
        for first, second in zip(*recorded):
            assert not set(first["ids"]) & set(second["ids"])  # disjoint samples at every step
    adapter = lambda run: load_file(run / "adapters" / "final" / "adapter_model.safetensors")  # noqa: E731
    expected, resumed = adapter(straight), adapter(paused)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert (resumed[key] == expected[key]).all(), key


def test_rl_on_two_ranks_shards_prompts_and_reduces_the_validation_reward(tiny_llama_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"What is {i} + 1?", "reference": str(i + 1)})
                               + "\n" for i in range(8)))
    # reward 1 for one validation prompt only: over the 3 validation prompts the mean is 1/3, while a mean of the
    # ranks' means (2 prompts on rank 0, 1 on rank 1) would be 1/4 or 1/2
    first_dev = load_benchmark(prompts, split="dev", limit=3, seed=0)[0].id
    (tmp_path / "toy_rewards.py").write_text(f"def only_one(sample, completion):\n"
                                             f"    return float(sample.id == {first_dev!r})\n")
    # one run: pausing and resuming are the same callbacks as SFT's (tested there)
    run_lab("rl", "fit", "--config", "configs/rl/tiny.yaml", "--model.model", str(tiny_llama_dir),
            "--data.path", str(prompts), "--model.reward", f"{tmp_path / 'toy_rewards.py'}:only_one",
            "--run.root", str(tmp_path / "runs"), "--run.name", "rl", "--trainer.max_steps", "2",
            "--data.batch_size", "1", "--model.group_size", "2", "--model.max_new_tokens", "3",
            "--data.val_split", "dev", "--data.val_limit", "3", "--trainer.val_check_interval", "2",
            "--trainer.num_sanity_val_steps", "0", *DDP, "--trainer.callbacks+=test_ddp.RecordSampleIds")
    run_dir = tmp_path / "runs" / "rl" / "rl"
    recorded = [read_jsonl(run_dir / f"samples.rank{rank}.jsonl") for rank in (0, 1)]
    assert [[line["step"] for line in lines] for lines in recorded] == [[1, 2], [1, 2]]
    train_ids = {sample.id for sample in load_benchmark(prompts, split="all")} - {
        sample.id for sample in load_benchmark(prompts, split="dev")}
    seen = [sample_id for lines in recorded for line in lines for sample_id in line["ids"]]
    assert len(seen) == len(set(seen)) == 4 and set(seen) <= train_ids  # 2 steps x 2 ranks, all different
    validations = [line for line in read_jsonl(run_dir / "metrics.jsonl") if "val_reward" in line]
    assert len(validations) == 1 and validations[0]["val_reward"] == pytest.approx(1 / 3)
