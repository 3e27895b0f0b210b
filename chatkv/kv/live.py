"""Helpers over transformers' DynamicCache (5.x: `cache.layers[i].keys / .values`).

Positions a cache has handed out are never written again: `update` appends past
them (GrowableLayer) or concatenates into new tensors (DynamicLayer), and cropping
slices. So a cache can be forked by sharing its tensors, and a spill thread can hold
a snapshot while the next turn extends the cache.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from chatkv.kv.chunks import Layers
from chatkv.kv.growable import GrowableLayer, capacity


def new_cache(model) -> DynamicCache:
    """An empty cache for `model`; full-attention layers append in place (see growable.py)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [GrowableLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def layers_of(cache: DynamicCache) -> Layers:
    """Per layer (keys, values), each (B, H, T, D)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from_layers(model, layers: Layers) -> DynamicCache:
    """A new cache holding a copy of `layers` (per layer (k, v), each (B, H, T, D))."""
    cache = new_cache(model)
    for layer, (k, v) in zip(cache.layers, layers, strict=True):
        layer.update(k, v)
    return cache


def seq_len(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def crop_to(cache: DynamicCache, n: int) -> None:
    """Keep the first `n` positions."""
    if n < seq_len(cache):
        for layer in cache.layers:
            layer.keys = layer.keys[..., :n, :]
            layer.values = layer.values[..., :n, :]


def nbytes(cache: DynamicCache) -> int:
    """Device bytes the cache holds, spare capacity included."""
    total = 0
    for layer in cache.layers:
        k, v = getattr(layer, "_kbuf", None), getattr(layer, "_vbuf", None)
        if k is None:
            k, v = layer.keys, layer.values
        for t in (k, v):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def buffers(model, n: int, batch: int = 1, dtype=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty key and value storage for all layers, (L, B, H, capacity, D), with room for
    `n` positions and some to grow (see GrowableLayer)."""
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    shape = (c.num_hidden_layers, batch, heads, capacity(n), head_dim)
    dtype, device = dtype or model.dtype, device or model.device
    return torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)


def cache_from_buffers(model, k: torch.Tensor, v: torch.Tensor, n: int) -> DynamicCache:
    """A cache over `buffers()` whose first `n` positions are filled (no copy)."""
    cache = new_cache(model)
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, GrowableLayer):
            layer.adopt(k[i], v[i], n)
        else:
            layer.update(k[i][..., :n, :].clone(), v[i][..., :n, :].clone())
    return cache
