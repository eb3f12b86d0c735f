import json
import time
from pathlib import Path

import pytest
import torch

from lightning_lab.data.benchmarks import load_benchmark
from lightning_lab.eval.metrics import extract_gsm8k_answer
from lightning_lab.models.loading import ModelLoadError, load_causal_lm, resolve_dtype


def test_tiny_llama_loads_from_directory(tiny_llama_dir):
    loaded = load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32")
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.dtype == torch.float32 and next(loaded.model.parameters()).dtype == torch.float32
    assert not loaded.model.training
    ids = loaded.tokenizer("The answer is 72.", return_tensors="pt").input_ids
    assert loaded.model(ids).logits.shape == (1, ids.shape[1], len(loaded.tokenizer))


def test_attn_implementation_is_selectable(tiny_llama_dir):
    loaded = load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32", attn_implementation="eager")
    assert loaded.model.config._attn_implementation == "eager"


def test_bf16_is_honoured(tiny_llama_dir):
    loaded = load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="bf16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_unknown_dtype_names_the_choices():
    with pytest.raises(ValueError, match="fp32"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_missing_gguf_names_its_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError, match=str(missing)):
        load_causal_lm(str(missing), device="cpu", dtype="fp32")


def test_corrupt_gguf_names_its_path(tmp_path):
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        load_causal_lm(str(corrupt), device="cpu", dtype="fp32")


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_causal_lm(str(tmp_path), device="cpu", dtype="fp32")


def test_cached_hub_id_loads_from_the_local_cache(tiny_llama_dir, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    repo = tmp_path / "hub" / "models--lab--tiny"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from_cache = load_causal_lm("lab/tiny", device="cpu", dtype="fp32")
    from_directory = load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32")
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(from_cache.model(ids).logits, from_directory.model(ids).logits, atol=0, rtol=0)


def test_unreachable_hub_id_fails_fast_and_says_what_to_pass(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="smollm2-135m") as error:
        load_causal_lm("someone/not-cached-model", device="cpu", dtype="fp32")
    assert time.perf_counter() - start < 10
    assert "local" in str(error.value) and ".gguf" in str(error.value)


@pytest.mark.slow
def test_smollm2_alias_answers_a_gsm8k_question(gsm8k_path):
    loaded = load_causal_lm("smollm2-135m", device="cpu", dtype="bf16")
    assert 130e6 < loaded.num_parameters < 140e6
    sample = load_benchmark(str(gsm8k_path), split="all", limit=None)[0]
    messages = [{"role": "user", "content": sample.prompt}]
    ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"]
    with torch.no_grad():
        out = loaded.model.generate(ids, max_new_tokens=96, do_sample=False)
    answer = loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    # A 135M model often gets the arithmetic wrong; what we check is that it reads the question
    # and answers with a number we can extract.
    assert extract_gsm8k_answer(answer) is not None, answer


# ---- lab checkpoints load with weights_only=True: a checkpoint cannot run code ------------------


class WritesMarker:
    """Unpickling this object calls open(marker, "w"): a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_lab_run(run_dir: Path, tokenizer_dir: Path, extra: dict | None = None) -> Path:
    """A lab run as `lab pretrain` leaves it (model_config.json, tokenizer/, checkpoints/last.ckpt), holding a
    tiny lab GPT; `extra` entries are added to the checkpoint. Returns the checkpoint's path."""
    from transformers import AutoTokenizer

    from lightning_lab.models.gpt import LabGPTConfig, LabGPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = LabGPTForCausalLM(LabGPTConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "model_config.json").write_text(model.config.to_json_string())
    tokenizer.save_pretrained(run_dir / "tokenizer")
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 1,
                **(extra or {})}, checkpoint)
    return checkpoint


@pytest.fixture()
def poisoned(tiny_llama_dir, tmp_path) -> tuple[Path, Path]:
    """(a lab checkpoint that also carries a WritesMarker, the marker file it would create)."""
    marker = tmp_path / "code_ran"
    return write_lab_run(tmp_path / "run", tiny_llama_dir, {"payload": WritesMarker(marker)}), marker


def test_a_plain_lab_checkpoint_loads(tiny_llama_dir, tmp_path):
    checkpoint = write_lab_run(tmp_path / "run", tiny_llama_dir)
    loaded = load_causal_lm(str(checkpoint), device="cpu", dtype="fp32")
    assert type(loaded.model).__name__ == "LabGPTForCausalLM"


def test_poisoned_checkpoint_as_model_spec_runs_nothing(poisoned):
    checkpoint, marker = poisoned
    with pytest.raises(ModelLoadError, match=rf"checkpoint {checkpoint}: refused to load, it would call \S*open"):
        load_causal_lm(str(checkpoint), device="cpu", dtype="fp32")
    assert not marker.exists()


@pytest.mark.parametrize("command", ["export", "adapter merge --base", "sft fit --model.model"])
def test_poisoned_checkpoint_on_the_command_line_runs_nothing(command, poisoned, tiny_llama_dir, tmp_path, capsys):
    from lightning_lab.cli import main

    checkpoint, marker = poisoned
    if command == "export":
        argv = ["export", "--ckpt", str(checkpoint), "--out", str(tmp_path / "out")]
    elif command.startswith("adapter"):  # an adapter whose recorded base is fine; --base names the poisoned file
        from safetensors.torch import save_file

        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_llama_dir)}))
        save_file({"lora_A": torch.zeros(1)}, adapter / "adapter_model.safetensors")
        argv = ["adapter", "merge", "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--base", str(checkpoint)]
    else:
        data = tmp_path / "pairs.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(8)))
        argv = ["sft", "fit", "--model.model", str(checkpoint), "--data.path", str(data), "--data.val_split", "null",
                "--run.root", str(tmp_path / "runs"), "--trainer.max_steps", "1", "--trainer.enable_progress_bar",
                "false", "--trainer.logger", "false"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(checkpoint) in err and "refused to load" in err, err
    assert not marker.exists() and not (tmp_path / "out").exists()
