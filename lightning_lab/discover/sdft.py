"""Self-distillation (SDFT): consolidate what test-time training found into the weights.

    lab discover build-sdft --suite_root runs/discover/ttt-train-s0 --tasks data/discover/train.jsonl \\
        --out data/discover/sdft.jsonl --min_reward 0.99

`build-sdft` reads the finished tasks of one discovery run (``<suite_root>/summary.jsonl`` and
``tasks/<id>/result.json``) or of every run directly under ``suite_root``, and keeps each task's best answer
only when it is verified exact: the run marked it exact and the task's verifier (`tasks.verify`, re-run here
against the task file's answer) gives it a reward of at least ``min_reward``. One JSONL line per
(task, distinct demonstration): ``id``, ``task_id``, ``family``, ``difficulty``, ``prompt`` (the task's
``Q: ... A:``), ``demonstration`` (the answer line), ``completion`` (what follows the prompt in the corpus
format: a space and the answer, so `lab sft` and `load_benchmark` read the file as prompt/completion pairs),
``reward`` and ``source`` (the run it came from).

    lab sdft fit --config configs/sdft/tiny.yaml --model.model <pretrained> --data.path sdft.jsonl [--ckpt_path last]
    lab sdft fit --config configs/sdft/tiny.yaml --model.objective sft --run.name tiny-sft     # the SFT baseline
    lab sdft validate --config configs/sdft/tiny.yaml --ckpt_path last
    lab sdft predict --config configs/sdft/tiny.yaml --ckpt_path last

The stage (`SDFTModule`, a `LoraModule`, on `SampleDataModule` batches of that file; LightningCLI via
`run_stage_cli`, so RunTracker, GracefulPause and exact resume come with it). One ``sdft`` step, for a batch of
prompts: the student (the base + LoRA) samples ``samples_per_prompt`` answers from the prompt alone (the lab
sampler; seed = f(seed, step), so a resumed run draws the same samples); the teacher, the same base with an
EMA of the student's LoRA weights (``ema_rate``; swapped in for the call, no second copy of the model), reads
the same answer tokens after ``teacher_template`` (the prompt with its demonstration); the loss is the
per-token reverse KL, KL(student || teacher) summed over the vocabulary (full logits from `scoring.score`) and
averaged over the student's sampled tokens. After each optimizer step the teacher moves toward the student.
``objective: sft`` trains the cross-entropy of the demonstrations instead (training/sft.py's examples).
``replay_bin`` mixes pretraining windows in: loss = (1 - replay_ratio) x objective + replay_ratio x their NLL.

Retention gate (``gate_bin``): the perplexity of ``gate_windows`` windows of a packed validation file
(eval/retention.py's windows and NLL) before training, every ``gate_every`` steps and at the last step
(``trainer.max_steps``, so no run ends on weights the gate never saw); a measurement above
(1 + ``gate_max_rise``) x the first one stops the run and puts the LoRA weights of the last passing step back,
so the adapter written at the end is that step's; each pass also writes ``checkpoints/passing.ckpt``.
The teacher's weights and the gate's state are in every checkpoint (exact resume).

Artifacts: ``checkpoints/`` (last.ckpt, step=N.ckpt, passing.ckpt), ``metrics.jsonl`` (train_reverse_kl or
train_sft_nll, train_replay_nll, gate_perplexity; val_reverse_kl and val_demo_nll on the held-out dev half:
the KL to the teacher on the student's samples and the demonstrations' NLL), ``adapters/<adapter_name>/`` and
``sdft_eval_report.json`` (objective, steps, the gate's baseline, history, passing and stopping steps, the
last metrics).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torchmetrics import MeanMetric

from lightning_lab.data.benchmarks import Sample
from lightning_lab.data.io import DataError, write_json_atomic
from lightning_lab.errors import UserError, check_input_file, check_new_output_file
from lightning_lab.eval.retention import read_windows, window_nll
from lightning_lab.loops import check_count, check_number
from lightning_lab.models.lora import LoraSettings
from lightning_lab.models.scoring import score
from lightning_lab.sampling.prompts import encode_prompt
from lightning_lab.training.common import LoraModule, PredictSettings, SampleDataModule, run_stage_cli
from lightning_lab.training.sft import sft_example

log = logging.getLogger(__name__)

# ---- the SDFT data set -------------------------------------------------------------------------------


@dataclass
class BuildSdftConfig:
    """`lab discover build-sdft`: verified-exact demonstrations of a discovery run, as SDFT/SFT data."""

    suite_root: str = ""
    """a `lab discover run` directory (summary.jsonl), or a directory whose subdirectories are such runs"""
    tasks: str = ""
    """the task file the runs solved (its answers re-verify every demonstration)"""
    out: str = ""
    """the JSONL to write (must not exist)"""
    min_reward: float = 0.99
    """keep a demonstration only when the verifier's reward is at least this (and the answer is exact)"""

    def __post_init__(self) -> None:
        for key in ("suite_root", "tasks", "out"):
            if not getattr(self, key):
                raise UserError(f"{key}: required (--{key} ...)")
        check_input_file(self.tasks, "tasks:")
        if not Path(self.suite_root).is_dir():
            raise UserError(f"suite_root: {self.suite_root}: no such directory")
        check_number("min_reward", self.min_reward, 0.0, 1.0)
        check_new_output_file(self.out, "out")


def suite_runs(root: Path) -> list[Path]:
    """`root` when it is a discovery run, else its subdirectories that are (sorted by name)."""
    if (root / "summary.jsonl").is_file():
        return [root]
    runs = sorted(path for path in root.iterdir() if (path / "summary.jsonl").is_file())
    if not runs:
        raise UserError(f"suite_root: {root} holds no discovery run (no summary.jsonl in it or its subdirectories)")
    return runs


def demonstrations(config: BuildSdftConfig) -> list[dict]:
    """Every verified-exact demonstration of the runs under `suite_root`, one per (task, answer)."""
    from lightning_lab.discover.compare import read_run
    from lightning_lab.discover.tasks import read_tasks, verify

    tasks = {task.id: task for task in read_tasks(config.tasks)}
    rows, seen = [], set()
    for run in suite_runs(Path(config.suite_root)):
        for (task_id, _), result in read_run(run)[2].items():
            task = tasks.get(task_id)
            if task is None:
                raise DataError(f"{run / 'tasks' / task_id / 'result.json'}: task {task_id!r} is not in "
                                f"{config.tasks} (was the run made on another task file?)")
            best = result.get("best")
            if not best or not best.get("exact"):
                continue
            exact, reward = verify(best["text"], task.answer)
            if not exact or reward < config.min_reward or (task.id, best["text"]) in seen:
                continue
            seen.add((task.id, best["text"]))
            rows.append({"id": f"{task.id}-{len(rows)}", "task_id": task.id, "family": task.family,
                         "difficulty": task.difficulty, "prompt": task.prompt, "demonstration": best["text"],
                         "completion": f" {best['text']}", "reward": reward, "source": str(run)})
    return rows


def build_sdft(config: BuildSdftConfig) -> int:
    """Write the demonstrations; print how many tasks gave one."""
    rows = demonstrations(config)
    if not rows:
        raise UserError(f"suite_root: {config.suite_root}: no task was solved exactly (reward >= "
                        f"{config.min_reward}); nothing to distil")
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("x", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")
    print(f"{out}: {len(rows)} demonstrations of {len({row['task_id'] for row in rows})} tasks")
    return 0


# ---- the SDFT stage ------------------------------------------------------------------------------------


class SDFTModule(LoraModule):
    """On-policy self-distillation into a LoRA adapter (Shenfeld et al. 2026), or plain SFT on the same data.

    Args:
        model: base model spec for `load_causal_lm` (the pretrained lab GPT, an alias, a HF directory).
        lora: LoRA rank, alpha, dropout, targets (models/lora.py).
        objective: ``sdft`` (reverse KL to the EMA teacher on the student's samples) or ``sft`` (cross-entropy
            on the demonstrations: the baseline).
        ema_rate: how far the teacher moves toward the student after each optimizer step:
            teacher <- (1 - ema_rate) * teacher + ema_rate * student, on the LoRA weights.
        teacher_template: the teacher's context, from the sample's ``prompt`` and ``completion`` (the
            demonstration): by default the solved example, a newline, then the same prompt again.
        samples_per_prompt: student samples per prompt and step.
        max_new_tokens: longest student sample (a sample also stops at a newline: one answer line).
        temperature: the student's sampling temperature (the KL is between the untempered distributions).
        replay_bin: a packed pretraining file whose windows are mixed into every step (None: no replay).
        replay_ratio: the loss is (1 - ratio) x distillation + ratio x replay NLL.
        replay_windows: replay windows per step (consecutive, in file order, continuing from step to step).
        gate_bin: a packed validation file for the retention gate (None: no gate).
        gate_every: evaluate the gate's perplexity every this many optimizer steps (and at the last one).
        gate_max_rise: stop when perplexity exceeds (1 + gate_max_rise) x its value before training.
        seq_len: tokens per replay / gate window.
        gate_windows: windows of gate_bin the perplexity is measured on.
        learning_rate, weight_decay, warmup_steps, min_lr_ratio: AdamW and its warm-up + cosine schedule.
        max_length: longest SFT example (prompt + demonstration + EOS).
        dtype: dtype the base is loaded in.
        adapter_name: the adapter goes to ``<run>/adapters/<adapter_name>/``.
        seed: seeds the student's samples (with the step number).
        adapter: start from this saved peft adapter directory.
        predict: decoding settings of ``lab sdft predict``.
    """

    def __init__(self, model: str = "smollm2-135m", lora: LoraSettings = LoraSettings(dropout=0.0),
                 objective: str = "sdft", ema_rate: float = 0.02,
                 teacher_template: str = "{prompt}{completion}\n{prompt}", samples_per_prompt: int = 2,
                 max_new_tokens: int = 32, temperature: float = 1.0, replay_bin: str | None = None,
                 replay_ratio: float = 0.0, replay_windows: int = 2, gate_bin: str | None = None,
                 gate_every: int = 10, gate_max_rise: float = 0.05, seq_len: int = 128, gate_windows: int = 16,
                 learning_rate: float = 1e-4, weight_decay: float = 0.0, warmup_steps: int = 0,
                 min_lr_ratio: float = 1.0, max_length: int = 256, dtype: str = "fp32", adapter_name: str = "final",
                 seed: int = 0, adapter: str | None = None, predict: PredictSettings = PredictSettings()):
        super().__init__(model, lora, learning_rate, weight_decay, warmup_steps, min_lr_ratio, dtype, adapter_name,
                         adapter, predict)
        if objective not in OBJECTIVES:
            raise UserError(f"model.objective={objective!r}: choose from {list(OBJECTIVES)}")
        if not 0.0 < ema_rate <= 1.0:
            raise UserError(f"model.ema_rate={ema_rate}: must be in (0, 1]")
        if not 0.0 <= replay_ratio < 1.0 or (replay_ratio > 0) != (replay_bin is not None):
            raise UserError(f"model.replay_ratio={replay_ratio}, model.replay_bin={replay_bin}: a ratio in (0, 1) "
                            "needs a packed file, and a packed file a ratio > 0")
        if "{prompt}" not in teacher_template or "{completion}" not in teacher_template:
            raise UserError(f"model.teacher_template={teacher_template!r}: must contain {{prompt}} and {{completion}}")
        for key, path in (("replay_bin", replay_bin), ("gate_bin", gate_bin)):
            if path is not None:
                check_input_file(path, f"model.{key}:")
        for key, value in (("samples_per_prompt", samples_per_prompt), ("max_new_tokens", max_new_tokens),
                           ("gate_every", gate_every), ("seq_len", seq_len), ("gate_windows", gate_windows),
                           ("replay_windows", replay_windows)):
            check_count(f"model.{key}", value)
        check_number("model.gate_max_rise", gate_max_rise, 0.0)
        check_number("model.temperature", temperature, 0.0, low_open=True)
        self.teacher: dict[str, torch.Tensor] = {}  # the EMA of the LoRA weights, made in on_fit_start
        self.teacher_step = 0  # the optimizer step the teacher last moved at
        self.gate: dict = {"baseline": None, "history": [], "passing_step": None, "stopped_at": None}
        self.passing_state: dict[str, torch.Tensor] = {}  # LoRA weights at the last passing gate
        self.restored: dict | None = None
        self.val_kl, self.val_nll = MeanMetric(), MeanMetric()

    # ---- tokens ------------------------------------------------------------------------------

    def prompt_ids(self, samples: list[Sample]) -> tuple[list[list[int]], list[list[int]]]:
        """(student prompts, teacher prompts) as the sampler encodes them."""
        template = self.hparams.teacher_template
        student = [encode_prompt(self.tokenizer, sample.prompt) for sample in samples]
        teacher = [encode_prompt(self.tokenizer, template.format(prompt=sample.prompt, completion=sample.reference))
                   for sample in samples]
        return student, teacher

    def student_samples(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        """`samples_per_prompt` completions of every prompt from the current student (token ids, stop included)."""
        generation = self.sampler().generate(prompts, n=self.hparams.samples_per_prompt,
                                             max_new_tokens=self.hparams.max_new_tokens,
                                             temperature=self.hparams.temperature, stop=["\n"], seed=seed,
                                             batch_size=len(prompts))
        return [completion.token_ids for result in generation.prompts for completion in result.completions]

    # ---- the teacher -------------------------------------------------------------------------

    def lora_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: parameter for name, parameter in self.model.named_parameters() if parameter.requires_grad}

    @contextlib.contextmanager
    def teacher_weights(self):
        """Run the model with the teacher's LoRA weights for the duration (no second copy of the base)."""
        parameters = self.lora_parameters()
        student = {name: parameter.detach().clone() for name, parameter in parameters.items()}
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(self.teacher[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, parameter in parameters.items():
                    parameter.copy_(student[name])

    def update_teacher(self) -> None:
        """teacher <- (1 - rate) teacher + rate student, after an optimizer step."""
        with torch.no_grad():
            for name, parameter in self.lora_parameters().items():
                self.teacher[name].lerp_(parameter.detach(), self.hparams.ema_rate)

    # ---- losses -------------------------------------------------------------------------------

    def reverse_kl(self, samples: list[Sample], seed: int, grad: bool) -> tuple[torch.Tensor, int]:
        """Mean over the student's sampled tokens of KL(student || teacher) over the vocabulary, and the token count."""
        student_prompts, teacher_prompts = self.prompt_ids(samples)
        completions = self.student_samples(student_prompts, seed)
        if grad:
            self.model.train()  # the sampler left it in eval mode
        n = self.hparams.samples_per_prompt
        student_rows = [ids for ids in student_prompts for _ in range(n)]
        teacher_rows = [ids for ids in teacher_prompts for _ in range(n)]
        with self.teacher_weights():
            teacher = score(self.model, teacher_rows, completions, logits=True)
        student = score(self.model, student_rows, completions, logits=True, grad=grad)
        log_student = torch.log_softmax(student.logits, dim=-1)
        log_teacher = torch.log_softmax(teacher.logits, dim=-1)
        per_token = (log_student.exp() * (log_student - log_teacher)).sum(dim=-1) * student.mask
        return per_token.sum() / student.mask.sum().clamp(min=1), student.num_tokens

    def sft_loss(self, samples: list[Sample], grad: bool) -> tuple[torch.Tensor, int]:
        examples = [sft_example(self.tokenizer, sample, self.hparams.max_length) for sample in samples]
        scores = score(self.model, [p for p, _ in examples], [c for _, c in examples], grad=grad)
        return scores.mean_nll(), scores.num_tokens

    def replay_loss(self) -> torch.Tensor:
        """NLL of the next `replay_windows` windows of the replay file (position fixed by the step: exact resume)."""
        count = self.hparams.replay_windows
        indices = [(self.global_step * count + i) % len(self.replay) for i in range(count)]
        windows = torch.stack([torch.cat([self.replay[i][0], self.replay[i][1][-1:]]) for i in indices])
        return score(self.model, windows[:, :1], windows[:, 1:], grad=True).mean_nll()

    def gate_perplexity(self) -> float:
        was_training = self.model.training
        self.model.eval()
        nll = window_nll(self.model, self.gate_windows.to(self.device), batch_size=8)
        self.model.train(was_training)
        return math.exp(sum(nll) / len(nll))

    # ---- fit ----------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.configure_model()
        from lightning_lab.data.packed import PackedDataset, check_tokenizer

        self.replay = None
        if self.hparams.replay_bin is not None:
            check_tokenizer(self.hparams.replay_bin, self.tokenizer, self.hparams.model)
            self.replay = PackedDataset(self.hparams.replay_bin, self.hparams.seq_len)
        if self.hparams.gate_bin is not None:
            check_tokenizer(self.hparams.gate_bin, self.tokenizer, self.hparams.model)
            self.gate_windows = read_windows(self.hparams.gate_bin, self.hparams.seq_len, self.hparams.gate_windows)

    def init_teacher(self) -> None:
        """The teacher of the checkpoint being resumed or validated, else the student's own weights."""
        saved = (self.restored or {}).get("teacher", {})
        self.teacher = {name: saved.get(name, parameter.detach()).clone().to(parameter.device)
                        for name, parameter in self.lora_parameters().items()}
        self.teacher_step = self.global_step

    def on_fit_start(self) -> None:
        self.init_teacher()
        parameters = self.lora_parameters()
        saved = self.restored or {}
        if "gate" in saved:
            self.gate = saved["gate"]
            self.passing_state = saved["passing_state"]
        elif self.hparams.gate_bin is not None:
            self.gate["baseline"] = self.gate_perplexity()
            self.passing_state = {name: parameter.detach().clone() for name, parameter in parameters.items()}
            self.gate["passing_step"] = self.global_step

    def training_step(self, samples: list[Sample], batch_idx: int) -> torch.Tensor:
        if self.hparams.objective == "sdft":
            seed = zlib.crc32(f"{self.hparams.seed}:{self.global_step}".encode())
            loss, tokens = self.reverse_kl(samples, seed, grad=True)
            self.log("train_reverse_kl", loss, prog_bar=True, batch_size=len(samples))
        else:
            loss, tokens = self.sft_loss(samples, grad=True)
            self.log("train_sft_nll", loss, prog_bar=True, batch_size=len(samples))
        if self.replay is not None:
            replay = self.replay_loss()
            self.log("train_replay_nll", replay, batch_size=len(samples))
            loss = (1 - self.hparams.replay_ratio) * loss + self.hparams.replay_ratio * replay
        self.log("train_loss", loss, batch_size=len(samples))
        self.log("train_completion_tokens", float(tokens), batch_size=len(samples))
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=len(samples))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.global_step == self.teacher_step:
            return  # gradients are still accumulating: no optimizer step yet
        self.teacher_step = self.global_step
        self.update_teacher()
        # the last step is gated too, so the adapter a run ends with has always passed (or is the last pass)
        last = self.global_step == self.trainer.max_steps
        if self.hparams.gate_bin is not None and (self.global_step % self.hparams.gate_every == 0 or last):
            self.check_gate()

    def check_gate(self) -> None:
        """Measure the gate's perplexity; keep the weights when it passes, else stop and go back to the last pass."""
        perplexity = self.gate_perplexity()
        bound = self.gate["baseline"] * (1 + self.hparams.gate_max_rise)
        passed = perplexity <= bound
        self.gate["history"].append({"step": self.global_step, "perplexity": perplexity, "bound": bound,
                                     "passed": passed})
        self.log("gate_perplexity", perplexity)
        parameters = self.lora_parameters()
        if passed:
            self.passing_state = {name: parameter.detach().clone() for name, parameter in parameters.items()}
            self.gate["passing_step"] = self.global_step
            self.trainer.save_checkpoint(Path(self.trainer.default_root_dir) / "checkpoints" / "passing.ckpt")
            return
        log.warning("retention gate: perplexity %.4f > %.4f at step %d; stopping, keeping step %s", perplexity, bound,
                    self.global_step, self.gate["passing_step"])
        self.gate["stopped_at"] = self.global_step
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(self.passing_state[name])
        self.trainer.should_stop = True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["sdft"] = {"teacher": self.teacher, "gate": self.gate, "passing_state": self.passing_state}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.restored = checkpoint.get("sdft")

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.trainer.is_global_zero:
            metrics = {key: float(value) for key, value in self.trainer.callback_metrics.items() if value.numel() == 1}
            write_json_atomic(Path(self.trainer.default_root_dir) / "sdft_eval_report.json", {
                "objective": self.hparams.objective, "model": self.hparams.model, "steps": self.global_step,
                "ema_rate": self.hparams.ema_rate, "replay_ratio": self.hparams.replay_ratio,
                "gate": {**self.gate, "max_rise": self.hparams.gate_max_rise, "enabled": self.hparams.gate_bin
                         is not None}, "adapter": str(self.adapter_dir()), "last_metrics": metrics})

    # ---- validation: the KL to the teacher and the demonstrations' NLL on held-out prompts ---------------

    def validation_step(self, samples: list[Sample], batch_idx: int) -> None:
        if not self.teacher:  # `lab sdft validate`: no on_fit_start
            self.init_teacher()
        kl, tokens = self.reverse_kl(samples, seed=self.hparams.seed + batch_idx, grad=False)
        self.val_kl.update(kl, weight=tokens)
        nll, tokens = self.sft_loss(samples, grad=False)
        self.val_nll.update(nll, weight=tokens)

    def on_validation_epoch_end(self) -> None:
        self.log("val_reverse_kl", self.val_kl.compute(), prog_bar=True)
        self.log("val_demo_nll", self.val_nll.compute())
        self.val_kl.reset()
        self.val_nll.reset()


OBJECTIVES = ("sdft", "sft")
REQUIRED_ARTIFACTS = ("config.yaml", "checkpoints/last.ckpt", "metrics.jsonl", "sdft_eval_report.json",
                      "adapters/*/adapter_model.safetensors")


def main(argv: list[str]) -> int:
    run_stage_cli(SDFTModule, SampleDataModule, "sdft", argv, required_artifacts=REQUIRED_ARTIFACTS)
    return 0
