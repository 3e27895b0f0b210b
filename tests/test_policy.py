"""Storage policies on the tiny model (issue 8, "a reused cache never changes the answer"):

- the unfinished tail chunk is lossless under every policy, so a conversation shorter
  than one chunk comes back from disk bit for bit, and the same prompt asked twice in
  new conversations gets the same greedy reply;
- the first tokens of the chunk at position 0 (attention sinks) are lossless too;
- full chunks are stored by age tier and re-coded in place (same key and path, row
  updated) by a later spill, never to a finer codec the policy does not need;
- a reader decodes what the file holds (a reader racing a re-code is not fooled), and a
  policy never uses a chunk coarser than it allows (lossless means lossless);
- another version's tail chunks are neither used nor deleted.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch

from chatkv.api import GenerationSettings
from chatkv.config import CODEC_NAMES, load_settings
from chatkv.engine.generate import cache_arg
from chatkv.kv import live, maintenance, manager
from chatkv.kv.chunks import encode_chunk, read_chunk, write_atomic
from chatkv.kv.codecs import get_codec
from chatkv.kv.manager import KVManager
from chatkv.kv.policy import DEFAULT_POLICY, INT4_AFTER, POLICIES, get_policy
from chatkv.paths import kv_dir
from chatkv.session import Chat

C = 32  # chunk tokens
GREEDY = GenerationSettings(max_new_tokens=12, temperature=0.0)


def ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(5, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def computed(lm, tokens: list[int]):
    """The exact cache of `tokens`, as a prefill computes it."""
    cache = live.new_cache(lm.model)
    with torch.no_grad():
        lm.model(torch.tensor([tokens], device=lm.device), **cache_arg(lm.model, cache), use_cache=True)
    return cache


def spilled(store, lm, policy: str, tokens: list[int]) -> KVManager:
    """A manager with `policy` that has spilled the exact cache of `tokens` to disk."""
    kv = KVManager(store, kv_dir(), lm, codec=policy, chunk_tokens=C)
    kv.spill(None, tokens, computed(lm, tokens))
    kv.flush()
    return kv


def from_disk(store, lm, policy: str, tokens: list[int]):
    """What a fresh process attaches for `tokens` + one more token: (Attached, its layers)."""
    kv = KVManager(store, kv_dir(), lm, codec=policy, chunk_tokens=C)
    att = kv.attach(None, tokens + [7])
    return att, live.layers_of(att.cache)


def codecs_by_start(store) -> dict[int, str]:
    return {r.start: r.codec.split(":")[0] for r in store.all_chunks()}


def file_meta(path: Path) -> dict:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n])["__metadata__"]


def test_the_config_lists_every_policy_and_defaults_to_tiered_with_an_exact_tail():
    # tiered since int4 chunks decode fast (see kv/policy.py)
    assert set(CODEC_NAMES) == set(POLICIES)
    assert load_settings().cache.codec == DEFAULT_POLICY == "tiered"
    assert get_policy(DEFAULT_POLICY).tail.lossless and get_policy(DEFAULT_POLICY).sink > 0
    with pytest.raises(ValueError, match="allowed: tiered"):
        get_policy("int3")


@pytest.mark.parametrize("policy", ["tiered", "int8", "int4", "int2"])
def test_a_conversation_shorter_than_one_chunk_is_exact_on_disk(store, tiny_lm, policy):
    tokens = ids(C - 5)
    exact = live.layers_of(computed(tiny_lm, tokens))
    spilled(store, tiny_lm, policy, tokens)
    assert codecs_by_start(store) == {0: "fp16"}
    att, got = from_disk(store, tiny_lm, policy, tokens)
    assert (att.source, att.cached, att.problems) == ("disk", len(tokens), [])
    for (k, v), (k2, v2) in zip(exact, got, strict=True):
        assert torch.equal(k, k2[..., : len(tokens), :]) and torch.equal(v, v2[..., : len(tokens), :])


@pytest.mark.parametrize("policy", ["int8", "int4"])
def test_the_sink_tokens_and_the_tail_are_exact_the_rest_is_quantized(store, tiny_lm, policy):
    tokens = ids(2 * C + 6)
    exact = live.layers_of(computed(tiny_lm, tokens))
    spilled(store, tiny_lm, policy, tokens)
    assert codecs_by_start(store) == {0: policy, C: policy, 2 * C: "fp16"}
    att, got = from_disk(store, tiny_lm, policy, tokens)
    assert att.cached == len(tokens) and not att.problems
    s = get_policy(policy).sink
    assert s >= 1
    for (k, v), (k2, v2) in zip(exact, got, strict=True):
        for a, b in ((k, k2), (v, v2)):
            assert torch.equal(a[..., :s, :], b[..., :s, :])  # the attention sinks
            assert not torch.equal(a[..., s:C, :], b[..., s:C, :])  # quantized
            assert not torch.equal(a[..., C + 1 : C + s, :], b[..., C + 1 : C + s, :])  # no sink past 0
            err = (a[..., : 2 * C, :] - b[..., : 2 * C, :]).abs().max()
            assert err <= 0.2 * a[..., : 2 * C, :].abs().max()  # but close
            assert torch.equal(a[..., 2 * C : len(tokens), :], b[..., 2 * C : len(tokens), :])  # the tail


def test_chunks_age_into_coarser_tiers_in_place(store, tiny_lm):
    full = INT4_AFTER + 2
    tokens = ids((full + 1) * C + 5)
    kv = spilled(store, tiny_lm, "tiered", tokens[: full * C + 5])
    ages = {i * C: full - 1 - i for i in range(full)}
    want = {start: "int4" if age >= INT4_AFTER else "int8" for start, age in ages.items()}
    assert codecs_by_start(store) == want | {full * C: "fp16"}

    # One chunk more: the chunk that is now INT4_AFTER behind the tail is re-coded in place.
    before = {r.start: r for r in store.all_chunks()}
    aging = before[(full - INT4_AFTER) * C]
    assert aging.codec.startswith("int8:")
    kv.spill(None, tokens, computed(tiny_lm, tokens))
    kv.flush()
    after = {r.start: r for r in store.all_chunks()}
    recoded = after[aging.start]
    assert recoded.key == aging.key and recoded.path == aging.path  # same key: descendants keep theirs
    assert recoded.codec == get_codec("int4").tag and recoded.nbytes < aging.nbytes
    assert (
        recoded.checksum != aging.checksum
        and recoded.checksum == file_meta(kv_dir() / recoded.path)["checksum"]
    )
    assert file_meta(kv_dir() / recoded.path)["codec"] == "int4"
    for start in range(0, (full - INT4_AFTER) * C, C):  # older ones were int4 already: untouched
        assert after[start].checksum == before[start].checksum
    assert after[full * C].codec.startswith("int8:") and not after[full * C].partial  # the old tail, filled
    assert maintenance.verify(store, kv_dir()).bad == []
    att, _ = from_disk(store, tiny_lm, "tiered", tokens)
    assert att.cached == len(tokens) and not att.problems


def test_a_shared_chunk_is_never_recoded_to_a_finer_codec_the_policy_allows(store, tiny_lm):
    tokens = ids((INT4_AFTER + 2) * C)
    spilled(store, tiny_lm, "tiered", tokens)
    first = {r.start: r for r in store.all_chunks()}
    assert first[0].codec.startswith("int4:")
    # A short conversation over the same first chunks would store chunk 0 as int8 (age 1),
    # but int4 is allowed: it is left alone, so two conversations never take turns.
    spilled(store, tiny_lm, "tiered", tokens[: 2 * C + 3])
    assert {r.start: r.checksum for r in store.all_chunks() if r.start < 2 * C} == {
        0: first[0].checksum,
        C: first[C].checksum,
    }


def test_a_lossless_policy_never_uses_a_lossy_chunk_and_rewrites_it(store, tiny_lm):
    tokens = ids(3 * C + 4)
    exact = live.layers_of(computed(tiny_lm, tokens))
    spilled(store, tiny_lm, "int8", tokens)
    att, _ = from_disk(store, tiny_lm, "fp16", tokens)
    assert att.cached == 0 and att.source == "none" and att.problems == []  # refused, not "damaged"
    assert len(store.all_chunks()) == 4  # and not deleted either
    spilled(store, tiny_lm, "fp16", tokens)  # the lossless policy writes its own
    assert set(codecs_by_start(store).values()) == {"fp16"}
    att, got = from_disk(store, tiny_lm, "fp16", tokens)
    assert att.cached == len(tokens)
    assert all(torch.equal(k, k2[..., : len(tokens), :]) for (k, _), (k2, _) in zip(exact, got, strict=True))


def test_a_reader_racing_a_recode_decodes_what_the_file_holds(store, tiny_lm, monkeypatch):
    tokens = ids(2 * C + 3)
    spilled(store, tiny_lm, "tiered", tokens)
    rec = next(r for r in store.all_chunks() if r.start == C)
    assert rec.codec.startswith("int8:")
    # A spill re-codes the chunk to int4: the file first, then its row ...
    data = read_chunk(
        kv_dir() / rec.path, get_policy("tiered"), tiny_lm.fingerprint, rec.key, torch.float32, "cpu"
    )
    blob, checksum = encode_chunk(
        get_codec("int4"), tiny_lm.fingerprint, rec.key, rec.parent, C, data.tokens, data.layers, False
    )
    write_atomic(kv_dir() / rec.path, blob)
    codec = get_codec("int4").tag
    store.add_chunk(type(rec)(**{**rec.__dict__, "codec": codec, "nbytes": len(blob), "checksum": checksum}))
    assert maintenance.verify(store, kv_dir(), fix=False).bad == []
    # ... while a reader planned its load from the rows as they were before: it reads the
    # chunk again under its fresh row, and decodes what the file holds.
    real, calls = store.get_chunks, []

    def rows_from_before(keys):
        calls.append(keys)
        found = real(keys)
        return {k: rec if k == rec.key and len(calls) == 1 else r for k, r in found.items()}

    monkeypatch.setattr(store, "get_chunks", rows_from_before)
    att, _ = from_disk(store, tiny_lm, "tiered", tokens)
    assert att.cached == len(tokens) and att.problems == []
    assert len(calls) >= 2  # the stale row was read again


def test_a_reader_between_a_recodes_file_and_its_row_removes_nothing(store, tiny_lm):
    """The re-coding spill has replaced the file, not yet its row: the reader finds the file
    unlike its row, but sound in itself. Not damage: it stops there and removes nothing (the
    row about to be written would be left without its file), and the next reader uses it."""
    tokens = ids(2 * C + 3)
    spilled(store, tiny_lm, "tiered", tokens)
    rec = next(r for r in store.all_chunks() if r.start == C)
    data = read_chunk(
        kv_dir() / rec.path, get_policy("tiered"), tiny_lm.fingerprint, rec.key, torch.float32, "cpu"
    )
    blob, checksum = encode_chunk(
        get_codec("int4"), tiny_lm.fingerprint, rec.key, rec.parent, C, data.tokens, data.layers, False
    )
    write_atomic(kv_dir() / rec.path, blob)  # the file; its row comes after the reader's read
    att, _ = from_disk(store, tiny_lm, "tiered", tokens)
    assert att.cached == C and att.problems and "re-code under way" in att.problems[0]
    assert (kv_dir() / rec.path).read_bytes() == blob and store.get_chunks([rec.key])
    codec = get_codec("int4").tag
    store.add_chunk(type(rec)(**{**rec.__dict__, "codec": codec, "nbytes": len(blob), "checksum": checksum}))
    att, _ = from_disk(store, tiny_lm, "tiered", tokens)
    assert att.cached == len(tokens) and att.problems == []
    # the row never comes (its writer was killed, or lost a race with another's row): once
    # the file has stood unlike its row for a while, the reader writes the row from it
    store.add_chunk(rec)
    att, _ = from_disk(store, tiny_lm, "tiered", tokens)
    assert att.cached == C and "re-code under way" in att.problems[0]
    old = time.time() - manager.SETTLED_S - 1
    os.utime(kv_dir() / rec.path, (old, old))
    att, _ = from_disk(store, tiny_lm, "tiered", tokens)
    assert att.cached == len(tokens) and att.problems == []
    healed = store.get_chunks([rec.key])[rec.key]
    assert (healed.codec, healed.nbytes, healed.checksum) == (codec, len(blob), checksum)
    # a file damaged in place (its own checksum fails) is still removed
    damaged = bytearray(blob)
    damaged[-5] ^= 0xFF
    write_atomic(kv_dir() / rec.path, bytes(damaged))
    att, _ = from_disk(store, tiny_lm, "tiered", tokens)
    assert att.cached == C and not (kv_dir() / rec.path).exists()


def test_another_versions_tail_chunk_is_neither_used_nor_deleted(store, tiny_lm):
    tokens = ids(C - 4)
    spilled(store, tiny_lm, "tiered", tokens)
    (rec,) = store.all_chunks()
    # As another chatkv version would index it: the same codec name, other parameters.
    store.delete_chunks([rec.key])
    store.add_chunk(type(rec)(**{**rec.__dict__, "codec": "fp16:00000000"}))
    att, _ = from_disk(store, tiny_lm, "tiered", tokens)
    assert att.cached == 0 and att.problems == []
    assert [r.codec for r in store.all_chunks()] == ["fp16:00000000"]
    assert (kv_dir() / rec.path).exists()


def test_the_same_prompt_twice_in_new_conversations_gives_the_same_greedy_reply(tiny_settings, tiny_lm):
    tiny_settings.set("cache.codec", DEFAULT_POLICY)
    tiny_settings.set("cache.chunk_tokens", load_settings().cache.chunk_tokens)  # the defaults
    chat = Chat(tiny_settings, lm=tiny_lm)
    chat.load()
    for prompt in ["What is the capital of France?", "Tell me a story about the sea.", "Hello!"]:
        first = chat.send(chat.new_conversation().id, prompt, GREEDY)
        a = "".join(first)
        chat.kv.flush()
        second = chat.send(chat.new_conversation().id, prompt, GREEDY)
        b = "".join(second)
        assert (
            second.stats.cache_source == "disk"
            and second.stats.cached_tokens == first.stats.prompt_tokens - 1
        )
        assert a == b and first.tokens == second.tokens
    chat.close()


def test_a_chunk_is_not_recoded_from_a_cache_that_was_decoded_from_it(store, tiny_lm):
    """bench quality --explore: int4 of int8's reload is several times further from exact
    than int4 of the exact cache. A cache attached from disk holds the reload; the aging
    chunk stays int8 until a conversation with the exact cache spills it."""
    full = INT4_AFTER + 1
    tokens = ids((full + 1) * C + 5)
    spilled(store, tiny_lm, "tiered", tokens[: full * C + 5])
    aging = next(r for r in store.all_chunks() if r.start == C)
    assert aging.codec.startswith("int8:")
    kv = KVManager(store, kv_dir(), tiny_lm, codec="tiered", chunk_tokens=C)
    att = kv.attach(None, tokens[: full * C + 5] + [7])
    assert att.source == "disk" and att.cached == full * C + 5
    # the conversation goes on from the attached cache: one chunk more
    with torch.no_grad():
        rest = torch.tensor([tokens[att.cached :]], device=tiny_lm.device)
        tiny_lm.model(rest, **cache_arg(tiny_lm.model, att.cache), use_cache=True)
    kv.spill(None, tokens, att.cache)
    kv.flush()
    assert store.get_chunks([aging.key])[aging.key].checksum == aging.checksum  # not re-coded
    # A conversation holding the exact cache re-codes it.
    spilled(store, tiny_lm, "tiered", tokens)
    assert store.get_chunks([aging.key])[aging.key].codec.startswith("int4:")


def test_a_tail_that_begins_with_positions_decoded_from_a_lossy_chunk_is_not_stored_as_exact(store, tiny_lm):
    """A regenerate whose prompt is shorter than a chunk uses the start of the conversation's
    own quantized first chunk; the tail it then spills would hold those decoded positions
    under the lossless codec, and a new conversation asking the same would take them as
    exact."""
    conv = store.create_conversation().id
    long = ids(2 * C + 5)
    kv = KVManager(store, kv_dir(), tiny_lm, codec="tiered", chunk_tokens=C)
    kv.spill(conv, long, computed(tiny_lm, long))
    kv.flush()
    first = next(r for r in store.all_chunks() if r.start == 0)
    assert not get_codec(first.codec.split(":")[0]).lossless
    short = long[:20] + ids(8, seed=1)  # shorter than a chunk, parts from the old one at 20
    kv = KVManager(store, kv_dir(), tiny_lm, codec="tiered", chunk_tokens=C)
    att = kv.attach(conv, short + [7])
    assert att.source == "disk" and att.cached == 20 and kv.inexact(att.cache) == 20
    with torch.no_grad():
        rest = torch.tensor([short[20:]], device=tiny_lm.device)
        tiny_lm.model(rest, **cache_arg(tiny_lm.model, att.cache), use_cache=True)
    kv.spill(conv, short, att.cache)
    kv.flush()
    assert [r for r in store.all_chunks() if r.partial and r.start == 0] == []
    again, _ = from_disk(store, tiny_lm, "tiered", short)
    assert again.cached == 0  # computed anew, never the lossy positions labelled exact
    exact = spilled(store, tiny_lm, "tiered", short)  # a spill from the exact cache stores it
    assert [r.codec.split(":")[0] for r in store.all_chunks() if r.partial and r.start == 0] == ["fp16"]
    exact.close()


def test_a_tail_whose_row_names_another_parent_than_its_file_is_not_used(store, tiny_lm):
    """Tail chunks are found by their row's parent: a row that lies about it (damaged, or
    mixed up) must not attach a cache computed after another prefix."""
    import sqlite3

    from chatkv.paths import db_path

    a, b = ids(C + 5, seed=1), ids(C + 5, seed=2)
    spilled(store, tiny_lm, "fp16", a)
    spilled(store, tiny_lm, "fp16", b)
    a0 = next(r.key for r in store.all_chunks() if r.start == 0 and not r.partial and r.parent is None)
    b_tail = [r for r in store.all_chunks() if r.partial and r.parent != a0]
    assert len(b_tail) == 1
    with sqlite3.connect(db_path()) as db:
        db.execute("UPDATE kv_chunks SET parent = ? WHERE key = ?", (a0, b_tail[0].key))
    prompt = a[:C] + b[C:]
    att, _ = from_disk(store, tiny_lm, "fp16", prompt)
    assert att.cached == C  # a's first chunk, and not b's tail after it


# The layouts chatkv wrote before (GroupQuantCodec arguments past name and bits): each must
# be refused by the current reader under the same codec name.
OLD_LAYOUTS = {
    # int4 version 1: symmetric values, key codes in channel order
    "int4 v1": ("int4", 4, dict(k_group=32, version="1")),
    # int2 version 2: key groups of 32, float16 scales and zero points
    "int2 v2": ("int2", 2, dict(k_group=32, version="2")),
}


@pytest.mark.parametrize("old_layout", sorted(OLD_LAYOUTS))
def test_a_chunk_in_a_previous_layout_is_refused_and_recomputed(store, tiny_lm, old_layout):
    """A codec's layout version names what its files hold (int4 version 2: values' zero points
    in one byte; int2 version 3: key group ranges as 4-bit codes, groups of 16): a file written by an earlier
    version under the same name is refused by the reader, whatever its index row says, and
    the conversation's next spill replaces it with the current layout."""
    from chatkv.errors import CacheError
    from chatkv.kv.codecs import GroupQuantCodec

    name, bits, layout = OLD_LAYOUTS[old_layout]
    old = GroupQuantCodec(
        name, bits, k_axis="token", v_axis="channel", v_group=64, k_rotate=True, v_rotate=True, sink=1,
        **layout,
    )  # fmt: skip
    assert get_codec(name).params()["version"] != old.params()["version"]
    assert old.tag != get_codec(name).tag
    tokens = ids(2 * C + 6)
    spilled(store, tiny_lm, name, tokens)
    rec = next(r for r in store.all_chunks() if r.start == C)
    path = kv_dir() / rec.path
    data = read_chunk(path, get_policy(name), tiny_lm.fingerprint, rec.key, torch.float32, "cpu")
    blob, checksum = encode_chunk(
        old, tiny_lm.fingerprint, rec.key, rec.parent, C, data.tokens, data.layers, False
    )
    write_atomic(path, blob)
    store.add_chunk(type(rec)(**{**rec.__dict__, "nbytes": len(blob), "checksum": checksum}))
    with pytest.raises(CacheError, match=f"codec '{name}'"):
        read_chunk(path, get_policy(name), tiny_lm.fingerprint, rec.key, torch.float32, "cpu")
    att, _ = from_disk(store, tiny_lm, name, tokens)
    assert att.source == "disk" and att.cached == C  # the chunk before it, no further
    assert any(rec.key[:12] in p for p in att.problems)
    spilled(store, tiny_lm, name, tokens)  # the conversation goes on: the chunk is rewritten
    assert file_meta(path)["codec_params"] == json.dumps(get_codec(name).params(), sort_keys=True)
    att, _ = from_disk(store, tiny_lm, name, tokens)
    assert att.cached == len(tokens) and att.problems == []
