"""Retention (`lab eval retention`): perplexity of two models on the same packed windows, the paired delta."""

from __future__ import annotations

import json

import pytest

from lightning_lab.cli import main as lab
from lightning_lab.data.packed import pack
from lightning_lab.eval.retention import RetentionConfig, retention
from lightning_lab.errors import UserError


@pytest.fixture(scope="module")
def val_bin(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("retention")
    text = root / "val.txt"
    text.write_text("".join(f"What is {i} + {i + 2}? It is {2 * i + 2}. The answer is {i}.\n" for i in range(60)))
    pack(tiny_llama_dir, text, root / "val.bin")
    return root / "val.bin"


@pytest.fixture(scope="module")
def other_model_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny llama's architecture and tokenizer with other random weights: a model that differs."""
    from transformers import AutoTokenizer

    from tests.conftest import build_tiny_llama

    out = tmp_path_factory.mktemp("other_llama")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    build_tiny_llama(len(tokenizer), seed=1).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_model_against_itself_has_delta_zero_with_an_interval_containing_zero(tiny_llama_dir, val_bin, tmp_path,
                                                                                   capsys):
    out = tmp_path / "self.json"
    assert lab(["eval", "retention", "--base", str(tiny_llama_dir), "--updated", str(tiny_llama_dir),
                "--val_bin", str(val_bin), "--seq_len", "16", "--batch_size", "4", "--max_batches", "3",
                "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["windows"] == 12 and len(report["base_window_nll"]) == 12
    assert report["delta_nll"] == 0.0 and report["delta_perplexity"] == 0.0
    low, high = report["delta_nll_interval"]
    assert low <= 0.0 <= high
    assert report["base_perplexity"] > 1.0
    assert "12 windows" in capsys.readouterr().out
    assert lab(["eval", "retention", "--base", str(tiny_llama_dir), "--updated", str(tiny_llama_dir),
                "--val_bin", str(val_bin), "--out", str(out)]) == 2  # never overwritten


def test_another_model_gets_its_own_perplexity_on_the_same_windows(tiny_llama_dir, other_model_dir, val_bin, tmp_path):
    import math

    report = retention(RetentionConfig(base=str(tiny_llama_dir), updated=str(other_model_dir), val_bin=str(val_bin),
                                       out=str(tmp_path / "r.json"), seq_len=16, batch_size=4, max_batches=2,
                                       device="cpu"))
    deltas = [u - b for u, b in zip(report["updated_window_nll"], report["base_window_nll"])]
    assert report["delta_nll"] == pytest.approx(sum(deltas) / len(deltas))
    assert report["delta_nll"] != 0.0
    assert report["perplexity_ratio"] == pytest.approx(report["updated_perplexity"] / report["base_perplexity"])
    low, high = report["delta_nll_interval"]
    assert low <= report["delta_nll"] <= high and math.exp(low) == pytest.approx(report["perplexity_ratio_interval"][0])


def test_bad_inputs_are_named_before_a_model_loads(tmp_path, val_bin):
    with pytest.raises(UserError, match="val_bin"):
        RetentionConfig(base="x", updated="y", val_bin=str(tmp_path / "missing.bin"), out=str(tmp_path / "o.json"))
    with pytest.raises(UserError, match="updated"):
        RetentionConfig(base="x", val_bin=str(val_bin), out=str(tmp_path / "o.json"))
    with pytest.raises(UserError, match="seq_len"):
        RetentionConfig(base="x", updated="y", val_bin=str(val_bin), out=str(tmp_path / "o.json"), seq_len=0)
