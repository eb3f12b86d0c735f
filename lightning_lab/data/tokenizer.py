"""Train a SentencePiece tokenizer and save it as a transformers tokenizer directory.

    lab data tokenizer --input data/corpus/train.txt --model-prefix data/tokenizer/lab \\
        --vocab-size 512 --model-type bpe

writes ``data/tokenizer/lab.model`` + ``lab.vocab`` (SentencePiece's own files) and the directory
``data/tokenizer/lab/`` (``tokenizer.json`` + ``tokenizer_config.json``) that
``AutoTokenizer.from_pretrained`` loads offline, so the lab GPT goes through `load_causal_lm` like
any Hugging Face model.

Choices, and why:
- byte_fallback: a character the pieces do not cover is spelled as UTF-8 byte pieces
  ``<0x..>``, so any text encodes and nothing becomes ``<unk>``.
- identity normalisation, extra whitespace kept, no dummy prefix: decoding gives back exactly the
  text that was encoded (``decode(encode(s), skip_special_tokens=True) == s``), and a word after a
  space is the same ``▁word`` piece whether the text is tokenized whole or in pieces (prompt, then
  completion " 42"). The one exception is SentencePiece's own: a literal ``▁`` (U+2581) in the input
  decodes as a space.
- split_digits: numbers are spelled digit by digit, which is what small models need to learn arithmetic.
- fixed special ids: ``<unk>`` 0, ``<s>`` (BOS) 1, ``</s>`` (EOS) 2, ``<pad>`` 3, then the reserved
  `THOUGHT_TOKENS` (Quiet-STaR) as single pieces, then the 256 byte pieces, then learned pieces.
- the transformers tokenizer adds BOS in front of every encoded text (as Llama's does) and never EOS;
  `lab data pack` appends EOS after each line, so prompts at inference look like line starts in training.

The transformers tokenizer is built straight from the SentencePiece pieces and scores (BPE merges
are recovered from the piece ranks), so it needs no protobuf and encodes exactly as SentencePiece
does, apart from literal special-token text such as ``</s>``, which transformers maps to the token.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lightning_lab.data.io import DataError
from lightning_lab.errors import check_input_file

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
THOUGHT_TOKENS: tuple[str, ...] = ("<|startofthought|>", "<|endofthought|>")
MODEL_TYPES = ("bpe", "unigram")


def train_tokenizer(
    input: str | Path,
    model_prefix: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    reserved_tokens: tuple[str, ...] = THOUGHT_TOKENS,
    max_sentences: int = 2_000_000,
    seed: int = 0,
) -> Path:
    """Train SentencePiece on `input` (one sentence per line) and save the transformers tokenizer.

    Returns the directory ``<model_prefix>/``; SentencePiece's files are ``<model_prefix>.model/.vocab``.
    `reserved_tokens` become single, special pieces; `max_sentences` caps how many lines (sampled
    with `seed`) the trainer reads from a large file.
    """
    import sentencepiece as spm

    input = check_input_file(input, "--input")
    if model_type not in MODEL_TYPES:
        raise DataError(f"--model-type must be one of {MODEL_TYPES}, got {model_type!r}")
    if not 0.0 < character_coverage <= 1.0:
        raise DataError(f"--character-coverage must be in (0, 1], got {character_coverage}")
    prefix = str(model_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            input=str(input), model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, split_digits=True, character_coverage=character_coverage,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
            user_defined_symbols=list(reserved_tokens),
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1, minloglevel=1,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size too high (4000). Please set it to a value <= 310."
        raise DataError(f"training a {model_type} tokenizer on {input} failed: {e}") from None

    tokenizer = tokenizer_from_sentencepiece(prefix + ".model", model_type, reserved_tokens)
    output_dir = Path(prefix)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def tokenizer_from_sentencepiece(model_file: str | Path, model_type: str = "bpe",
                                 reserved_tokens: tuple[str, ...] = THOUGHT_TOKENS):
    """A transformers fast tokenizer that encodes like the SentencePiece `model_type` model in `model_file`."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    if pieces[:4] != [UNK, BOS, EOS, PAD]:
        raise DataError(f"{model_file}: expected special pieces {[UNK, BOS, EOS, PAD]} at ids 0-3, got {pieces[:4]}")

    if model_type == "bpe":
        vocab = {piece: i for i, piece in enumerate(pieces)}
        model = models.BPE(vocab=vocab, merges=_bpe_merges(sp, vocab), unk_token=UNK, fuse_unk=True, byte_fallback=True)
    elif model_type == "unigram":
        model = models.Unigram([(piece, sp.get_score(i)) for i, piece in enumerate(pieces)], unk_id=0, byte_fallback=True)
    else:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    backend = Tokenizer(model)
    # Spaces become "▁" (SentencePiece's meta symbol); no prefix is added and nothing is split
    # off, matching add_dummy_prefix=False.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens=list(reserved_tokens),
    )


def _bpe_merges(sp, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges in SentencePiece's order: a learned piece is every split of it into two pieces that
    are both in the vocabulary, ranked by the piece's id (SentencePiece BPE ids follow merge order)."""
    merges = []
    for piece, piece_id in vocab.items():
        if sp.is_control(piece_id) or sp.is_unknown(piece_id) or sp.is_byte(piece_id):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((piece_id, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def load_tokenizer(path: str | Path):
    """`AutoTokenizer.from_pretrained(path)` for a local directory, with an error that names the path."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise DataError(f"{path}: not a tokenizer directory (no tokenizer.json); "
                        "train one with `lab data tokenizer --input TXT --model-prefix PATH --vocab-size N`")
    return AutoTokenizer.from_pretrained(str(path))


def tokenizer_fingerprint(tokenizer) -> str:
    """16 hex digits of sha256 over the (token, id) pairs, added tokens included: packed token files
    record it, so ids are never read with a tokenizer they were not written with."""
    pairs = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
