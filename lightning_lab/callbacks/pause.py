"""Graceful pause: the first Ctrl+C (or SIGTERM) stops at a safe point, the second exits now.

The signal handler only sets a flag; the work happens where it is safe:

- ``GracefulPause`` (Lightning callback): at the next ``on_train_batch_end`` it saves
  ``last.ckpt`` in the checkpoint directory, marks the run's ``RunTracker`` as paused and sets
  ``trainer.should_stop``, so ``fit`` returns normally and ``--ckpt_path last`` resumes. Under DDP
  the ranks agree at every batch end (one all-reduce of a flag), so all of them stop after the same
  step even when the signal reached only one.
- ``PauseFlag`` (plain loops): poll ``pause.requested`` and stop between items::

      with RunTracker(run_dir, stage="bon", total=n) as tracker, PauseFlag() as pause:
          for i, sample in enumerate(samples):
              if pause.requested:
                  tracker.finish("paused")
                  break
              ...

A second SIGINT raises ``KeyboardInterrupt`` (rather than ``os._exit(130)``) so that
``finally`` blocks, ``RunTracker`` (status paused) and Lightning's own interrupt shutdown
(which exits with code 1) still run. Signal handlers can only be installed from the main thread;
elsewhere the flag is never set and a warning says so.
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_lab.callbacks.tracker import RunTracker

PAUSE_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class PauseFlag:
    """SIGINT/SIGTERM set ``requested``; a second SIGINT raises KeyboardInterrupt.

    ``install()`` replaces the handlers (remembering the previous ones), ``restore()`` puts them
    back; the context manager does both.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None  # the signal that asked for the pause
        self._previous_handlers: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("PauseFlag: not in the main thread, so Ctrl+C/SIGTERM cannot be handled for a pause")
            return
        self.requested = False
        for signum in PAUSE_SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _handle(self, signum: int, frame) -> None:
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        # os.write, not print: the handler may run while the main thread is inside a print to
        # the same stream (progress bars), and a buffered stream is not reentrant.
        os.write(2, f"\n{self.signal_name}: pausing at next batch boundary, Ctrl+C again to exit now\n".encode())

    def __enter__(self) -> PauseFlag:
        self.install()
        return self

    def __exit__(self, exc_type, exception, exc_traceback) -> bool:
        self.restore()
        return False


class GracefulPause(Callback):
    """First SIGINT/SIGTERM: at the next batch end save last.ckpt, tracker paused, stop fit."""

    def __init__(self) -> None:
        self.flag = PauseFlag()
        self.checkpoint_path: Path | None = None  # where the pause checkpoint went, once paused

    def on_train_start(self, trainer, pl_module) -> None:
        # Installed here rather than in on_fit_start: the Trainer registers its own SIGTERM
        # handler after on_fit_start, and that one raises SIGTERMException at the end of the
        # batch, which would turn a pause into an exit. Lightning never handles SIGINT itself
        # (it catches the KeyboardInterrupt, wherever in the step it lands, and exits with 1).
        self.checkpoint_path = None
        self.flag.install()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.checkpoint_path is not None:
            return
        requested = self.flag.requested
        if trainer.world_size > 1:  # DDP: the ranks must stop after the same step (one asked: all stop)
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        checkpoint_callback = trainer.checkpoint_callback
        if checkpoint_callback is not None and checkpoint_callback.dirpath is not None:
            checkpoint_dir = Path(checkpoint_callback.dirpath)
        else:
            checkpoint_dir = Path(trainer.default_root_dir) / "checkpoints"
        self.checkpoint_path = checkpoint_dir / "last.ckpt"
        if isinstance(checkpoint_callback, ModelCheckpoint) and checkpoint_callback.save_last:
            # Claim last.ckpt for ModelCheckpoint (set before saving: it is part of the saved state),
            # so that its next save, in this run or after resume, overwrites the file instead of
            # writing last-v1.ckpt beside it.
            checkpoint_callback.last_model_path = str(self.checkpoint_path)
        trainer.save_checkpoint(self.checkpoint_path)
        for callback in trainer.callbacks:
            if isinstance(callback, RunTracker) and callback.status == "running":
                callback.finish("paused", signal=self.flag.signal_name, checkpoint=str(self.checkpoint_path))
        trainer.should_stop = True
        # Lightning validates when a run stops early (for early-stopping monitors); a pause should not
        # spend minutes on that: the resumed run validates on its usual schedule.
        trainer.limit_val_batches = 0

    # Restored at the end of training (normal or not), before the Trainer's own teardown puts
    # back the handlers it saw when fit began.
    def on_train_end(self, trainer, pl_module) -> None:
        self.flag.restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.flag.restore()
