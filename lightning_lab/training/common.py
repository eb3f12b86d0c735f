"""What every trainable stage shares: the run directory, the callbacks, and the LightningCLI.

`lab <stage> fit --config configs/<stage>/<name>.yaml` puts everything for one run under
``runs/<stage>/<name>/``:

    config.yaml            the resolved config (rewritten on every invocation)
    checkpoints/           last.ckpt and step=NNNNNNN.ckpt (a fixed folder, so `--ckpt_path last` finds it)
    metrics.jsonl          every logged metric, one JSON line per log step / validation
    metrics.csv            the same through Lightning's CSV logger (or TensorBoard / W&B when chosen)
    _run_tracker/          heartbeat.json, events.jsonl, artifacts.json (read by `lab status`)

`--run.name` defaults to the config file's stem; `--run.root` to ``runs``.
"""

from __future__ import annotations

import random
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

from lightning_lab.callbacks.pause import GracefulPause
from lightning_lab.callbacks.tracker import RunTracker
from lightning_lab.data.io import JsonlWriter, read_jsonl, read_yaml_or_json
from lightning_lab.errors import UserError, check_input_file, check_writable_dir
from lightning_lab.models.loading import load_checkpoint


class MetricsJsonl(Callback):
    """Appends logged metrics to ``<run>/metrics.jsonl``: train metrics every `log_every_n_steps`, val after validation.

    A resumed fit continues the file. Steps the file already holds (written after the checkpoint it resumes
    from, before the run was stopped) are not written again: resume is exact, so they would be the same.
    (`validate` always writes its line.)"""

    def __init__(self) -> None:
        self.writer: JsonlWriter | None = None
        self.last_written = {"train": -1, "val": -1}  # the last step of each kind already in the file

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.is_global_zero and self.writer is None:
            self.writer = JsonlWriter(Path(trainer.default_root_dir) / "metrics.jsonl")

    def on_train_start(self, trainer, pl_module) -> None:
        if self.writer is not None and trainer.global_step > 0:  # resumed from a checkpoint
            for _, record in read_jsonl(self.writer.path):
                kind = "val" if any(name.startswith("val") for name in record) else "train"
                self.last_written[kind] = max(self.last_written[kind], record.get("step", -1))

    def _write(self, trainer, kind: str) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("val") == (kind == "val") and v.numel() == 1}
        if self.writer is not None and metrics and trainer.global_step > self.last_written[kind]:
            self.writer.write({"step": trainer.global_step, "epoch": trainer.current_epoch,
                               "time": round(time.time(), 3), **metrics})
            self.last_written[kind] = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            self._write(trainer, "train")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, "val")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def rng_states() -> dict:
    """Python, NumPy and torch RNG states as tensors, ints and tuples (loadable with torch.load(weights_only=True))."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position,
                                                     has_gauss, cached_gaussian),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ExactResume(Callback):
    """Saves the RNG states (Python, NumPy, torch, CUDA) in every checkpoint and restores them on resume,
    so dropout, sampling and shuffling continue as in an uninterrupted run."""

    def __init__(self) -> None:
        self.states_to_restore: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.states_to_restore = checkpoint.get("rng_states")

    def on_train_start(self, trainer, pl_module) -> None:
        # restored here, after setup and the sanity check have drawn whatever random numbers they draw
        if self.states_to_restore is not None:
            set_rng_states(self.states_to_restore)
            self.states_to_restore = None


class StepsProgressBar(RichProgressBar):
    """Lightning's default (rich) progress bar, minus the "Epoch 0/-2" it shows when a run is bounded by
    ``max_steps`` alone (``max_epochs`` is then -1; pretraining's data is one endless epoch)."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"


class SaveConfigToRunDir(SaveConfigCallback):
    """Writes the resolved config to ``<run>/config.yaml`` whatever logger is chosen."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.is_global_zero and not self.already_saved:
            path = Path(trainer.default_root_dir) / self.config_filename
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(path), skip_none=False, overwrite=True)
            self.already_saved = True


class LabCLI(LightningCLI):
    """LightningCLI plus the lab's run layout: `--run.root`, `--run.name`, `--run.checkpoint_every_n_steps`."""

    def __init__(self, *args, stage: str, default_run_name: str, required_artifacts: tuple[str, ...], **kwargs):
        self.stage = stage
        self.default_run_name = default_run_name
        self.required_artifacts = required_artifacts
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run.root", type=str, default="runs", help="runs go to <root>/<stage>/<name>")
        parser.add_argument("--run.name", type=str, default=self.default_run_name,
                            help="run name (default: the config file's stem)")
        parser.add_argument("--run.checkpoint_every_n_steps", type=int, default=100,
                            help="also keep checkpoints/step=NNNNNNN.ckpt every this many optimizer steps")

    def run_dir(self) -> Path:
        run = self.config[self.config.subcommand].run
        return Path(run.root) / self.stage / run.name

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's first step after parsing, where it reads the hyper-parameters of a ``--ckpt_path`` file:
        the device, the run directory and the checkpoint are checked before it, and before anything is built."""
        config = self.config[self.config.subcommand]
        check_accelerator(config.trainer.accelerator)
        check_writable_dir(self.run_dir(), "--run.root/--run.name")
        self.resolve_ckpt_path()
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        trainer = self._get(self.config, "trainer")
        trainer.default_root_dir = str(self.run_dir())
        if trainer.logger in (None, True):  # the default: a CSV log inside the run directory
            trainer.logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                              "init_args": {"save_dir": str(self.run_dir()), "name": "", "version": "csv"}}

    def resolve_ckpt_path(self) -> None:
        """``--ckpt_path last`` is this run's ``checkpoints/last.ckpt`` and must exist; `fit` without
        ``--ckpt_path`` refuses a run that already has checkpoints rather than start it again in the same folder.
        The checkpoint is checked here (memory-mapped, weights_only), before any model is built or loaded."""
        config = self.config[self.config.subcommand]
        checkpoints = self.run_dir() / "checkpoints"
        if config.ckpt_path == "last":
            config.ckpt_path = str(checkpoints / "last.ckpt")
            if not Path(config.ckpt_path).is_file():
                raise UserError(f"--ckpt_path last: {config.ckpt_path} does not exist (is --run.name right? "
                                "a run that never saved a checkpoint starts with fit and no --ckpt_path)")
        elif config.ckpt_path is None and self.config.subcommand == "fit" and any(checkpoints.glob("*.ckpt")):
            raise UserError(f"run {self.run_dir()} already has checkpoints in {checkpoints}: continue it with "
                            "--ckpt_path last, or start a new run with another --run.name")
        if config.ckpt_path is not None:
            check_input_file(config.ckpt_path, "--ckpt_path")
            load_checkpoint(config.ckpt_path, mmap=True)
        if config.weights_only is None:
            config.weights_only = True  # what torch does by default today, stated so that no setting changes it

    def instantiate_trainer(self, **kwargs):
        run = self._get(self.config, "run")
        checkpoint = ModelCheckpoint(dirpath=self.run_dir() / "checkpoints", filename="step={step:07d}",
                                     auto_insert_metric_name=False, save_last=True, save_top_k=-1,
                                     every_n_train_steps=run.checkpoint_every_n_steps)
        lab_callbacks = [RunTracker(stage=self.stage, required_artifacts=self.required_artifacts),
                         GracefulPause(), checkpoint, MetricsJsonl(), ExactResume()]
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        chosen = list(trainer_config.get("callbacks") or []) + extra
        if (_RICH_AVAILABLE and trainer_config.get("enable_progress_bar", True) is not False
                and not any(isinstance(callback, ProgressBar) for callback in chosen)):
            lab_callbacks.append(StepsProgressBar())
        return self._instantiate_trainer(trainer_config, extra + lab_callbacks)


def check_accelerator(accelerator) -> None:
    """`--trainer.accelerator` names a device this machine has: one line saying what it has otherwise."""
    if not isinstance(accelerator, str) or accelerator == "auto":
        return  # auto, or an Accelerator instance / class_path from a config: Lightning checks those
    from lightning.pytorch.accelerators import AcceleratorRegistry

    present = [name for name in sorted(AcceleratorRegistry.available_accelerators())
               if AcceleratorRegistry[name]["accelerator"].is_available()]
    wanted = ("cuda", "mps") if accelerator == "gpu" else (accelerator,)
    if accelerator != "gpu" and accelerator not in AcceleratorRegistry.available_accelerators():
        raise UserError(f"--trainer.accelerator {accelerator}: unknown; use auto, gpu or one of "
                        f"{', '.join(sorted(AcceleratorRegistry.available_accelerators()))} (this machine has "
                        f"{', '.join(present)})")
    if not any(name in present for name in wanted):
        raise UserError(f"--trainer.accelerator {accelerator}: not available on this machine, which has "
                        f"{', '.join(present)} (use --trainer.accelerator {present[0]}, or auto)")


def config_files(argv: list[str]) -> list[str]:
    """Every `--config FILE` (or `--config=FILE`) in argv, in order."""
    files = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    return files + [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]


def config_stem(argv: list[str]) -> str | None:
    """The stem of the first `--config FILE`: the default run name."""
    files = config_files(argv)
    return Path(files[0]).stem if files else None


def argument_message(error: Exception) -> str:
    """jsonargparse's message in the lab's words: the flag as typed (`--model.lr`), plain type names, and for
    a value that fits none of a union's types, the value and the choices rather than every type's error."""
    message = re.sub(r'Parser key "([^"]+)"', r"--\1", str(error))
    message = re.sub(r"<class '([\w.]+)'>", r"\1", message)
    union = re.search(r"Does not validate against any of the Union subtypes(.*)Given value: (.*)$", message, re.S)
    if union:
        choices = ", ".join(re.findall(r"Literal\[([^\]]*)\]", union.group(1).split("Errors:")[0]))
        expected = f" (expected one of {choices})" if choices else ""
        message = f"{message[:union.start()]}invalid value {union.group(2).strip()}{expected}"
    return message


def run_stage_cli(model_class, datamodule_class, stage: str, argv: list[str],
                  required_artifacts: tuple[str, ...] = ("config.yaml", "checkpoints/last.ckpt", "metrics.jsonl"),
                  trainer_defaults: dict | None = None):
    """Run `lab <stage> <fit|validate|test|predict> ...` and return the LabCLI (its trainer, model, datamodule).
    `trainer_defaults`: the stage's own defaults for `--trainer.*` (a config or the command line overrides them).

    Every mistake in the arguments or config files is a `UserError`: config files are read first (a
    malformed one is named with its line; jsonargparse would say ``<unicode string>``), jsonargparse's
    errors (unknown key, wrong type, missing value) and Lightning's configuration errors become one line."""
    for config_file in config_files(argv):
        check_input_file(config_file, "--config")
        read_yaml_or_json(config_file)
    try:
        with warnings.catch_warnings():
            # `lab` hands the stage its own argv; Lightning would warn that sys.argv is also set.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            return LabCLI(
                model_class,
                datamodule_class,
                stage=stage,
                default_run_name=config_stem(argv) or "default",
                required_artifacts=required_artifacts,
                args=argv,
                save_config_callback=SaveConfigToRunDir,
                seed_everything_default=0,
                trainer_defaults=trainer_defaults,
                auto_configure_optimizers=False,
                parser_kwargs={"prog": f"lab {stage}", "default_env": False, "exit_on_error": False},
            )
    except ArgumentError as error:
        raise UserError(argument_message(error)) from error
    except MisconfigurationException as error:
        raise UserError(str(error)) from error
