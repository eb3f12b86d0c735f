"""Thought tokens: ``<|startofthought|>`` and ``<|endofthought|>`` added to a tokenizer and its model.

    thoughts = add_thought_tokens(loaded.model, loaded.tokenizer)      # ThoughtTokens(start_id, end_id, ...)
    strip_thoughts(ids, thoughts)                                      # the ids a reader sees: thoughts removed

Both strings become special tokens (one id each, never split, never merged with their neighbours). Their
input embeddings, and their output rows when the output layer is not tied to the input, start as the
embedding of an existing piece of text (the Quiet-STaR paper used ``"---"``; a text of several tokens
gives their mean), so a thought marker starts as something the model has seen, not as noise.

The ids are recorded in the model's config (``config.thought_token_ids``), so a baked model saved with
`save_pretrained` and loaded again keeps them: calling `add_thought_tokens` on it finds them and changes
nothing. A tokenizer that has the strings already but at ids the model does not record (a tokenizer from
another model, or one edited by hand) is refused: its thoughts would read rows the model never learned.
One exception: the lab's own tokenizer reserves both markers when it is trained (data/tokenizer.py), so a
lab GPT pretrained with it has rows for them that its corpus never reached; those rows are initialised as
new ones would be and the ids recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_lab.errors import UserError

START_THOUGHT = "<|startofthought|>"
END_THOUGHT = "<|endofthought|>"
INIT_FROM = "---"  # the paper's choice for the markers' initial embedding


@dataclass(frozen=True)
class ThoughtTokens:
    """The two marker strings and their ids in one tokenizer."""

    start: str
    end: str
    start_id: int
    end_id: int


def add_thought_tokens(model: torch.nn.Module, tokenizer, start: str = START_THOUGHT, end: str = END_THOUGHT,
                       init_from: str = INIT_FROM) -> ThoughtTokens:
    """Add the markers to `tokenizer` and `model` (embeddings resized, new rows copied from `init_from`).

    Idempotent on a model that already has them (see the module docstring); a tokenizer that already has
    them at ids the model does not record is a `UserError`.
    """
    if not start or not end or start == end:
        raise UserError(f"thought tokens: start {start!r} and end {end!r} must be two different non-empty strings")
    recorded = getattr(model.config, "thought_token_ids", None)
    present = {text: _single_id(tokenizer, text) for text in (start, end)}
    init_ids = tokenizer(init_from, add_special_tokens=False)["input_ids"]
    if not init_ids:
        raise UserError(f"thought tokens: init_from={init_from!r} encodes to no tokens")
    if recorded is None and model.config.model_type == "lab_gpt" and None not in present.values():
        _check_embedding_rows(model, present)  # reserved by the lab tokenizer, never trained: start them as new rows
        return _initialise(model, present, init_ids, start, end)
    if any(token_id is not None for token_id in present.values()):
        expected = recorded or {}
        if present != expected:
            raise UserError(
                f"the tokenizer already has thought tokens {present} (string: id), but the model records "
                f"{expected or 'no thought tokens'} (config.thought_token_ids): these ids are not the ones the "
                "model was given, so its thoughts would read untrained rows; pass the tokenizer saved with this "
                "model, or a tokenizer without these tokens")
        _check_embedding_rows(model, present)
        return ThoughtTokens(start, end, present[start], present[end])

    tokenizer.add_tokens([start, end], special_tokens=True)
    ids = {text: _single_id(tokenizer, text) for text in (start, end)}
    # mean_resizing=False: the rows written below replace the new rows anyway
    model.resize_token_embeddings(max(len(tokenizer), model.get_input_embeddings().num_embeddings),
                                  mean_resizing=False)
    return _initialise(model, ids, init_ids, start, end)


def _initialise(model: torch.nn.Module, ids: dict[str, int], init_ids: list[int], start: str,
                end: str) -> ThoughtTokens:
    """The markers' rows set to the mean embedding of `init_ids`, and their ids recorded in the model's config."""
    with torch.no_grad():
        for embeddings in _embedding_matrices(model):
            embeddings[list(ids.values())] = embeddings[init_ids].mean(dim=0)
    model.config.thought_token_ids = ids
    return ThoughtTokens(start, end, ids[start], ids[end])


def _single_id(tokenizer, text: str) -> int | None:
    """The id of `text` when the tokenizer holds it as one token of its own, else None."""
    token_id = tokenizer.convert_tokens_to_ids(text)
    if token_id is None or token_id == tokenizer.unk_token_id:
        return None
    return int(token_id)


def _embedding_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    """The input embedding matrix, and the output layer's when it is a separate matrix (not tied)."""
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)
    return matrices


def _check_embedding_rows(model: torch.nn.Module, ids: dict[str, int]) -> None:
    rows = model.get_input_embeddings().num_embeddings
    beyond = {text: token_id for text, token_id in ids.items() if token_id >= rows}
    if beyond:
        raise UserError(f"thought tokens {beyond} lie beyond the model's {rows} embedding rows: "
                        "the model was saved without its resized embeddings")


def strip_thoughts(token_ids: list[int], thoughts: ThoughtTokens) -> list[int]:
    """`token_ids` without every thought: each start marker, everything up to its end marker, and the end
    marker (a thought still open at the end is dropped too; a stray end marker is dropped)."""
    visible, inside = [], False
    for token_id in token_ids:
        if token_id == thoughts.start_id:
            inside = True
        elif token_id == thoughts.end_id:
            inside = False
        elif not inside:
            visible.append(token_id)
    return visible
