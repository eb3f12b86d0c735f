"""Shared fixtures: a tiny random llama with a real (small, byte-level) tokenizer, and data paths."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

# Spinning OpenMP threads slow small steps 10-80x when the 2 cores are shared (e.g. with a subprocess).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402  (after OMP_WAIT_POLICY, which is read when torch loads OpenMP)

# Tests never reach a hub; a hub id must fail fast rather than hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))
from lightning.pytorch import Callback  # noqa: E402  (after HF_HUB_OFFLINE, which huggingface_hub reads on import)



class SigintAtStep(Callback):
    """Sends this process a real SIGINT once `step` optimizer steps are done (GracefulPause must catch it).
    Stages take it on the command line: --trainer.callbacks+=conftest.SigintAtStep --trainer.callbacks.step=N
    (and ``--trainer.callbacks.rank=R``: only in the DDP process of global rank R)."""

    def __init__(self, step: int, rank: int | None = None):
        self.step = step
        self.rank = rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), signal.SIGINT)


class RecordBatches(Callback):
    """Appends each training batch's window starts (the first 4 input ids of every row) to
    ``<run dir>/batches.rank<R>.jsonl``, one line per step: which data each DDP rank trained on."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        path = Path(trainer.default_root_dir) / f"batches.rank{trainer.global_rank}.jsonl"
        with path.open("a") as file:
            file.write(json.dumps({"step": trainer.global_step, "rows": batch[0][:, :4].tolist()}) + "\n")


SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer():
    """A byte-level BPE trained in milliseconds on a few lines, wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["Natalia sold clips to 48 of her friends in April.", "The answer is 72.",
              "What is 2 + 3? It is 5.", "user assistant system question answer"] * 20
    tokenizer.train_from_iterator(corpus, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>",
                                      eos_token="<|im_end|>", pad_token="<pad>")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM and its tokenizer saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lab_gpt_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """A tiny lab GPT with mHC streams and the tiny llama's tokenizer, saved as a HF directory."""
    from transformers import AutoTokenizer

    from lightning_lab.models.gpt import LabGPTConfig, LabGPTForCausalLM

    out = tmp_path_factory.mktemp("tiny_lab_gpt")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    torch.manual_seed(0)
    model = LabGPTForCausalLM(LabGPTConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, mhc={"enabled": True}, initializer_range=0.1,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def gsm8k_path() -> Path:
    if not SHARED_GSM8K.is_file():
        pytest.skip(f"GSM8K train file not found at {SHARED_GSM8K}")
    return SHARED_GSM8K
