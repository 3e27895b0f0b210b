"""Live caches: helpers over transformers' DynamicCache (5.x: `cache.layers[i].keys /
.values`) or, for a model that never runs transformers' forward, a LeanCache of the same
shape (kv/appending.py), and the pool that keeps conversations' caches in memory across turns.

Positions a cache has handed out are never written again: `update` appends past
them (GrowableLayer) or concatenates into new tensors (DynamicLayer), and cropping
slices. So a cache can be forked by sharing its tensors, and a spill thread can hold
a snapshot while the next turn extends the cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch

from chatkv.engine.model import kv_shape
from chatkv.kv.appending import Appending, LeanCache
from chatkv.kv.capacity import capacity
from chatkv.kv.chunks import Layers as Layers  # re-exported: engine.batch spells it live.Layers

if TYPE_CHECKING:
    from typing import TypeAlias

    from transformers import DynamicCache

    Cache: TypeAlias = DynamicCache | LeanCache


class KVLayer(Protocol):
    """What chatkv uses of a cache layer. transformers types `cache.layers` as a union that
    includes linear-attention layers (which chatkv never builds: it serves attention-only
    models) and declares keys/values Optional (None only before a layer's first update)."""

    keys: torch.Tensor  # (B, H, T, D)
    values: torch.Tensor  # (B, H, T, D)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def kv_layers(cache: Cache) -> list[KVLayer]:
    """`cache.layers` as the attention layers chatkv builds (see KVLayer)."""
    return cast("list[KVLayer]", cache.layers)


def new_cache(model: Any) -> Cache:  # model: a transformers causal LM (untyped)
    """An empty cache for `model`; full-attention layers append in place (see appending.py).
    A model that never runs transformers' forward (`lean_cache`, engine/leanload.py) gets a
    LeanCache: transformers is not imported for it."""
    if getattr(model, "lean_cache", False):
        return LeanCache(kv_shape(model.config)[0])
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from chatkv.engine.leanload import LeanModel
    from chatkv.kv.growable import GrowableLayer

    # A LeanModel with its lean step off runs transformers' forward: its config is that model's.
    cache = DynamicCache(config=model.full().config if isinstance(model, LeanModel) else model.config)
    cache.layers = [
        GrowableLayer() if type(layer) is DynamicLayer else layer  # type: ignore[no-untyped-call]  # DynamicLayer.__init__
        for layer in cache.layers
    ]
    return cache


def dynamic(cache: Cache) -> DynamicCache:
    """`cache`, which must be a DynamicCache: the cache of a model that runs transformers'
    forward (engine/batch.py's, always loaded through transformers)."""
    if isinstance(cache, LeanCache):
        raise TypeError("a LeanCache where transformers' forward needs a DynamicCache")
    return cache


def as_dynamic(cache: Any, model: Any) -> Any:
    """`cache` as transformers' forward takes it: a LeanCache becomes a DynamicCache of
    appending layers over the same storage (no copy), which then serve the LeanCache too
    (both hold one list of layers); anything else is returned as is."""
    if not isinstance(cache, LeanCache):
        return cache
    from transformers import DynamicCache

    from chatkv.kv.growable import GrowableLayer

    for i, layer in enumerate(cache.layers):
        if isinstance(layer, GrowableLayer):
            continue  # made so by an earlier call
        grown = GrowableLayer()  # type: ignore[no-untyped-call]  # DynamicLayer.__init__
        if layer.is_initialized and layer.keys.numel():
            if layer._owns_views():
                grown.adopt(layer._kbuf, layer._vbuf, layer._len)
            else:
                grown.update(layer.keys, layer.values)
        cache.layers[i] = grown
    wrapped = DynamicCache(config=model.full().config)  # model: a LeanModel
    wrapped.layers = cache.layers
    return wrapped


def layers_of(cache: Cache) -> Layers:
    """Per layer (keys, values), each (B, H, T, D)."""
    return [(layer.keys, layer.values) for layer in kv_layers(cache)]


def cache_from_layers(model: Any, layers: Layers) -> Cache:
    """A new cache holding a copy of `layers` (per layer (k, v), each (B, H, T, D))."""
    cache = new_cache(model)
    for layer, (k, v) in zip(kv_layers(cache), layers, strict=True):
        layer.update(k, v)
    return cache


def seq_len(cache: Cache) -> int:
    """Positions the cache holds."""
    return cache.get_seq_length()


def crop_to(cache: Cache, n: int) -> bool:
    """Keep the first `n` positions; False (the cache untouched) where that cannot be done:
    a sliding-window layer that has dropped positions before `n`'s end no longer holds the
    window `n` positions would end with (the caller starts a cache anew)."""
    total = seq_len(cache)
    if n >= total:
        return True
    layers = kv_layers(cache)
    if any(getattr(layer, "is_sliding", False) and layer.keys.shape[-2] < total for layer in layers):
        return False
    for layer in layers:
        layer.keys = layer.keys[..., :n, :]
        layer.values = layer.values[..., :n, :]
    return True


def untear(cache: Cache) -> int:
    """Crop every layer to the positions all of them hold, and return that many. A decode
    step cut short (Ctrl-C, an error in layer i) has appended its token to the first layers
    only: the positions before it are whole, the torn one goes.

    Sliding-window layers (transformers' `is_sliding`: Gemma, Mistral) keep only their last
    window of positions, so their length says nothing: they are left alone, and a cache of
    such layers alone holds what it says it holds."""
    full = [
        layer
        for layer in kv_layers(cache)
        if getattr(layer, "keys", None) is not None
        and getattr(layer, "values", None) is not None
        and not getattr(layer, "is_sliding", False)
    ]
    if not full:
        return seq_len(cache)
    n = min(min(layer.keys.shape[-2], layer.values.shape[-2]) for layer in full)
    for layer in full:
        if layer.keys.shape[-2] != n or layer.values.shape[-2] != n:
            layer.keys = layer.keys[..., :n, :]
            layer.values = layer.values[..., :n, :]
    return n


def nbytes(cache: Cache) -> int:
    """Device bytes the cache holds, spare capacity included."""
    total = 0
    for layer in kv_layers(cache):
        k, v = getattr(layer, "_kbuf", None), getattr(layer, "_vbuf", None)
        if k is None:
            k, v = layer.keys, layer.values
        for t in (k, v):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def buffers(
    model: Any, n: int, batch: int = 1, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty key and value storage for all layers, (L, B, H, capacity, D), with room for
    `n` positions and some to grow (see GrowableLayer)."""
    layers, heads, head_dim = kv_shape(model.config)
    shape = (layers, batch, heads, capacity(n), head_dim)
    dtype, device = dtype or model.dtype, device or model.device
    return torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)


def cache_from_buffers(model: Any, k: torch.Tensor, v: torch.Tensor, n: int) -> Cache:
    """A cache over `buffers()` whose first `n` positions are filled (no copy)."""
    cache = new_cache(model)
    for i, layer in enumerate(kv_layers(cache)):
        if isinstance(layer, Appending):
            layer.adopt(k[i], v[i], n)
        else:
            layer.update(k[i][..., :n, :].clone(), v[i][..., :n, :].clone())
    return cache


@dataclass
class _Live:
    tokens: list[int]
    cache: Cache
    nbytes: int


class LivePool:
    """Live caches in device memory, least recently used evicted past a byte budget.
    Evicted caches are already on disk (spilled after each turn)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._items: OrderedDict[object, _Live] = OrderedDict()
        # Snapshots queued for spilling: ticket -> (conversation, bytes). They are views of
        # the live cache, so they cost memory of their own only once that cache has left
        # the pool (evicted, or taken and grown into new storage); then they count here.
        self._held: dict[object, tuple[object, int]] = {}
        self._lock = threading.Lock()

    def take(self, key: object) -> _Live | None:
        """Remove and return the entry: the caller extends the cache and puts it back."""
        with self._lock:
            return self._items.pop(key, None)

    def peek_tokens(self, key: object) -> int:
        with self._lock:
            item = self._items.get(key)
            return len(item.tokens) if item else 0

    def put(self, key: object, tokens: list[int], cache: Cache) -> None:
        item = _Live(tokens, cache, nbytes(cache))
        with self._lock:
            self._items.pop(key, None)
            if item.nbytes > self.budget:  # a single cache over budget is not kept at all
                return
            self._items[key] = item
            while self._bytes() > self.budget and self._items:
                self._items.popitem(last=False)

    def hold(self, ticket: object, key: object, nbytes: int) -> None:
        """Count a snapshot of `key`'s cache (queued for spilling) until `release(ticket)`."""
        with self._lock:
            self._held[ticket] = (key, nbytes)

    def release(self, ticket: object) -> None:
        with self._lock:
            self._held.pop(ticket, None)

    def drop(self, key: object) -> None:
        with self._lock:
            self._items.pop(key, None)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        """How many conversations' caches are live."""
        with self._lock:
            return len(self._items)

    @property
    def bytes(self) -> int:
        """Live caches plus the snapshots queued for spilling whose cache is no longer live."""
        with self._lock:
            return self._bytes()

    def _bytes(self) -> int:
        held = sum(n for key, n in self._held.values() if key not in self._items)
        return sum(i.nbytes for i in self._items.values()) + held
