"""How a prompt becomes token ids: the one function that training and decoding both use, so a model is
trained on exactly the prompt ids it will see when it samples."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

Prompt = str | Sequence[dict] | Sequence[int]


def encode_prompt(tokenizer, prompt: Prompt, chat: bool | None = None) -> list[int]:
    """Token ids of one prompt: plain text, chat messages (``[{"role": ..., "content": ...}]``) or token ids.

    ``chat=None`` (default) frames text *and* messages with the tokenizer's chat template when it has one (one
    user turn plus the assistant header: an instruct model answers a bare question badly), and uses text
    verbatim, with the tokenizer's usual special tokens, when it has none; ``chat=False`` always uses text
    verbatim (already templated text, base-model continuation; messages are then an error); ``chat=True``
    requires a template. Token ids are used as given.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, str):
        if not (has_template if chat is None else chat):
            return list(tokenizer(prompt)["input_ids"])
        messages = [{"role": "user", "content": prompt}]
    elif len(prompt) and all(isinstance(token, numbers.Integral) for token in prompt):
        return [int(token) for token in prompt]
    elif len(prompt) and all(isinstance(message, dict) for message in prompt):
        if chat is False:
            raise ValueError("chat=False, but the prompt is a list of chat messages")
        messages = list(prompt)
    else:
        raise TypeError(f"prompt must be text, a non-empty list of chat messages or of token ids, got {prompt!r:.80}")
    if not has_template:
        raise ValueError(f"{type(tokenizer).__name__} has no chat template: pass plain text, or chat=False, "
                         "for this model")
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])
