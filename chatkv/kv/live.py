"""Helpers over transformers' DynamicCache (5.x: `cache.layers[i].keys / .values`).

Tensors in a DynamicCache are never modified in place: `update` concatenates into
new tensors and cropping slices. So a cache can be forked by sharing its tensors,
and a spill thread can hold a snapshot while the next turn extends the cache.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

Layers = list[tuple[torch.Tensor, torch.Tensor]]


def new_cache(model) -> DynamicCache:
    return DynamicCache(config=model.config)


def layers_of(cache: DynamicCache) -> Layers:
    """Per layer (keys, values), each (B, H, T, D)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from_layers(model, layers: Layers) -> DynamicCache:
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


def fork(model, cache: DynamicCache, n: int | None = None) -> DynamicCache:
    """A new cache sharing `cache`'s tensors (first `n` positions); extending one leaves the other as is."""
    layers = layers_of(cache)
    if n is not None:
        layers = [(k[..., :n, :], v[..., :n, :]) for k, v in layers]
    return cache_from_layers(model, layers)


def nbytes(cache: DynamicCache) -> int:
    return sum(
        k.numel() * k.element_size() + v.numel() * v.element_size()
        for k, v in layers_of(cache)
        if k is not None
    )


def concat(model, parts: list[Layers]) -> DynamicCache:
    """Join consecutive spans of layers along the token axis into one cache."""
    layers = [
        (torch.cat([p[i][0] for p in parts], dim=-2), torch.cat([p[i][1] for p in parts], dim=-2))
        for i in range(len(parts[0]))
    ]
    return cache_from_layers(model, layers)
