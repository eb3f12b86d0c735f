"""Run tracker: heartbeat, event timeline and artifact check for one run directory.

A run writes three files under ``<run_dir>/_run_tracker/``:

- ``heartbeat.json``: where the run is now (stage, name, step/total, smoothed rate, ETA,
  status running|completed|paused|failed, pid, hostname, time). Replaced atomically, at most
  every ``heartbeat_every_s`` seconds, and at once when the status changes.
- ``events.jsonl``: the timeline (start, resume, validation, checkpoint, pause, finish,
  failure), one JSON object per line, each line flushed and fsynced as it is written.
- ``artifacts.json``: ``{"required": [...], "present": [...], "missing": [...]}``; required
  entries are paths (glob patterns allowed) relative to the run directory.

``RunTracker`` is a Lightning callback (``run_dir`` defaults to ``trainer.default_root_dir``)
and also works from a plain loop::

    with RunTracker("runs/bon/gsm8k", stage="bon", total=len(samples)) as tracker:
        for i, sample in enumerate(samples):
            ...
            tracker.update(i + 1)

``lab status`` and ``lab artifacts`` (callbacks/status.py, which imports no Lightning) read these
files for every run under a root directory.
"""

from __future__ import annotations

import math
import os
import socket
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_lab.callbacks.status import TRACKER_DIR, check_artifacts, iso_time
from lightning_lab.data.io import JsonlWriter, write_json_atomic

# The rate is an exponential moving average over time: roughly the steps/s of the last 30 s.
RATE_TIME_CONSTANT_S = 30.0
# The event written when a run ends with each final status.
FINISH_EVENTS = {"completed": "finish", "paused": "pause", "failed": "failure"}


def _status_for_exception(exception: BaseException) -> str:
    # Ctrl+C (KeyboardInterrupt) and Lightning's SIGTERM exit are a stop by the user, not a
    # failure: the run can be resumed from its last checkpoint.
    return "paused" if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) else "failed"


def _error_fields(exception: BaseException) -> dict[str, str]:
    return {
        "error": f"{type(exception).__name__}: {exception}",
        "traceback": "".join(traceback.format_exception(type(exception), exception, exception.__traceback__)),
    }


class RunTracker(Callback):
    """Heartbeat + events + artifacts for one run; a Lightning callback or a plain-loop object.

    Plain loop: ``start(total)``, then ``update(step)`` as work progresses, ``event(kind, ...)``
    for anything worth a timeline entry, and ``finish(status)``; or use it as a context manager,
    which starts it and finishes it as completed, paused (KeyboardInterrupt) or failed.
    """

    def __init__(
        self,
        run_dir: str | Path | None = None,
        stage: str = "run",
        total: int | None = None,
        required_artifacts: Sequence[str] = (),
        heartbeat_every_s: float = 5.0,
        name: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.stage = stage
        self.total = total
        self.required_artifacts = list(required_artifacts)
        self.heartbeat_every_s = heartbeat_every_s
        self.name = name
        self.status: str | None = None  # None until start(), then running|completed|paused|failed
        self.step = 0
        self.rate: float | None = None  # steps/s, smoothed
        self.extra: dict[str, Any] = {}
        self._started_at = 0.0
        self._rate_step = 0
        self._rate_time: float | None = None
        self._last_heartbeat_at = -math.inf
        self._is_writer = True  # False on the non-zero ranks of a distributed Lightning run
        self._events: JsonlWriter | None = None  # events.jsonl, open from start() to finish()

    @property
    def tracker_dir(self) -> Path:
        if self.run_dir is None:
            raise ValueError(
                "RunTracker has no run_dir: pass RunTracker(run_dir=...) or use it as a Lightning "
                "callback, which defaults it to trainer.default_root_dir"
            )
        return self.run_dir / TRACKER_DIR

    # ---- plain-loop API ------------------------------------------------------------------

    def start(self, total: int | None = None, step: int = 0) -> None:
        """Mark the run as running; a ``resume`` event if it starts past step 0 or ran here before."""
        self.tracker_dir.mkdir(parents=True, exist_ok=True)
        resumed = step > 0 or (self.tracker_dir / "heartbeat.json").exists()
        if total is not None:
            self.total = total
        self.step = step
        self.rate = None
        self._rate_step, self._rate_time = step, None
        self._started_at = time.time()
        self.status = "running"
        self.event("resume" if resumed else "start", total=self.total)
        self._write_heartbeat()
        self._write_artifacts()

    def update(self, step: int, total: int | None = None, **extra: Any) -> None:
        """Record progress; ``extra`` values (e.g. loss) go into the heartbeat's ``extra``."""
        self._require_started("update")
        now = time.time()
        if total is not None:
            self.total = total
        self.extra.update(extra)
        self._update_rate(step, now)
        self.step = step
        if now - self._last_heartbeat_at >= self.heartbeat_every_s:
            self._write_heartbeat(now)

    def event(self, kind: str, **data: Any) -> None:
        """Append one line (JSON-serialisable ``data``) to events.jsonl; on disk when this returns."""
        self._require_started("event")
        if self._events is None:
            self._events = JsonlWriter(self.tracker_dir / "events.jsonl")
        now = time.time()
        self._events.write({"time": now, "time_iso": iso_time(now), "event": kind, "step": self.step, **data})

    def finish(self, status: str = "completed", **data: Any) -> None:
        """End the run as completed, paused or failed: event, heartbeat, artifacts re-checked."""
        self._require_started("finish")
        if status not in FINISH_EVENTS:
            raise ValueError(f"RunTracker.finish: status must be one of {sorted(FINISH_EVENTS)}, got {status!r}")
        self.status = status
        self.event(FINISH_EVENTS[status], status=status, **data)
        self._events.close()
        self._events = None
        self._write_heartbeat()
        self._write_artifacts()

    def __enter__(self) -> RunTracker:
        if self.status != "running":
            self.start()
        return self

    def __exit__(self, exc_type, exception, exc_traceback) -> bool:
        if exception is not None:
            self.finish(_status_for_exception(exception), **_error_fields(exception))
        elif self.status == "running":
            self.finish("completed")
        return False

    # ---- Lightning hooks -----------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._is_writer = trainer.is_global_zero
        if self.run_dir is None:
            self.run_dir = Path(trainer.default_root_dir)

    def on_train_start(self, trainer, pl_module) -> None:
        if not self._is_writer:
            return
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        self.start(total=int(total) if math.isfinite(total) else None, step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._is_writer and self.status == "running":
            self.update(trainer.global_step)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._is_writer and self.status == "running" and not trainer.sanity_checking:
            metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if value.numel() == 1}
            self.event("validation", metrics=metrics)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self._is_writer and self.status == "running":
            self.event("checkpoint")

    def on_fit_end(self, trainer, pl_module) -> None:
        # Still running here means the loop ended on its own (max_steps, early stopping);
        # GracefulPause has already finished the run as paused.
        if self._is_writer and self.status == "running":
            self.step = trainer.global_step
            self.finish("completed")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not self._is_writer or self.run_dir is None:
            return
        if self.status is None:  # failed before training started (setup, sanity check)
            self.start(step=trainer.global_step)
        self.finish(_status_for_exception(exception), **_error_fields(exception))

    # ---- internals -----------------------------------------------------------------------

    def _require_started(self, method: str) -> None:
        if self.status is None:
            raise RuntimeError(f"RunTracker.{method}() called before start()")

    def _update_rate(self, step: int, now: float) -> None:
        # The first update only sets the reference point, so startup time does not count.
        if self._rate_time is None or step < self._rate_step:
            self._rate_step, self._rate_time = step, now
            return
        if step == self._rate_step:
            return
        elapsed = max(now - self._rate_time, 1e-9)
        instant = (step - self._rate_step) / elapsed
        weight = 1.0 - math.exp(-elapsed / RATE_TIME_CONSTANT_S)
        self.rate = instant if self.rate is None else self.rate + weight * (instant - self.rate)
        self._rate_step, self._rate_time = step, now

    def _write_heartbeat(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        eta_s = None
        if self.status == "running" and self.total is not None and self.rate:
            eta_s = max(self.total - self.step, 0) / self.rate
        heartbeat = {
            "stage": self.stage,
            "name": self.name or self.run_dir.resolve().name,
            "status": self.status,
            "step": self.step,
            "total": self.total,
            "rate": self.rate,
            "eta_s": eta_s,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "time": now,
            "time_iso": iso_time(now),
            "started": self._started_at,
            "heartbeat_interval_s": self.heartbeat_every_s,
            "extra": self.extra,
        }
        write_json_atomic(self.tracker_dir / "heartbeat.json", heartbeat)
        self._last_heartbeat_at = now

    def _write_artifacts(self) -> None:
        write_json_atomic(self.tracker_dir / "artifacts.json", check_artifacts(self.run_dir, self.required_artifacts))
