"""`lab pipeline discover-distill`: a complete step is skipped, an incomplete one is redone (phase A, tiny sizes);
a paused stage is continued from its checkpoint; a kill in phase C followed by --resume ends with the registry of
an uninterrupted run; phase B's mHC-off control arm; the paper scale's settings (micro sizes)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from lightning_lab.callbacks.status import run_status
from lightning_lab.cli import main as lab
from lightning_lab.discover.pipeline import PROJECT

TINY = """
corpus_train_lines: 300
corpus_val_lines: 40
vocab_size: 400
train_per_cell: 1
heldout_per_cell: 1
"""


def test_a_complete_phase_is_skipped_and_an_incomplete_one_redone(tmp_path, capsys):
    config, root = tmp_path / "tiny.yaml", tmp_path / "root"
    config.write_text(TINY)
    args = ["pipeline", "discover-distill", "--config", str(config), "--root", str(root), "--to-phase", "A"]
    assert lab(args) == 0
    first = capsys.readouterr().out
    assert "phase A: done in" in first and "$ lab data pack" in first
    data = root / "data"
    outputs = ["train_tasks.jsonl", "heldout_tasks.jsonl", "train.txt", "train.bin", "val.bin", "tokenizer"]
    assert all((data / name).exists() for name in outputs)
    train_lines = (data / "train.txt").read_text().splitlines()
    assert len(train_lines) == 300 + 20  # the corpus plus one line per train task (10 families x 2 difficulties)
    stamps = {path: path.stat().st_mtime_ns for path in data.rglob("*") if path.is_file()}

    assert lab(args) == 2  # a root that holds a pipeline needs --resume
    assert "--resume" in capsys.readouterr().err
    assert lab(args + ["--resume"]) == 0
    again = capsys.readouterr().out
    assert "$ lab" not in again and again.count("complete, skipped") == 5
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps

    (data / "val.bin.json").unlink()  # a pack killed between its two files: that step alone is redone
    assert lab(args + ["--resume"]) == 0
    redo = capsys.readouterr().out
    assert "$ lab data pack" in redo and "--output " + str(data / "val.bin") in redo and redo.count("$ lab") == 1
    assert (data / "val.bin.json").is_file()
    assert (data / "train.bin").stat().st_mtime_ns == stamps[data / "train.bin"]
    assert json.loads((root / "pipeline.json").read_text())["phases"]["A"]["seconds"] >= 0


def test_bad_arguments_are_named(tmp_path, capsys):
    assert lab(["pipeline", "discover-distill", "--scale", "huge", "--root", str(tmp_path)]) == 2
    assert "huge" in capsys.readouterr().err
    assert lab(["pipeline", "discover-distill", "--from-phase", "C", "--to-phase", "B", "--root", str(tmp_path)]) == 2


# A→C in ~a minute on 2 shared cores: a 4-step pretraining of the tiny GPT, 2 held-out tasks, 2 TTT steps, one seed.
MICRO = f"""
corpus_train_lines: 300
corpus_val_lines: 40
vocab_size: 400
train_per_cell: 1
heldout_per_cell: 1
pretrain_config: {PROJECT}/configs/pretrain/tiny.yaml
pretrain_args: [--trainer.max_steps, "4", --data.seq_len, "32", --data.batch_size, "4", --trainer.val_check_interval,
                "2", --data.val_batches, "1", --model.warmup_steps, "1", --trainer.enable_progress_bar, "false",
                --run.checkpoint_every_n_steps, "2", --trainer.precision, "32-true", --trainer.accelerator, cpu]
discover_config: {PROJECT}/configs/discover/tiny.yaml
discover_args: [--steps, "2", --rollouts, "6", --groups, "2", --max_new_tokens, "6", --save_adapters, "false",
                --limit, "2"]
seeds: [0]
"""


def pipeline_process(config: Path, root: Path, log: Path, *args: str) -> subprocess.Popen:
    """`lab pipeline discover-distill` in its own process, one thread: every run compared sums in the same order."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT)}
    return subprocess.Popen([sys.executable, "-m", "lightning_lab.cli", "pipeline", "discover-distill", "--config",
                             str(config), "--root", str(root), *args], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def registry_without_wall_clock(root: Path) -> str:
    """results.md less its wall-clock table (seconds differ between any two runs) + results.tex."""
    text = (root / "results.md").read_text()
    start = text.index("## Wall-clock per phase")
    end = text.find("\n## ", start + 1)
    return text[:start] + (text[end:] if end >= 0 else "") + (root / "results.tex").read_text()


def task_results(run: Path) -> dict:
    """Every task's result.json of a discover run, less its seconds."""
    return {path.parent.name: {k: v for k, v in json.loads(path.read_text()).items() if k != "seconds"}
            for path in sorted((run / "tasks").glob("*/result.json"))}


def test_a_kill_in_phase_c_then_resume_gives_the_registry_of_an_uninterrupted_run(tmp_path, capsys):
    config, straight, killed = tmp_path / "micro.yaml", tmp_path / "straight", tmp_path / "killed"
    config.write_text(MICRO)
    assert lab(["pipeline", "discover-distill", "--config", str(config), "--root", str(straight), "--to-phase",
                "B"]) == 0
    capsys.readouterr()
    shutil.copytree(straight, killed)  # both continue from the same pretrained model

    process = pipeline_process(config, straight, tmp_path / "straight.log", "--from-phase", "C", "--to-phase", "C",
                               "--resume")
    assert process.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()

    # SIGKILL once TTT has finished a step of a held-out task: phase C is half done, its TTT run mid-way
    heldout = killed / "discover" / "heldout"
    process = pipeline_process(config, killed, tmp_path / "killed.log", "--from-phase", "C", "--to-phase", "C",
                               "--resume")
    deadline = time.time() + 300
    while not any(path.stat().st_size for path in (heldout / "ttt-s0" / "tasks").glob("*/metrics.jsonl")):
        assert process.poll() is None, (tmp_path / "killed.log").read_text()
        assert time.time() < deadline, "no TTT step in 300 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert run_status(heldout / "bestofn-s0") == "completed" and run_status(heldout / "ttt-s0") == "running"
    assert not (heldout / "compare.json").exists()

    # --resume from phase A: A and B are complete and skipped, best-of-N is skipped, TTT continues
    process = pipeline_process(config, killed, tmp_path / "resumed.log", "--to-phase", "C", "--resume")
    assert process.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()
    out = (tmp_path / "resumed.log").read_text()
    assert "$ lab data" not in out and "$ lab pretrain" not in out and "complete, skipped: pretrain/pretrain" in out
    assert "complete, skipped: discover/heldout/bestofn-s0" in out
    assert "--name ttt-s0 --progress false --resume true" in out

    for root in (straight, killed):
        assert lab(["pipeline", "discover-distill", "--config", str(config), "--root", str(root), "--from-phase", "F",
                    "--resume"]) == 0
    for run in sorted(path for path in (straight / "discover" / "heldout").iterdir() if path.is_dir()):
        assert task_results(killed / "discover" / "heldout" / run.name) == task_results(run), run.name
    rows = [json.loads((root / "discover" / "heldout" / "compare.json").read_text())["rows"]
            for root in (straight, killed)]
    assert rows[0] == rows[1] and any(row["comparison"] == "ttt vs bestofn@samples" for row in rows[0])
    assert registry_without_wall_clock(killed) == registry_without_wall_clock(straight)
    assert "ttt vs bestofn@samples | all | 2 |" in (killed / "results.md").read_text()


def test_a_paused_stage_stops_the_pipeline_and_resume_continues_it_from_its_checkpoint(tmp_path, capsys):
    config, paused, root = tmp_path / "micro.yaml", tmp_path / "paused.yaml", tmp_path / "root"
    config.write_text(MICRO)  # pretraining pauses at step 2 of 4 (a real SIGINT, caught by GracefulPause):
    paused.write_text(MICRO.replace("--trainer.accelerator, cpu]", "--trainer.accelerator, cpu, "
                                    "--trainer.callbacks+=conftest.SigintAtStep, --trainer.callbacks.step, '2']"))
    assert lab(["pipeline", "discover-distill", "--config", str(paused), "--root", str(root), "--to-phase", "B"]) == 3
    assert "phase B: paused in" in capsys.readouterr().out
    run = root / "pretrain" / "pretrain"
    assert run_status(run) == "paused" and "B" not in json.loads((root / "pipeline.json").read_text())["phases"]

    assert lab(["pipeline", "discover-distill", "--config", str(config), "--root", str(root), "--to-phase", "B",
                "--resume"]) == 0
    out = capsys.readouterr().out
    assert "$ lab data" not in out and "--run.name pretrain --ckpt_path last" in out
    assert run_status(run) == "completed"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_phase_b_pretrains_the_mhc_off_control_and_the_registry_reads_both_arms(tmp_path, capsys):
    config, root = tmp_path / "micro.yaml", tmp_path / "root"
    config.write_text(MICRO.replace("--trainer.accelerator, cpu]", "--trainer.accelerator, cpu, --model.model_config, "
                                    f"{PROJECT}/configs/model/gpt_tiny_mhc.yaml]")
                      + f"mhc_off_model_config: {PROJECT}/configs/model/gpt_tiny.yaml\nretention_max_batches: 1\n")
    args = ["pipeline", "discover-distill", "--config", str(config), "--root", str(root)]
    assert lab(args + ["--to-phase", "B"]) == 0
    out = capsys.readouterr().out
    assert "--run.name pretrain_plain" in out and f"--model.model_config {PROJECT}/configs/model/gpt_tiny.yaml" in out
    arms = {name: json.loads((root / "pretrain" / name / "model_config.json").read_text())["mhc"]["enabled"]
            for name in ("pretrain", "pretrain_plain")}
    assert arms == {"pretrain": True, "pretrain_plain": False}
    comparison = json.loads((root / "pretrain" / "mhc_on_vs_off.json").read_text())
    assert comparison["config"]["base"].endswith("pretrain_plain/checkpoints/last.ckpt")
    assert comparison["config"]["updated"].endswith("pretrain/pretrain/checkpoints/last.ckpt")
    assert comparison["windows"] == 8  # retention_max_batches 1 x 8 windows

    assert lab(args + ["--from-phase", "B", "--to-phase", "B", "--resume"]) == 0  # all three steps complete
    assert "$ lab" not in capsys.readouterr().out
    assert lab(args + ["--from-phase", "F", "--resume"]) == 0
    low, high = comparison["perplexity_ratio_interval"]
    text = (root / "results.md").read_text()
    assert f"{comparison['perplexity_ratio']:.4f} [{low:.4f}, {high:.4f}]" in text
    assert "mHC on vs off (perplexity ratio on / off on 8 validation windows" in text
    assert "no claim about mHC" not in text


def test_the_paper_scale_is_the_seeds_configuration_with_its_mhc_control():
    from lightning_lab.data.io import read_yaml_or_json
    from lightning_lab.discover.pipeline import CONFIG_DIR, load_scale

    paper = load_scale(CONFIG_DIR / "paper.yaml")
    pretrain = read_yaml_or_json(PROJECT / paper.pretrain_config)
    assert read_yaml_or_json(PROJECT / pretrain["model"]["model_config"])["mhc"]["enabled"] is True
    assert read_yaml_or_json(PROJECT / paper.mhc_off_model_config)["mhc"]["enabled"] is False
    assert paper.vocab_size == 32000 and pretrain["data"]["seq_len"] == 256 and pretrain["data"]["batch_size"] == 4
    assert pretrain["trainer"]["accumulate_grad_batches"] == 4 and pretrain["trainer"]["max_steps"] == 5000
    flags = dict(zip(paper.discover_args[::2], paper.discover_args[1::2]))
    seed = {"--rollouts": "32", "--steps": "30", "--kl_coef": "0.1", "--max_new_tokens": "32"}
    assert {key: flags[key] for key in seed} == seed
    sdft = read_yaml_or_json(PROJECT / paper.sdft_config)
    assert sdft["trainer"]["max_steps"] == 500 and paper.sdft_replay and sdft["model"]["replay_ratio"] > 0
    assert load_scale(CONFIG_DIR / "tiny.yaml").mhc_off_model_config is None  # tiny: no control, so no mHC claim


def test_phase_d_gives_sdft_and_sft_the_replay_file_when_the_scale_asks(tmp_path):
    """configs/sdft/paper.yaml replays at 0.1, which SDFTModule refuses without a packed file."""
    from lightning_lab.discover.pipeline import CONFIG_DIR, Pipeline, load_scale

    for scale, replay in (("paper", True), ("tiny", False)):
        pipeline, fits = Pipeline(tmp_path, load_scale(CONFIG_DIR / f"{scale}.yaml")), []
        pipeline.discover = pipeline.files_step = lambda *args: None  # only phase D's SDFT and SFT fits are looked at
        pipeline.stage_step = lambda run_dir, argv: fits.append(argv)
        pipeline.phase_d()
        assert len(fits) == 2
        for argv in fits:
            assert ("--model.replay_bin" in argv) == replay and argv[argv.index("--model.gate_bin") + 1] == str(
                tmp_path / "data" / "val.bin")
            if replay:
                assert argv[argv.index("--model.replay_bin") + 1] == str(tmp_path / "data" / "train.bin")
