"""LoRA adapters through peft: add them to any causal LM, save them with their base model's spec, merge them.

The SFT and RL stages (and anything else that trains an adapter) use these functions:

    settings = LoraSettings(rank=16, alpha=32)
    model = add_lora(loaded.model, settings)                       # a peft.PeftModel; only LoRA weights train
    save_adapter(model, loaded.tokenizer, "runs/sft/x/adapters/final", base_spec=loaded.spec)
    loaded = load_adapter("runs/sft/x/adapters/final")             # base found from the adapter's config
    merge_adapter("runs/sft/x/adapters/final", "checkpoints/sft-merged")   # one HF dir, base + LoRA

Target modules default per architecture: where the model has llama-style projections (SmolLM2,
Llama, Qwen2, Mistral, the lab GPT) all seven of q_proj, k_proj, v_proj, o_proj, gate_proj,
up_proj, down_proj that exist (so the lab GPT's small mHC mixing layers stay frozen); otherwise
peft's ``"all-linear"``, every ``nn.Linear`` / GPT-2 ``Conv1D`` except the output head (on GPT-2:
c_attn, c_proj, c_fc). Pass names (``--model.lora.target_modules [q_proj,v_proj]``) to narrow it.

The adapter directory is peft's format (``adapter_config.json`` + ``adapter_model.safetensors``)
plus the tokenizer; ``base_model_name_or_path`` in the config holds the lab model spec (an alias
such as ``smollm2-135m``, or an absolute directory), so ``lab adapter merge --adapter DIR --out DIR``
needs no ``--base``. The merged directory is an ordinary Hugging Face model that
``load_causal_lm`` loads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_lab.data.io import read_yaml_or_json
from lightning_lab.errors import ArgumentParser, check_new_output_dir
from lightning_lab.models.loading import (DTYPES, LoadedModel, ModelLoadError, check_safetensors, load_causal_lm,
                                          save_model_dir)

log = logging.getLogger(__name__)


@dataclass
class LoraSettings:
    """LoRA hyper-parameters.

    Args:
        rank: rank r of the update B A (A: r x in, B: out x r).
        alpha: the update is scaled by alpha / rank.
        dropout: dropout on the LoRA branch's input (training only).
        target_modules: module names to adapt; None: the default for the architecture (module docstring).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: default_target_modules(model)


LLAMA_STYLE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def default_target_modules(model: torch.nn.Module) -> list[str] | str:
    """Llama-style projection names where the model has q_proj, else peft's "all-linear" (see module docstring)."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if "q_proj" in leaf_names:
        return [name for name in LLAMA_STYLE_TARGETS if name in leaf_names]
    return "all-linear"


def add_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Wrap `model` in a peft LoRA model: base weights frozen, LoRA weights trainable.

    peft keeps the LoRA weights in fp32 even when the base is bf16 (``autocast_adapter_dtype``),
    so a bf16 base still trains its adapter in full precision.
    """
    from peft import LoraConfig, get_peft_model

    target_modules = settings.target_modules or default_target_modules(model)
    config = LoraConfig(task_type="CAUSAL_LM", r=settings.rank, lora_alpha=settings.alpha,
                        lora_dropout=settings.dropout, target_modules=target_modules)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as error:  # peft's message names the target modules it did not find
        raise ValueError(f"LoRA target_modules={target_modules!r} on {type(model).__name__}: {error}") from error
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA r=%d alpha=%g on %s: %d trainable of %d parameters (%.2f%%)", settings.rank, settings.alpha,
             sorted(peft_model.peft_config["default"].target_modules), trainable, total, 100 * trainable / total)
    return peft_model


def portable_spec(spec: str) -> str:
    """A spec that still resolves from another working directory: existing paths become absolute."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def save_adapter(model: torch.nn.Module, tokenizer, directory: str | Path, base_spec: str) -> Path:
    """Write the LoRA weights (peft format) and the tokenizer; the config records `base_spec`."""
    directory = Path(directory)
    model.peft_config["default"].base_model_name_or_path = portable_spec(base_spec)
    model.save_pretrained(directory, save_embedding_layers=False)  # LoRA never touches the embeddings
    tokenizer.save_pretrained(directory)
    return directory


def check_adapter_dir(adapter_dir: str | Path) -> dict:
    """The adapter's config, once the directory is checked to hold a readable adapter (config and weights):
    a bad adapter is named before any model loads."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ModelLoadError(f"adapter {adapter_dir}: "
                             f"{'is a file, expected a directory' if adapter_dir.exists() else 'no such directory'}")
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"adapter {adapter_dir}: not a LoRA adapter directory (no adapter_config.json)")
    check_safetensors(adapter_dir / "adapter_model.safetensors")
    return read_yaml_or_json(config_file)


def adapter_base_spec(adapter_dir: str | Path) -> str:
    """The base model spec recorded in an adapter directory's adapter_config.json."""
    base = check_adapter_dir(adapter_dir).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{Path(adapter_dir) / 'adapter_config.json'}: no base_model_name_or_path; "
                             "pass the base model spec (--base)")
    return base


def load_adapter(adapter_dir: str | Path, base: str | None = None, device: str | torch.device = "auto",
                 dtype: str | torch.dtype = "auto") -> LoadedModel:
    """The base model (`base`, or the spec recorded in the adapter) with the adapter applied, in eval mode.

    ``loaded.model`` is a peft model: ``with loaded.model.disable_adapter():`` runs the plain base.
    """
    from peft import PeftModel

    if not base:
        base = adapter_base_spec(adapter_dir)  # checks the adapter directory as it reads it
    else:
        check_adapter_dir(adapter_dir)
    loaded = load_causal_lm(base, device=device, dtype=dtype)
    model = PeftModel.from_pretrained(loaded.model, str(adapter_dir)).eval()
    return LoadedModel(model, loaded.tokenizer, loaded.spec, loaded.device, loaded.dtype)


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None,
                  dtype: str = "fp32") -> Path:
    """Fold the LoRA weights into the base (computed in fp32, on the CPU) and save one HF model directory."""
    loaded = load_adapter(adapter_dir, base=base, device="cpu", dtype="fp32")
    merged = loaded.model.merge_and_unload()
    merged = merged.to(DTYPES[dtype])
    out_dir = save_model_dir(merged, loaded.tokenizer, out_dir)
    log.info("merged %s into %s -> %s", adapter_dir, loaded.spec, out_dir)
    return out_dir


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="lab adapter", description="LoRA adapter tools")
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="write base + LoRA as one Hugging Face model directory")
    merge.add_argument("--adapter", required=True, help="adapter directory (runs/<stage>/<name>/adapters/<adapter>)")
    merge.add_argument("--out", required=True, help="output directory for the merged model (new, or empty)")
    merge.add_argument("--base", default=None, help="base model spec (default: the one recorded in the adapter)")
    merge.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of the saved weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_adapter_dir(args.adapter)  # the adapter and the output are checked before the base model loads
    check_new_output_dir(args.out, "--out")
    print(merge_adapter(args.adapter, args.out, base=args.base, dtype=args.dtype))
    return 0
