"""GrowableLayer: transformers' DynamicLayer, appending into spare capacity instead of
concatenating (kv/appending.py says why and how), for caches transformers' forward takes."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from chatkv.kv.appending import Appending
from chatkv.kv.capacity import GROW_TOKENS, capacity

__all__ = ["GROW_TOKENS", "GrowableLayer", "capacity"]


class GrowableLayer(Appending, DynamicLayer):  # type: ignore[no-untyped-call]  # transformers' __init_subclass__ is unannotated
    # Set once initialized (transformers declares them Optional: None before the first update).
    keys: torch.Tensor
    values: torch.Tensor
