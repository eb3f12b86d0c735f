"""Packed token files for pretraining, and the LightningDataModule that serves them with exact resume.

    lab data pack --tokenizer data/tokenizer/lab --input data/corpus/train.txt --output data/packed/train.bin

File layout. ``PATH.bin`` holds the token ids of every document back to back, little-endian
``uint16`` while every id fits (vocabulary <= 65536) and ``uint32`` beyond. ``PATH.bin.json`` is its
header::

    {"format": "lightning_lab.packed", "version": 1, "dtype": "uint16", "num_tokens": 123456,
     "num_documents": 2000, "skipped_blank_lines": 0, "vocab_size": 512,
     "tokenizer_fingerprint": "3f0c...", "tokenizer_path": "/abs/data/tokenizer/lab",
     "source": "/abs/data/corpus/train.txt", "append_eos": true}

A document is one non-blank line of the input (blank lines are skipped and counted). It is
encoded with the tokenizer's own special tokens, i.e. exactly as ``tokenizer(line)`` encodes a
prompt at inference (the lab tokenizer puts BOS in front), then followed by EOS when
``--append-eos 1``. Every reader checks the header: a missing or malformed header, a file whose
size disagrees with it, or a tokenizer with another fingerprint is an error naming the files.

Training batches. `PackedDataset(path, seq_len)` cuts the token stream into non-overlapping
windows of ``seq_len + 1`` tokens (stride ``seq_len``) and returns ``(input_ids, labels)``, two
LongTensors of length ``seq_len`` with ``labels[t] == input_ids[t + 1]`` of the stream: the labels
are already shifted. Do not pass them as ``labels=`` to a Hugging Face model, which shifts again;
use ``F.cross_entropy(logits.flatten(0, 1), labels.flatten())`` (or ``shift_labels=``).

`PackedDataModule` trains on an endless stream of batches: data epoch ``e`` is a permutation of the
windows drawn with ``torch.Generator().manual_seed(seed + e)``, cut into full batches (the windows
left over at the end of an epoch are skipped), and the epochs follow each other without end, so
Lightning sees one unending epoch: set ``max_steps`` and an integer ``val_check_interval``.
Batch ``b`` of the stream (counted from the start of training) is fully determined by
``(seed, batch_size, b)``, which is what makes resume exact.

Resume. The position saved in a checkpoint is the number of batches training has consumed, not
how far the sampler got: a DataLoader (and Lightning's own prefetch of one batch) fetches ahead,
so the sampler is always ahead of the training step. In a Trainer, the count is the fit loop's
``batch_progress.total.ready`` (batches handed to ``training_step``, restored with the loops); the
DataModule's ``state_dict()`` stores it (Lightning puts DataModule state into every checkpoint) and
every train iteration starts at that count, so ``--ckpt_path last`` continues with exactly the
next batch. Outside a Trainer the count is what the train loader has yielded, which is exact with
``num_workers=0`` (a DataLoader without workers fetches nothing ahead). Loading a state saved with
another seed, batch size, sequence length or train file is an error, since batch ``b`` would be
different data.

Validation uses the first ``val_batches`` batches of the val file in file order (all when None).
``lab pretrain predict`` continues the prompts of ``prompts`` (a text file, one prompt per non-blank
line, id ``<file stem>-<line number>``), ``batch_size`` at a time.

Several processes (DDP, ``--trainer.devices 2``). ``batch_size`` is per process, as everywhere in
Lightning: stream batch b is a global batch of ``world_size * batch_size`` windows, and rank r trains
on its r-th slice, so the ranks see different windows and together cover what one process with a
``world_size`` times larger batch would. A data epoch then holds ``num_windows // (world_size *
batch_size)`` steps. Lightning must not put its own DistributedSampler in front (it cannot inside a
custom batch sampler): ``lab pretrain`` sets ``trainer.use_distributed_sampler: false``. Every rank
validates on the same val batches. Resuming with another number of processes is an error (batch b
would be other data).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from lightning_lab.data.io import DataError, read_lines, write_json_atomic
from lightning_lab.errors import check_input_file
from lightning_lab.data.tokenizer import load_tokenizer, tokenizer_fingerprint

HEADER_FORMAT = "lightning_lab.packed"
HEADER_VERSION = 1
HEADER_KEYS = ("dtype", "num_tokens", "vocab_size", "tokenizer_fingerprint", "tokenizer_path", "source")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
UINT16_MAX_VOCAB = 2**16  # ids 0..65535 fit in uint16


def header_path(bin_path: str | Path) -> Path:
    return Path(f"{bin_path}.json")


# ---------------------------------------------------------------------------------------------
# Writing


def pack(tokenizer_path: str | Path, input_path: str | Path, output_path: str | Path,
         append_eos: bool = True, lines_per_batch: int = 4096) -> dict:
    """Tokenize `input_path` line by line into `output_path` (+ header); returns the header."""
    tokenizer_path, input_path, output_path = Path(tokenizer_path), Path(input_path), Path(output_path)
    check_input_file(input_path, "--input")
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = len(tokenizer)
    dtype_name = "uint16" if vocab_size <= UINT16_MAX_VOCAB else "uint32"
    dtype = DTYPES[dtype_name]
    if append_eos and tokenizer.eos_token_id is None:
        raise DataError(f"{tokenizer_path}: tokenizer has no EOS token; pack with --append-eos 0")

    output_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = output_path.with_name(output_path.name + ".tmp")
    num_tokens = num_documents = skipped_blank = 0
    try:
        with temporary.open("wb") as out:
            for lines in _batched_lines(input_path, lines_per_batch):
                documents = [line for line in lines if line.strip()]
                skipped_blank += len(lines) - len(documents)
                if not documents:
                    continue
                ids = tokenizer(documents)["input_ids"]
                if append_eos:
                    ids = [document + [tokenizer.eos_token_id] for document in ids]
                flat = np.fromiter((token for document in ids for token in document), dtype=dtype)
                flat.tofile(out)
                num_tokens += len(flat)
                num_documents += len(documents)
    except BaseException:
        temporary.unlink(missing_ok=True)  # a failed pack leaves nothing behind
        raise
    if num_documents == 0:
        temporary.unlink()
        raise DataError(f"{input_path}: no text to pack (every line is blank)")

    header = {
        "format": HEADER_FORMAT, "version": HEADER_VERSION, "dtype": dtype_name,
        "num_tokens": num_tokens, "num_documents": num_documents, "skipped_blank_lines": skipped_blank,
        "vocab_size": vocab_size, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "tokenizer_path": str(tokenizer_path.resolve()), "source": str(input_path.resolve()),
        "append_eos": bool(append_eos),
    }
    # Old header out first: a crash between the two replaces leaves a file without header (an
    # error on read), never new tokens under an old header.
    header_path(output_path).unlink(missing_ok=True)
    os.replace(temporary, output_path)
    write_json_atomic(header_path(output_path), header)
    return header


def _batched_lines(path: Path, size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for _, line in read_lines(path):
        batch.append(line)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# Reading


def read_header(bin_path: str | Path) -> dict:
    """The header of a packed file, checked against the file's size."""
    bin_path = Path(bin_path)
    path = header_path(bin_path)
    hint = "pack it with `lab data pack --tokenizer DIR --input TXT --output " + str(bin_path) + "`"
    if not bin_path.is_file():
        raise DataError(f"{bin_path}: no such packed token file; {hint}")
    if not path.is_file():
        raise DataError(f"{bin_path}: header {path} is missing, so its dtype and tokenizer are unknown; {hint}")
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed packed header ({e}); {hint}") from None
    if not isinstance(header, dict) or header.get("format") != HEADER_FORMAT:
        raise DataError(f"{path}: not a {HEADER_FORMAT} header; {hint}")
    missing = [key for key in HEADER_KEYS if key not in header]
    if missing:
        raise DataError(f"{path}: header lacks {missing}; {hint}")
    if header["dtype"] not in DTYPES:
        raise DataError(f"{path}: dtype {header['dtype']!r} is not one of {list(DTYPES)}")
    expected_bytes = header["num_tokens"] * DTYPES[header["dtype"]].itemsize
    actual_bytes = bin_path.stat().st_size
    if actual_bytes != expected_bytes:
        raise DataError(f"{bin_path}: {actual_bytes} bytes, but header {path} says {header['num_tokens']} "
                        f"{header['dtype']} tokens ({expected_bytes} bytes); re-pack it")
    return header


def check_tokenizer(bin_path: str | Path, tokenizer, tokenizer_path: str | Path) -> dict:
    """The header of `bin_path`, after checking it was packed with `tokenizer` (loaded from `tokenizer_path`)."""
    header = read_header(bin_path)
    fingerprint = tokenizer_fingerprint(tokenizer)
    if header["tokenizer_fingerprint"] != fingerprint:
        raise DataError(
            f"{bin_path} was packed with tokenizer {header['tokenizer_path']} (fingerprint "
            f"{header['tokenizer_fingerprint']}), but the tokenizer given is {tokenizer_path} (fingerprint "
            f"{fingerprint}); re-pack {header['source']} with this tokenizer or pass the one it was packed with")
    return header


class PackedDataset(Dataset):
    """Non-overlapping windows of a packed file: item i is (input_ids, labels) = tokens[i*T : i*T+T+1] shifted by one."""

    def __init__(self, path: str | Path, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.path = Path(path)
        self.seq_len = seq_len
        self.header = read_header(self.path)
        self.num_windows = (self.header["num_tokens"] - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(f"{self.path}: {self.header['num_tokens']} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self._tokens: np.memmap | None = None  # opened on first use, so each DataLoader worker maps its own

    @property
    def tokens(self) -> np.memmap:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=DTYPES[self.header["dtype"]], mode="r",
                                     shape=(self.header["num_tokens"],))
        return self._tokens

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} out of range for {self.num_windows} windows of {self.path}")
        start = index * self.seq_len
        window = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Full global batches (``world_size * batch_size`` items) in one data epoch; the rest is left out."""
    return num_samples // (batch_size * world_size)


class EpochShuffleBatchSampler(Sampler[list[int]]):
    """Endless batches of indices into `num_samples` items, reshuffled every data epoch.

    Data epoch e is ``torch.randperm(num_samples)`` under a generator seeded with ``seed + e``, cut
    into ``num_samples // (world_size * batch_size)`` full global batches; stream batch b is global batch
    ``b % batches_per_epoch`` of epoch ``b // batches_per_epoch``, and this process (``rank``) yields its
    ``rank``-th slice of ``batch_size`` indices. Each iteration starts at ``start_batch()``, read when the
    iteration begins, and ``next_batch`` is the stream position after the batch last yielded.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, start_batch: Callable[[], int],
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of the {world_size} processes")
        self.batches_per_epoch = batches_per_epoch(num_samples, batch_size, world_size)
        if self.batches_per_epoch < 1:
            processes = f" on each of {world_size} processes" if world_size > 1 else ""
            raise ValueError(f"{num_samples} samples cannot fill one batch of {batch_size}{processes}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.start_batch = start_batch
        self.rank, self.world_size = rank, world_size
        self.next_batch: int | None = None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start_batch()
        epoch, order = None, None
        while True:
            batch_epoch, index = divmod(position, self.batches_per_epoch)
            if batch_epoch != epoch:
                epoch, order = batch_epoch, self.epoch_order(batch_epoch)
            position += 1
            self.next_batch = position
            start = (index * self.world_size + self.rank) * self.batch_size
            yield order[start : start + self.batch_size].tolist()


class PackedDataModule(L.LightningDataModule):
    """Train/val packed files checked against one tokenizer; endless seeded batches with exact resume.

    `tokenizer` is the tokenizer directory; `self.tokenizer` holds it loaded and `self.vocab_size`
    is ``len(tokenizer)`` (size the model's embeddings with it).
    """

    def __init__(self, train_path: str, val_path: str, tokenizer: str, seq_len: int = 256, batch_size: int = 8,
                 seed: int = 0, num_workers: int = 0, val_batches: int | None = None, prompts: str | None = None):
        super().__init__()
        self.train_path, self.val_path, self.tokenizer_path = train_path, val_path, tokenizer
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.num_workers, self.val_batches = num_workers, val_batches
        self.prompts = prompts
        # Check everything now, so a wrong value, path or tokenizer fails before a model is built.
        for name, value, least in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1),
                                   ("num_workers", num_workers, 0), ("val_batches", val_batches, 1)):
            if value is not None and value < least:  # val_batches None: every validation batch
                raise DataError(f"data.{name} must be >= {least}, got {value}")
        self.tokenizer = load_tokenizer(tokenizer)
        self.vocab_size = len(self.tokenizer)
        for path in (train_path, val_path):
            check_tokenizer(path, self.tokenizer, tokenizer)
        self.train_dataset = PackedDataset(train_path, seq_len)
        self.val_dataset = PackedDataset(val_path, seq_len)
        if len(self.train_dataset) < batch_size:
            raise DataError(f"{train_path}: {len(self.train_dataset)} windows of {seq_len + 1} tokens, "
                            f"fewer than one batch of {batch_size}")
        self._resume_batch = 0  # set by load_state_dict
        self._train_sampler: EpochShuffleBatchSampler | None = None

    @property
    def batches_consumed(self) -> int:
        """Training batches consumed since the start of training: where the next batch comes from."""
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == "fit":
            return trainer.fit_loop.epoch_loop.batch_progress.total.ready
        if self._train_sampler is not None and self._train_sampler.next_batch is not None:
            return self._train_sampler.next_batch
        return self._resume_batch

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        self._train_sampler = EpochShuffleBatchSampler(len(self.train_dataset), self.batch_size, self.seed,
                                                       start_batch=lambda: self.batches_consumed, rank=rank,
                                                       world_size=self.world_size)
        return DataLoader(self.train_dataset, batch_sampler=self._train_sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        dataset = self.val_dataset
        if self.val_batches is not None:
            dataset = Subset(dataset, range(min(len(dataset), self.val_batches * self.batch_size)))
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        """Batches of (id, prompt) from the `prompts` file."""
        if self.prompts is None:
            raise DataError("data.prompts=None: predict needs a text file of prompts, one per line")
        path = check_input_file(self.prompts, "data.prompts")
        lines = [(f"{path.stem}-{number}", line) for number, line in read_lines(path) if line.strip()]
        return DataLoader(lines, batch_size=self.batch_size, collate_fn=list)  # batches: lists of (id, prompt)

    def _order_settings(self) -> dict:
        """What fixes the data behind stream batch b; a resumed run must match it."""
        return {"seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "train_tokens": self.train_dataset.header["num_tokens"],
                "tokenizer_fingerprint": self.train_dataset.header["tokenizer_fingerprint"],
                "world_size": self.world_size}

    def state_dict(self) -> dict:
        consumed = self.batches_consumed
        epoch, batch_in_epoch = divmod(consumed, batches_per_epoch(len(self.train_dataset), self.batch_size,
                                                                   self.world_size))
        return {"batches_consumed": consumed, "epoch": epoch, "batch_in_epoch": batch_in_epoch, **self._order_settings()}

    def load_state_dict(self, state_dict: dict) -> None:
        settings = self._order_settings()
        stored = {"world_size": 1, **state_dict}  # checkpoints from before DDP sharding were single-process
        changed = {key: (stored.get(key), value) for key, value in settings.items() if stored.get(key) != value}
        if changed:
            details = ", ".join(f"{key}: saved {saved!r}, now {now!r}" for key, (saved, now) in changed.items())
            raise DataError(f"cannot resume the batch order of {self.train_path}: data settings differ from the "
                             f"checkpoint ({details}); resume with the settings it was trained with")
        self._resume_batch = int(state_dict["batches_consumed"])
        if self._train_sampler is not None:
            self._train_sampler.next_batch = None  # the next iteration starts at the restored position
