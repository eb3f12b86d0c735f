"""Pretraining data: synthetic corpus, SentencePiece tokenizer, packed token files, resumable DataModule."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_lab.cli import main as lab
from lightning_lab.data.corpus import (DIFFICULTY_SIZES, TASK_FAMILIES, CorpusConfig, generate_lines, make_task,
                                       parse_line, prompt_for, solve, write_corpus)
from lightning_lab.data.io import DataError

ODD_TEXTS = ["Q: reverse \"abc\" A: cba", " leading and  double  spaces ", "tab\there, new\nline",
             "ünïcödé, 中文 and 😀", "digits 1234567890 and <angle> brackets", "", "x<|startofthought|>y<|endofthought|>"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Corpus, BPE tokenizer and packed train/val files, built through `lab data ...`."""
    root = tmp_path_factory.mktemp("pretrain_data")
    assert lab(["data", "corpus", "--seed", "0", "--train-lines", "3000", "--val-lines", "300",
                "--train-out", str(root / "train.txt"), "--val-out", str(root / "val.txt")]) == 0
    assert lab(["data", "tokenizer", "--input", str(root / "train.txt"), "--model-prefix", str(root / "tok"),
                "--vocab-size", "400", "--model-type", "bpe"]) == 0
    for split in ("train", "val"):
        assert lab(["data", "pack", "--tokenizer", str(root / "tok"), "--input", str(root / f"{split}.txt"),
                    "--output", str(root / f"{split}.bin"), "--append-eos", "1"]) == 0
    return root


# ---------------------------------------------------------------------------------------------
# Corpus


def test_corpus_is_byte_identical_for_a_seed_and_differs_across_seeds(tmp_path):
    def build(seed: int, name: str) -> tuple[bytes, bytes]:
        config = CorpusConfig(seed=seed, train_lines=500, val_lines=100)
        paths = write_corpus(config, tmp_path / f"{name}.train.txt", tmp_path / f"{name}.val.txt")
        return paths["train"].read_bytes(), paths["val"].read_bytes()

    first, again, other = build(0, "a"), build(0, "b"), build(1, "c")
    assert first == again
    assert first[0] != other[0] and first[1] != other[1]
    assert first[0][: len(first[1])] != first[1]  # val is its own stream, not a prefix of train
    assert first[0].count(b"\n") == 500 and first[1].count(b"\n") == 100


def test_every_task_line_has_the_answer_its_question_implies(data_dir):
    lines = (data_dir / "train.txt").read_text().splitlines()
    tasks = [parse_line(line) for line in lines]
    task_lines = [task for task in tasks if task is not None]
    assert 0.6 < len(task_lines) / len(lines) < 0.8  # filler_fraction 0.3
    for question, answer in task_lines:
        assert answer and solve(question) == answer, (question, answer)
    prose = [line for line, task in zip(lines, tasks) if task is None]
    assert prose and all("A:" not in line for line in prose)


@pytest.mark.parametrize("family", TASK_FAMILIES)
def test_make_task_answers_match_solve_at_every_difficulty(family):
    rng = random.Random(family)
    for difficulty in (1, 2, 3):
        for _ in range(30):
            question, answer = make_task(family, difficulty, rng)
            assert solve(question) == answer
            assert parse_line(f"{prompt_for(question)} {answer}") == (question, answer)
    # difficulty sets the size: e.g. the operands of add at level 3 have 3 digits
    if family == "add":
        question, _ = make_task("add", 3, random.Random(0))
        assert all(len(word) == 3 for word in question.rstrip("?").split() if word.isdigit())
    if family == "reverse":
        question, answer = make_task("reverse", 2, random.Random(0))
        assert len(answer) == DIFFICULTY_SIZES["reverse"][1]


def test_corpus_config_can_hold_out_families_and_difficulties():
    config = CorpusConfig(seed=3, filler_fraction=0.0, families=("mul",), difficulties=(1,))
    for line in generate_lines(config, "train", 200):
        question, answer = parse_line(line)
        a, b = (int(w.rstrip("?")) for w in question.split() if w.rstrip("?").isdigit())
        assert question.startswith("what is") and " times " in question and a < 10 and b < 10
    with pytest.raises(ValueError, match="unknown task families"):
        CorpusConfig(families=("divide",))
    with pytest.raises(ValueError, match="difficulty"):
        make_task("add", 4, random.Random(0))
    with pytest.raises(ValueError, match="not a question"):
        solve("what is the meaning of life?")


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_loads_with_autotokenizer_and_round_trips_text(data_dir):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from lightning_lab.data.tokenizer import THOUGHT_TOKENS

    tokenizer = AutoTokenizer.from_pretrained(data_dir / "tok")
    sp = spm.SentencePieceProcessor(model_file=str(data_dir / "tok.model"))
    assert len(tokenizer) == 400
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2, 3)
    assert [tokenizer.convert_tokens_to_ids(t) for t in THOUGHT_TOKENS] == [4, 5]

    lines = (data_dir / "val.txt").read_text().splitlines()[:100]
    for text in lines + ODD_TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>" + text
        assert tokenizer.unk_token_id not in ids  # byte fallback: everything encodes
        if "<|" not in text:  # special-token text is one token in transformers, spelled out by SentencePiece
            assert ids[1:] == sp.encode(text), text
            assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # a thought token is one id; a completion tokenized alone matches its tokens in context
    assert tokenizer("a<|startofthought|>b", add_special_tokens=False)["input_ids"][1] == 4
    full = tokenizer("Q: what is 2 plus 3? A: 5", add_special_tokens=False)["input_ids"]
    prompt = tokenizer("Q: what is 2 plus 3? A:", add_special_tokens=False)["input_ids"]
    completion = tokenizer(" 5", add_special_tokens=False)["input_ids"]
    assert full == prompt + completion


def test_unigram_tokenizer_round_trips_and_errors_name_the_input(data_dir, tmp_path):
    from lightning_lab.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_tokenizer

    directory = train_tokenizer(data_dir / "train.txt", tmp_path / "uni", vocab_size=360, model_type="unigram")
    tokenizer = load_tokenizer(directory)
    for text in ODD_TEXTS[:-1]:
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    assert tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(load_tokenizer(data_dir / "tok"))
    with pytest.raises(ValueError, match=r"train\.txt.*Vocabulary size too high"):
        train_tokenizer(data_dir / "train.txt", tmp_path / "huge", vocab_size=100_000, model_type="unigram")
    with pytest.raises(DataError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------
# Packed files


def test_pack_writes_uint16_tokens_and_a_header_that_counts_them(data_dir):
    from lightning_lab.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    header = json.loads((data_dir / "train.bin.json").read_text())
    tokenizer = load_tokenizer(data_dir / "tok")
    tokens = np.fromfile(data_dir / "train.bin", dtype="<u2")
    assert header["dtype"] == "uint16" and header["num_tokens"] == len(tokens) > 0
    assert header["num_documents"] == 3000 and header["vocab_size"] == 400
    assert header["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)
    assert header["source"] == str((data_dir / "train.txt").resolve())
    # documents are BOS + line + EOS, back to back
    assert (tokens == tokenizer.eos_token_id).sum() == 3000 and (tokens == tokenizer.bos_token_id).sum() == 3000
    first_line = (data_dir / "train.txt").read_text().splitlines()[0]
    first_document = tokens[: list(tokens).index(tokenizer.eos_token_id) + 1].tolist()
    assert first_document == tokenizer(first_line)["input_ids"] + [tokenizer.eos_token_id]


def test_pack_switches_to_uint32_when_ids_do_not_fit_uint16(data_dir, tmp_path, monkeypatch):
    from lightning_lab.data import packed

    monkeypatch.setattr(packed, "UINT16_MAX_VOCAB", 399)  # stands in for a > 65536-token vocabulary
    header = packed.pack(data_dir / "tok", data_dir / "val.txt", tmp_path / "val32.bin")
    reference = packed.PackedDataset(data_dir / "val.bin", seq_len=16)
    wide = packed.PackedDataset(tmp_path / "val32.bin", seq_len=16)
    assert header["dtype"] == "uint32" and (tmp_path / "val32.bin").stat().st_size == 4 * header["num_tokens"]
    assert header["num_tokens"] == reference.header["num_tokens"]
    assert all(torch.equal(a, b) for a, b in zip(wide[5], reference[5]))


def test_dataset_serves_non_overlapping_shifted_windows(data_dir):
    from lightning_lab.data.packed import PackedDataset

    dataset = PackedDataset(data_dir / "val.bin", seq_len=16)
    tokens = torch.from_numpy(np.fromfile(data_dir / "val.bin", dtype="<u2").astype(np.int64))
    assert len(dataset) == (len(tokens) - 1) // 16
    for index in (0, 1, len(dataset) - 1):
        input_ids, labels = dataset[index]
        assert input_ids.dtype == torch.long and input_ids.shape == labels.shape == (16,)
        assert torch.equal(input_ids, tokens[index * 16 : index * 16 + 16])
        assert torch.equal(labels, tokens[index * 16 + 1 : index * 16 + 17])
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_missing_or_inconsistent_header_is_an_error_naming_the_files(data_dir, tmp_path):
    from lightning_lab.data.packed import PackedDataset

    packed = tmp_path / "val.bin"
    shutil.copy(data_dir / "val.bin", packed)
    with pytest.raises(DataError, match=rf"{packed}.*header {packed}\.json is missing"):
        PackedDataset(packed, seq_len=16)

    header = json.loads((data_dir / "val.bin.json").read_text())
    (tmp_path / "val.bin.json").write_text(json.dumps({**header, "num_tokens": header["num_tokens"] + 1}))
    with pytest.raises(DataError, match=rf"{packed}: .* bytes, but header"):
        PackedDataset(packed, seq_len=16)

    (tmp_path / "val.bin.json").write_text("{not json")
    with pytest.raises(DataError, match="malformed packed header"):
        PackedDataset(packed, seq_len=16)


def test_datamodule_rejects_a_tokenizer_the_files_were_not_packed_with(data_dir, tmp_path):
    from lightning_lab.data.packed import PackedDataModule
    from lightning_lab.data.tokenizer import train_tokenizer

    other = train_tokenizer(data_dir / "train.txt", tmp_path / "other", vocab_size=380)
    with pytest.raises(DataError) as error:
        PackedDataModule(str(data_dir / "train.bin"), str(data_dir / "val.bin"), tokenizer=str(other))
    message = str(error.value)
    assert str(data_dir / "train.bin") in message and str(other) in message and str(data_dir / "tok") in message


# ---------------------------------------------------------------------------------------------
# Batch order and exact resume


def make_datamodule(data_dir: Path, **kwargs):
    from lightning_lab.data.packed import PackedDataModule

    settings = {"seq_len": 16, "batch_size": 4, "seed": 7, **kwargs}
    return PackedDataModule(str(data_dir / "train.bin"), str(data_dir / "val.bin"), str(data_dir / "tok"), **settings)


def take(datamodule, count: int) -> list[torch.Tensor]:
    batches = iter(datamodule.train_dataloader())
    return [next(batches)[0] for _ in range(count)]


def test_batches_are_a_fresh_seeded_permutation_every_epoch(data_dir):
    datamodule = make_datamodule(data_dir)
    per_epoch = len(datamodule.train_dataset) // 4
    index_batches = iter(datamodule.train_dataloader().batch_sampler)
    epochs = [[i for _ in range(per_epoch) for i in next(index_batches)] for _ in range(2)]
    for epoch in epochs:  # each epoch: every window at most once, all but the leftover < batch_size
        assert len(set(epoch)) == len(epoch) == per_epoch * 4
    assert epochs[0] != epochs[1]

    stream = take(datamodule, 3)
    assert torch.equal(stream[0][1], datamodule.train_dataset[epochs[0][1]][0])
    assert all(torch.equal(a, b) for a, b in zip(stream, take(make_datamodule(data_dir), 3)))
    assert not torch.equal(stream[0], take(make_datamodule(data_dir, seed=8), 1)[0])


@pytest.mark.parametrize("consumed", [3, "epoch+1"])
def test_state_dict_resumes_with_exactly_the_next_batch(data_dir, consumed):
    reference = make_datamodule(data_dir)
    per_epoch = len(reference.train_dataset) // 4
    k = per_epoch + 1 if consumed == "epoch+1" else consumed
    uninterrupted = take(reference, k + 2)

    interrupted = make_datamodule(data_dir)
    assert all(torch.equal(a, b) for a, b in zip(take(interrupted, k), uninterrupted))
    state = interrupted.state_dict()
    assert state["batches_consumed"] == k and (state["epoch"], state["batch_in_epoch"]) == divmod(k, per_epoch)

    resumed = make_datamodule(data_dir)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(take(resumed, 2), uninterrupted[k:]))

    with pytest.raises(ValueError, match="batch_size: saved 4, now 2"):
        make_datamodule(data_dir, batch_size=2).load_state_dict(state)


def test_ddp_ranks_train_on_the_slices_of_one_global_batch(data_dir):
    """Two processes with batch_size 4 see, at every step, the two halves of the batch of 8 that one process
    with batch_size 8 sees: disjoint windows, the same data epochs. A state saved by 2 processes does not load
    into 1; a state saved before sharding existed (no world_size) loads as single-process."""
    from lightning_lab.data.packed import EpochShuffleBatchSampler

    num_windows = len(make_datamodule(data_dir).train_dataset)
    single = EpochShuffleBatchSampler(num_windows, 8, seed=7, start_batch=lambda: 0)
    ranks = [EpochShuffleBatchSampler(num_windows, 4, seed=7, start_batch=lambda: 0, rank=r, world_size=2)
             for r in range(2)]
    assert ranks[0].batches_per_epoch == single.batches_per_epoch == num_windows // 8
    steps = single.batches_per_epoch + 2  # into the second data epoch
    streams = [iter(sampler) for sampler in (single, *ranks)]
    for _ in range(steps):
        whole, first, second = (next(stream) for stream in streams)
        assert first + second == whole and not set(first) & set(second)
    with pytest.raises(ValueError, match="rank 2 is not one of the 2 processes"):
        EpochShuffleBatchSampler(num_windows, 4, seed=7, start_batch=lambda: 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="cannot fill one batch of 4 on each of 64 processes"):
        EpochShuffleBatchSampler(100, 4, seed=7, start_batch=lambda: 0, rank=0, world_size=64)

    state = make_datamodule(data_dir).state_dict()
    assert state["world_size"] == 1
    with pytest.raises(ValueError, match="world_size: saved 2, now 1"):
        make_datamodule(data_dir).load_state_dict({**state, "world_size": 2})
    make_datamodule(data_dir).load_state_dict({key: value for key, value in state.items() if key != "world_size"})


def test_trainer_checkpoint_resumes_with_the_next_batch_despite_prefetch(data_dir, tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Embedding(400, 1)
            self.seen: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            input_ids, labels = batch
            self.seen.append(input_ids.clone())
            return self.layer(input_ids).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(max_steps: int, ckpt_path=None, callbacks=()):
        model, datamodule = Recorder(), make_datamodule(data_dir)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=2,
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=bool(callbacks), callbacks=list(callbacks),
                            limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        return model.seen, datamodule

    uninterrupted, _ = fit(max_steps=5)  # 10 batches
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    first_part, datamodule = fit(max_steps=3, callbacks=[checkpoint])
    assert datamodule._train_sampler.next_batch > 6  # the loader ran ahead of training
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=False)
    assert saved["PackedDataModule"]["batches_consumed"] == 4
    rest, _ = fit(max_steps=5, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    assert len(uninterrupted) == 10 and len(rest) == 6
    assert all(torch.equal(a, b) for a, b in zip(first_part[:4] + rest, uninterrupted))


def test_validation_is_fixed_order_and_limited(data_dir):
    datamodule = make_datamodule(data_dir, val_batches=3)
    batches = list(datamodule.val_dataloader())
    assert len(batches) == 3
    assert torch.equal(batches[0][0][1], datamodule.val_dataset[1][0])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, make_datamodule(data_dir, val_batches=3).val_dataloader()))
    with pytest.raises(DataError, match="data.val_batches must be >= 1, got 0"):  # 0 would validate on nothing
        make_datamodule(data_dir, val_batches=0)
