"""`lab export`: write a lab checkpoint as a Hugging Face directory.

    lab export --ckpt runs/pretrain/tiny/checkpoints/last.ckpt --out checkpoints/gpt_tiny [--dtype fp32]

The directory holds ``config.json``, ``generation_config.json``, ``model.safetensors`` and the
tokenizer files, so ``load_causal_lm(DIR)`` and ``AutoModelForCausalLM.from_pretrained(DIR)``
(after ``import lightning_lab.models.gpt``, which registers ``lab_gpt``) load it, and the
directory no longer depends on the run directory or the tokenizer path the run used.
``--out`` must not exist yet (or be an empty directory): an export never overwrites.
"""

from __future__ import annotations

from pathlib import Path

from lightning_lab.errors import ArgumentParser, check_input_file, check_new_output_dir
from lightning_lab.models.loading import load_causal_lm, save_model_dir


def export_checkpoint(ckpt: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Load `ckpt` (via `load_causal_lm`) and save model + tokenizer to `out`; returns `out`."""
    loaded = load_causal_lm(str(ckpt), device="cpu", dtype=dtype)
    tokenizer = loaded.tokenizer
    # generate() stops at EOS and pads with PAD without being told each time
    loaded.model.generation_config.eos_token_id = tokenizer.eos_token_id
    loaded.model.generation_config.pad_token_id = tokenizer.pad_token_id
    return save_model_dir(loaded.model, tokenizer, out)


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="lab export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True,
                        help="a lab checkpoint (.ckpt), e.g. runs/pretrain/NAME/checkpoints/last.ckpt")
    parser.add_argument("--out", required=True, help="output directory (must not exist yet, or be empty)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                        help="weights dtype (default fp32)")
    args = parser.parse_args(argv)
    check_input_file(args.ckpt, "--ckpt")
    check_new_output_dir(args.out, "--out")
    out = export_checkpoint(args.ckpt, args.out, args.dtype)
    print(f"wrote {out}/ (model.safetensors, config.json, tokenizer) from {args.ckpt}")
    return 0
