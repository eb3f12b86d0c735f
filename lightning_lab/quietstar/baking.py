"""Baking thoughts into the weights: `lab quietstar fit | validate | predict` (a LightningCLI stage).

    lab quietstar fit --config configs/quietstar/star_smollm2.yaml           # STaR on kept thought traces
    lab quietstar fit --config configs/quietstar/quietstar_tiny.yaml         # the paper's objective
    lab quietstar fit --config ... --ckpt_path last                          # resume after Ctrl+C

Two objectives (``model.objective``):

``star`` (STaR-style rationale fine-tuning). The data are traces that reached the correct answer: a
JSONL of ``prompt`` / ``completion`` pairs whose completions hold their thoughts between the markers
(``lab quietstar bake`` writes them). The loss is the mean cross-entropy over completion tokens, thought
tokens and markers included, so the baked model starts its own thoughts without an injector.

``quietstar`` (Zelikman et al. 2024, arXiv 2403.09629), on plain text (a .txt file of one document per
line, or any source `load_benchmark` reads: prompt and solution joined). For a batch of texts:

1. one teacher-forced pass gives the base next-token logits, last hidden states and the KV cache at every
   position;
2. after every token j that has ``thoughts.lookahead`` true tokens after it (``thoughts.positions: all``,
   the paper's setting and the default), or at that many random such positions per text (a number: the
   cheaper sampled option), ``thoughts.per_position`` thoughts are sampled: ``<|startofthought|>`` +
   ``thoughts.length`` tokens at ``thoughts.temperature`` + ``<|endofthought|>``, each continuing the text
   up to token j. Every thought of the batch is one row of one batched decode that branches off the cached
   text (`models.scoring.score_branches`: the text's keys up to j, an explicit attention mask), so no text
   is read again per position: ``length`` forward passes of one token per thought;
3. one teacher-forced pass, branching off the cache the same way, reads thought + end marker + the next
   ``thoughts.lookahead`` true tokens for every thought at once, giving the thought tokens' log-probs and
   the post-thought logits and hidden states for those true tokens;
4. the mixing head, a small MLP on [base hidden; post-thought hidden], gives a weight w and the mixed
   logits base + w (post - base). Its last layer starts at zero, so at step 0 w = 0 and the mixed output is
   the base model's exactly;
5. reward of a thought = log-likelihood of the true lookahead tokens under the mixed logits, minus the
   mean over the thoughts at the same position (the paper's baseline); REINFORCE on the thought tokens'
   log-probabilities (at the sampling temperature) with that advantage, negative advantages dropped
   (``thoughts.positive_advantages_only``, as in the reference code);
6. loss = ``base_loss_weight`` * base LM loss + (1 - ``base_loss_weight``) * mixed LM loss on the
   lookahead tokens + ``policy_weight`` * REINFORCE loss.

The thoughts are few and short (the paper: 16 thoughts of 12 tokens, here a few of a few): the lab runs on a
CPU with a tiny GPT or SmolLM2-135M. A batch holds texts x positions x ``per_position`` thought rows, so in
every-token mode keep ``data.batch_size`` and ``max_length`` small. Logged per step: ``train_loss``,
``base_nll``, ``mixed_nll``, ``policy_loss``, ``reward``, ``mixing_weight``, and ``thought_gain`` (mean over
lookahead tokens of log p_mixed - log p_base: positive when thoughts raise the next-token likelihood); validation logs the
same with ``val_`` (the held-out answer to "do thoughts help on held-out text?").

Both objectives: ``model.lora`` set -> a LoRA adapter (the marker embeddings stay as initialised), None ->
full fine-tuning (the default; the seed's learning rate 1e-5). Checkpoints hold the trainable weights (and
the mixing head); the base is reloaded from ``model.model`` and the thought tokens re-added, so
``--ckpt_path last`` resumes exactly (RNG states and the batch position included). At the end of fit (not at
a pause) the baked model is written to ``<run>/baked_model/`` (LoRA merged), a Hugging Face directory with the thought
tokens in its tokenizer, that `load_causal_lm` and the A/B harness load; the quietstar objective adds
``mixing_head.pt`` beside it. ``lab quietstar predict --ckpt_path last`` writes the answers to the prompts of
``data.predict_path`` (default: ``data.val_path``) to ``<run>/predictions.jsonl`` as `lab sft predict` does
(``model.predict.*``), each completion with its thoughts listed beside its text and never inside it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch

from lightning_lab.callbacks.pause import GracefulPause
from lightning_lab.data.benchmarks import Sample, load_benchmark
from lightning_lab.data.io import DataError, JsonlWriter
from lightning_lab.errors import UserError
from lightning_lab.models.loading import load_causal_lm, save_model_dir
from lightning_lab.models.lora import LoraSettings, add_lora
from lightning_lab.models.scoring import Scores, pretrained_model, score, score_branches
from lightning_lab.quietstar.injector import InjectorConfig, ThoughtInjector
from lightning_lab.quietstar.tokens import END_THOUGHT, START_THOUGHT, add_thought_tokens
from lightning_lab.sampling.prompts import encode_prompt
from lightning_lab.sampling.sampler import SamplingParams, choose_tokens
from lightning_lab.training.common import (LoraModule, PredictSettings, SampleBatches, predictions_path,
                                           run_stage_cli)
from lightning_lab.training.sft import completion_text

log = logging.getLogger(__name__)

OBJECTIVES = ("star", "quietstar")


@dataclass
class ThoughtSampling:
    """The quietstar objective's thoughts (module docstring, steps 2-6).

    Args:
        positions: "all": a thought after every token that has ``lookahead`` true tokens after it (the paper);
            a number: that many such positions sampled per text per step.
        per_position: thoughts per position; the reward's baseline is their mean (at least 2).
        length: tokens per thought, between the markers.
        lookahead: true tokens after the thought whose log-likelihood is the reward.
        temperature: sampling temperature of thought tokens (their REINFORCE log-probs use it too).
        policy_weight: weight of the REINFORCE loss.
        base_loss_weight: weight of the base LM loss; the mixed LM loss gets 1 - this.
        positive_advantages_only: drop negative advantages (as the reference code does).
    """

    positions: int | str = "all"
    per_position: int = 2
    length: int = 4
    lookahead: int = 4
    temperature: float = 1.0
    policy_weight: float = 1.0
    base_loss_weight: float = 0.5
    positive_advantages_only: bool = True

    def __post_init__(self):
        if self.positions != "all" and (isinstance(self.positions, bool) or not isinstance(self.positions, int)
                                        or self.positions < 1):
            raise UserError(f"model.thoughts.positions: {self.positions!r} must be 'all' or a number >= 1")
        if self.per_position < 2 or self.length < 1 or self.lookahead < 1:
            raise UserError(f"model.thoughts: per_position={self.per_position} >= 2 "
                            f"(the baseline is their mean), length={self.length} >= 1, lookahead={self.lookahead} >= 1")
        if self.temperature <= 0 or not 0 <= self.base_loss_weight <= 1:
            raise UserError(f"model.thoughts: temperature={self.temperature} must be > 0, "
                            f"base_loss_weight={self.base_loss_weight} in [0, 1]")


def mixing_head(hidden_size: int) -> torch.nn.Sequential:
    """[base hidden; post-thought hidden] -> one weight; the last layer is zero, so the weight starts at 0."""
    head = torch.nn.Sequential(torch.nn.Linear(2 * hidden_size, hidden_size), torch.nn.ReLU(),
                               torch.nn.Linear(hidden_size, 1))
    torch.nn.init.zeros_(head[2].weight)
    torch.nn.init.zeros_(head[2].bias)
    return head


def mix(head: torch.nn.Module, base_logits: torch.Tensor, post_logits: torch.Tensor, base_hidden: torch.Tensor,
        post_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed logits base + w (post - base), w from the head; and w. At w = 0 they are the base logits exactly."""
    weight = head(torch.cat([base_hidden, post_hidden], dim=-1).to(head[0].weight.dtype)).float()
    return base_logits + weight * (post_logits - base_logits), weight.squeeze(-1)


def thought_places(lengths: list[int], settings: ThoughtSampling) -> list[tuple[int, int]]:
    """(text, j) pairs: a thought after token j of text number `text`, for every j with ``settings.lookahead``
    true tokens after it (``positions`` "all"), or for that many of them drawn at random per text."""
    places = []
    for text, length in enumerate(lengths):
        eligible = torch.arange(max(0, length - settings.lookahead))
        if settings.positions != "all":
            eligible = eligible[torch.randperm(len(eligible))[:settings.positions]]
        places += [(text, int(j)) for j in eligible]
    return places


def at_columns(values: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``values[rows[r], columns[r, k]]`` for (rows, width, ...) values: (len(rows), columns.shape[1], ...).

    Through `index_select` rather than advanced indexing: the places overlap, and advanced indexing's backward
    adds the overlapping gradients with atomics on several CPU threads, in a different order each run."""
    flat = (rows[:, None] * values.shape[1] + columns).flatten()
    return values.flatten(0, 1).index_select(0, flat).view(*columns.shape, *values.shape[2:])


# ---- the LightningModule ------------------------------------------------------------------------


class QuietStarModule(LoraModule):
    """Bakes thoughts into a causal LM with the star or quietstar objective (module docstring).

    The shared `LoraModule` (training/common.py) gives the optimizer and schedule, the checkpoints of trainable
    weights only and the predictions file; this class adds the thought tokens, full fine-tuning (``lora``
    None), the mixing head, the two objectives and the baked model at the end of fit.

    Args:
        model: base model spec for `load_causal_lm` (alias, HF directory, .gguf, lab .ckpt).
        objective: star | quietstar.
        lora: LoRA settings; None: full fine-tuning.
        thoughts: the quietstar objective's thought sampling and loss weights.
        learning_rate: peak AdamW learning rate (the seed's 1e-5).
        weight_decay: AdamW decoupled weight decay.
        warmup_steps: linear warm-up steps, then cosine to ``min_lr_ratio * learning_rate``.
        min_lr_ratio: where the cosine ends, at the last step.
        max_length: longest training sequence in tokens (longer ones are cut).
        dtype: dtype the model is loaded in (fp32 default).
        start_token: the thought start marker.
        end_token: the thought end marker.
        predict: how `predict` decodes (training/common.py's PredictSettings); thoughts are sampled when the
            model starts them, at temperature 1, and never shown in the text.
    """

    def __init__(self, model: str = "smollm2-135m", objective: str = "star", lora: LoraSettings | None = None,
                 thoughts: ThoughtSampling = ThoughtSampling(), learning_rate: float = 1e-5, weight_decay: float = 0.0,
                 warmup_steps: int = 10, min_lr_ratio: float = 0.1, max_length: int = 512, dtype: str = "fp32",
                 start_token: str = START_THOUGHT, end_token: str = END_THOUGHT,
                 predict: PredictSettings = PredictSettings()):
        if objective not in OBJECTIVES:
            raise UserError(f"model.objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
        super().__init__(model, lora or LoraSettings(), learning_rate, weight_decay, warmup_steps, min_lr_ratio, dtype,
                         adapter_name="final", predict=predict)
        self.lora, self.thought_sampling = lora, thoughts
        # plain types only in the hyper-parameters: checkpoints load with torch's weights_only
        self.hparams["lora"] = asdict(lora) if lora is not None else None
        self.hparams["thoughts"] = asdict(thoughts)
        self.mixing_head: torch.nn.Module | None = None
        self.thought_tokens = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        loaded = load_causal_lm(self.hparams.model, device="cpu", dtype=self.hparams.dtype)  # Lightning moves it
        self.tokenizer = loaded.tokenizer
        self.thought_tokens = add_thought_tokens(loaded.model, loaded.tokenizer, self.hparams.start_token,
                                                 self.hparams.end_token)
        model = add_lora(loaded.model, self.lora) if self.lora is not None else loaded.model
        self.model = model.train()  # load_causal_lm returns eval mode; Lightning keeps whatever mode it finds
        if self.hparams.objective == "quietstar":
            hidden_size = pretrained_model(model).config.get_text_config().hidden_size
            self.mixing_head = mixing_head(hidden_size)

    # ---- losses -------------------------------------------------------------------------------

    def star_loss(self, samples: list[Sample], grad: bool = True) -> dict[str, torch.Tensor]:
        """Mean cross-entropy over each trace's completion (thoughts and markers included) and EOS."""
        prompts, completions = [], []
        for sample in samples:
            prompt = encode_prompt(self.tokenizer, sample.prompt)
            completion = self.tokenizer(completion_text(sample), add_special_tokens=False)["input_ids"]
            completion = (completion + [self.tokenizer.eos_token_id])[:max(1, self.hparams.max_length - len(prompt))]
            prompts.append(prompt)
            completions.append(completion)
        nll = score(self.model, prompts, completions, grad=grad).mean_nll()
        return {"loss": nll, "nll": nll}

    def quietstar_loss(self, samples: list[Sample], grad: bool = True) -> dict[str, torch.Tensor]:
        """The paper's objective on the texts of `samples` (module docstring, steps 1-6)."""
        settings = self.thought_sampling
        rows = [ids for ids in (self.text_ids(sample) for sample in samples) if len(ids) > settings.lookahead + 1]
        if not rows:
            raise DataError(f"samples {[s.id for s in samples]}: every text is shorter than "
                            f"thoughts.lookahead + 2 = {settings.lookahead + 2} tokens")
        # 1. base pass: completion index k predicts token k + 1 of the row; one-token prompts, so no left padding
        # and cache column k holds token k (what score_branches' positions index)
        base = score(self.model, [ids[:1] for ids in rows], [ids[1:] for ids in rows], logits=True, hidden=True,
                     keep_cache=True, grad=grad)
        # 2. thought rows: per_position rows for each place (text, j); j + 1 .. j + lookahead are the true tokens
        places = thought_places([len(ids) for ids in rows], settings)
        device, length, ahead = base.logits.device, settings.length, settings.lookahead
        texts = torch.tensor([row for row, _ in places], device=device).repeat_interleave(settings.per_position)
        positions = torch.tensor([j for _, j in places], device=device).repeat_interleave(settings.per_position)
        start, end = self.thought_tokens.start_id, self.thought_tokens.end_id
        thoughts = self.sample_thoughts(base, texts, positions)
        # 3. post-thought pass: start + thought + end + the true tokens but the last (nothing after it is read)
        window = positions[:, None] + 1 + torch.arange(ahead, device=device)  # the true tokens' indices
        padded = torch.nn.utils.rnn.pad_sequence([torch.tensor(ids, device=device) for ids in rows], batch_first=True)
        targets = padded[texts[:, None], window]
        markers = torch.tensor([start, end], device=device).expand(len(texts), 2)
        tokens = torch.cat([markers[:, :1], thoughts, markers[:, 1:], targets[:, :-1]], dim=1)
        post_logits, post_hidden, _ = score_branches(self.model, base, texts, positions, tokens, hidden=True, grad=grad)
        thought_logp = torch.log_softmax(post_logits[:, :length] / settings.temperature, dim=-1)
        thought_logp = thought_logp.gather(-1, thoughts[..., None]).squeeze(-1).sum(dim=1)
        # 4. mix the base and post-thought predictions of the same true tokens
        base_logits, base_hidden = (at_columns(scores, texts, window - 1) for scores in (base.logits, base.hidden))
        mixed, weight = mix(self.mixing_head, base_logits, post_logits[:, length + 1:], base_hidden,
                            post_hidden[:, length + 1:])
        mixed_logp = torch.log_softmax(mixed, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
        base_logp = torch.log_softmax(base_logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
        # 5. reward over the mean thought at the same position; REINFORCE on the thought tokens
        reward = mixed_logp.sum(dim=1).detach().view(len(places), settings.per_position)
        advantage = reward - reward.mean(dim=1, keepdim=True)
        if settings.positive_advantages_only:
            advantage = advantage.clamp(min=0)
        policy_loss = -(advantage.flatten() * thought_logp).mean()
        # 6. the loss
        base_nll, mixed_nll = base.mean_nll(), -mixed_logp.mean()
        loss = (settings.base_loss_weight * base_nll + (1 - settings.base_loss_weight) * mixed_nll
                + settings.policy_weight * policy_loss)
        return {"loss": loss, "base_nll": base_nll, "mixed_nll": mixed_nll, "policy_loss": policy_loss,
                "reward": reward.mean(), "mixing_weight": weight.mean(),
                "thought_gain": (mixed_logp - base_logp).mean()}

    def text_ids(self, sample: Sample) -> list[int]:
        """The quietstar objective's text of a sample: its prompt, then its solution when it has one."""
        completion = completion_text(sample)
        text = sample.prompt + ("\n" + completion if completion else "")
        return self.tokenizer(text)["input_ids"][:self.hparams.max_length]

    @torch.no_grad()
    def sample_thoughts(self, base: Scores, texts: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(rows, length) thought tokens, row r after the start marker that follows token ``positions[r]`` of text
        ``texts[r]``: one batched decode branching off the base pass's cache, at the thoughts' temperature, drawn
        from torch's RNG (which ExactResume saves and restores)."""
        settings = self.thought_sampling
        params = SamplingParams(temperature=settings.temperature)
        tokens = [torch.full((len(texts),), self.thought_tokens.start_id, device=texts.device)]
        cache, training = None, self.model.training
        self.model.eval()  # drawn without dropout (LoRA's), as the sampler draws
        try:
            for _ in range(settings.length):
                logits, _, cache = score_branches(self.model, base, texts, positions, tokens[-1][:, None], cache=cache)
                tokens.append(choose_tokens(logits[:, -1], params, None))
        finally:
            self.model.train(training)
        return torch.stack(tokens[1:], dim=1)

    def losses(self, samples: list[Sample], grad: bool) -> dict[str, torch.Tensor]:
        if self.hparams.objective == "star":
            return self.star_loss(samples, grad)
        return self.quietstar_loss(samples, grad)

    # ---- steps ----------------------------------------------------------------------------------

    def training_step(self, samples: list[Sample], batch_idx: int) -> torch.Tensor:
        values = self.losses(samples, grad=True)
        name = {"loss": "train_loss"}
        self.log_dict({name.get(k, k): v.detach() for k, v in values.items()}, prog_bar=False, batch_size=len(samples))
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=len(samples))
        return values["loss"]

    def validation_step(self, samples: list[Sample], batch_idx: int) -> None:
        values = self.losses(samples, grad=False)
        self.log_dict({f"val_{k}": v for k, v in values.items()}, batch_size=len(samples), prog_bar=True)

    def on_predict_start(self) -> None:
        self.predictions = JsonlWriter(predictions_path(self.trainer, self.predict_settings))
        self.predictions.write({"header": {"stage": "quietstar", "model": self.hparams.model,
                                           "objective": self.hparams.objective, "ckpt_path": self.trainer.ckpt_path,
                                           "predict": asdict(self.predict_settings)}})

    def predict_step(self, samples: list[Sample], batch_idx: int) -> None:
        """Each sample's answers from the baked model: thoughts hidden in the text, listed beside it."""
        settings = self.predict_settings
        injector = ThoughtInjector(self.sampler(), self.thought_tokens, InjectorConfig(thought_probability=0.0))
        for sample in samples:
            completions = []
            for draw in range(settings.n):
                trace = injector.generate(sample.prompt, settings.max_new_tokens, settings.temperature,
                                          settings.top_p, settings.greedy, seed=settings.seed + draw)
                completions.append({"text": trace.text, "finish_reason": trace.finish_reason,
                                    "num_tokens": len(trace.visible_ids),
                                    "thoughts": [{"position": t.position, "text": t.text} for t in trace.thoughts]})
            self.predictions.write({"id": sample.id, "prompt": sample.prompt, "reference": sample.reference,
                                    "completions": completions})

    # ---- checkpoints, the baked model ----------------------------------------------------------

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("hyper_parameters", {})
        for key in ("objective", "lora"):
            if key in saved and saved[key] != self.hparams[key]:
                raise UserError(f"checkpoint was trained with model.{key}={saved[key]!r}, this run has "
                                f"{self.hparams[key]!r}; resume with the same settings")
        super().on_load_checkpoint(checkpoint)  # the same base model and the same trainable weights

    def baked_dir(self) -> Path:
        return Path(self.trainer.default_root_dir) / "baked_model"

    def paused(self) -> bool:
        """Whether this fit stopped on a Ctrl+C pause (GracefulPause saved last.ckpt) rather than finishing."""
        return any(isinstance(callback, GracefulPause) and callback.checkpoint_path is not None
                   for callback in self.trainer.callbacks)

    def on_train_end(self) -> None:
        if not self.trainer.is_global_zero or self.paused():  # a paused run bakes when it finishes
            return
        model = self.model
        if self.lora is not None:  # merged into a copy: the module keeps its adapter for a later resume
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        out = self.baked_dir()
        if out.exists():  # a run continued past its end (more steps) bakes again: overwrite nothing
            out = out.with_name(f"baked_model-step{self.trainer.global_step:07d}")
        save_model_dir(model, self.tokenizer, out)
        if self.mixing_head is not None:
            torch.save(self.mixing_head.state_dict(), out / "mixing_head.pt")
        log.info("baked model saved to %s", out)


# ---- data ----------------------------------------------------------------------------------------


def read_texts(path: str) -> list[Sample]:
    """A .txt file's non-empty lines as samples (the text is the prompt), or anything `load_benchmark` reads."""
    source = Path(path)
    if source.suffix != ".txt":
        return load_benchmark(path, split="all")
    if not source.is_file():
        raise DataError(f"{source}: no such file")
    lines = source.read_text(encoding="utf-8").splitlines()
    return [Sample(f"{source.stem}-{number}", line, "") for number, line in enumerate(lines, 1) if line.strip()]


class BakeDataModule(L.LightningDataModule):
    """Batches of `Sample`s for baking: thought traces (star) or texts (quietstar); resumable mid-epoch.

    Args:
        train_path: star: a JSONL of prompt/completion traces; quietstar: a .txt of one text per line, or any
            source `load_benchmark` reads (the text is the prompt and its solution).
        val_path: held-out data of the same kind (None: no validation).
        train_limit: use only the first this many training samples.
        val_limit: use only the first this many validation samples.
        batch_size: samples per training batch.
        val_batch_size: samples per validation batch (default: batch_size).
        predict_path: prompts for `predict` (default: val_path).
        seed: the shuffle order of each epoch.
    """

    def __init__(self, train_path: str | None = None, val_path: str | None = None, train_limit: int | None = None,
                 val_limit: int | None = 64, batch_size: int = 4, val_batch_size: int | None = None,
                 predict_path: str | None = None, seed: int = 0):
        super().__init__()
        self.train_path, self.val_path, self.predict_path = train_path, val_path, predict_path
        self.train_limit, self.val_limit = train_limit, val_limit
        self.batch_size, self.val_batch_size, self.seed = batch_size, val_batch_size or batch_size, seed
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.predict_samples: list[Sample] = []

    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.world_size > 1:
            raise UserError(f"--trainer.devices: {self.trainer.world_size} processes; baking runs on one device")
        if self.val_path:
            self.val_samples = read_texts(self.val_path)[:self.val_limit]
        if stage == "fit":
            if not self.train_path:
                raise UserError("data.train_path: needed for fit (traces for star, texts for quietstar)")
            self.train_samples = read_texts(self.train_path)[:self.train_limit]
            if not self.train_samples:
                raise DataError(f"{self.train_path}: no training samples")
        if stage == "predict":
            path = self.predict_path or self.val_path
            if not path:
                raise UserError("data.predict_path (or data.val_path): needed for predict")
            self.predict_samples = read_texts(path)[:self.val_limit]

    def train_dataloader(self) -> SampleBatches:
        return SampleBatches(self.train_samples, self.batch_size, shuffle=True, seed=self.seed)

    def val_dataloader(self) -> SampleBatches | list:
        return SampleBatches(self.val_samples, self.val_batch_size, shuffle=False) if self.val_samples else []

    def predict_dataloader(self) -> SampleBatches:
        return SampleBatches(self.predict_samples, self.val_batch_size, shuffle=False)


REQUIRED_ARTIFACTS = ("config.yaml", "checkpoints/last.ckpt", "metrics.jsonl", "baked_model/config.json")


def fit_main(argv: list[str]):
    """`lab quietstar fit|validate|predict ...`: the LightningCLI stage (returns the LabCLI)."""
    return run_stage_cli(QuietStarModule, BakeDataModule, "quietstar", argv, required_artifacts=REQUIRED_ARTIFACTS)
