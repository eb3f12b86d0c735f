"""What every trainable stage shares: the run directory, the callbacks, and the LightningCLI.

`lab <stage> fit --config configs/<stage>/<name>.yaml` puts everything for one run under
``runs/<stage>/<name>/``:

    config.yaml            the resolved config (rewritten on every invocation)
    checkpoints/           last.ckpt and step=NNNNNNN.ckpt (a fixed folder, so `--ckpt_path last` finds it)
    metrics.jsonl          every logged metric, one JSON line per log step / validation
    metrics.csv            the same through Lightning's CSV logger (or TensorBoard / W&B when chosen)
    _run_tracker/          heartbeat.json, events.jsonl, artifacts.json (read by `lab status`)

`--run.name` defaults to the config file's stem; `--run.root` to ``runs``.

Also here, shared by the SFT and RL stages (and every stage that trains a LoRA adapter on `Sample`s):
`SampleDataModule` / `SampleBatches` (batches of samples, sharded across DDP ranks, with exact resume) and
`LoraModule` (loading, small checkpoints, the optimizer and schedule, the adapter written at the end,
``predict``).
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
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
from lightning_lab.data.benchmarks import Sample, load_benchmark
from lightning_lab.data.io import DataError, JsonlWriter, read_jsonl
from lightning_lab.errors import (UserError, check_config_files, check_input_file, check_writable_dir, config_files,
                                  jsonargparse_message)
from lightning_lab.loops import engine_info
from lightning_lab.models.loading import LoadedModel, check_model_spec, load_causal_lm, load_checkpoint
from lightning_lab.models.lora import LoraSettings, add_lora, save_adapter
from lightning_lab.sampling.sampler import Sampler

log = logging.getLogger(__name__)


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
    so dropout, sampling and shuffling continue as in an uninterrupted run.

    Under DDP each rank draws its own random numbers (dropout over its own batch), so every rank's states are
    gathered into the checkpoint (``rng_states_per_rank``; every rank takes part in a save) and each rank gets
    its own back. ``rng_states`` (rank 0's) is what a single process saves and restores."""

    def __init__(self) -> None:
        self.states_to_restore: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        states = rng_states()
        checkpoint["rng_states"] = states
        if trainer.world_size > 1:
            every_rank = [None] * trainer.world_size
            torch.distributed.all_gather_object(every_rank, states)
            checkpoint["rng_states_per_rank"] = every_rank

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        per_rank = checkpoint.get("rng_states_per_rank")
        if per_rank is not None and len(per_rank) == trainer.world_size:
            self.states_to_restore = per_rank[trainer.global_rank]
        else:
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
        the device, the run directory, the checkpoint and the model spec (``model.model`` of the stages that
        load one) are checked before it, and before anything is built or written."""
        config = self.config[self.config.subcommand]
        check_accelerator(config.trainer.accelerator)
        check_writable_dir(self.run_dir(), "--run.root/--run.name")
        self.resolve_ckpt_path()
        model_spec = config.model.get("model") if hasattr(config.model, "get") else None
        if isinstance(model_spec, str):
            check_model_spec(model_spec)
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


def config_stem(argv: list[str]) -> str | None:
    """The stem of the first `--config FILE`: the default run name."""
    files = config_files(argv)
    return Path(files[0]).stem if files else None


def run_stage_cli(model_class, datamodule_class, stage: str, argv: list[str],
                  required_artifacts: tuple[str, ...] = ("config.yaml", "checkpoints/last.ckpt", "metrics.jsonl"),
                  trainer_defaults: dict | None = None):
    """Run `lab <stage> <fit|validate|test|predict> ...` and return the LabCLI (its trainer, model, datamodule).
    `trainer_defaults`: the stage's own defaults for `--trainer.*` (a config or the command line overrides them).

    Every mistake in the arguments or config files is a `UserError`: config files are read first (a
    malformed one is named with its line; jsonargparse would say ``<unicode string>``), jsonargparse's
    errors (unknown key, wrong type, missing value) and Lightning's configuration errors become one line."""
    check_config_files(argv)
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
        raise UserError(jsonargparse_message(error, argv)) from error
    except MisconfigurationException as error:
        raise UserError(str(error)) from error


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, min_lr_ratio: float):
    """transformers' linear warm-up (from 0) then cosine to ``min_lr_ratio`` x the peak at `max_steps`, stepped
    every optimizer step; its state (the step) is in every checkpoint, so a resumed run continues the curve."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup_steps, max_steps, min_lr_rate=min_lr_ratio)


# ---- batches of samples, sharded across DDP ranks ----------------------------------------------------
# torchdata's StatefulDataLoader would save a DataLoader's position, but torchdata is not a dependency of the
# lab; these batches are plain lists of `Sample`s (the module tokenizes), so a small stateful iterable does it.


class SampleBatches:
    """Lists of `Sample`s in an order fixed by (seed, epoch), sharded across DDP ranks; resumable mid-epoch.

    Every rank draws the same permutation of the samples for an epoch and cuts it into global batches of
    ``world_size * batch_size``; rank r trains on samples r, r + world_size, ... of each global batch, so the
    ranks see disjoint samples and together what one process with a world_size times larger batch would.
    One process keeps a last, shorter batch; several keep only full global batches (every rank must take
    the same number of steps of the same size), so up to ``world_size * batch_size - 1`` samples of an
    epoch are left out there.

    Lightning saves ``state_dict()`` (epoch, batches already given) in the checkpoint and calls
    ``load_state_dict()`` on resume, so a resumed run continues with the batch an uninterrupted
    run would have seen next (a plain DataLoader would restart the epoch). It has a length, so
    Lightning does not prefetch and the position counts exactly the batches trained on.
    """

    def __init__(self, samples: list[Sample], batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.samples = samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0  # batches of this epoch already given

    def __len__(self) -> int:
        if self.world_size == 1:
            return math.ceil(len(self.samples) / self.batch_size)
        return len(self.samples) // (self.batch_size * self.world_size)

    def __iter__(self):
        if self.position >= len(self):  # the previous epoch was used up: start the next one
            self.epoch += 1
            self.position = 0
        order = list(range(len(self.samples)))
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        size = self.batch_size * self.world_size
        while self.position < len(self):
            start = self.position * size
            self.position += 1
            yield [self.samples[i] for i in order[start:start + size][self.rank::self.world_size]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        saved_world = state.get("world_size", 1)
        if saved_world != self.world_size:
            raise UserError(f"--trainer.devices: the checkpoint was trained on {saved_world} processes, this run has "
                            f"{self.world_size}; its batch order cannot continue (resume with {saved_world})")
        self.epoch, self.position = state["epoch"], state["position"]


class SampleDataModule(L.LightningDataModule):
    """Batches of `Sample`s from one source; the LightningModule tokenizes (it owns the tokenizer).

    Args:
        path: anything `load_benchmark` accepts: a .jsonl / .tsv path, ``gsm8k``, ``humaneval``.
        train_split: the split to train on, minus every sample of `val_split` (see training/sft.py).
            For a local file ``all`` (= the file minus its dev half); for ``gsm8k`` ``train``.
        val_split: the held-out split validated on (``dev``); None: no validation, nothing held out.
        train_limit: train on only the first this many training samples (file order).
        val_limit: validate on this many samples of `val_split`, chosen by `seed` (load_benchmark's limit).
        predict_split: the split `lab <stage> predict` decodes (``dev``; ``all`` for every line of a file).
        predict_limit: decode only this many samples of `predict_split`, chosen by `seed`.
        batch_size: samples (prompts) per training batch, per process.
        val_batch_size: samples per validation / predict batch (default: batch_size).
        seed: the shuffle order of each epoch and the choice of the `val_limit` samples.

    Under DDP (``--trainer.devices N``) each rank trains on its share of every global batch (`SampleBatches`)
    and validates on every N-th validation sample; the stages' validation metrics are torchmetrics, which
    add up the ranks' shares.
    """

    def __init__(self, path: str, train_split: str = "all", val_split: str | None = "dev",
                 train_limit: int | None = None, val_limit: int | None = 200, predict_split: str = "dev",
                 predict_limit: int | None = None, batch_size: int = 8, val_batch_size: int | None = None,
                 seed: int = 0):
        super().__init__()
        self.path = path
        self.train_split = train_split
        self.val_split = val_split
        self.train_limit = train_limit
        self.val_limit = val_limit
        self.predict_split = predict_split
        self.predict_limit = predict_limit
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.seed = seed
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.predict_samples: list[Sample] = []

    @property
    def rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def setup(self, stage: str) -> None:
        rank, world = self.rank_and_world
        if stage == "predict":
            self.predict_samples = load_benchmark(self.path, split=self.predict_split, limit=self.predict_limit,
                                                  seed=self.seed)
            return
        if self.val_split is not None:
            self.val_samples = load_benchmark(self.path, split=self.val_split, limit=self.val_limit, seed=self.seed)
            if len(self.val_samples) < world:
                raise DataError(f"{self.path}: {len(self.val_samples)} validation samples for {world} processes; "
                                f"every rank needs one (raise data.val_limit or lower --trainer.devices)")
        if stage != "fit":
            return
        held_out = {s.id for s in load_benchmark(self.path, split=self.val_split)} if self.val_split else set()
        candidates = load_benchmark(self.path, split=self.train_split)
        self.train_samples = [sample for sample in candidates if sample.id not in held_out]
        if self.train_limit is not None:
            self.train_samples = self.train_samples[: self.train_limit]
        if not self.train_samples:
            raise DataError(f"{self.path}: no training samples left in split {self.train_split!r} "
                            f"after holding out split {self.val_split!r}")
        if world > 1 and len(self.train_samples) < self.batch_size * world:
            raise DataError(f"{self.path}: {len(self.train_samples)} training samples, fewer than one global batch "
                            f"of data.batch_size={self.batch_size} x {world} processes")
        log.info("%s: %d training samples (split %r minus %d held out in %r), %d validation samples", self.path,
                 len(self.train_samples), self.train_split, len(held_out), self.val_split, len(self.val_samples))

    def train_dataloader(self) -> SampleBatches:
        rank, world = self.rank_and_world
        return SampleBatches(self.train_samples, self.batch_size, shuffle=True, seed=self.seed, rank=rank,
                             world_size=world)

    def val_dataloader(self) -> SampleBatches | list:
        if not self.val_samples:
            return []
        rank, world = self.rank_and_world
        return SampleBatches(self.val_samples[rank::world], self.val_batch_size, shuffle=False)

    def predict_dataloader(self) -> SampleBatches:
        return SampleBatches(self.predict_samples, self.val_batch_size, shuffle=False)


# ---- the LoRA module shared by SFT and RL --------------------------------------------------------------


@dataclass
class PredictSettings:
    """How `lab sft|rl predict` decodes the prompts of ``data.predict_split`` (through the lab `Sampler`).

    Args:
        n: completions per prompt.
        max_new_tokens: longest completion.
        greedy: argmax decoding (default); False samples at `temperature` / `top_p`.
        temperature: sampling temperature (greedy=False).
        top_p: nucleus sampling (greedy=False; 1.0 = off).
        seed: the sampling seed.
        output: the JSONL file, inside the run directory; an existing file is never overwritten.
    """

    n: int = 1
    max_new_tokens: int = 256
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    output: str = "predictions.jsonl"


def predictions_path(trainer, settings: PredictSettings) -> Path:
    """``<run>/<settings.output>``, checked in a stage's ``setup("predict")``, before the model loads: predict
    runs in one process and never overwrites a file."""
    path = Path(trainer.default_root_dir) / settings.output
    if trainer.world_size > 1:
        raise UserError(f"--trainer.devices: predict writes one JSONL file from one process, not "
                        f"{trainer.world_size}; run it with --trainer.devices 1")
    if path.exists():
        raise UserError(f"{path} exists and is never overwritten; pass another --model.predict.output or --run.name")
    return path


def completion_records(result) -> list[dict]:
    """The completions of one sampler `PromptResult` as they go into a predictions file."""
    return [{"text": c.text, "finish_reason": c.finish_reason, "num_tokens": len(c.token_ids)}
            for c in result.completions]


class LoraModule(L.LightningModule):
    """A causal LM with a LoRA adapter whose checkpoints hold only the adapter (see training/sft.py).

    Subclasses (`SFTModule`, `RLModule`) add the training and validation steps; this class owns loading,
    the optimizer and schedule, the small checkpoints, exact resume, saving the adapter at the end of fit,
    and ``predict``: the generations of the model (a checkpoint via ``--ckpt_path``, or an adapter
    directory via ``--model.adapter``) on the prompts of ``data.predict_split``, written to
    ``<run>/<predict.output>``: a first line ``{"header": {...}}`` (model, adapter, checkpoint, decoding
    settings, the sampler's engine), then one line per prompt ``{"id", "prompt", "reference", "completions": [{"text",
    "finish_reason", "num_tokens"}]}`` (`predict_record`; RL adds each completion's reward).
    """

    def __init__(self, model: str, lora: LoraSettings, learning_rate: float, weight_decay: float,
                 warmup_steps: int, min_lr_ratio: float, dtype: str, adapter_name: str,
                 adapter: str | None = None, predict: PredictSettings = PredictSettings()):
        super().__init__()
        self.lora = lora
        self.predict_settings = predict
        # plain types only in the hyper-parameters: checkpoints load with torch's weights_only. The predict
        # settings stay out: LightningCLI lets a --ckpt_path's hyper-parameters override the command line.
        self.save_hyperparameters(ignore=["lora", "predict"])
        self.hparams["lora"] = asdict(self.lora)
        if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"model.adapter={adapter}: not a peft adapter directory (no adapter_config.json)")
        self.model: torch.nn.Module | None = None
        self.tokenizer = None
        self.strict_loading = False  # only LoRA weights are saved; on_load_checkpoint checks them
        self.predictions: JsonlWriter | None = None
        self.predict_sampler: Sampler | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        loaded = load_causal_lm(self.hparams.model, device="cpu", dtype=self.hparams.dtype)  # Lightning moves it
        self.tokenizer = loaded.tokenizer
        if self.hparams.adapter is None:
            self.model = add_lora(loaded.model, self.lora)
        else:  # a saved adapter (its own rank and targets) to train further or to predict with
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(loaded.model, self.hparams.adapter, is_trainable=True)
        self.model.train()  # load_causal_lm returns eval mode; Lightning keeps whatever mode it finds

    def trainable_names(self) -> set[str]:
        return {name for name, parameter in self.named_parameters() if parameter.requires_grad}

    def sampler(self) -> Sampler:
        """The lab sampler over the current policy (adapter on), decoding through the peft model."""
        return Sampler(LoadedModel(self.model, self.tokenizer, self.hparams.model, self.device,
                                   next(self.model.parameters()).dtype))

    # ---- optimisation --------------------------------------------------------------------

    def configure_optimizers(self):
        parameters = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        max_steps = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        schedule = cosine_schedule(optimizer, self.hparams.warmup_steps, int(max_steps), self.hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- small checkpoints, exact resume -------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved_model = checkpoint.get("hyper_parameters", {}).get("model")
        if saved_model is not None and saved_model != self.hparams.model:
            raise UserError(f"checkpoint was trained on model.model={saved_model!r}, this run has "
                            f"{self.hparams.model!r}; resume with the same base model")
        self.configure_model()  # also reached from load_from_checkpoint, which does not call configure_model
        saved, expected = set(checkpoint["state_dict"]), self.trainable_names()
        if saved != expected:
            example = sorted(saved ^ expected)[:3]
            raise UserError(f"checkpoint LoRA weights do not match this model's ({len(saved)} saved, "
                            f"{len(expected)} expected; e.g. {example}): same model.model and model.lora?")

    def adapter_dir(self) -> Path:
        return Path(self.trainer.default_root_dir) / "adapters" / self.hparams.adapter_name

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            path = save_adapter(self.model, self.tokenizer, self.adapter_dir(), base_spec=self.hparams.model)
            log.info("adapter saved to %s", path)

    # ---- predict: generations as JSONL ---------------------------------------------------

    def setup(self, stage: str) -> None:
        if stage == "predict":
            predictions_path(self.trainer, self.predict_settings)

    def on_predict_start(self) -> None:
        self.predict_sampler = self.sampler()  # the weights do not change while predicting
        self.predictions = JsonlWriter(predictions_path(self.trainer, self.predict_settings))
        self.predictions.write({"header": {
            "stage": type(self).__name__, "model": self.hparams.model, "adapter": self.hparams.adapter,
            "ckpt_path": self.trainer.ckpt_path, "predict": asdict(self.predict_settings),
            "engine": engine_info(self.predict_sampler), "time": time.time()}})

    def predict_step(self, samples: list[Sample], batch_idx: int) -> None:
        settings = self.predict_settings
        generation = self.predict_sampler.generate(
            [sample.prompt for sample in samples], n=settings.n, max_new_tokens=settings.max_new_tokens,
            greedy=settings.greedy, temperature=settings.temperature, top_p=settings.top_p,
            seed=settings.seed + batch_idx, batch_size=len(samples))
        for sample, result in zip(samples, generation.prompts):
            self.predictions.write(self.predict_record(sample, result))

    def predict_record(self, sample: Sample, result) -> dict:
        """One prompt's line of the predictions file (a `PromptResult` of the sampler)."""
        return {"id": sample.id, "prompt": sample.prompt, "reference": sample.reference,
                "completions": completion_records(result)}

    def on_predict_end(self) -> None:
        if self.predictions is not None:
            self.predictions.close()
            log.info("predictions written to %s", self.predictions.path)
            self.predictions = None
