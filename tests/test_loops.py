"""The loop convention (lightning_lab/loops.py): parsing, the run directory, claiming and locking, cleanup."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from lightning_lab import loops
from lightning_lab.data.io import DataError, JsonlWriter
from lightning_lab.errors import UserError
from lightning_lab.loops import EXIT_PAUSED, LoopConfig, LoopRun, check_sampling, parse_loop

REPO = Path(__file__).resolve().parents[1]


@dataclass
class EchoConfig(LoopConfig):
    output_dir: str = "runs/echo"
    """runs go to <output_dir>/<name>/"""
    count: int = 3
    """how many items to echo"""
    temperature: float = 0.8
    """sampling temperature; 0 decodes greedily"""
    k_values: list[int] = field(default_factory=lambda: [1, 2])
    """the k of pass@k"""

    def __post_init__(self):
        super().__post_init__()
        loops.check_count("count", self.count)
        check_sampling(self.temperature, 1.0)


COMMANDS = {"run": (EchoConfig, "echo some items")}


def test_config_file_then_overrides_and_json_is_yaml(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"count": 5, "k_values": [1, 2, 4], "temperature": 0.5}))
    command, parsed = parse_loop("lab echo", COMMANDS, ["run", "--config", str(config), "--count", "7",
                                                        "--device", "cpu"])
    assert command == "run" and isinstance(parsed, EchoConfig)
    assert (parsed.count, parsed.k_values, parsed.temperature, parsed.device) == (7, [1, 2, 4], 0.5, "cpu")


@pytest.mark.parametrize("argv, culprit", [
    (["run", "--cuont", "3"], "--cuont"),
    (["run", "--count", "three"], "count"),
    (["run", "--count", "0"], "count: must be an integer >= 1; got 0"),
    (["run", "--temperature", "nan"], "temperature"),
    (["run", "--temperature", "inf"], "temperature"),
    (["run", "--temperature", "-1"], "temperature"),
    (["run", "--device", "tpu"], "device: 'tpu' is not one of"),
    (["run", "--dtype", "int3"], "dtype: 'int3'"),
    (["run", "--name", "a/b"], "name: a run name is one path component"),
    (["walk"], "walk"),
])
def test_bad_values_are_one_line_user_errors_naming_the_key(argv, culprit):
    with pytest.raises(UserError) as error:
        parse_loop("lab echo", COMMANDS, argv)
    assert culprit in str(error.value) and "\n" not in str(error.value)


def test_unknown_key_in_a_config_file_is_named(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("count: 2\ncuont: 3\n")
    with pytest.raises(UserError, match=f"'cuont'.*--config {config}"):
        parse_loop("lab echo", COMMANDS, ["run", "--config", str(config)])
    config.write_text("count: [2\n")
    with pytest.raises(UserError, match=f"{config}:2: malformed YAML"):  # a malformed file is named with its line
        parse_loop("lab echo", COMMANDS, ["run", "--config", str(config)])


def test_help_documents_every_field_and_print_config_prints_the_resolved_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_loop("lab echo", COMMANDS, ["run", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for doc in ("how many items to echo", "the k of pass@k", "auto | cpu | cuda", "continue the run"):
        assert doc in text
    with pytest.raises(SystemExit):
        parse_loop("lab echo", COMMANDS, ["run", "--count", "9", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["count"] == 9


def echo(config: EchoConfig, fail_after: int | None = None, pause_after: int | None = None) -> int:
    """A loop written as loops.py's docstring says; `fail_after` raises after that many results."""
    with LoopRun(config, method="echo") as run:
        run.start(total=config.count, header={"engine": {"threads": 1}})
        for i in range(config.count):
            if str(i) in run.done:
                continue
            if i == pause_after:
                return run.pause()
            if i == fail_after:
                raise RuntimeError("boom")
            run.write({"id": str(i), "echo": i})
    return run.exit_status


def test_a_run_directory_has_config_results_and_tracker(tmp_path):
    config = EchoConfig(output_dir=str(tmp_path / "echo"), name="first", count=3)
    assert echo(config) == 0
    run = tmp_path / "echo" / "first"
    assert yaml.safe_load((run / "config.yaml").read_text())["count"] == 3
    lines = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert lines[0]["kind"] == "header" and lines[0]["method"] == "echo" and lines[0]["engine"] == {"threads": 1}
    assert [line["id"] for line in lines[1:]] == ["0", "1", "2"]
    heartbeat = json.loads((run / "_run_tracker" / "heartbeat.json").read_text())
    assert (heartbeat["stage"], heartbeat["name"], heartbeat["status"], heartbeat["step"]) == ("echo", "first",
                                                                                               "completed", 3)
    artifacts = json.loads((run / "_run_tracker" / "artifacts.json").read_text())
    assert artifacts["missing"] == [] and "results.jsonl" in artifacts["present"]


def test_paused_exits_3_and_resume_skips_finished_ids_and_refuses_a_changed_config(tmp_path):
    config = EchoConfig(output_dir=str(tmp_path), name="r", count=4)
    assert echo(config, pause_after=2) == EXIT_PAUSED == 3
    heartbeat = json.loads((tmp_path / "r" / "_run_tracker" / "heartbeat.json").read_text())
    assert heartbeat["status"] == "paused" and heartbeat["step"] == 2
    with pytest.raises(UserError, match="the run exists; continue it with --config"):
        echo(config)
    with pytest.raises(UserError, match="different count"):
        echo(EchoConfig(output_dir=str(tmp_path), name="r", count=5, resume=True))
    _, resumed = parse_loop("lab echo", COMMANDS, ["run", "--config", str(tmp_path / "r" / "config.yaml"),
                                                   "--resume", "true"])
    assert echo(resumed) == 0
    ids = [json.loads(line).get("id") for line in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    assert ids == [None, "0", "1", "2", "3"]


def test_two_runs_started_in_the_same_second_get_two_directories(tmp_path, monkeypatch):
    class FrozenClock:
        @staticmethod
        def now():
            from datetime import datetime
            return datetime(2026, 12, 4, 16, 15, 3)

    monkeypatch.setattr(loops, "datetime", FrozenClock)
    config = EchoConfig(output_dir=str(tmp_path), count=1)
    with LoopRun(config, "echo") as first, LoopRun(config, "echo") as second:
        assert first.directory.name == "20261204-161503" and second.directory.name == "20261204-161503-1"
        first.start(1)
        second.start(1)
        first.write({"id": "a"})
        second.write({"id": "b"})
    assert [json.loads(line).get("id") for line in (first.results_path).read_text().splitlines()] == [None, "a"]


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    config = EchoConfig(output_dir=str(tmp_path), name="busy", count=1, resume=True)
    with LoopRun(config, "echo") as run:
        run.start(1)
        with pytest.raises(DataError, match=r"being written by pid \d+ on "):
            LoopRun(config, "echo").__enter__()
        run.write({"id": "x"})
    with LoopRun(config, "echo") as again:  # released when the first one ended
        assert again.done == {"x"}


def test_the_lock_holds_across_processes(tmp_path):
    results = tmp_path / "results.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lightning_lab.data.io import JsonlWriter; "
         f"w = JsonlWriter({str(results)!r}, exclusive=True); print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DataError, match=f"being written by pid {holder.pid} "):
            JsonlWriter(results, exclusive=True)
    finally:
        holder.communicate("", timeout=30)
    JsonlWriter(results, exclusive=True).close()  # the holder's exit released it


@pytest.mark.parametrize("fail_after", [0, None])
def test_a_run_that_fails_before_its_first_result_leaves_nothing(tmp_path, fail_after):
    config = EchoConfig(output_dir=str(tmp_path / "echo"), name="doomed", count=2)
    with pytest.raises(RuntimeError):
        with LoopRun(config, "echo") as run:
            if fail_after is None:  # fails before start (e.g. the model does not load)
                raise RuntimeError("no model")
            run.start(2)
            raise RuntimeError("boom")
    assert list((tmp_path / "echo").iterdir()) == []  # no header-only file blocks the rerun
    assert echo(config) == 0


def test_a_run_that_fails_after_a_result_keeps_it_as_failed(tmp_path):
    config = EchoConfig(output_dir=str(tmp_path), name="half", count=3)
    with pytest.raises(RuntimeError, match="boom"):
        echo(config, fail_after=1)
    heartbeat = json.loads((tmp_path / "half" / "_run_tracker" / "heartbeat.json").read_text())
    assert heartbeat["status"] == "failed" and heartbeat["step"] == 1
    assert echo(EchoConfig(output_dir=str(tmp_path), name="half", count=3, resume=True)) == 0
