"""Bad inputs end in one line on stderr and exit status 2, before any model loads, and change nothing.

The table `CASES` runs every `lab` command with a missing, empty, corrupt, wrong-type, out-of-range,
unreadable or misplaced input, in this process through `lightning_lab.cli.main`. Each case asserts the
status, that stderr is one line ``lab <command>: error: ...`` naming the culprit, and that no file
that existed before changed. The harms of issue 22 that are not one-line errors (a run restarted over
its own checkpoints, ``--ckpt_path last`` without a checkpoint, metric steps written twice) have their
own tests below the table.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightning_lab.cli import main
from test_loading import WritesMarker, write_lab_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

PAIRS = [{"id": str(i), "prompt": f"What is {i} + 1?", "completion": f"The answer is {i + 1}."} for i in range(8)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` and its bytes: what a failed command must leave as it was."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def run_lab(argv: list[str], capsys) -> tuple[int, str]:
    status = main(argv)
    return status, capsys.readouterr().err


def assert_one_line_error(status: int, err: str, command: str, *culprits: str) -> None:
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lab {command}: error: " if command else "lab: error: "), lines[0]
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])


# ---- the table --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tiny_llama_dir, tmp_path_factory) -> dict[str, str]:
    """Good and bad inputs for every command, made once; the names below fill the table's {placeholders}."""
    w = tmp_path_factory.mktemp("world")
    write_jsonl(w / "pairs.jsonl", PAIRS)
    (w / "empty.jsonl").write_bytes(b"")
    (w / "malformed.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c",\n')
    (w / "latin1.jsonl").write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "d"}\n')
    (w / "list.jsonl").write_text("[1, 2]\n")
    (w / "text.txt").write_text("the cat sat on the mat\n" * 50)
    (w / "latin1.txt").write_bytes(b"fine line\nna\xefve line\n")
    (w / "blank.txt").write_text("\n\n   \n")
    (w / "existing.txt").write_text("written before\n")
    (w / "a_dir").mkdir()
    (w / "nonempty").mkdir()
    (w / "nonempty" / "kept.txt").write_text("kept\n")
    (w / "no_tokenizer").mkdir()
    (w / "unreadable.jsonl").write_text((w / "pairs.jsonl").read_text())
    (w / "unreadable.jsonl").chmod(0)
    (w / "readonly").mkdir()
    (w / "readonly").chmod(stat.S_IRUSR | stat.S_IXUSR)
    (w / "bad.yaml").write_text("trainer:\n  max_steps: [1,\n")
    (w / "unknown_key.yaml").write_text("model:\n  no_such_key: 1\n")
    (w / "list.yaml").write_text("- 1\n- 2\n")
    (w / "garbage.bin").write_bytes(b"\x00" * 64)
    shutil.copytree(tiny_llama_dir, w / "model")
    shutil.copytree(tiny_llama_dir, w / "corrupt_model")
    weights = w / "corrupt_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    # lab runs: a good checkpoint, and the same run layout around poisoned / garbage / empty ones
    write_lab_run(w / "run", tiny_llama_dir)
    write_lab_run(w / "poisoned_run", tiny_llama_dir, {"payload": WritesMarker(w / "code_ran")})
    (w / "garbage.ckpt").write_bytes(b"not a checkpoint" * 8)
    (w / "empty.ckpt").write_bytes(b"")
    # adapters: good, corrupt weights, no config, malformed config
    for name in ("adapter", "adapter_corrupt", "adapter_noconfig", "adapter_badjson"):
        (w / name).mkdir()
        save_file({"lora_A": torch.zeros(2)}, w / name / "adapter_model.safetensors")
        (w / name / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(w / "model")}))
    (w / "adapter_corrupt" / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    (w / "adapter_noconfig" / "adapter_config.json").unlink()
    (w / "adapter_badjson" / "adapter_config.json").write_text('{"base_model_name_or_path": ')
    (w / "runs").mkdir()
    return {"w": str(w), "cfg": str(CONFIGS), "model": str(w / "model"), "tok": str(w / "model")}


def pretrain(args: str) -> str:
    return ("--config {cfg}/pretrain/tiny.yaml --model.tokenizer {tok} --data.tokenizer {tok} "
            "--model.model_config {cfg}/model/gpt_tiny.yaml --data.train_path {w}/missing.bin "
            "--data.val_path {w}/missing.bin --run.root {w}/runs " + args)


def lora_stage(config: str, args: str) -> str:
    return f"--config {{cfg}}/{config} --model.model {{model}} --data.path {{w}}/pairs.jsonl --run.root {{w}}/runs " + args


BON = "--base_model {model} --prompts_file {w}/pairs.jsonl --answer_field completion --output_dir {w}/runs "

# (command, arguments, what the one line must name). {w}: the world directory; {model}, {tok}: a tiny model and
# its tokenizer; {cfg}: configs/. Every case fails before a model loads (or, for a bad model, as it starts to).
CASES = [
    # lab (no command / an unknown one)
    ("lab", "no-such-command", ["unknown command 'no-such-command'"]),
    # data corpus
    ("data corpus", "--train-out {w}/t.txt", ["--val-out"]),
    ("data corpus", "--train-lines -5 --train-out {w}/t.txt --val-out {w}/v.txt", ["train_lines", "-5"]),
    ("data corpus", "--train-lines many --train-out {w}/t.txt --val-out {w}/v.txt", ["--train-lines", "many"]),
    ("data corpus", "--filler-fraction 2 --train-out {w}/t.txt --val-out {w}/v.txt", ["filler_fraction", "2"]),
    ("data corpus", "--families nope --train-out {w}/t.txt --val-out {w}/v.txt", ["--families", "nope"]),
    ("data corpus", "--train-out {w}/existing.txt --val-out {w}/v.txt", ["--train-out", "existing.txt", "already exists"]),
    ("data corpus", "--train-out {w}/a_dir --val-out {w}/v.txt", ["--train-out", "a_dir", "is a directory"]),
    ("data corpus", "--train-out {w}/t.txt --val-out {w}/t.txt", ["--val-out", "same file"]),
    ("data corpus", "--train-out {w}/readonly/t.txt --val-out {w}/v.txt", ["--train-out", "readonly", "not writable"]),
    # data tokenizer
    ("data tokenizer", "--input {w}/missing.txt --model-prefix {w}/tk --vocab-size 300", ["--input", "missing.txt"]),
    ("data tokenizer", "--input {w}/a_dir --model-prefix {w}/tk --vocab-size 300", ["--input", "a_dir", "directory"]),
    ("data tokenizer", "--input {w}/text.txt --model-prefix {w}/tk --vocab-size 0", ["--vocab-size", "0"]),
    ("data tokenizer", "--input {w}/text.txt --model-prefix {w}/tk --vocab-size big", ["--vocab-size", "big"]),
    ("data tokenizer", "--input {w}/text.txt --model-prefix {w}/tk --vocab-size 300 --model-type wordpiece",
     ["--model-type", "wordpiece"]),
    ("data tokenizer", "--input {w}/text.txt --model-prefix {w}/nonempty --vocab-size 300", ["--model-prefix", "nonempty"]),
    ("data tokenizer", "--input {w}/text.txt --model-prefix {w}/tk --vocab-size 300 --character-coverage 0",
     ["--character-coverage", "0"]),
    # data pack
    ("data pack", "--tokenizer {w}/missing_tok --input {w}/text.txt --output {w}/o.bin", ["--tokenizer", "missing_tok"]),
    ("data pack", "--tokenizer {w}/text.txt --input {w}/text.txt --output {w}/o.bin", ["--tokenizer", "is a file"]),
    ("data pack", "--tokenizer {w}/no_tokenizer --input {w}/text.txt --output {w}/o.bin", ["no_tokenizer", "tokenizer.json"]),
    ("data pack", "--tokenizer {tok} --input {w}/missing.txt --output {w}/o.bin", ["--input", "missing.txt"]),
    ("data pack", "--tokenizer {tok} --input {w}/latin1.txt --output {w}/o.bin", ["latin1.txt:2", "not UTF-8"]),
    ("data pack", "--tokenizer {tok} --input {w}/blank.txt --output {w}/o.bin", ["blank.txt", "no text"]),
    ("data pack", "--tokenizer {tok} --input {w}/text.txt --output {w}/existing.txt", ["--output", "already exists"]),
    ("data pack", "--tokenizer {tok} --input {w}/text.txt --output {w}/a_dir", ["--output", "a_dir", "directory"]),
    ("data pack", "--tokenizer {tok} --input {w}/text.txt --output {w}/o.bin --append-eos 2", ["--append-eos", "2"]),
    ("data pack", "--tokenizer {tok} --input {w}/unreadable.jsonl --output {w}/o.bin", ["unreadable.jsonl", "not readable"]),
    ("data discovery-tasks", "--out-train {w}/existing.txt --out-heldout {w}/h.jsonl", ["--out-train", "already exists"]),
    # pretrain (a LightningCLI stage)
    ("pretrain fitt", "", ["invalid choice", "fitt"]),
    ("pretrain", "", ["subcommand"]),
    ("pretrain fit", "--config {w}/missing.yaml", ["--config", "missing.yaml", "no such file"]),
    ("pretrain fit", "--config {w}/a_dir", ["--config", "a_dir", "directory"]),
    ("pretrain fit", "--config {w}/bad.yaml", ["bad.yaml:3", "malformed YAML"]),
    ("pretrain fit", "--config {w}/list.yaml", ["list.yaml", "mapping"]),
    ("pretrain fit", "--config {w}/empty.jsonl", ["empty.jsonl", ".yaml"]),
    ("pretrain fit", "--config {cfg}/pretrain/tiny.yaml --config {w}/unknown_key.yaml", ["model.no_such_key", "unknown_key.yaml"]),
    ("pretrain fit", "--config {cfg}/pretrain/tiny.yaml --no_such_flag 1", ["--no_such_flag"]),
    ("pretrain fit", pretrain("--model.lr fast"), ["--model.lr", "fast"]),
    ("pretrain fit", pretrain("--trainer.max_steps ten"), ["--trainer.max_steps", "ten"]),
    ("pretrain fit", pretrain("--trainer.precision 17"), ["--trainer.precision", "17"]),
    ("pretrain fit", pretrain("--trainer.accelerator gpu"), ["--trainer.accelerator gpu", "cpu"]),
    ("pretrain fit", pretrain("--trainer.accelerator mps"), ["--trainer.accelerator mps", "cpu"]),
    ("pretrain fit", pretrain("--trainer.accelerator quantum"), ["--trainer.accelerator quantum", "unknown"]),
    ("pretrain fit", pretrain("--model.tokenizer {w}/no_tokenizer"), ["no_tokenizer", "tokenizer.json"]),
    ("pretrain fit", pretrain("--model.model_config {w}/missing.yaml"), ["missing.yaml", "no such file"]),
    ("pretrain fit", pretrain("--model.model_config {w}/bad.yaml"), ["bad.yaml:3"]),
    ("pretrain fit", pretrain(""), ["missing.bin"]),
    ("pretrain fit", pretrain("--data.train_path {w}/garbage.bin"), ["garbage.bin", "header"]),
    ("pretrain fit", pretrain("--data.seq_len 0"), ["data.seq_len", "0"]),
    ("pretrain fit", pretrain("--run.root {w}/existing.txt"), ["--run.root", "existing.txt", "is a file"]),
    ("pretrain fit", pretrain("--run.root {w}/readonly"), ["--run.root", "readonly", "not writable"]),
    ("pretrain fit", pretrain("--ckpt_path last"), ["--ckpt_path last", "{w}/runs/pretrain/tiny/checkpoints/last.ckpt"]),
    ("pretrain validate", pretrain("--ckpt_path last"),
     ["--ckpt_path last", "checkpoints/last.ckpt"]),
    ("pretrain fit", pretrain("--ckpt_path {w}/missing.ckpt"), ["--ckpt_path", "missing.ckpt"]),
    ("pretrain fit", pretrain("--ckpt_path {w}/poisoned_run/checkpoints/last.ckpt"), ["poisoned_run", "refused"]),
    ("pretrain fit", pretrain("--ckpt_path {w}/garbage.ckpt"), ["garbage.ckpt", "not a readable"]),
    ("pretrain fit", pretrain("--ckpt_path {w}/empty.ckpt"), ["empty.ckpt", "not a readable"]),
    # sft and rl (LoRA stages): data and model errors come before the model's weights load
    ("sft fit", lora_stage("sft/tiny.yaml", "--data.path {w}/missing.jsonl"), ["missing.jsonl"]),
    ("sft fit", lora_stage("sft/tiny.yaml", "--data.path {w}/empty.jsonl"), ["empty.jsonl", "no samples"]),
    ("sft fit", lora_stage("sft/tiny.yaml", "--data.path {w}/malformed.jsonl"), ["malformed.jsonl:2", "malformed JSON"]),
    ("sft fit", lora_stage("sft/tiny.yaml", "--data.path {w}/latin1.jsonl"), ["latin1.jsonl:2", "not UTF-8"]),
    ("sft fit", lora_stage("sft/tiny.yaml", "--data.path {w}/list.jsonl"), ["list.jsonl:1", "JSON object"]),
    ("sft fit", lora_stage("sft/tiny.yaml", "--data.path {w}/unreadable.jsonl"), ["unreadable.jsonl", "not readable"]),
    ("sft fit", lora_stage("sft/tiny.yaml", "--data.path {w}/a_dir"), ["a_dir", "directory"]),
    ("sft fit", lora_stage("sft/tiny.yaml", "--model.model {w}/missing_model"), ["missing_model"]),
    ("sft fit", lora_stage("sft/tiny.yaml", "--model.model {w}/corrupt_model"), ["corrupt_model/model.safetensors",
                                                                                   "corrupt"]),
    ("sft fit", lora_stage("sft/tiny.yaml", "--model.lora.rank eight"), ["--model.lora.rank", "eight"]),
    ("sft fit", lora_stage("sft/tiny.yaml", "--trainer.accelerator gpu"), ["--trainer.accelerator gpu"]),
    ("sft validate", lora_stage("sft/tiny.yaml", "--ckpt_path last"), ["checkpoints/last.ckpt"]),
    ("rl fit", lora_stage("rl/tiny.yaml", "--data.path {w}/latin1.jsonl"), ["latin1.jsonl:2", "not UTF-8"]),
    ("rl fit", lora_stage("rl/tiny.yaml", "--model.group_size many"), ["--model.group_size", "many"]),
    ("rl fit", lora_stage("rl/tiny.yaml", "--model.reward builtin:nope"), ["model.reward", "nope"]),
    ("rl fit", lora_stage("rl/tiny.yaml", "--model.group_size 1"), ["model.group_size=1"]),
    ("rl fit", lora_stage("rl/tiny.yaml", "--ckpt_path {w}/poisoned_run/checkpoints/last.ckpt"), ["refused"]),
    # export
    ("export", "--ckpt {w}/missing.ckpt --out {w}/out", ["--ckpt", "missing.ckpt", "no such file"]),
    ("export", "--ckpt {w}/a_dir --out {w}/out", ["--ckpt", "a_dir", "directory"]),
    ("export", "--ckpt {w}/empty.ckpt --out {w}/out", ["empty.ckpt", "not a readable"]),
    ("export", "--ckpt {w}/garbage.ckpt --out {w}/out", ["garbage.ckpt", "not a readable"]),
    ("export", "--ckpt {w}/poisoned_run/checkpoints/last.ckpt --out {w}/out", ["poisoned_run", "refused"]),
    ("export", "--ckpt {w}/run/checkpoints/last.ckpt --out {w}/nonempty", ["--out", "nonempty", "not empty"]),
    ("export", "--ckpt {w}/run/checkpoints/last.ckpt --out {w}/existing.txt", ["--out", "existing.txt", "is a file"]),
    ("export", "--ckpt {w}/run/checkpoints/last.ckpt --out {w}/o --dtype fp8", ["--dtype", "fp8"]),
    ("export", "--ckpt {w}/run/checkpoints/last.ckpt", ["--out"]),
    # adapter merge
    ("adapter merge", "--adapter {w}/missing_adapter --out {w}/out", ["missing_adapter", "no such directory"]),
    ("adapter merge", "--adapter {w}/existing.txt --out {w}/out", ["existing.txt", "expected a directory"]),
    ("adapter merge", "--adapter {w}/adapter_noconfig --out {w}/out", ["adapter_noconfig", "adapter_config.json"]),
    ("adapter merge", "--adapter {w}/adapter_corrupt --out {w}/out", ["adapter_corrupt/adapter_model.safetensors",
                                                                      "corrupt"]),
    ("adapter merge", "--adapter {w}/adapter_badjson --out {w}/out", ["adapter_badjson/adapter_config.json:1"]),
    ("adapter merge", "--adapter {w}/adapter --out {w}/nonempty", ["--out", "nonempty"]),
    ("adapter merge", "--adapter {w}/adapter --out {w}/out --base {w}/missing_base", ["missing_base"]),
    ("adapter merge", "--adapter {w}/adapter --out {w}/out --base {w}/poisoned_run/checkpoints/last.ckpt",
     ["poisoned_run", "refused"]),
    ("adapter merge", "--adapter {w}/adapter --out {w}/out --dtype int4", ["--dtype", "int4"]),
    ("adapter mrege", "", ["mrege"]),
    # status and artifacts
    ("status", "--root {w}/missing_runs", ["--root", "missing_runs", "no such directory"]),
    ("status", "--root {w}/existing.txt", ["--root", "existing.txt", "is a file"]),
    ("status", "--root {w}/runs --watch 0", ["--watch", "0"]),
    ("status", "--root {w}/runs --watch nan", ["--watch", "nan"]),
    ("status", "--root {w}/runs --watch soon", ["--watch", "soon"]),
    ("artifacts", "--root {w}/missing_runs", ["--root", "missing_runs"]),
    ("artifacts", "--root {w}/existing.txt", ["--root", "is a file"]),
    # bon (a loop: jsonargparse over a config dataclass, lightning_lab/loops.py)
    ("bon collect", "--config {w}/bad.yaml", ["bad.yaml:3", "malformed YAML"]),
    ("bon collect", "--config {w}/unknown_key.yaml", ["model", "unknown_key.yaml"]),
    ("bon collect", "--no_such_key 1", ["--no_such_key"]),
    ("bon collect", BON + "--samples_per_prompt 0", ["samples_per_prompt", "0"]),
    ("bon collect", BON + "--samples_per_prompt many", ["--samples_per_prompt", "many"]),
    ("bon collect", BON + "--temperature nan", ["temperature", "nan"]),
    ("bon collect", BON + "--temperature -1", ["temperature", "-1"]),
    ("bon collect", BON + "--top_p 1.5", ["top_p", "1.5"]),
    ("bon collect", BON + "--k_values [1,16] --samples_per_prompt 8", ["k_values", "16"]),
    ("bon collect", BON + "--device tpu", ["device", "tpu"]),
    ("bon collect", BON + "--prompts_file {w}/latin1.jsonl", ["latin1.jsonl:2", "not UTF-8"]),
    ("bon collect", BON + "--prompts_file {w}/missing.jsonl", ["missing.jsonl"]),
    ("bon collect", BON + "--base_model {w}/missing_model", ["missing_model"]),
    ("bon collect", BON + "--adapter_path {w}/adapter_corrupt", ["adapter_corrupt"]),
    ("bon collect", BON + "--output_dir {w}/existing.txt", ["existing.txt"]),
    ("bon distill", "--runs {w}/missing_run.jsonl --out {w}/o.jsonl", ["missing_run.jsonl"]),
    ("bon distill", "--runs {w}/latin1.jsonl --out {w}/o.jsonl", ["latin1.jsonl"]),
    ("bon analyze", "--runs {w}/malformed.jsonl --out {w}/s.json", ["malformed.jsonl"]),
    ("bon analyze", "--runs {w}/malformed.jsonl --out {w}/s.json --resamples 0", ["resamples", "0"]),
    ("bon predict", "--runs {w}/malformed.jsonl --out {w}/p.json --n_splits 1", ["n_splits", "1"]),
    # the other loops and stages, on the same convention
    ("discover run", "--tasks {w}/missing.jsonl --model {model} --output_dir {w}/runs", ["missing.jsonl"]),
    ("discover run", "--tasks {w}/latin1.jsonl --model {model} --output_dir {w}/runs", ["latin1.jsonl"]),
    ("discover run", "--tasks {w}/pairs.jsonl --mode magic --model {model}", ["mode", "magic"]),
    ("discover compare", "--runs [{w}/missing_run] --out {w}/c.json", ["missing_run"]),
    ("ace run", "--dataset_path {w}/latin1.jsonl --output_dir {w}/runs", ["latin1.jsonl"]),
    ("ace run", "--task_name tatqa_tiny --limit 0 --output_dir {w}/runs", ["limit", "0"]),
    ("ace summarize", "--input_dir {w}/missing_dir --output_path {w}/s.csv", ["missing_dir"]),
    ("eval retention", "--base {model} --updated {model} --val_bin {w}/missing.bin --out {w}/r.json", ["missing.bin"]),
    ("discover build-sdft", "--suite_root {w}/missing_dir --tasks {w}/pairs.jsonl --out {w}/s.jsonl", ["missing_dir"]),
    ("sdft fit", lora_stage("sdft/tiny.yaml", "--data.path {w}/missing.jsonl"), ["missing.jsonl"]),
    ("sdft fit", lora_stage("sdft/tiny.yaml", "--model.objective magic"), ["model.objective", "magic"]),
    ("sdft fit", lora_stage("sdft/tiny.yaml", "--model.gate_bin {w}/missing.bin"), ["model.gate_bin", "missing.bin"]),
    ("pipeline discover-distill", "--scale huge --root {w}/runs", ["--scale huge"]),
    ("pipeline discover-distill", "--from-phase C --to-phase B --root {w}/runs", ["--from-phase C"]),
    ("eval retention", "--base {model} --updated {model} --val_bin {w}/garbage.bin --out {w}/r.json", ["garbage.bin"]),
    ("eval retention", "--base {model} --updated {model} --val_bin {w}/garbage.bin --out {w}/existing.txt",
     ["existing.txt"]),
    ("rauq score", "--config {w}/bad.yaml", ["bad.yaml:3", "malformed YAML"]),
    ("rauq score", "--model {model} --input {w}/missing.jsonl --output {w}/o.jsonl", ["missing.jsonl"]),
    ("rauq select-heads", "--no_such_key 1", ["--no_such_key"]),
    ("ab", "--config {w}/bad.yaml", ["bad.yaml:3", "malformed YAML"]),
    ("ab", "--a {w}/missing.yaml --b {w}/missing.yaml", ["missing.yaml"]),
    ("quietstar fit", "--config {w}/bad.yaml", ["bad.yaml:3", "malformed YAML"]),
    ("quietstar fit", "--model.model {model} --data.train_path {w}/pairs.jsonl --trainer.accelerator mps "
                      "--run.root {w}/runs", ["--trainer.accelerator mps"]),
    # demo, report
    ("report", "--root {w}/no_such_runs", ["--root", "no_such_runs"]),
    ("report", "--root {w}/latin1.jsonl", ["--root", "latin1.jsonl"]),
    ("demo", "--only nothing --out {w}/demo", ["--only", "nothing"]),
    ("demo", "--out {w}/demo --gsm8k {w}/missing.jsonl", ["--gsm8k", "missing.jsonl"]),
]


@pytest.fixture()
def permissions_bind(monkeypatch):
    """Root ignores permission bits; there, `os.access` is made to read them, as it does for any other user."""
    if os.geteuid() == 0:
        real_access = os.access

        def access(path, mode, *args, **kwargs):
            if not real_access(path, os.F_OK):
                return False
            bits = os.stat(path).st_mode
            wanted = [(os.R_OK, stat.S_IRUSR), (os.W_OK, stat.S_IWUSR), (os.X_OK, stat.S_IXUSR)]
            return all(bits & bit for flag, bit in wanted if mode & flag)

        monkeypatch.setattr(os, "access", access)


@pytest.mark.parametrize("command, args, culprits", CASES,
                         ids=[f"{i:03d}-{command}" for i, (command, _, _) in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(command, args, culprits, world, capsys, monkeypatch,
                                                          permissions_bind):
    w = Path(world["w"])
    monkeypatch.chdir(w)  # a command that wrote to a default path would write here, and be caught
    before = snapshot(w)
    words = [] if command == "lab" else command.split()
    argv = words + shlex.split(args.format(**world))
    status, err = run_lab(argv, capsys)
    assert_one_line_error(status, err, command if command != "lab" else "", *(c.format(**world) for c in culprits))
    assert snapshot(w) == before
    assert not (w / "code_ran").exists()


def test_the_table_covers_every_command():
    from lightning_lab.cli import COMMANDS

    covered = {command.split()[0] for command, _, _ in CASES}
    assert len(CASES) >= 60
    assert covered >= set(COMMANDS), set(COMMANDS) - covered


def test_a_bad_input_through_the_lab_script_is_one_line(tmp_path):
    """The installed way in: a subprocess, as a user types it."""
    result = subprocess.run([sys.executable, "-m", "lightning_lab.cli", "export", "--ckpt", str(tmp_path / "x.ckpt"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == f"lab export: error: --ckpt {tmp_path / 'x.ckpt'}: no such file\n"


# ---- harms 4 and 5: a run is never restarted over its own checkpoints, `last` is this run's -------------


def sft_argv(model_dir: Path, data: Path, root: Path, *extra: str, subcommand: str = "fit") -> list[str]:
    return ["sft", subcommand, "--config", "configs/sft/tiny.yaml", "--model.model", str(model_dir),
            "--data.path", str(data), "--run.root", str(root), "--run.name", "x", "--trainer.max_steps", "4",
            "--run.checkpoint_every_n_steps", "2", *extra]


@pytest.fixture(scope="module")
def finished_sft_run(tiny_llama_dir, tmp_path_factory) -> tuple[list[str], Path]:
    """A 4-step SFT run (checkpoints at steps 2 and 4): (the argv that made it, its run directory).
    Tests that change it work on a copy (`copy_run`)."""
    root = tmp_path_factory.mktemp("finished")
    data = write_jsonl(root / "pairs.jsonl", PAIRS)
    argv = sft_argv(tiny_llama_dir, data, root / "runs")
    assert main(argv) == 0
    return argv, root / "runs" / "sft" / "x"


def copy_run(finished_sft_run, tmp_path: Path) -> tuple[list[str], Path]:
    argv, run_dir = finished_sft_run
    shutil.copytree(run_dir.parent.parent, tmp_path / "runs")
    argv = [str(tmp_path / "runs") if arg == str(run_dir.parent.parent) else arg for arg in argv]
    return argv, tmp_path / "runs" / "sft" / "x"


def test_fit_on_a_run_with_checkpoints_refuses_and_names_both_ways_on(finished_sft_run, capsys):
    argv, run_dir = finished_sft_run
    before = snapshot(run_dir)
    status, err = run_lab(argv, capsys)
    assert_one_line_error(status, err, "sft fit", str(run_dir / "checkpoints"), "--ckpt_path last", "--run.name")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_ckpt_path_last_without_a_checkpoint_names_the_path(subcommand, tiny_llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    argv = sft_argv(tiny_llama_dir, data, tmp_path / "runs", "--ckpt_path", "last", subcommand=subcommand)
    status, err = run_lab(argv, capsys)
    assert_one_line_error(status, err, f"sft {subcommand}", str(tmp_path / "runs" / "sft" / "x" / "checkpoints" /
                                                                 "last.ckpt"))
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_resume_does_not_write_metric_steps_twice(finished_sft_run, tmp_path):
    """A run killed after step 4 whose newest checkpoint is step 2 resumes from step 2: steps 3 and 4 are
    already in metrics.jsonl and are not written again (MetricsJsonl is the same for every stage)."""
    argv, run_dir = copy_run(finished_sft_run, tmp_path)
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "step=0000002.ckpt").replace(checkpoints / "last.ckpt")
    (checkpoints / "step=0000004.ckpt").unlink()
    before = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert before == [1, 2, 3, 4]
    assert main(argv + ["--ckpt_path", "last"]) == 0
    after = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert after == before
