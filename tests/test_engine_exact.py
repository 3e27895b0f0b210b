"""Exactness in every dtype: a conversation whose cache comes back from disk (fp16 codec,
which stores the compute dtype as is) continues with exactly the tokens, and the very
cache, it would have had if its cache had stayed live in memory. Float32 and bfloat16
on the tiny model (bfloat16 is the default on CPUs with bf16 instructions, where a
fresh re-prefill of a conversation's earlier replies is not bit-equal to their decoding:
that equality is tested in float32, in test_session.py and test_e2e.py; a prompt's own
split is, test_engine_lean.py)."""

from __future__ import annotations

import pytest
import torch

from chatkv.api import GenerationSettings
from chatkv.kv import live
from chatkv.session import Chat
from chatkv.store import Store

GREEDY = GenerationSettings(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def lm(request, tiny_model_dir):
    from chatkv.engine.model import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype=request.param)


def test_a_reloaded_fp16_cache_continues_exactly_as_the_live_one(lm, tiny_settings, monkeypatch):
    tiny_settings.set("model.dtype", str(lm.dtype).removeprefix("torch."))
    first = Chat(tiny_settings, lm=lm)
    first.load()
    conv = first.new_conversation(system_prompt="You are terse.")
    for q in ["Summarise the GNU GPL in three bullet points.", "How does the Apache license differ?"]:
        "".join(first.send(conv.id, q, GREEDY))
    first.flush()  # the spill is on disk; `first` keeps its live cache

    # A second Chat has an empty live pool, as a new process would: its cache comes from disk.
    again = Chat(tiny_settings, store=Store(first.store.path), lm=lm)
    again.load()
    # Its turn is not spilled: the disk keeps what turn 2 left, so `first` reads its memory.
    monkeypatch.setattr(again.kv, "spill", lambda *args, **kwargs: None)
    from_disk = again.send(conv.id, "Tell me a story about the sea.", GREEDY)
    disk_reply = "".join(from_disk)
    disk_cache = again.kv.pool.take(conv.id)
    again.store.delete_messages_from(conv.id, again.messages(conv.id)[-2].position)
    again.close()

    from_memory = first.send(conv.id, "Tell me a story about the sea.", GREEDY)
    live_reply = "".join(from_memory)
    live_cache = first.kv.pool.take(conv.id)
    first.close()

    assert from_disk.stats.cache_source == "disk" and from_memory.stats.cache_source == "memory"
    assert from_disk.stats.cached_tokens == from_memory.stats.cached_tokens > 0
    assert from_disk.tokens == from_memory.tokens and disk_reply == live_reply
    assert disk_cache is not None and live_cache is not None and disk_cache.tokens == live_cache.tokens
    for (kd, vd), (kl, vl) in zip(
        live.layers_of(disk_cache.cache), live.layers_of(live_cache.cache), strict=True
    ):
        assert kd.dtype == lm.dtype and torch.equal(kd, kl) and torch.equal(vd, vl)


def test_auto_dtype_is_bfloat16_on_cuda_and_on_cpus_with_bf16_instructions(monkeypatch):
    from chatkv.engine import model as model_mod

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(model_mod, "cpu_has_bf16", lambda: True)
    assert model_mod.pick_dtype("auto", cpu) == torch.bfloat16
    assert model_mod.pick_dtype("float32", cpu) == torch.float32  # asked for: exact re-prefill
    monkeypatch.setattr(model_mod, "cpu_has_bf16", lambda: False)
    assert model_mod.pick_dtype("auto", cpu) == torch.float32  # emulated bf16 would be slower
    assert model_mod.pick_dtype("auto", cuda) == torch.bfloat16
