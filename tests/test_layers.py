"""The house's structure: what each layer computes in one place."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import LlamaConfig

from chatkv.engine.model import kv_shape
from chatkv.kv import live
from chatkv.kv.growable import capacity


def test_live_buffers_take_their_shape_from_the_engines_kv_shape() -> None:
    # Grouped-query attention and a head_dim that is not hidden_size / heads: the two cases
    # where reading the config naively gives the wrong shape.
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_hidden_layers=3
    )
    model = SimpleNamespace(config=config, dtype=torch.float32, device=torch.device("cpu"))
    assert kv_shape(config) == (3, 2, 24)
    k, v = live.buffers(model, 10, batch=2)
    assert k.shape == v.shape == (3, 2, 2, capacity(10), 24)  # (L, B, H, capacity, D)
