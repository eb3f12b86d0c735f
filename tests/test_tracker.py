"""RunTracker files (heartbeat, events, artifacts), crash safety, and `lab status` / `lab artifacts`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_lab.callbacks.status import artifacts_main, human_duration, status_main
from lightning_lab.callbacks.tracker import RunTracker
from lightning_lab.cli import main as lab_main


def read_heartbeat(run_dir: Path) -> dict:
    return json.loads((run_dir / "_run_tracker" / "heartbeat.json").read_text())


def read_events(run_dir: Path) -> list[dict]:
    lines = (run_dir / "_run_tracker" / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_plain_loop_writes_heartbeat_events_and_artifacts(tmp_path):
    run_dir = tmp_path / "bon" / "gsm8k"
    tracker = RunTracker(run_dir, stage="bon", required_artifacts=["samples.jsonl", "plots/*.png"],
                         heartbeat_every_s=0)
    tracker.start(total=10)
    for step in range(1, 6):
        time.sleep(0.01)
        tracker.update(step, loss=1.0 / step)
    tracker.event("checkpoint", path="x.ckpt")

    heartbeat = read_heartbeat(run_dir)
    assert heartbeat["status"] == "running" and heartbeat["stage"] == "bon" and heartbeat["name"] == "gsm8k"
    assert (heartbeat["step"], heartbeat["total"], heartbeat["pid"]) == (5, 10, os.getpid())
    assert heartbeat["hostname"] == socket.gethostname() and heartbeat["heartbeat_interval_s"] == 0
    assert 10 < heartbeat["rate"] < 200  # ~100 steps/s with the 10 ms sleeps
    assert heartbeat["eta_s"] == pytest.approx(5 / heartbeat["rate"])
    assert heartbeat["extra"] == {"loss": 0.2}
    assert json.loads((run_dir / "_run_tracker" / "artifacts.json").read_text())["missing"] == [
        "samples.jsonl", "plots/*.png"]

    (run_dir / "samples.jsonl").write_text("{}\n")
    tracker.finish()
    assert read_heartbeat(run_dir)["status"] == "completed"
    assert [event["event"] for event in read_events(run_dir)] == ["start", "checkpoint", "finish"]
    assert json.loads((run_dir / "_run_tracker" / "artifacts.json").read_text()) == {
        "required": ["samples.jsonl", "plots/*.png"], "present": ["samples.jsonl"], "missing": ["plots/*.png"]}

    # Starting again in the same directory is a resume.
    tracker.start(total=10, step=5)
    assert read_events(run_dir)[-1]["event"] == "resume"


def test_heartbeat_is_throttled_but_status_changes_are_written_at_once(tmp_path):
    tracker = RunTracker(tmp_path, heartbeat_every_s=3600)
    tracker.start(total=100)
    tracker.update(7)
    assert read_heartbeat(tmp_path)["step"] == 0  # within the interval: not rewritten
    tracker.finish("paused")
    assert (read_heartbeat(tmp_path)["step"], read_heartbeat(tmp_path)["status"]) == (7, "paused")


def test_context_manager_statuses(tmp_path):
    with RunTracker(tmp_path / "ok", total=3) as tracker:
        tracker.update(3)
    assert read_heartbeat(tmp_path / "ok")["status"] == "completed"

    with pytest.raises(ZeroDivisionError):
        with RunTracker(tmp_path / "bad"):
            1 / 0
    assert read_heartbeat(tmp_path / "bad")["status"] == "failed"
    failure = read_events(tmp_path / "bad")[-1]
    assert failure["event"] == "failure" and "ZeroDivisionError" in failure["error"]

    with pytest.raises(KeyboardInterrupt):
        with RunTracker(tmp_path / "stopped"):
            raise KeyboardInterrupt
    assert read_heartbeat(tmp_path / "stopped")["status"] == "paused"


def test_misuse_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match=r"update\(\) called before start\(\)"):
        RunTracker(tmp_path).update(1)
    with pytest.raises(ValueError, match="run_dir"):
        RunTracker().start()
    tracker = RunTracker(tmp_path)
    tracker.start()
    with pytest.raises(ValueError, match="status must be one of"):
        tracker.finish("done")


CRASH_LOOP = """
import sys
from lightning_lab.callbacks.tracker import RunTracker

tracker = RunTracker(sys.argv[1], stage="loop", total=10**9, heartbeat_every_s=0)
tracker.start()
step = 0
while True:
    step += 1
    tracker.update(step, loss=1.0 / step)
    if step % 5 == 0:
        tracker.event("checkpoint", note="x" * 500)
"""


def test_files_parse_after_sigkill_mid_run(tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", CRASH_LOOP, str(run_dir)])
    heartbeat_path = run_dir / "_run_tracker" / "heartbeat.json"
    try:
        deadline = time.time() + 60
        step = 0
        while step < 300:  # read while it writes: every read must parse too
            assert process.poll() is None, "the tracker loop died on its own"
            assert time.time() < deadline, "the tracker loop made no progress"
            if heartbeat_path.exists():
                step = json.loads(heartbeat_path.read_text())["step"]
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL

    heartbeat = read_heartbeat(run_dir)
    assert heartbeat["status"] == "running" and heartbeat["step"] >= 300
    events = read_events(run_dir)
    assert events[0]["event"] == "start" and len(events) >= 300 // 5


def write_fake_heartbeat(run_dir: Path, **fields) -> None:
    heartbeat = {"stage": "sft", "name": run_dir.name, "status": "running", "step": 40, "total": 100,
                 "rate": 2.0, "eta_s": 30.0, "pid": os.getpid(), "hostname": socket.gethostname(),
                 "time": time.time(), "heartbeat_interval_s": 5.0, "extra": {}}
    heartbeat.update(fields)
    (run_dir / "_run_tracker").mkdir(parents=True)
    (run_dir / "_run_tracker" / "heartbeat.json").write_text(json.dumps(heartbeat))


def dead_pid() -> int:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    return finished.pid


def status_rows(capsys, root: Path) -> dict[str, list[str]]:
    assert status_main(["--root", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["STAGE", "NAME", "STEP", "RATE", "ETA", "STATUS", "HEARTBEAT"]
    return {line.split()[1]: line.split() for line in lines[1:]}


def test_status_marks_dead_runs_stale_and_live_runs_running(tmp_path, capsys):
    an_hour_ago = time.time() - 3600
    write_fake_heartbeat(tmp_path / "sft" / "dead", pid=dead_pid(), time=an_hour_ago)
    write_fake_heartbeat(tmp_path / "sft" / "slow_but_alive", time=an_hour_ago)
    write_fake_heartbeat(tmp_path / "sft" / "live")
    write_fake_heartbeat(tmp_path / "sft" / "elsewhere_old", hostname="another-host", time=an_hour_ago)
    write_fake_heartbeat(tmp_path / "sft" / "elsewhere_fresh", hostname="another-host")
    write_fake_heartbeat(tmp_path / "sft" / "done", status="completed", pid=dead_pid(), time=an_hour_ago)

    rows = status_rows(capsys, tmp_path)
    status = {name: row[5] for name, row in rows.items()}
    assert status == {"sft/dead": "stale", "sft/slow_but_alive": "running", "sft/live": "running",
                      "sft/elsewhere_old": "stale", "sft/elsewhere_fresh": "running", "sft/done": "completed"}
    assert rows["sft/live"][:6] == ["sft", "sft/live", "40/100", "2/s", "30s", "running"]
    assert rows["sft/dead"][4] == "-"  # no ETA for a run that is not running
    assert rows["sft/dead"][6] == "1h00m"


def test_status_reads_a_real_tracker_through_the_lab_cli(tmp_path, capsys):
    tracker = RunTracker(tmp_path / "bon" / "a", stage="bon", total=4)
    tracker.start()
    assert lab_main(["status", "--root", str(tmp_path)]) == 0
    assert "bon/a" in capsys.readouterr().out


def test_status_without_runs_and_with_a_missing_root(tmp_path, capsys):
    assert status_main(["--root", str(tmp_path)]) == 0
    assert "no runs under" in capsys.readouterr().out
    assert lab_main(["status", "--root", str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_status_watch_stops_cleanly_on_ctrl_c(tmp_path, capsys, monkeypatch):
    write_fake_heartbeat(tmp_path / "run")

    def ctrl_c(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", ctrl_c)
    assert status_main(["--root", str(tmp_path), "--watch", "15"]) == 0
    assert "refreshing every 15s" in capsys.readouterr().out


def test_artifacts_reports_missing(tmp_path, capsys):
    complete = RunTracker(tmp_path / "complete", required_artifacts=["config.yaml"])
    (tmp_path / "complete" / "config.yaml").parent.mkdir(parents=True)
    (tmp_path / "complete" / "config.yaml").write_text("a: 1\n")
    complete.start()
    incomplete = RunTracker(tmp_path / "incomplete", required_artifacts=["config.yaml", "checkpoints/*.ckpt"])
    incomplete.start()

    assert artifacts_main(["--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "complete: 1/1 required artifacts present" in out
    assert "incomplete: 0/2 required artifacts present\n  missing: config.yaml, checkpoints/*.ckpt" in out

    (tmp_path / "incomplete" / "config.yaml").write_text("a: 1\n")
    (tmp_path / "incomplete" / "checkpoints").mkdir()
    (tmp_path / "incomplete" / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert artifacts_main(["--root", str(tmp_path)]) == 0
    assert lab_main(["artifacts", "--root", str(tmp_path / "nope")]) == 2


def test_human_duration():
    assert [human_duration(s) for s in (None, 5, 125, 3 * 3600 + 240, 2 * 86400 + 3 * 3600)] == [
        "-", "5s", "2m05s", "3h04m", "2d03h"]
