"""The loop convention: how every `lab <method>` loop command parses its arguments and writes its run.

A loop (`lab bon collect`, and next `lab rauq`, `lab ace`, `lab discover`, `lab quietstar`) is a
jsonargparse CLI over a config dataclass:

    lab bon collect --config configs/bon/collector_base.json --limit 4 --name try1 --device cpu
    lab bon collect --config configs/bon/collector_base.json --print_config     # the resolved config
    lab bon collect --help                                                      # every field, documented

``--config FILE`` (YAML, or JSON: JSON is YAML) plus ``--key value`` overrides, later ones winning;
an unknown key, a wrong type or a value out of range is a `UserError` naming it (``lab`` prints one
line and exits 2) before any model loads. Every field's docstring is its ``--help`` text.

A loop that loads a model extends `LoopConfig` (``--output_dir``, ``--name``, ``--resume``,
``--device``, ``--dtype``, ``--progress``) and writes ``<output_dir>/<name>/`` (``output_dir``
defaults to ``runs/<method>``):

    config.yaml       the resolved config (a later ``--resume true`` must not change it)
    results.jsonl     a header line, then one line per finished item (flushed and fsynced as written)
    _run_tracker/     heartbeat.json, events.jsonl, artifacts.json: `lab status` and `lab artifacts`
                      show loops and stages alike (callbacks/tracker.py)

The name defaults to the start time and is claimed atomically (two runs started in the same second
get two directories); the results file is created with ``open(path, "x")`` and locked (``flock``)
while the loop writes it, so a second writer, even one given the same ``--name``, is refused with a
message naming the holder. ``--config <run>/config.yaml --resume true`` continues a run, skipping
the ids already written. A run that fails before writing a single result leaves nothing behind.

Exit status: 0 finished, 2 user error, `EXIT_PAUSED` (3) paused by Ctrl+C/SIGTERM (resume it), 1 a bug.

A loop, top to bottom::

    @dataclass
    class EchoConfig(LoopConfig):
        output_dir: str = "runs/echo"
        \"\"\"runs go to <output_dir>/<name>/\"\"\"
        prompts_file: str = "data/prompts/arithmetic.jsonl"
        \"\"\"a JSONL/TSV file of prompts\"\"\"
        temperature: float = 0.8
        \"\"\"sampling temperature; 0 decodes greedily\"\"\"

        def __post_init__(self):
            super().__post_init__()
            check_sampling(self.temperature, top_p=1.0)

    def run(config: EchoConfig) -> int:
        with LoopRun(config, method="echo") as run:          # claims, locks, writes config.yaml
            samples = load_benchmark(config.prompts_file)     # inputs checked before the model loads
            sampler = Sampler(load_causal_lm("smollm2-135m", device=config.device, dtype=config.dtype))
            run.start(total=len(samples), header={"engine": engine_info(sampler)})
            with PauseFlag() as pause:
                for sample in samples:
                    if sample.id in run.done:
                        continue
                    if pause.requested:
                        return run.pause()
                    run.write({"id": sample.id, "text": sampler.generate([sample.prompt]).completions[0][0].text})
        return run.exit_status

    def main(argv: list[str]) -> int:
        command, config = parse_loop("lab echo", {"run": (EchoConfig, "echo the prompts")}, argv)
        return run(config)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import itertools
import math
import platform
import shutil
import socket
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from lightning_lab.data.io import JsonlWriter, read_yaml_or_json
from lightning_lab.errors import UserError, check_config_files, jsonargparse_message

EXIT_FINISHED = 0
EXIT_PAUSED = 3  # differs from 0 (finished), 1 (a bug) and 2 (a user error): a script can tell a pause apart
RESULTS_FILE = "results.jsonl"
# Fields that say how to run, not what to compute: a resumed run may change them.
RUN_CONTROL_KEYS = ("output_dir", "name", "resume", "device", "dtype", "progress")


@dataclass
class LoopConfig:
    """The fields every model-loading loop has; a method's config extends it."""

    output_dir: str = "runs/loop"
    """runs go to <output_dir>/<name>/ (a method sets its own default, runs/<method>)"""
    name: str | None = None
    """run name (default: the start time, e.g. 20261204-161503, claimed atomically)"""
    resume: bool = False
    """continue the run <output_dir>/<name>/, skipping finished ids (pass --config <run>/config.yaml)"""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps"""
    dtype: str = "auto"
    """auto | fp32 | bf16 | fp16 (auto: bf16 where it is measured fast, else fp32)"""
    progress: bool = True
    """show a progress bar"""

    def __post_init__(self) -> None:
        check_device(self.device, self.dtype)
        if self.name is not None and (not self.name.strip() or Path(self.name).name != self.name):
            raise UserError(f"name: a run name is one path component (no '/'); got {self.name!r}")


# ---- checks: every value by type and range, before any model loads ---------------------------------


def check_count(key: str, value: Any, minimum: int = 1) -> None:
    """`value` must be an int >= `minimum` (a bool is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{key}: must be an integer >= {minimum}; got {value!r}")


def check_number(key: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> None:
    """`value` must be a finite number in [low, high] (or (low, high] with `low_open`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value > high or (value <= low if low_open else value < low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise UserError(f"{key}: must be a finite number in {interval}; got {value!r}")


def check_sampling(temperature: Any, top_p: Any, prefix: str = "") -> None:
    """Temperature finite and >= 0 (0 = greedy), top_p in (0, 1]: what the sampler accepts."""
    check_number(f"{prefix}temperature", temperature, 0.0)
    check_number(f"{prefix}top_p", top_p, 0.0, 1.0, low_open=True)


def check_choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise UserError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")


def check_device(device: str, dtype: str) -> None:
    """A device this machine has and a dtype the loader knows, so a typo costs no model load."""
    import torch

    from lightning_lab.models.loading import DTYPES

    check_choice("dtype", dtype, ["auto", *DTYPES])
    kind, _, index = str(device).partition(":")
    check_choice("device", kind, ["auto", "cpu", "cuda", "mps"])
    available = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + \
        (["mps"] if torch.backends.mps.is_available() else [])
    if kind not in ("auto", *available):
        raise UserError(f"device: {device!r} is not available on this machine (available: auto, "
                        f"{', '.join(available)})")
    if index and (kind != "cuda" or not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise UserError(f"device: {device!r}: no such device")


# ---- parsing ----------------------------------------------------------------------------------------


def parse_loop(prog: str, commands: dict[str, tuple[type, str]], argv: list[str]) -> tuple[str, Any]:
    """Parse ``<command> [--config FILE] [--key value ...]`` into (command, its config dataclass).

    `commands` maps each subcommand to (its config dataclass, one-line help). Errors of any kind
    (unknown key, wrong type, unreadable config, a check in the dataclass's ``__post_init__``) are
    raised as one-line `UserError`s; ``--help`` and ``--print_config`` print and exit 0.
    """
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings become --help text
    parser = ArgumentParser(prog=prog, exit_on_error=False, default_env=False)
    subcommands = parser.add_subcommands(required=True, dest="command")
    for command, (config_class, help_text) in commands.items():
        sub = ArgumentParser(prog=f"{prog} {command}", description=help_text, exit_on_error=False,
                             default_env=False)
        sub.add_argument("--config", action=ActionConfigFile, help="a YAML or JSON file of the keys below")
        sub.add_class_arguments(config_class, as_group=False)
        subcommands.add_subcommand(command, sub, help=help_text)
    check_config_files(argv)  # a config file's own errors name the file and line (jsonargparse's do not)
    try:
        namespace = parser.parse_args(argv)
    except argparse.ArgumentError as error:
        raise UserError(jsonargparse_message(error, argv)) from None
    command = namespace.command
    config_class = commands[command][0]
    values = namespace[command]
    return command, config_class(**{field.name: values[field.name] for field in dataclasses.fields(config_class)})


# ---- the run directory ------------------------------------------------------------------------------


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("lightning_lab", "torch", "transformers", "peft", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def engine_info(sampler) -> dict:
    """What decoded, for a run header: `Sampler.engine_info` (decoder or transformers, CPU kernels, packed
    weights, dtype, device, threads, adapter). A generator that is not a `Sampler` (a scripted or remote
    one) has no engine to report: its header records the torch threads alone."""
    import torch

    return {"threads": torch.get_num_threads(), **(sampler.engine_info() if hasattr(sampler, "engine_info") else {})}


class LoopRun:
    """One run directory of a loop, ``<output_dir>/<name>/``: claimed, locked, tracked, cleaned on failure.

    ``with LoopRun(config, method) as run:`` claims the directory and the results file, locks it,
    and writes (or, on resume, checks) config.yaml; nothing is loaded yet, so a refused run costs
    nothing. Then ``run.start(total, header)`` writes the header line (new runs) and starts the
    tracker; ``run.write(record)`` appends one result; ``run.done`` holds the finished ids;
    ``return run.pause()`` stops as paused. Leaving the block finishes the tracker (completed,
    paused or failed); a new run that failed before its first result is removed entirely.
    """

    def __init__(self, config: LoopConfig, method: str, results_file: str = RESULTS_FILE,
                 control_keys: tuple[str, ...] = RUN_CONTROL_KEYS, required_artifacts: tuple[str, ...] = ()):
        self.config = config
        self.method = method
        self.results_file = results_file
        self.control_keys = control_keys
        self.required_artifacts = ("config.yaml", results_file, *required_artifacts)
        self.directory: Path | None = None
        self.writer: JsonlWriter | None = None
        self.tracker = None
        self.status = "running"
        self._created: list[Path] = []  # what this run made, removed if it fails before its first result

    @property
    def results_path(self) -> Path:
        return self.directory / self.results_file

    @property
    def done(self) -> set[str]:
        return self.writer.done_ids()

    @property
    def exit_status(self) -> int:
        return EXIT_PAUSED if self.status == "paused" else EXIT_FINISHED

    def resume_command(self, prog: str) -> str:
        return f"{prog} --config {self.directory / 'config.yaml'} --resume true"

    # ---- claim --------------------------------------------------------------------------------------

    def __enter__(self) -> LoopRun:
        try:
            self._claim()
        except BaseException:
            self._remove_created()
            raise
        return self

    def _claim(self) -> None:
        config, root = self.config, Path(self.config.output_dir)
        if root.exists() and not root.is_dir():
            raise UserError(f"output_dir: {root} is a file, not a directory")
        if config.name is None:
            if config.resume:
                raise UserError("resume: needs the run to continue: --config <run>/config.yaml --resume true "
                                "(or --name NAME --resume true)")
            self.directory = self._claim_new_name(root)
        else:
            self.directory = root / config.name
            if not self.directory.exists():
                try:
                    self.directory.mkdir(parents=True)
                except OSError as error:
                    raise UserError(f"output_dir: cannot create {self.directory}: {error.strerror}") from None
                self._created.append(self.directory)
        try:
            open(self.results_path, "x").close()  # atomic: of two starts, exactly one creates it
            self._created.append(self.results_path)
        except FileExistsError:
            if not config.resume:
                raise UserError(f"{self.directory}: the run exists; continue it with --config "
                                f"{self.directory / 'config.yaml'} --resume true, or choose another --name") from None
        except OSError as error:
            raise UserError(f"output_dir: cannot write {self.results_path}: {error.strerror}") from None
        self.writer = JsonlWriter(self.results_path, exclusive=True)  # refused while another process writes it
        if self.results_path in self._created:
            self._created.append(self.writer.lock_path)
        self.config = dataclasses.replace(self.config, name=self.directory.name)
        self._write_or_check_config()

    def _claim_new_name(self, root: Path) -> Path:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        for suffix in itertools.count():
            directory = root / (stamp if suffix == 0 else f"{stamp}-{suffix}")
            try:
                directory.mkdir(parents=True)  # atomic: a directory another run made is never shared
            except FileExistsError:
                continue
            except OSError as error:
                raise UserError(f"output_dir: cannot create {directory}: {error.strerror}") from None
            self._created.append(directory)
            return directory

    def _write_or_check_config(self) -> None:
        values = asdict(self.config)
        path = self.directory / "config.yaml"
        if path.exists():
            saved = read_yaml_or_json(path)
            changed = sorted(key for key, value in values.items()
                             if key not in self.control_keys and saved.get(key, value) != value)
            if changed:
                raise UserError(f"{self.directory}: the run was started with different {', '.join(changed)}; "
                                f"resume it with its own config (--config {path} --resume true) or start a new run")
            return
        path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
        self._created.append(path)

    # ---- run ------------------------------------------------------------------------------------

    def start(self, total: int, header: dict | None = None) -> None:
        """Write the header line (a new run: method, config, versions, host, time + `header`); start the tracker."""
        from lightning_lab.callbacks.tracker import RunTracker

        if self.results_path.stat().st_size == 0:
            self.writer.write({"kind": "header", "method": self.method, "config": asdict(self.config),
                               "versions": package_versions(), "host": socket.gethostname(),
                               "created": datetime.now().isoformat(), **(header or {})})
        self.tracker = RunTracker(self.directory, stage=self.method, total=total, name=self.directory.name,
                                  required_artifacts=self.required_artifacts)
        self.tracker.start(total=total, step=len(self.done))
        self._created.append(self.tracker.tracker_dir)

    def write(self, record: dict) -> None:
        """Append one result line (on disk when this returns) and count it in the heartbeat."""
        self.writer.write(record)
        if self.tracker is not None:
            self.tracker.update(len(self.done))

    def pause(self) -> int:
        """Stop as paused (return it from the loop); the run resumes with `resume_command`."""
        self.status = "paused"
        return EXIT_PAUSED

    def __exit__(self, exc_type, exception, traceback) -> bool:
        if exception is not None:
            self.status = "paused" if isinstance(exception, KeyboardInterrupt) else "failed"
        elif self.status == "running":
            self.status = "completed"
        if self.tracker is not None:
            error = {"error": f"{type(exception).__name__}: {exception}"} if exception is not None else {}
            self.tracker.finish(self.status, results=len(self.done), **error)
        no_result = self.writer is None or not self.done
        if self.writer is not None:
            self.writer.close()
        if exception is not None and no_result:
            self._remove_created()  # nothing partial: a rerun starts as if this one never was
        return False

    def _remove_created(self) -> None:
        for path in reversed(self._created):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)  # made by this run, so all of it is this run's
            else:
                path.unlink(missing_ok=True)
        self._created.clear()
