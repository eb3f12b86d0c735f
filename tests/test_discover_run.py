"""The discovery suite runner: best-of-N and TTT arms on a tiny model, resume after a kill, a TTT step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_lab.cli import main as lab
from lightning_lab.discover.run import DiscoverConfig, run
from lightning_lab.discover.tasks import DiscoveryTask
from lightning_lab.errors import UserError

TASKS = [
    DiscoveryTask("rev", "reverse", 1, 'reverse "abc"', "cba"),
    DiscoveryTask("sort", "sort_digits", 1, "sort the digits 3 1 2", "1 2 3"),
    DiscoveryTask("dd", "dedup", 1, 'remove repeated letters from "abca"', "abc"),
]
TINY = dict(steps=2, rollouts=6, groups=2, max_new_tokens=4, progress=False, device="cpu", dtype="fp32")


def task_file(directory: Path, tasks=TASKS) -> Path:
    path = directory / "tasks.jsonl"
    path.write_text("".join(json.dumps(task.__dict__) + "\n" for task in tasks))
    return path


def results(run_dir: Path) -> dict[str, dict]:
    return {path.parent.name: json.loads(path.read_text()) for path in (run_dir / "tasks").glob("*/result.json")}


def test_both_arms_give_byte_identical_prompts_and_count_their_budget(tmp_path, tiny_llama_dir):
    tasks = task_file(tmp_path)
    common = dict(tasks=str(tasks), model=str(tiny_llama_dir), output_dir=str(tmp_path / "runs"),
                  stop_on_exact=False, **TINY)
    assert run(DiscoverConfig(mode="bestofn", name="bon", **common)) == 0
    assert run(DiscoverConfig(mode="ttt", name="ttt", **common)) == 0
    bon, ttt = results(tmp_path / "runs" / "bon"), results(tmp_path / "runs" / "ttt")
    assert sorted(bon) == sorted(ttt) == sorted(task.id for task in TASKS)
    for task in TASKS:
        b, t = bon[task.id], ttt[task.id]
        assert b["prompt"] == t["prompt"] and "Q: " + task.question + " A:" in b["prompt"]
        assert b["samples"] == t["samples"] == 12 == len(b["rewards"]) == len(t["rewards"])
        assert b["flops"]["backward"] == 0 < t["flops"]["backward"]
        assert t["flops"]["forward"] > t["flops"]["sampling"] > 0 and b["flops"]["forward"] == b["flops"]["sampling"]
        for r in (b, t):
            assert r["reward"] == max(r["rewards"]) and r["best"]["reward"] == r["reward"]
            assert 0 <= r["mean_reward"] <= r["reward"] <= 1 and r["exact"] == (r["best"]["text"] == task.answer)
        metrics = [json.loads(line) for line in (tmp_path / "runs/ttt/tasks" / task.id / "metrics.jsonl").open()]
        assert [m["step"] for m in metrics] == [0, 1] and len(t["betas"]) == 2
        assert (tmp_path / "runs/ttt/tasks" / task.id / "adapters/step_001/adapter_model.safetensors").is_file()
        assert not (tmp_path / "runs/ttt/tasks" / task.id / "progress.pt").exists()
    summary = [json.loads(line) for line in (tmp_path / "runs/ttt/summary.jsonl").open()]
    assert summary[0]["kind"] == "header" and [s["id"] for s in summary[1:]] == [task.id for task in TASKS]
    assert lab(["discover", "compare", "--runs", f"[{tmp_path / 'runs/bon'},{tmp_path / 'runs/ttt'}]"]) == 0


def test_ttt_step_raises_the_log_prob_of_high_reward_rollouts(tmp_path, tiny_llama_dir):
    from lightning_lab.discover.archive import Archive
    from lightning_lab.discover.run import Budget, prompt_ids
    from lightning_lab.discover.ttt import TestTimeTrainer
    from lightning_lab.models.loading import LoadedModel, load_causal_lm
    from lightning_lab.models.scoring import score
    from lightning_lab.sampling.sampler import Sampler

    config = DiscoverConfig(tasks=str(task_file(tmp_path)), model=str(tiny_llama_dir), mode="ttt", rollouts=8,
                            groups=1, max_new_tokens=6, learning_rate=0.02, kl_coef=0.0, **{
                                k: v for k, v in TINY.items() if k not in ("rollouts", "groups", "max_new_tokens")})
    loaded = load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32")
    trainer = TestTimeTrainer(loaded, config)
    sampler = Sampler(LoadedModel(trainer.model, loaded.tokenizer, loaded.spec, loaded.device, loaded.dtype))
    task = TASKS[1]
    ids = prompt_ids(sampler, task, None)
    optimizer = torch.optim.AdamW(list(trainer.trainable.values()), lr=config.learning_rate)
    (group,), metrics = trainer.step(sampler, task, ids, Archive(), 0, optimizer, Budget())
    rewards = torch.tensor([r.reward for r in group])
    assert rewards.max() > rewards.min()
    completions = [r.completion_ids for r in group]
    after = score(trainer.model, [ids] * len(group), completions).sequence_logprobs()
    before = score(trainer.model, [ids] * len(group), completions, adapter=False).sequence_logprobs()  # B was 0
    change = after - before
    best, worst = int(rewards.argmax()), int(rewards.argmin())
    assert change[best] > 0 and change[best] > change[worst]
    assert metrics["betas"][0] > 0 and metrics["seconds"]["total"] > 0


def test_resume_after_a_kill_finishes_without_redoing_finished_tasks(tmp_path, tiny_llama_dir):
    tasks = task_file(tmp_path)
    settings = dict(TINY, steps=5, stop_on_exact=False, save_adapters=False)
    common = dict(tasks=str(tasks), model=str(tiny_llama_dir), output_dir=str(tmp_path / "runs"), mode="ttt",
                  **settings)
    assert run(DiscoverConfig(name="whole", **common)) == 0

    args = [sys.executable, "-m", "lightning_lab.cli", "discover", "run", "--name", "killed"]
    args += [item for key, value in common.items() for item in (f"--{key}", str(value))]
    process = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": os.getcwd()}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    killed = tmp_path / "runs" / "killed"
    deadline = time.time() + 300
    while not (killed / "tasks" / TASKS[1].id / "progress.pt").exists():  # mid-way through the second task
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = killed / "tasks" / TASKS[0].id / "result.json"
    finished_before = first.stat().st_mtime_ns
    assert run(DiscoverConfig(name="killed", resume=True, **common)) == 0
    assert first.stat().st_mtime_ns == finished_before
    summary = [json.loads(line) for line in (killed / "summary.jsonl").open()][1:]
    assert [s["id"] for s in summary] == [task.id for task in TASKS]
    whole, resumed = results(tmp_path / "runs" / "whole"), results(killed)
    for task in TASKS:
        assert resumed[task.id]["rewards"] == whole[task.id]["rewards"]
        assert resumed[task.id]["best"] == whole[task.id]["best"]
        steps = [json.loads(line)["step"] for line in (killed / "tasks" / task.id / "metrics.jsonl").open()]
        assert steps == list(range(5))


def test_bad_inputs_are_named_before_a_model_loads(tmp_path, capsys):
    tasks = task_file(tmp_path)
    base = ["discover", "run", "--tasks", str(tasks), "--model", str(tmp_path / "no-such-model"),
            "--output_dir", str(tmp_path / "runs")]
    assert lab(base + ["--mode", "ttt", "--rollouts", "4", "--groups", "2"]) == 2
    assert "each group needs at least 3" in capsys.readouterr().err
    assert lab(base + ["--mode", "sideways"]) == 2
    assert "mode" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(tasks.read_text() + '{"id": "x", "family": "add", "difficulty": 1, "question": "what is 1 plus 1?", '
                   '"answer": "3"}\n')
    assert lab(["discover", "run", "--tasks", str(bad), "--model", str(tmp_path / "no-such-model"),
                "--output_dir", str(tmp_path / "runs")]) == 2
    assert f"{bad}:4: answer '3' does not solve" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    with pytest.raises(UserError, match="tasks: .*no such file"):
        DiscoverConfig(tasks=str(tmp_path / "missing.jsonl"))


@pytest.mark.slow
def test_smollm2_runs_both_arms_from_the_shipped_config(tmp_path):
    tasks = task_file(tmp_path, TASKS[:1])
    for mode in ("bestofn", "ttt"):
        assert lab(["discover", "run", "--config", "configs/discover/smollm2.yaml", "--tasks", str(tasks),
                    "--mode", mode, "--name", mode, "--output_dir", str(tmp_path / "runs"), "--steps", "1",
                    "--rollouts", "3", "--groups", "1", "--max_new_tokens", "8", "--progress", "false"]) == 0
    bon, ttt = results(tmp_path / "runs" / "bestofn"), results(tmp_path / "runs" / "ttt")
    assert bon["rev"]["prompt"] == ttt["rev"]["prompt"] and "<|im_start|>" in bon["rev"]["prompt"]
    assert ttt["rev"]["flops"]["backward"] > 0 and len(ttt["rev"]["rewards"]) == 3


def test_ttt_runs_on_the_lab_gpt(tmp_path, tiny_lab_gpt_dir, capsys):
    tasks = task_file(tmp_path, TASKS[:1])
    assert run(DiscoverConfig(tasks=str(tasks), model=str(tiny_lab_gpt_dir), mode="ttt", name="gpt",
                              output_dir=str(tmp_path / "runs"), **dict(TINY, steps=1))) == 0
    result = results(tmp_path / "runs" / "gpt")["rev"]
    assert result["samples"] == 6 and result["flops"]["backward"] > 0
    assert "1 tasks, mean best reward" in capsys.readouterr().out
