"""`lab status` and `lab artifacts`: read the `_run_tracker/` folders that `RunTracker` writes.

Kept apart from the callback so that these commands start without importing Lightning or torch.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from lightning_lab.errors import ArgumentParser, check_input_dir

TRACKER_DIR = "_run_tracker"
# A running heartbeat older than this many heartbeat intervals (and no live process) is stale.
STALE_AFTER_INTERVALS = 3


def iso_time(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time).astimezone().isoformat(timespec="seconds")


def check_artifacts(run_dir: str | Path, required: Sequence[str]) -> dict[str, list[str]]:
    """Which required artifacts (paths or glob patterns relative to ``run_dir``) exist now."""
    run_dir = Path(run_dir)
    present = [pattern for pattern in required if any(run_dir.glob(pattern))]
    missing = [pattern for pattern in required if pattern not in present]
    return {"required": list(required), "present": present, "missing": missing}


def find_runs(root: Path) -> list[Path]:
    """Every directory under ``root`` (recursively, root included) that has a heartbeat."""
    return sorted(heartbeat.parent.parent for heartbeat in root.glob(f"**/{TRACKER_DIR}/heartbeat.json"))


def run_status(run_dir: Path) -> str | None:
    """The heartbeat status of a stage or loop run (running, paused, completed, ...; None: never started)."""
    heartbeat = Path(run_dir) / TRACKER_DIR / "heartbeat.json"
    return json.loads(heartbeat.read_text()).get("status") if heartbeat.is_file() else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def displayed_status(heartbeat: dict[str, Any], now: float, this_host: str) -> str:
    """The heartbeat's status, or ``stale`` for a running run that stopped beating and is gone."""
    status = heartbeat["status"]
    if status != "running":
        return status
    too_old = now - heartbeat["time"] > STALE_AFTER_INTERVALS * heartbeat["heartbeat_interval_s"]
    # On another machine the pid means nothing here: judge by age alone.
    process_gone = heartbeat["hostname"] != this_host or not pid_alive(heartbeat["pid"])
    return "stale" if too_old and process_gone else "running"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"unreadable JSON: {error}") from error


def _format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _status_row(heartbeat: dict[str, Any], name: str, now: float, this_host: str) -> list[str]:
    status = displayed_status(heartbeat, now, this_host)
    total, rate = heartbeat["total"], heartbeat["rate"]
    return [
        heartbeat["stage"],
        name,
        f"{heartbeat['step']}/{total if total is not None else '?'}",
        f"{rate:.3g}/s" if rate else "-",
        human_duration(heartbeat["eta_s"]) if status == "running" else "-",
        status,
        human_duration(now - heartbeat["time"]) + " ago",
    ]


def status_table(root: Path, now: float | None = None) -> str | None:
    """The `lab status` table for every run under ``root``; None if there is no run."""
    now = time.time() if now is None else now
    this_host = socket.gethostname()
    rows = [["STAGE", "NAME", "STEP", "RATE", "ETA", "STATUS", "HEARTBEAT"]]
    for run_dir in find_runs(root):
        heartbeat_path = run_dir / TRACKER_DIR / "heartbeat.json"
        name = str(run_dir.relative_to(root))
        try:
            rows.append(_status_row(_read_json(heartbeat_path), name, now, this_host))
        except (ValueError, KeyError, TypeError) as error:
            print(f"lab status: {heartbeat_path}: bad heartbeat: {error!r}", file=sys.stderr)
            rows.append(["?", name, "?", "-", "-", "unreadable", "-"])
    return _format_table(rows) if len(rows) > 1 else None


def status_main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="lab status", description="One row per run found under --root.")
    parser.add_argument("--root", default="runs", help="directory searched recursively for runs (default: runs)")
    parser.add_argument("--watch", type=float, default=None, metavar="N", help="reprint every N seconds until Ctrl+C")
    args = parser.parse_args(argv)
    if args.watch is not None and not 0 < args.watch < float("inf"):  # also NaN
        parser.error(f"--watch must be a positive number of seconds, got {args.watch:g}")
    root = check_input_dir(args.root, "--root")
    try:
        while True:
            table = status_table(root)
            if args.watch is not None and sys.stdout.isatty():
                print("\033[2J\033[H", end="")  # clear the screen between refreshes
            print(table if table is not None else f"no runs under {root} (no {TRACKER_DIR}/heartbeat.json found)")
            if args.watch is None:
                return 0
            print(f"\n{iso_time(time.time())}  refreshing every {args.watch:g}s, Ctrl+C to stop", flush=True)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def artifacts_main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="lab artifacts", description="Required vs present artifacts per run.")
    parser.add_argument("--root", default="runs", help="directory searched recursively for runs (default: runs)")
    args = parser.parse_args(argv)
    root = check_input_dir(args.root, "--root")
    runs = find_runs(root)
    if not runs:
        print(f"no runs under {root} (no {TRACKER_DIR}/heartbeat.json found)")
        return 0
    any_missing = False
    for run_dir in runs:
        artifacts_path = run_dir / TRACKER_DIR / "artifacts.json"
        try:
            required = _read_json(artifacts_path)["required"] if artifacts_path.exists() else []
        except (ValueError, KeyError, TypeError) as error:
            print(f"{run_dir.relative_to(root)}: cannot check, {artifacts_path}: {error!r}")
            any_missing = True
            continue
        artifacts = check_artifacts(run_dir, required)
        line = f"{run_dir.relative_to(root)}: {len(artifacts['present'])}/{len(required)} required artifacts present"
        if artifacts["missing"]:
            any_missing = True
            line += "\n  missing: " + ", ".join(artifacts["missing"])
        print(line)
    return 1 if any_missing else 0
