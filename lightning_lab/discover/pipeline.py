"""The Discover→Distill experiment end to end, phase by phase, resumable.

    lab pipeline discover-distill --from-phase A --to-phase F --scale tiny --root runs/dd-tiny
    lab pipeline discover-distill --from-phase A --to-phase F --scale tiny --root runs/dd-tiny --resume   # after Ctrl+C
    lab pipeline discover-distill --scale paper --root runs/dd-paper          # a GPU: the seed's configuration

Phases (every step is a `lab` command run in this process, its output under ``--root``):

A  data: discovery tasks (``data/train_tasks.jsonl``, ``data/heldout_tasks.jsonl``), the synthetic corpus with
   the train tasks' own lines added (`discover.tasks.pretraining_text`: the model reads the task format, and the
   answers of the tasks phase D trains on, never the held-out ones), a tokenizer, ``data/train.bin``/``val.bin``.
B  pretrain the lab GPT (``pretrain/pretrain/``, the scale's pretrain config). With ``mhc_off_model_config``
   (``--scale paper``) also the mHC-off control (``pretrain/pretrain_plain/``: the same run with that model
   config) and both models' perplexity on the same validation windows (``pretrain/mhc_on_vs_off.json``,
   `lab eval retention` with the control as base): the registry makes no claim about mHC without them.
C  the held-out suite: best-of-N and TTT at seeds 0 and 1, the TTT ablations at seed 0 (no reuse, fixed beta,
   no KL; ``--include-expected-ablation``: the expected-reward objective), ``discover/heldout/compare.json``.
D  TTT on the train tasks, the SDFT data of its verified-exact answers (``sdft_data.jsonl``), then SDFT and the
   SFT baseline on it (``sdft/sdft/``, ``sdft/sft/``; replay and the retention gate on the packed files).
E  each consolidated model (adapter merged: ``models/<arm>/``) does best-of-N on the held-out tasks again
   (``discover/post/<arm>-bon-s0``), and retention against the pretrained model (``retention/<arm>.json``).
F  figures (``figs/*.png``) and the results registry (``results.md``, ``results.tex``): reports/registry.py.

A step is complete when its outputs exist (a run: its heartbeat says ``completed``); complete steps are skipped
with a line saying so, so ``--resume`` continues at the first unfinished step, and an unfinished run continues
where it stopped (a loop with ``--resume true``, a stage with ``--ckpt_path last``). A step that pauses (Ctrl+C)
stops the pipeline with exit status 3. The wall-clock of every phase is printed; ``pipeline.json`` keeps each
phase's total over all invocations (a skipped step adds ~0).
Scales are ``configs/pipeline/<scale>.yaml`` (the size of every step); ``--config FILE`` uses another file.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from lightning_lab.callbacks.status import run_status
from lightning_lab.data.io import read_yaml_or_json, write_json_atomic
from lightning_lab.errors import ArgumentParser, UserError
from lightning_lab.loops import EXIT_PAUSED

PHASES = "ABCDEF"
PROJECT = Path(__file__).resolve().parents[2]  # relative config paths in a pipeline config are the project's
CONFIG_DIR = PROJECT / "configs" / "pipeline"
ABLATIONS = {"noreuse": ["--reuse", "false"], "fixedbeta": ["--adaptive_beta", "false"], "nokl": ["--kl_coef", "0"]}
ARMS = ("sdft", "sft")  # the consolidation arms of phase D


@dataclass
class PipelineConfig:
    """The size of every step (configs/pipeline/<scale>.yaml); the stage configs hold the rest."""

    corpus_train_lines: int = 20000
    corpus_val_lines: int = 500
    vocab_size: int = 512
    train_per_cell: int = 4
    heldout_per_cell: int = 2
    pretrain_config: str = "configs/pretrain/tiny.yaml"
    pretrain_args: list[str] = field(default_factory=list)
    mhc_off_model_config: str | None = None  # phase B's mHC-off control arm (a model config); None: no control
    discover_config: str = "configs/discover/tiny.yaml"
    discover_args: list[str] = field(default_factory=list)
    bestofn_samples: int = 0
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    sdft_config: str = "configs/sdft/tiny.yaml"
    sdft_args: list[str] = field(default_factory=list)
    sdft_replay: bool = False  # phase D gives SDFT/SFT data/train.bin to replay (at the sdft config's replay_ratio)
    retention_seq_len: int = 64
    retention_max_batches: int = 8


def load_scale(path: Path) -> PipelineConfig:
    values = read_yaml_or_json(path)
    known = {f.name for f in fields(PipelineConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
    return PipelineConfig(**values)


def lab(argv: list[str]) -> int:
    """Run one `lab` command in this process; print it first (so a user can rerun it alone)."""
    from lightning_lab.cli import main

    print("  $ lab " + shlex.join(argv), flush=True)
    return main(argv)


class Paused(Exception):
    """A step stopped before finishing (Ctrl+C); the pipeline continues with --resume."""


@dataclass
class Pipeline:
    root: Path
    config: PipelineConfig
    include_expected_ablation: bool = False

    # ---- paths ------------------------------------------------------------------------------

    def data(self, name: str) -> Path:
        return self.root / "data" / name

    @property
    def checkpoint(self) -> Path:
        return self.root / "pretrain" / "pretrain" / "checkpoints" / "last.ckpt"

    # ---- step kinds: a file step, a loop run, a stage run --------------------------------------

    def files_step(self, outputs: list[Path], argv: list[str]) -> None:
        """A command whose outputs are files or directories: skipped when all exist; a partial set is removed."""
        if all(path.exists() for path in outputs):
            print(f"  complete, skipped: {', '.join(str(p.relative_to(self.root)) for p in outputs)}")
            return
        for path in outputs:  # a step killed midway: start it again
            if path.is_file():
                path.unlink()
        self.check(lab(argv), argv)

    def loop_step(self, run_dir: Path, argv: list[str]) -> None:
        """`lab discover run`: skipped when completed, continued with --resume true when started."""
        status = run_status(run_dir)
        if status == "completed":
            print(f"  complete, skipped: {run_dir.relative_to(self.root)}")
            return
        resume = ["--resume", "true"] if (run_dir / "config.yaml").is_file() else []
        argv = [*argv, "--output_dir", str(run_dir.parent), "--name", run_dir.name, "--progress", "false", *resume]
        self.check(lab(argv), argv)
        if run_status(run_dir) != "completed":
            raise Paused(str(run_dir))

    def stage_step(self, run_dir: Path, argv: list[str]) -> None:
        """A LightningCLI fit: skipped when completed, continued from checkpoints/last.ckpt when there is one."""
        status = run_status(run_dir)
        if status == "completed":
            print(f"  complete, skipped: {run_dir.relative_to(self.root)}")
            return
        resume = ["--ckpt_path", "last"] if (run_dir / "checkpoints" / "last.ckpt").is_file() else []
        argv = [*argv, "--run.root", str(self.root), "--run.name", run_dir.name, *resume]
        self.check(lab(argv), argv)
        if run_status(run_dir) != "completed":
            raise Paused(str(run_dir))

    @staticmethod
    def check(code: int, argv: list[str]) -> None:
        if code == EXIT_PAUSED:
            raise Paused(" ".join(argv[:2]))
        if code != 0:
            raise UserError(f"step `lab {shlex.join(argv)}` failed with exit status {code}")

    # ---- the phases -------------------------------------------------------------------------

    def phase_a(self) -> None:
        from lightning_lab.discover.tasks import pretraining_text, read_tasks

        c = self.config
        train_tasks, heldout_tasks = self.data("train_tasks.jsonl"), self.data("heldout_tasks.jsonl")
        self.files_step([train_tasks, heldout_tasks], [
            "data", "discovery-tasks", "--seed", "0", "--out-train", str(train_tasks), "--out-heldout",
            str(heldout_tasks), "--train-per-cell", str(c.train_per_cell), "--heldout-per-cell", str(c.heldout_per_cell)])
        corpus, val = self.data("corpus.txt"), self.data("val.txt")
        self.files_step([corpus, val], ["data", "corpus", "--seed", "0", "--train-lines", str(c.corpus_train_lines),
                                        "--val-lines", str(c.corpus_val_lines), "--train-out", str(corpus),
                                        "--val-out", str(val)])
        train = self.data("train.txt")
        if not train.exists():  # the corpus plus one line per train task, written whole (atomic rename)
            lines = [pretraining_text(task) + "\n" for task in read_tasks(train_tasks)]
            temporary = train.with_name(".train.txt.tmp")
            temporary.write_text(corpus.read_text(encoding="utf-8") + "".join(lines), encoding="utf-8")
            temporary.replace(train)
            print(f"  {train.relative_to(self.root)}: corpus + {len(lines)} train-task lines")
        tokenizer = self.data("tokenizer")
        self.files_step([tokenizer / "tokenizer_config.json"], [
            "data", "tokenizer", "--input", str(train), "--model-prefix", str(tokenizer),
            "--vocab-size", str(c.vocab_size)])
        for split, text in (("train", train), ("val", val)):
            self.files_step([self.data(f"{split}.bin"), self.data(f"{split}.bin.json")], [
                "data", "pack", "--tokenizer", str(tokenizer), "--input", str(text), "--output",
                str(self.data(f"{split}.bin"))])

    def phase_b(self) -> None:
        c, tokenizer = self.config, str(self.data("tokenizer"))
        argv = ["pretrain", "fit", "--config", c.pretrain_config, "--model.tokenizer", tokenizer, "--data.tokenizer",
                tokenizer, "--data.train_path", str(self.data("train.bin")), "--data.val_path",
                str(self.data("val.bin")), *c.pretrain_args]
        self.stage_step(self.root / "pretrain" / "pretrain", argv)
        if c.mhc_off_model_config is None:
            return
        plain = self.root / "pretrain" / "pretrain_plain"  # the control: the same run with mHC off
        self.stage_step(plain, [*argv, "--model.model_config", c.mhc_off_model_config])
        out = self.root / "pretrain" / "mhc_on_vs_off.json"
        self.files_step([out], ["eval", "retention", "--base", str(plain / "checkpoints" / "last.ckpt"), "--updated",
                                str(self.checkpoint), "--val_bin", str(self.data("val.bin")), "--seq_len",
                                str(c.retention_seq_len), "--max_batches", str(c.retention_max_batches), "--out",
                                str(out)])

    def discover(self, run_dir: Path, tasks: Path, mode: str, seed: int, model: Path, *extra: str) -> None:
        samples = ["--samples", str(self.config.bestofn_samples)] if mode == "bestofn" else []
        self.loop_step(run_dir, ["discover", "run", "--config", self.config.discover_config, "--tasks", str(tasks),
                                 "--model", str(model), "--mode", mode, "--seed", str(seed), *samples,
                                 *self.config.discover_args, *extra])

    def heldout_runs(self) -> list[tuple[Path, str, int, list[str]]]:
        """Phase C's runs: (directory, mode, seed, extra flags)."""
        directory = self.root / "discover" / "heldout"
        runs = [(directory / f"{mode}-s{seed}", mode, seed, []) for seed in self.config.seeds
                for mode in ("bestofn", "ttt")]
        ablations = {**ABLATIONS, **({"expected": ["--objective", "expected"]} if self.include_expected_ablation
                                     else {})}
        return runs + [(directory / f"ttt-{name}-s0", "ttt", 0, flags) for name, flags in ablations.items()]

    def phase_c(self) -> None:
        for run_dir, mode, seed, flags in self.heldout_runs():
            self.discover(run_dir, self.data("heldout_tasks.jsonl"), mode, seed, self.checkpoint, *flags)
        out = self.root / "discover" / "heldout" / "compare.json"
        runs = [str(run_dir) for run_dir, *_ in self.heldout_runs()]
        self.files_step([out], ["discover", "compare", "--runs", json.dumps(runs), "--out", str(out)])

    def phase_d(self) -> None:
        train_run = self.root / "discover" / "train" / "ttt-s0"
        self.discover(train_run, self.data("train_tasks.jsonl"), "ttt", 0, self.checkpoint)
        demos = self.root / "sdft_data.jsonl"
        self.files_step([demos], ["discover", "build-sdft", "--suite_root", str(train_run), "--tasks",
                                  str(self.data("train_tasks.jsonl")), "--out", str(demos)])
        replay = ["--model.replay_bin", str(self.data("train.bin"))] if self.config.sdft_replay else []
        for arm in ARMS:
            self.stage_step(self.root / "sdft" / arm, [
                "sdft", "fit", "--config", self.config.sdft_config, "--model.model", str(self.checkpoint),
                "--data.path", str(demos), "--model.objective", arm, "--model.gate_bin", str(self.data("val.bin")),
                "--data.val_split", "null",  # every demonstration trains; phase E evaluates on the held-out tasks
                *replay, *self.config.sdft_args])

    def phase_e(self) -> None:
        for arm in ARMS:
            adapter = self.root / "sdft" / arm / "adapters" / "final"
            merged = self.root / "models" / arm
            self.files_step([merged / "config.json"], ["adapter", "merge", "--adapter", str(adapter), "--out",
                                                       str(merged)])
            self.discover(self.root / "discover" / "post" / f"{arm}-bestofn-s0", self.data("heldout_tasks.jsonl"),
                          "bestofn", 0, merged)
            out = self.root / "retention" / f"{arm}.json"
            self.files_step([out], ["eval", "retention", "--base", str(self.checkpoint), "--updated", str(adapter),
                                    "--val_bin", str(self.data("val.bin")), "--seq_len",
                                    str(self.config.retention_seq_len), "--max_batches",
                                    str(self.config.retention_max_batches), "--out", str(out)])

    def phase_f(self) -> None:
        from lightning_lab.reports.registry import write_registry

        for path in write_registry(self.root):
            print(f"  wrote {path.relative_to(self.root)}")

    def run(self, first: str, last: str) -> int:
        record_path = self.root / "pipeline.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else {"phases": {}}
        for phase in PHASES[PHASES.index(first):PHASES.index(last) + 1]:
            print(f"phase {phase}", flush=True)
            started = time.perf_counter()
            try:
                getattr(self, f"phase_{phase.lower()}")()
            except Paused as paused:
                print(f"phase {phase}: paused in {paused}; continue with --resume")
                return EXIT_PAUSED
            seconds = time.perf_counter() - started
            spent = record["phases"].get(phase, {}).get("seconds", 0.0)  # a resumed phase adds to its earlier time
            record["phases"][phase] = {"seconds": round(spent + seconds, 1), "finished": time.time()}
            write_json_atomic(record_path, record)
            print(f"phase {phase}: done in {seconds:.1f} s", flush=True)
        return 0


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="lab pipeline", description="end-to-end experiment pipelines")
    commands = parser.add_subparsers(dest="command", required=True)
    dd = commands.add_parser("discover-distill", help="phases A..F of Discover→Distill (discover/pipeline.py)")
    dd.add_argument("--from-phase", choices=list(PHASES), default="A")
    dd.add_argument("--to-phase", choices=list(PHASES), default="F")
    dd.add_argument("--scale", default="tiny", help="configs/pipeline/<scale>.yaml (tiny | paper)")
    dd.add_argument("--config", default=None, help="a pipeline config file instead of the scale's")
    dd.add_argument("--root", default="runs/discover-distill", help="every output goes under this directory")
    dd.add_argument("--resume", action="store_true", help="continue a root that already holds a pipeline")
    dd.add_argument("--include-expected-ablation", action="store_true",
                    help="phase C also runs TTT with the expected-reward objective")
    args = parser.parse_args(argv)
    if PHASES.index(args.from_phase) > PHASES.index(args.to_phase):
        raise UserError(f"--from-phase {args.from_phase} comes after --to-phase {args.to_phase}")
    path = Path(args.config) if args.config else CONFIG_DIR / f"{args.scale}.yaml"
    if not path.is_file():
        raise UserError(f"--scale {args.scale}: no pipeline config {path} (scales: "
                        f"{', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.yaml')))})")
    root = Path(args.root)
    if (root / "pipeline.json").is_file() and not args.resume:
        raise UserError(f"--root {root} already holds a pipeline run; continue it with --resume or choose another root")
    root.mkdir(parents=True, exist_ok=True)
    return Pipeline(root, load_scale(path), args.include_expected_ablation).run(args.from_phase, args.to_phase)
