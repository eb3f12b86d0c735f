"""SDFT: the data set of verified-exact demonstrations (`lab discover build-sdft`) and the distillation stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from lightning_lab.cli import main as lab
from lightning_lab.discover.tasks import DiscoveryTask

TASKS = [
    DiscoveryTask("rev", "reverse", 1, 'reverse "abc"', "cba"),
    DiscoveryTask("sort", "sort_digits", 1, "sort the digits 3 1 2", "1 2 3"),
    DiscoveryTask("dd", "dedup", 1, 'remove repeated letters from "abca"', "abc"),
]


def task_file(directory: Path, tasks=TASKS) -> Path:
    path = directory / "tasks.jsonl"
    path.write_text("".join(json.dumps(task.__dict__) + "\n" for task in tasks))
    return path


def fake_run(directory: Path, best: dict[str, tuple[str, bool]]) -> Path:
    """A finished discovery run as `lab discover run` writes it: summary.jsonl + tasks/<id>/result.json."""
    directory.mkdir(parents=True)
    lines = [{"kind": "header", "config": {"mode": "ttt", "seed": int(directory.name[-1])}}]
    for task_id, (text, exact) in best.items():
        (directory / "tasks" / task_id).mkdir(parents=True)
        result = {"id": task_id, "best": {"text": text, "exact": exact, "reward": 1.0 if exact else 0.5}}
        (directory / "tasks" / task_id / "result.json").write_text(json.dumps(result))
        lines.append({"id": task_id, "exact": exact})
    (directory / "summary.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return directory


def test_build_sdft_keeps_only_verified_exact_demonstrations(tmp_path, capsys):
    tasks = task_file(tmp_path)
    # seed 0 solved rev and sort (sort's "exact" flag is wrong: the verifier disagrees), seed 1 rev again and dd
    fake_run(tmp_path / "suite" / "ttt-s0", {"rev": ("cba", True), "sort": ("3 1 2", True), "dd": ("abca", False)})
    fake_run(tmp_path / "suite" / "ttt-s1", {"rev": ("cba", True), "dd": ("abc", True)})
    out = tmp_path / "sdft.jsonl"
    assert lab(["discover", "build-sdft", "--suite_root", str(tmp_path / "suite"), "--tasks", str(tasks),
                "--out", str(out), "--min_reward", "0.99"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["task_id"], row["demonstration"]) for row in rows] == [("rev", "cba"), ("dd", "abc")]
    assert rows[0]["prompt"] == 'Q: reverse "abc" A:' and rows[0]["completion"] == " cba"
    assert all(row["reward"] == 1.0 for row in rows)
    assert "2 demonstrations of 2 tasks" in capsys.readouterr().out
    from lightning_lab.data.benchmarks import load_benchmark

    assert [s.reference for s in load_benchmark(str(out), split="all")] == [" cba", " abc"]  # SFT reads it as pairs
    # nothing overwritten; a run on another task file is named
    assert lab(["discover", "build-sdft", "--suite_root", str(tmp_path / "suite"), "--tasks", str(tasks),
                "--out", str(out)]) == 2
    (tmp_path / "other").mkdir()
    other = task_file(tmp_path / "other", TASKS[:1])
    assert lab(["discover", "build-sdft", "--suite_root", str(tmp_path / "suite"), "--tasks", str(other),
                "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "not in" in capsys.readouterr().err


# ---- the stage -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> Path:
    """Prompt/demonstration pairs of real discovery tasks (their exact answers), as build-sdft writes them."""
    from lightning_lab.discover.tasks import SplitConfig, make_splits

    path = tmp_path_factory.mktemp("sdft_data") / "sdft.jsonl"
    tasks = make_splits(SplitConfig(seed=0, train_per_cell=2, heldout_per_cell=1))["train"][:24]
    path.write_text("".join(json.dumps({"id": task.id, "task_id": task.id, "prompt": task.prompt,
                                        "demonstration": task.answer, "completion": f" {task.answer}",
                                        "reward": 1.0}) + "\n" for task in tasks))
    return path


@pytest.fixture(scope="module")
def packed_val(tiny_llama_dir, tmp_path_factory) -> Path:
    from lightning_lab.data.packed import pack

    root = tmp_path_factory.mktemp("sdft_val")
    (root / "val.txt").write_text("".join(f"What is {i} + 3? It is {i + 3}. The answer is {i}.\n" for i in range(40)))
    pack(tiny_llama_dir, root / "val.txt", root / "val.bin")
    return root / "val.bin"


def stage(tmp_path, model_dir, data, *extra) -> list[str]:
    return ["sdft", "--config", "configs/sdft/tiny.yaml", "--model.model", str(model_dir), "--data.path", str(data),
            "--run.root", str(tmp_path), *extra]


def val_metric(run: Path, key: str) -> float:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if key in line][-1][key]


class SpoilAtStep(Callback):
    """Wrecks the LoRA weights once `step` optimizer steps are done, so the retention gate's perplexity rises
    (stages take it on the command line: --trainer.callbacks+=tests.test_sdft.SpoilAtStep)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, parameter in pl_module.named_parameters():
                    if "lora_B" in name:
                        parameter.copy_(5 * torch.randn(parameter.shape, generator=generator))


def test_the_ema_teacher_moves_by_the_configured_rate(tiny_llama_dir):
    from lightning_lab.discover.sdft import SDFTModule

    module = SDFTModule(model=str(tiny_llama_dir), ema_rate=0.03)
    module.configure_model()
    module.init_teacher()
    parameters = module.lora_parameters()
    before = {name: tensor.clone() for name, tensor in module.teacher.items()}
    with torch.no_grad():
        for parameter in parameters.values():
            parameter.add_(torch.randn_like(parameter))
    module.update_teacher()
    for name, parameter in parameters.items():
        torch.testing.assert_close(module.teacher[name] - before[name], 0.03 * (parameter.detach() - before[name]))
    with module.teacher_weights():  # the student runs with the teacher's weights, then gets its own back
        assert all(torch.equal(p, module.teacher[n]) for n, p in module.lora_parameters().items())
    assert not any(torch.equal(p, module.teacher[n]) for n, p in module.lora_parameters().items())


def test_sdft_lowers_the_reverse_kl_to_the_teacher_on_held_out_prompts(tmp_path, tiny_lab_gpt_dir, demos):
    # the lab GPT fixture: larger initial weights than the llama's, so its outputs depend on the context
    assert lab(["sdft", "validate"] + stage(tmp_path, tiny_lab_gpt_dir, demos, "--run.name", "before")[1:]) == 0
    before = val_metric(tmp_path / "sdft" / "before", "val_reverse_kl")
    assert lab(["sdft", "fit"] + stage(tmp_path, tiny_lab_gpt_dir, demos, "--run.name", "fit")[1:]) == 0
    run = tmp_path / "sdft" / "fit"
    after = val_metric(run, "val_reverse_kl")  # the held-out (dev) half, after 20 steps
    print(f"held-out reverse KL before {before:.4f}, after {after:.4f}")
    assert after < 0.5 * before, (before, after)
    report = json.loads((run / "sdft_eval_report.json").read_text())
    assert report["objective"] == "sdft" and report["steps"] == 20 and not report["gate"]["enabled"]
    assert (run / "adapters" / "final" / "adapter_model.safetensors").is_file()
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "train_reverse_kl" in line]
    assert len(train) == 20


def test_the_retention_gate_stops_a_run_whose_perplexity_rises_and_keeps_the_last_pass(tmp_path, tiny_lab_gpt_dir,
                                                                                        demos, packed_val):
    from safetensors.torch import load_file

    args = ["sdft", "fit"] + stage(tmp_path, tiny_lab_gpt_dir, demos, "--run.name", "gate", "--model.objective", "sft",
                                   "--model.learning_rate", "1e-4", "--model.gate_bin", str(packed_val),
                                   "--model.seq_len", "16", "--model.gate_every", "2", "--model.gate_max_rise", "0.1",
                                   "--trainer.callbacks+=tests.test_sdft.SpoilAtStep",
                                   "--trainer.callbacks.step=4")[1:]
    assert lab(args) == 0
    run = tmp_path / "sdft" / "gate"
    gate = json.loads((run / "sdft_eval_report.json").read_text())["gate"]
    assert [(h["step"], h["passed"]) for h in gate["history"]] == [(2, True), (4, False)]
    assert gate["stopped_at"] == 4 and gate["passing_step"] == 2
    passing = torch.load(run / "checkpoints" / "passing.ckpt", weights_only=True)
    assert passing["global_step"] == 2
    adapter = load_file(run / "adapters" / "final" / "adapter_model.safetensors")
    kept = {name.split("model.", 1)[1]: tensor for name, tensor in passing["state_dict"].items()}
    for name, tensor in adapter.items():  # the adapter written is the last passing step's, not the spoilt one
        match = [value for key, value in kept.items() if key.replace(".default", "") == name]
        assert len(match) == 1 and torch.equal(match[0], tensor), name


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_lab_gpt_dir, demos, packed_val):
    """The student's samples, the EMA teacher and the gate continue exactly after a pause; the gate also checks
    the last step (5, not a multiple of gate_every)."""
    from safetensors.torch import load_file

    common = ["--trainer.max_steps", "5", "--model.gate_bin", str(packed_val), "--model.seq_len", "16",
              "--model.gate_every", "2", "--model.gate_max_rise", "10", "--trainer.val_check_interval", "100"]
    assert lab(["sdft", "fit"] + stage(tmp_path, tiny_lab_gpt_dir, demos, "--run.name", "straight", *common)[1:]) == 0
    paused = stage(tmp_path, tiny_lab_gpt_dir, demos, "--run.name", "paused", *common)[1:]
    assert lab(["sdft", "fit"] + paused + ["--trainer.callbacks+=conftest.SigintAtStep",
                                           "--trainer.callbacks.step=3"]) == 0
    run = tmp_path / "sdft" / "paused"
    assert json.loads((run / "_run_tracker" / "heartbeat.json").read_text())["status"] == "paused"
    assert lab(["sdft", "fit"] + paused + ["--ckpt_path", "last"]) == 0
    reports = [json.loads((tmp_path / "sdft" / name / "sdft_eval_report.json").read_text())
               for name in ("straight", "paused")]
    assert reports[0]["gate"]["history"] == reports[1]["gate"]["history"]
    assert [h["step"] for h in reports[0]["gate"]["history"]] == [2, 4, 5]
    straight, resumed = (load_file(tmp_path / "sdft" / name / "adapters" / "final" / "adapter_model.safetensors")
                         for name in ("straight", "paused"))
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)


@pytest.mark.slow
def test_sdft_steps_on_smollm2(tmp_path, demos):
    """Two SDFT steps on the real model: its samples, the teacher's context and the vocabulary-wide KL."""
    args = ["sdft", "fit"] + stage(tmp_path, "smollm2-135m", demos, "--run.name", "smollm2", "--trainer.max_steps", "2",
                                   "--model.samples_per_prompt", "1", "--model.max_new_tokens", "6",
                                   "--model.learning_rate", "1e-4", "--data.batch_size", "2",
                                   "--data.val_split", "null")[1:]
    assert lab(args) == 0
    run = tmp_path / "sdft" / "smollm2"
    kls = [json.loads(line)["train_reverse_kl"] for line in (run / "metrics.jsonl").read_text().splitlines()
           if "train_reverse_kl" in line]
    assert len(kls) == 2 and all(kl > 0 for kl in kls)  # the teacher sees the demonstration: the distributions differ
    assert json.loads((run / "sdft_eval_report.json").read_text())["steps"] == 2
