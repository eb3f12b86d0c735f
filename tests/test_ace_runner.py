"""The ACE loops: scripted roles for the learning logic, the tiny random llama for the real sampler path."""

import csv
import json
import re
import time
from types import SimpleNamespace

import pytest

from lightning_lab.ace import runner
from lightning_lab.ace.cli import main as ace_main
from lightning_lab.ace.cli import seed_spelling
from lightning_lab.ace.grid import GridConfig, grid_commands
from lightning_lab.ace.playbook import Playbook
from lightning_lab.ace.tasks import load_items, task_path
from lightning_lab.errors import UserError

GOLD = {item.question + item.context: item.answer for item in load_items(task_path("iot_tiny")[0])}


class ScriptedSampler:
    """Stands in for `Sampler`: the generator is right only when the playbook holds a bullet for the item's
    question; the reflector proposes that bullet; the curator adds it (or writes garbage when told to)."""

    def __init__(self, garbage_curator=False):
        self.tokenizer = SimpleNamespace(encode=lambda text, add_special_tokens=False: text.split())
        self.garbage_curator = garbage_curator
        self.calls = []

    def generate(self, prompts, n=1, max_new_tokens=16, **kwargs):
        self.calls.append(prompts)
        return SimpleNamespace(prompts=[SimpleNamespace(completions=[SimpleNamespace(text=self.reply(p), seconds=0.01)])
                                        for p in prompts])

    def reply(self, prompt):
        if prompt.startswith("You review"):
            if not prompt.endswith("Diagnosis:"):
                return ""  # all of it came as JSON after the first label
            question = re.search(r"Question: (.*)", prompt).group(1)
            used = re.findall(r"\[([a-z]+-\d{5})\]", prompt)
            tags = ", ".join(f'"{i}": "helpful"' for i in used)
            return ('{"diagnosis": "missed the rule", "bullet_tags": {' + tags + '}, "lessons": '
                    f'["For the question {question!r} check the sensor readings against the threshold.", '
                    '"Always double-check your work."]}')
        if prompt.startswith("You maintain"):
            if self.garbage_curator:
                return "I think we should add something {{{"
            lesson = re.search(r"New lessons:\n- (.*)", prompt).group(1)
            return json.dumps({"operations": [{"op": "ADD", "section": "iot", "content": lesson}]})
        question = re.search(r"Question: (.*)", prompt).group(1)
        bullet = re.search(r"\[([a-z]+-\d{5})\][^\n]*" + re.escape(repr(question)), prompt)
        assert prompt.endswith("Reasoning:")  # the reply is primed with the format's first label
        if bullet is None:
            return " no idea\nBullets used: none\nAnswer: unknown"
        context = prompt.split("Context:\n", 1)[1].split("\n\nQuestion: ", 1)[0]
        return f" the playbook says so\nBullets used: {bullet.group(1)}\nAnswer: {GOLD[question + context]}"


@pytest.fixture
def scripted(monkeypatch):
    sampler = ScriptedSampler()
    monkeypatch.setattr(runner, "open_roles", lambda config: runner.Roles(sampler, sampler, config))
    return sampler


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_seed_spelling_of_flags():
    assert seed_spelling(["run", "--model-id", "x", "--no-ground-truth", "--online", "--dry-run", "--limit", "3",
                          "--resume", "false", "--task-name=a-b"]) == [
        "run", "--model_id", "x", "--ground_truth=false", "--online=true", "--dry_run=true", "--limit", "3",
        "--resume", "false", "--task_name=a-b"]


def test_online_ace_run_learns_tags_and_writes_the_seed_csv(scripted, tmp_path, capsys):
    out = tmp_path / "r.csv"
    status = ace_main(["run", "--model-id", "scripted", "--task-name", "iot_tiny", "--mode", "ace", "--limit", "6",
                       "--batch-size", "3", "--output_dir", str(tmp_path / "runs"), "--name", "a",
                       "--output-path", str(out), "--progress", "false"])
    assert status == 0
    rows = read_csv(out)
    assert list(rows[0]) == (runner.CORE_COLUMNS + runner.EXTRA_COLUMNS + runner.ACE_COLUMNS)
    # the first batch saw an empty playbook; the second batch's questions are new, so still no bullet for them
    assert [row["correct"] for row in rows] == ["False"] * 6
    assert [row["playbook_size"] for row in rows] == ["0"] * 3 + ["3"] * 3
    assert all(row["reflected"] == "True" for row in rows)
    playbook = Playbook.load(tmp_path / "runs" / "a" / "playbook.jsonl")
    assert len(playbook) == 6  # one specific lesson per item; "Always double-check your work." was filtered
    assert all("double-check" not in entry.content for entry in playbook.entries)
    printed = capsys.readouterr().out
    assert "accuracy 0.000 (6 items)" in printed and "lessons_generic 6" in printed


def test_epochs_online_improve_and_counters_count(scripted, tmp_path, capsys):
    status = ace_main(["epochs", "--model-id", "scripted", "--task-name", "iot_tiny", "--epochs", "2", "--online",
                       "--limit", "6", "--batch-size", "3", "--output_dir", str(tmp_path), "--name", "e",
                       "--progress", "false"])
    assert status == 0
    run = tmp_path / "e"
    epoch = {k: read_csv(run / f"epoch{k}.csv") for k in range(3)}
    accuracy = [sum(r["correct"] == "True" for r in rows) / len(rows) for rows in epoch.values()]
    assert accuracy == [0.0, 0.0, 1.0]  # epoch 2 finds every item's own lesson, learned in epoch 1
    assert all(r["bullets_used"] for r in epoch[2])
    playbook = Playbook.load(run / "playbook.jsonl")
    assert sum(entry.helpful for entry in playbook.entries) == 6  # each bullet tagged once when it was used
    summary = read_csv(run / "epoch_summary.csv")
    assert [row["accuracy"] for row in summary] == ["0.0", "0.0", "1.0"]
    assert float(summary[2]["mcnemar_p"]) == pytest.approx(2 * 0.5 ** 6)  # 6 discordant pairs, all for ACE
    assert "| 2 | ace | all | 6 | 1.000 | 0.031 |" in capsys.readouterr().out


def test_offline_epochs_use_disjoint_splits_and_keep_the_best_val_playbook(scripted, tmp_path):
    assert ace_main(["epochs", "--model-id", "scripted", "--task-name", "iot_tiny", "--epochs", "1", "--limit", "8",
                     "--output_dir", str(tmp_path), "--name", "o", "--progress", "false"]) == 0
    run = tmp_path / "o"
    ids = {split: {r["sample_id"] for r in read_csv(path)} for split, path in
           [("train", run / "train" / "epoch1.csv"), ("val", run / "val" / "epoch1.csv"), ("test", run / "epoch1.csv")]}
    assert [len(v) for v in ids.values()] == [4, 2, 2]
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert {r["sample_id"] for r in read_csv(run / "epoch0.csv")} == ids["test"]
    assert Playbook.load(run / "playbook_best.jsonl").entries == Playbook.load(run / "playbook_epoch1.jsonl").entries


def test_malformed_curator_output_is_counted_and_the_lessons_still_go_in(monkeypatch, tmp_path, capsys):
    sampler = ScriptedSampler(garbage_curator=True)
    monkeypatch.setattr(runner, "open_roles", lambda config: runner.Roles(sampler, sampler, config))
    assert ace_main(["run", "--task_name", "iot_tiny", "--mode", "ace", "--limit", "4", "--output_dir",
                     str(tmp_path), "--name", "g", "--progress", "false"]) == 0
    assert "curator_unparsed 4" in capsys.readouterr().out
    assert len(Playbook.load(tmp_path / "g" / "playbook.jsonl")) == 4


def test_resume_skips_finished_items(scripted, tmp_path):
    args = ["run", "--task_name", "iot_tiny", "--mode", "ace", "--limit", "6", "--batch_size", "3",
            "--output_dir", str(tmp_path), "--name", "r", "--progress", "false"]
    assert ace_main(args) == 0
    calls = len(scripted.calls)
    with pytest.raises(UserError, match="the run exists"):
        ace_main(args)
    assert ace_main(["run", "--config", str(tmp_path / "r" / "config.yaml"), "--resume", "true"]) == 0
    assert len(scripted.calls) == calls  # nothing left to do: no model call
    assert len(read_csv(tmp_path / "r" / "results.csv")) == 6


def test_reflect_every_and_no_ground_truth(scripted, tmp_path):
    assert ace_main(["run", "--task_name", "iot_tiny", "--mode", "ace", "--limit", "6", "--reflect-every", "3",
                     "--no-ground-truth", "--output_dir", str(tmp_path), "--name", "n", "--progress", "false"]) == 0
    rows = read_csv(tmp_path / "n" / "results.csv")
    assert [r["reflected"] for r in rows] == ["True", "False", "False", "True", "False", "False"]
    reflector_prompts = [p for call in scripted.calls for p in call
                         if p.startswith("You review") and p.endswith("Diagnosis:")]
    assert len(reflector_prompts) == 2
    assert all("Correct answer" not in p and "Feedback:" in p for p in reflector_prompts)
    assert not any(item.answer in p.split("Model output:")[1] for p in reflector_prompts
                   for item in load_items(task_path("iot_tiny")[0]) if item.answer == "T3")


def test_summarize_reproduces_hand_computed_accuracies(scripted, tmp_path, capsys):
    for name, limit in (("a", 6), ("b", 4)):
        assert ace_main(["epochs", "--task_name", "iot_tiny", "--epochs", "2", "--online", "--limit", str(limit),
                         "--output_dir", str(tmp_path), "--name", name, "--progress", "false"]) == 0
    rows = [r for path in sorted(tmp_path.glob("*/epoch[0-9].csv")) for r in read_csv(path)]
    by_hand = {}
    for r in rows:
        by_hand.setdefault((r["mode"], r["epoch"]), []).append(r["correct"] == "True")
    assert ace_main(["summarize", "--input-dir", str(tmp_path)]) == 0
    summary = {(r["mode"], r["epoch"]): r for r in read_csv(tmp_path / "summary.csv")}
    assert set(summary) == set(by_hand)
    for key, correct in by_hand.items():
        assert float(summary[key]["accuracy"]) == pytest.approx(sum(correct) / len(correct))
        assert int(summary[key]["num_samples"]) == len(correct) == 10
    assert (tmp_path / "summary.md").read_text().startswith("| model_id | task_name | mode | epoch | accuracy |")
    with pytest.raises(UserError, match="already exists"):
        ace_main(["summarize", "--input-dir", str(tmp_path)])


def test_grid_dry_run_prints_the_exact_commands(capsys):
    assert ace_main(["grid", "--config", "configs/ace/exp_grid.yaml", "--dry-run", "--model-id", "tiny-gpt2",
                     "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"lab ace {command} --model_id tiny-gpt2 --task_name {task} --output_dir runs/ace/grid "
                     f"--name {task}-tiny-gpt2-{mode} --device auto --dtype auto --limit 2"
                     for task in ("tatqa_tiny", "medqa_tiny", "iot_tiny")
                     for mode, command in (("baseline", "run --mode baseline"), ("ace", "epochs --epochs 1"))]
    assert len(grid_commands(GridConfig())) == 3  # the default grid: baselines of the three tiny tasks


def test_bad_inputs_fail_before_any_model_loads(tmp_path):
    with pytest.raises(UserError, match="give exactly one"):
        ace_main(["run", "--task_name", "iot_tiny", "--dataset_path", "x.json"])
    with pytest.raises(UserError, match="dataset_path: .*missing.json: no such file"):
        ace_main(["run", "--dataset_path", str(tmp_path / "missing.json"), "--output_dir", str(tmp_path)])
    with pytest.raises(UserError, match="mode: 'fast' is not one of baseline, ace"):
        ace_main(["run", "--task_name", "iot_tiny", "--mode", "fast"])
    with pytest.raises(UserError, match="modes: 'x' is not one of"):
        ace_main(["grid", "--modes", "[x]"])
    assert not any(tmp_path.iterdir())


def test_seed_alias_offline_fails_at_once_naming_the_alias(tmp_path):
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"model_id 'phi3-mini' \(the seed's alias of microsoft/Phi-3-mini-4k-instruct\)"
                                        r".*smollm2-135m"):
        ace_main(["run", "--model-id", "phi3-mini", "--task_name", "iot_tiny", "--output_dir", str(tmp_path)])
    assert time.perf_counter() - start < 10
    assert not any(tmp_path.iterdir())  # the run directory of a failed start is removed


def test_real_sampler_path_with_a_tiny_random_model(tiny_llama_dir, tmp_path):
    """Garbage from a random model: every output unparsed and counted, nothing raises, the files are written."""
    args = ["--model_id", str(tiny_llama_dir), "--task_name", "tatqa_tiny", "--limit", "3", "--max_new_tokens", "6",
            "--reflector_max_new_tokens", "6", "--output_dir", str(tmp_path), "--progress", "false", "--device", "cpu",
            "--embedding_model", str(tiny_llama_dir)]
    assert ace_main(["run", "--mode", "ace", "--name", "t", *args]) == 0
    rows = read_csv(tmp_path / "t" / "results.csv")
    assert len(rows) == 3 and all(r["reflected"] == "True" for r in rows)
    summary = [json.loads(line) for line in (tmp_path / "t" / "results.jsonl").read_text().splitlines()][-1]
    assert summary["kind"] == "summary" and summary["reflections"] >= 3


@pytest.mark.slow
def test_smollm2_baseline_and_one_ace_epoch_end_to_end(tmp_path):
    """The real model on three items: epoch 0 baseline, epoch 1 online ACE (reflector, curator, playbook)."""
    assert ace_main(["epochs", "--task_name", "iot_tiny", "--epochs", "1", "--online", "--limit", "3",
                     "--max_new_tokens", "32", "--reflector_max_new_tokens", "24", "--output_dir", str(tmp_path),
                     "--name", "s", "--progress", "false"]) == 0
    run = tmp_path / "s"
    baseline, ace = read_csv(run / "epoch0.csv"), read_csv(run / "epoch1.csv")
    assert [r["sample_id"] for r in baseline] == [r["sample_id"] for r in ace] and len(ace) == 3
    assert all(r["mode"] == "ace" and r["reflected"] == "True" and float(r["reflection_latency_ms"]) > 0 for r in ace)
    assert all(r["pred"] or r["correct"] == "False" for r in baseline + ace)
    summary = read_csv(run / "epoch_summary.csv")
    assert [r["epoch"] for r in summary] == ["0", "1"]
    assert int(summary[1]["reflections"]) >= 3
    records = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert all(r["reflection"].startswith("Diagnosis:") for r in records if r.get("pass") == "epoch1/all")
    assert len(Playbook.load(run / "playbook.jsonl")) == int(summary[1]["playbook_size"])


def test_ctrl_c_pauses_between_batches_and_resume_finishes(monkeypatch, tmp_path):
    import os
    import signal

    from lightning_lab.loops import EXIT_PAUSED

    sampler = ScriptedSampler()
    answer = sampler.reply

    def reply_then_interrupt(prompt):
        if prompt.endswith("Reasoning:") and not getattr(sampler, "interrupted", False):
            sampler.interrupted = True
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl+C while the first batch is being answered
        return answer(prompt)

    sampler.reply = reply_then_interrupt
    monkeypatch.setattr(runner, "open_roles", lambda config: runner.Roles(sampler, sampler, config))
    args = ["epochs", "--task_name", "iot_tiny", "--epochs", "1", "--online", "--limit", "6", "--batch_size", "3",
            "--output_dir", str(tmp_path), "--name", "p", "--progress", "false"]
    assert ace_main(args) == EXIT_PAUSED
    lines = (tmp_path / "p" / "results.jsonl").read_text().splitlines()
    assert len([line for line in lines if '"sample_id"' in line]) == 3  # the batch under way was finished
    assert ace_main(["epochs", "--config", str(tmp_path / "p" / "config.yaml"), "--resume", "true"]) == 0
    summary = read_csv(tmp_path / "p" / "epoch_summary.csv")
    assert [int(row["num_samples"]) for row in summary] == [6, 6]
    assert summary[1]["accuracy"] == "0.0" and int(summary[1]["playbook_size"]) == 6


def test_hidden_state_embedder_on_a_tiny_model(tiny_llama_dir):
    from lightning_lab.models.loading import load_causal_lm

    embed = runner.HiddenStateEmbedder(load_causal_lm(str(tiny_llama_dir), device="cpu"))
    vectors = embed(["The answer is 72.", "What is 2 + 3?", "The answer is 72."])
    assert vectors.shape == (3, 64) and (vectors[0] == vectors[2]).all() and not (vectors[0] == vectors[1]).all()
    playbook = Playbook()
    for lesson in ("The answer is 72.", "What is 2 + 3?", "Natalia sold clips to 48 of her friends."):
        playbook.add(lesson)
    assert playbook.retrieve("The answer is 72.", k=1, embed=embed)[0].content == "The answer is 72."
