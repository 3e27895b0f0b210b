"""Cache layers that append into spare capacity instead of concatenating, without transformers.

transformers' DynamicLayer runs torch.cat on every update, copying the whole cache
for each decoded token: at 4k tokens that is ~90 MB per token for SmolLM2 in float32.
`Appending` keeps a buffer with room to grow and exposes views of its filled part.

Safety: existing views never see a write, because appends only go past the end of the
view this layer last handed out. Anything that replaces `keys`/`values` from outside
(cropping, batch selection) leaves a tensor that is not that view, and the next
update then copies into a fresh buffer.

Two layers append this way: kv/growable.py's GrowableLayer, a DynamicLayer that
transformers' forward can take, and `LeanLayer` here, in a `LeanCache` for a model loaded
without transformers (engine/leanload.py), which never runs transformers' forward: a
resumed `chatkv ask` then does not import transformers at all.
"""

from __future__ import annotations

from typing import Any

import torch

from chatkv.kv.capacity import capacity


class Appending:
    """The appending update, mixed into a layer class that provides `lazy_initialization`
    (setting `keys`, `values` to empty tensors and `is_initialized`)."""

    keys: torch.Tensor
    values: torch.Tensor
    is_initialized: bool

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)  # type: ignore[misc]  # the layer class's
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None
        self._len = 0  # length of the views last handed out

    def _owns_views(self) -> bool:
        kb, vb = self._kbuf, self._vbuf
        return (
            kb is not None
            and vb is not None
            and self.keys.data_ptr() == kb.data_ptr()
            and self.values.data_ptr() == vb.data_ptr()
            and self.keys.shape[:-2] == kb.shape[:-2]
            and self.keys.shape[-2] == self.values.shape[-2] == self._len
        )

    def adopt(self, kbuf: torch.Tensor, vbuf: torch.Tensor, n: int) -> None:
        """Take `kbuf`/`vbuf` (B, H, capacity, D), whose first `n` positions are filled, as
        this layer's storage (no copy). The caller gives up writing to them."""
        self.lazy_initialization(kbuf, vbuf)
        self._kbuf, self._vbuf = kbuf, vbuf
        self.keys, self.values = kbuf[..., :n, :], vbuf[..., :n, :]
        self._len = n

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.keys.shape[-2] if self.keys.numel() else 0
        t = key_states.shape[-2]
        kb = self._kbuf
        if (
            kb is None  # never None when _owns_views(); spelled out for the type checker
            or not self._owns_views()
            or n + t > kb.shape[-2]
            or key_states.shape[:-2] != kb.shape[:-2]
        ):
            cap = capacity(n + t)
            b, h, _, d = key_states.shape  # (B, H, T, D)
            kbuf = key_states.new_empty((b, h, cap, d))
            vbuf = value_states.new_empty((b, h, cap, value_states.shape[-1]))
            if n:
                kbuf[..., :n, :] = self.keys
                vbuf[..., :n, :] = self.values
            self._kbuf, self._vbuf = kbuf, vbuf
        kb, vb = self._kbuf, self._vbuf
        assert kb is not None and vb is not None  # _owns_views() held, or just allocated
        kb[..., n : n + t, :] = key_states
        vb[..., n : n + t, :] = value_states
        self.keys = kb[..., : n + t, :]
        self.values = vb[..., : n + t, :]
        self._len = n + t
        return self.keys, self.values


class _Plain:
    """A layer's state before and after its first update, as transformers' DynamicLayer
    (5.x) keeps it: empty tensors of the first update's dtype and device, then the views."""

    keys: torch.Tensor  # None before the first update, as DynamicLayer's
    values: torch.Tensor

    def __init__(self) -> None:
        self.keys = self.values = None  # type: ignore[assignment]
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = torch.tensor([], dtype=key_states.dtype, device=self.device)
        self.values = torch.tensor([], dtype=value_states.dtype, device=self.device)
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]


class LeanLayer(Appending, _Plain):
    """An appending layer of a LeanCache."""


class LeanCache:
    """What chatkv uses of transformers' DynamicCache (`layers`, `get_seq_length`), for a
    model that never runs transformers' forward (engine/leanload.py's LeanModel)."""

    def __init__(self, layers: int) -> None:
        self.layers: list[Any] = [LeanLayer() for _ in range(layers)]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()  # type: ignore[no-any-return]
