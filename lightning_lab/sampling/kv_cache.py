"""The sampler's KV cache: one preallocated buffer per layer, written in place, cropped by moving a length.

A cache that grows by concatenation copies every layer's keys and values at every decode step; these buffers are
allocated once for the decode's capacity (doubling if a state outgrows it). `KVCache` is a transformers `Cache`,
so transformers' forward and `LlamaDecoder` both write into it; it remembers which rows are copies of one row
(`shared_prefix`: the n samples of a prompt, the branches of a fork) so the CPU attention kernel reads their
common positions once. Models with other layer kinds (sliding windows, ...) get transformers' `DynamicCache`
(`new_cache`).
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, get_layer_types_and_kwargs


class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in buffers of shape (batch, kv_heads, capacity, head_dim), written in
    place; ``keys``/``values`` are views of the first ``length`` positions. Grows (doubling) if needed."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads, length, key_dim = key_states.shape
        self.capacity = max(self.capacity, length)
        self.key_buffer = key_states.new_empty(batch, heads, self.capacity, key_dim)
        self.value_buffer = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.claim(key_states.shape[-2])
        self.key_buffer[:, :, start:self.length] = key_states
        self.value_buffer[:, :, start:self.length] = value_states
        return self.keys, self.values

    def claim(self, tokens: int) -> int:
        """Room for ``tokens`` more positions, counted in the length (growing the buffers if needed); returns the
        first of them, where the caller writes their keys and values into the buffers."""
        start, end = self.length, self.length + tokens
        if end > self.capacity:
            self._reallocate(max(end, 2 * self.capacity))
        self._set_length(end)
        return start

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys = self.key_buffer[:, :, :length]
        self.values = self.value_buffer[:, :, :length]

    def _reallocate(self, capacity: int, rows: torch.Tensor | None = None, repeats: int = 1) -> None:
        """New buffers of `capacity` positions holding the current `length` ones (of `rows`, each `repeats` times)."""
        keys, values = self.keys, self.values
        if rows is not None:
            keys, values = keys.index_select(0, rows), values.index_select(0, rows)
        batch, heads, _, key_dim = keys.shape
        self.key_buffer = keys.new_empty(batch * repeats, heads, capacity, key_dim)
        self.value_buffer = values.new_empty(batch * repeats, heads, capacity, values.shape[-1])
        # broadcast copy: row r of the old batch fills rows r*repeats .. r*repeats+repeats-1
        self.key_buffer.view(batch, repeats, heads, capacity, key_dim)[:, :, :, :self.length] = keys[:, None]
        self.value_buffer.view(batch, repeats, heads, capacity, -1)[:, :, :, :self.length] = values[:, None]
        self.capacity = capacity
        self._set_length(self.length)

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove")
        if self.is_initialized:
            self._set_length(self.length + tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._reallocate(self.capacity, repeats=repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._reallocate(self.capacity, rows=indices)

    def reset(self) -> None:
        self.length = 0
        super().reset()


class KVCache(Cache):
    """A transformers `Cache` of `PreallocatedLayer`s (full-attention models).

    ``shared_prefix``: after `batch_repeat_interleave` the rows copied from one row hold the same first positions;
    (source row of each row, length of that common part) lets the CPU attention kernel read those positions
    once per group of copies. None when no rows are copies. Kept right through row selection and cropping."""

    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])
        self.copied_from: torch.Tensor | None = None  # per row: the row of the first batch it is a copy of
        self.shared_prefix: tuple[torch.Tensor, int] | None = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = self.layers[0].keys.shape[0] if self.layers[0].is_initialized else 0
        origin = self.copied_from if self.copied_from is not None else torch.arange(rows)
        common = self.shared_prefix[1] if self.shared_prefix is not None else self.get_seq_length()
        super().batch_repeat_interleave(repeats)
        self._share(origin.repeat_interleave(repeats), common)

    def take(self, rows: torch.Tensor) -> KVCache:
        """A new cache of copies of the given rows (`take_rows`); this one is left as it was."""
        taken = KVCache(len(self.layers), 0)
        for index, layer in enumerate(self.layers):
            copied = taken.layers[index] = PreallocatedLayer(layer.capacity)
            if layer.is_initialized:
                copied.device, copied.is_initialized, copied.length = layer.device, True, layer.length
                copied.keys, copied.values = layer.keys, layer.values  # what _reallocate copies from
                copied._reallocate(layer.capacity, rows=rows)
        taken._share(rows.cpu(), self.get_seq_length())
        return taken

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.shared_prefix is not None:
            self._share(self.copied_from[indices.cpu()], self.shared_prefix[1])

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.shared_prefix is not None:
            self._share(self.copied_from, min(self.shared_prefix[1], self.get_seq_length()))

    def reset(self) -> None:
        super().reset()
        self._share(None, 0)

    def _share(self, copied_from: torch.Tensor | None, length: int) -> None:
        if copied_from is None or length == 0:  # nothing in common: the rows' copy history no longer matters
            self.copied_from = self.shared_prefix = None
            return
        self.copied_from = copied_from
        # each row reads the common part from the first row that is a copy of the same row
        same = copied_from[None, :] == copied_from[:, None]
        self.shared_prefix = (same.int().argmax(dim=1), length)


def full_attention_layers(config) -> int | None:
    """The number of layers when every one is plain full attention (the preallocated cache fits); else None."""
    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return len(layer_types) if all(kind == "full_attention" for kind in layer_types) else None


def new_cache(config, capacity: int) -> Cache:
    """The preallocated cache when every layer is plain full attention; transformers' `DynamicCache`
    (which knows sliding windows and other layer types) otherwise."""
    num_layers = full_attention_layers(config)
    return KVCache(num_layers, capacity) if num_layers is not None else DynamicCache(config=config)



def take_rows(cache: Cache, rows: torch.Tensor) -> Cache:
    """A new cache whose row j is a copy of `cache`'s row ``rows[j]`` (rows may repeat: a fork); `cache` is left
    as it was. In a `KVCache`, rows copied from one row share all their positions (`KVCache.shared_prefix`)."""
    if isinstance(cache, KVCache):
        return cache.take(rows)
    taken = copy.deepcopy(cache)
    taken.batch_select_indices(rows)
    return taken
