"""GracefulPause + RunTracker in a real (tiny, CPU) Lightning fit, and PauseFlag for plain loops."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_lab.callbacks.pause import GracefulPause, PauseFlag
from lightning_lab.callbacks.tracker import RunTracker


class LinearRegression(pl.LightningModule):
    """A BoringModel: one Linear layer on random tensors (20 batches an epoch)."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return torch.nn.functional.mse_loss(self.layer(inputs), targets)

    def validation_step(self, batch, batch_idx):
        inputs, targets = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(inputs), targets))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(80, 8, generator=generator), torch.randn(80, 1, generator=generator))
        return DataLoader(data, batch_size=4)

    def val_dataloader(self):
        return self.train_dataloader()


class RaiseSignalAt(Callback):
    """Delivers a real signal to this process just before training batch ``batch_idx``."""

    def __init__(self, batch_idx: int, signum: int):
        self.batch_idx, self.signum = batch_idx, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch_idx:
            signal.raise_signal(self.signum)


class CountValidations(Callback):
    def __init__(self):
        self.count = 0

    def on_validation_start(self, trainer, pl_module):
        self.count += 1


def fit(run_dir: Path, *extra_callbacks: Callback, ckpt_path: str | None = None) -> pl.Trainer:
    trainer = pl.Trainer(
        default_root_dir=run_dir, max_steps=20, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=10, limit_val_batches=2,
        callbacks=[*extra_callbacks, RunTracker(stage="tiny", heartbeat_every_s=0), GracefulPause(),
                   ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, every_n_train_steps=10)],
    )
    trainer.fit(LinearRegression(), ckpt_path=ckpt_path)
    return trainer


def read_heartbeat(run_dir: Path) -> dict:
    return json.loads((run_dir / "_run_tracker" / "heartbeat.json").read_text())


def event_names(run_dir: Path) -> list[str]:
    lines = (run_dir / "_run_tracker" / "events.jsonl").read_text().splitlines()
    return [json.loads(line)["event"] for line in lines]


def test_fit_writes_a_completed_heartbeat_and_restores_signal_handlers(tmp_path):
    handlers_before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    trainer = fit(tmp_path)
    assert trainer.global_step == 20
    heartbeat = read_heartbeat(tmp_path)
    assert (heartbeat["status"], heartbeat["step"], heartbeat["total"], heartbeat["stage"]) == (
        "completed", 20, 20, "tiny")
    assert heartbeat["rate"] > 0
    events = event_names(tmp_path)
    assert events[0] == "start" and events[-1] == "finish"
    assert events.count("validation") == 2 and "checkpoint" in events
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers_before


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_first_signal_pauses_at_batch_end_then_resume_completes(tmp_path, signum):
    handlers_before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    validations = CountValidations()
    trainer = fit(tmp_path, RaiseSignalAt(batch_idx=5, signum=signum), validations)  # no exception, no exit
    assert validations.count == 0  # Lightning validates on an early stop; a pause skips that

    assert trainer.global_step == 6  # batch 5 (the 6th step) finished, nothing after it
    last_ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last_ckpt, weights_only=False)["global_step"] == 6
    heartbeat = read_heartbeat(tmp_path)
    assert (heartbeat["status"], heartbeat["step"]) == ("paused", 6)
    pause_event = json.loads((tmp_path / "_run_tracker" / "events.jsonl").read_text().splitlines()[-1])
    assert pause_event["event"] == "pause" and pause_event["checkpoint"] == str(last_ckpt)
    assert pause_event["signal"] == signal.Signals(signum).name
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers_before

    trainer = fit(tmp_path, ckpt_path="last")
    assert trainer.global_step == 20
    assert read_heartbeat(tmp_path)["status"] == "completed"
    events = event_names(tmp_path)
    assert events[:4] == ["start", "checkpoint", "pause", "resume"] and events[-1] == "finish"
    # ModelCheckpoint took over the pause's last.ckpt rather than versioning around it.
    assert [path.name for path in last_ckpt.parent.glob("last*")] == ["last.ckpt"]
    assert torch.load(last_ckpt, weights_only=False)["global_step"] == 20


def test_exception_in_fit_marks_failed_and_restores_handlers(tmp_path):
    class Boom(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 3:
                raise RuntimeError("boom")

    handlers_before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, Boom())
    assert read_heartbeat(tmp_path)["status"] == "failed"
    assert event_names(tmp_path)[-1] == "failure"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers_before


def test_pause_flag_first_signal_sets_flag_second_sigint_raises():
    handler_before = signal.getsignal(signal.SIGINT)
    with PauseFlag() as pause:
        assert not pause.requested
        signal.raise_signal(signal.SIGTERM)
        assert pause.requested and pause.signal_name == "SIGTERM"
        signal.raise_signal(signal.SIGTERM)  # a second SIGTERM is no reason to exit
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is handler_before
