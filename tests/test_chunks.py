"""Unit tests of the chunk store's building blocks, without generating text:

- chunk keys chain over their parent, so equal keys mean equal prefixes;
- a chunk file round-trips exactly with the fp16 codec, and `read_chunk` refuses any
  file it cannot trust (corrupt, truncated, missing, another model, codec, format,
  key or dtype) with a CacheError, never with wrong tensors;
- `write_atomic` leaves only the finished file, also when the rename fails;
- `verify_file`, `maintenance.verify` and `maintenance.gc` (missing files, orphan and
  temp files, LRU down to a byte budget);
- the LivePool keeps the most recently used caches within its byte budget.
"""

from __future__ import annotations

import json
import os
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch

from chatkv.errors import CacheError
from chatkv.kv import live, maintenance
from chatkv.kv.chunks import (
    chain_keys,
    chunk_key,
    encode_chunk,
    peek_tokens,
    read_chunk,
    relpath,
    verify_file,
    write_atomic,
)
from chatkv.kv.codecs import get_codec
from chatkv.kv.live import LivePool
from chatkv.kv.policy import get_policy
from chatkv.store.common import ChunkRecord

FP = "f" * 32
FP16 = get_codec("fp16")
EXACT = get_policy("fp16")  # the lossless policy: accepts fp16 chunks only
DTYPE = torch.float32
CPU = torch.device("cpu")


def layers(n_tokens: int, n_layers: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (1, 2, n_tokens, 16)  # (B, H, T, D)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(n_layers)]


def make_chunk(tokens, parent=None, start=0, fingerprint=FP, codec=FP16, partial=False, seed=0):
    """(key, file bytes, checksum, layers) of a chunk over `tokens`."""
    key = chunk_key(fingerprint, parent, tokens)
    kv = layers(len(tokens), seed=seed)
    blob, checksum = encode_chunk(codec, fingerprint, key, parent, start, tokens, kv, partial)
    return key, blob, checksum, kv


def rewrite_metadata(path: Path, **changes: str) -> None:
    """Change `__metadata__` entries of a safetensors file, keeping its tensors as they are."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    header["__metadata__"].update(changes)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + blob[8 + n :])


def flip_data_bytes(path: Path) -> None:
    """Invert a few bytes in the middle of the tensor data (the header stays readable)."""
    blob = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    mid = 8 + n + (len(blob) - 8 - n) // 2
    for i in range(mid, mid + 4):
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))


# -- keys ---------------------------------------------------------------------------


def test_chunk_keys_chain_over_the_parent():
    a = list(range(100))
    b = a[:64] + [7] * 36  # same first two chunks, then different
    ka, kb = chain_keys(FP, a, 32), chain_keys(FP, b, 32)
    assert len(ka) == 3 and len(kb) == 3  # the trailing partial chunk is not in the chain
    assert ka[:2] == kb[:2] and ka[2] != kb[2]
    assert ka == chain_keys(FP, a + [1, 2, 3], 32)  # a longer conversation extends the chain
    assert ka[1] == chunk_key(FP, ka[0], a[32:64])

    # The same tokens after a different parent or model are another chunk (not another
    # codec: a chunk is re-coded as it ages under the same key; the file names its codec).
    same_tokens = a[32:64]
    assert chunk_key(FP, "0" * 64, same_tokens) != ka[1]
    assert chunk_key(FP, None, same_tokens) != ka[1]
    assert chunk_key("e" * 32, ka[0], same_tokens) != ka[1]
    # and a different token anywhere in a chunk changes its key and every key after it
    c = a.copy()
    c[40] = 999
    kc = chain_keys(FP, c, 32)
    assert kc[0] == ka[0] and kc[1] != ka[1] and kc[2] != ka[2]


def test_relpath_fans_out_on_the_key():
    key = chunk_key(FP, None, [1, 2, 3])
    assert relpath(key) == f"{key[:2]}/{key[2:4]}/{key}.safetensors"


# -- file format ----------------------------------------------------------------------


def test_fp16_chunk_roundtrips_exactly(tmp_path):
    tokens = list(range(10, 42))
    parent = chunk_key(FP, None, list(range(32)))
    key, blob, _, kv = make_chunk(tokens, parent=parent, start=32, partial=True)
    path = tmp_path / relpath(key)
    write_atomic(path, blob)
    data = read_chunk(path, EXACT, FP, key, DTYPE, CPU)
    assert data.key == key and data.parent == parent and data.start == 32 and data.partial
    assert data.tokens == tokens
    assert len(data.layers) == len(kv)
    for (k, v), (k2, v2) in zip(kv, data.layers, strict=True):
        assert k2.shape == k.shape and k2.dtype == DTYPE
        assert torch.equal(k, k2) and torch.equal(v, v2)


def test_the_directories_a_write_creates_are_private_whatever_the_umask(tmp_path):
    key, blob, _, _ = make_chunk(list(range(32)))
    path = tmp_path / "kv" / relpath(key)
    old = os.umask(0o022)
    try:
        write_atomic(path, blob)
    finally:
        os.umask(old)
    for d in (tmp_path / "kv", path.parent.parent, path.parent):
        assert d.stat().st_mode & 0o777 == 0o700, d
    assert path.read_bytes() == blob


@pytest.fixture
def written(tmp_path):
    """A sound chunk file on disk: (path, key)."""
    key, blob, _, _ = make_chunk(list(range(32)))
    path = tmp_path / relpath(key)
    write_atomic(path, blob)
    return path, key


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (flip_data_bytes, "checksum"),
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "truncated"),
        (lambda p: p.write_bytes(p.read_bytes()[:5]), "not a safetensors"),
        (lambda p: p.write_bytes(b"hello, world" * 10), "not a safetensors"),
        (lambda p: p.unlink(), "unreadable"),
        (lambda p: rewrite_metadata(p, format="chatkv-kv/0"), "format"),
        (lambda p: rewrite_metadata(p, fingerprint="e" * 32), "fingerprint"),
        (lambda p: rewrite_metadata(p, codec="int8"), "codec"),  # not fp16's parameters
        (lambda p: rewrite_metadata(p, codec="int9"), "codec"),  # not registered
        (lambda p: rewrite_metadata(p, key="0" * 64), "key"),
        (lambda p: rewrite_metadata(p, dtype="bfloat16"), "dtype"),
        (lambda p: rewrite_metadata(p, n_tokens="31"), "malformed|tokens"),
    ],
    ids=[
        "flipped",
        "truncated",
        "header-cut",
        "garbage",
        "missing",
        "format",
        "fingerprint",
        "codec",
        "unknown-codec",
        "key",
        "dtype",
        "n_tokens",
    ],
)
def test_read_chunk_refuses_what_it_cannot_trust(written, damage, reason):
    path, key = written
    read_chunk(path, EXACT, FP, key, DTYPE, CPU)  # sound before
    damage(path)
    with pytest.raises(CacheError, match=reason):
        read_chunk(path, EXACT, FP, key, DTYPE, CPU)


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        lambda p: p.write_bytes(p.read_bytes()[:5]),
        lambda p: p.write_bytes(b"hello, world" * 10),
        lambda p: p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}"),
        lambda p: p.unlink(),
    ],
    ids=["truncated", "header-cut", "garbage", "huge-header", "missing"],
)
def test_peek_tokens_reads_a_chunks_token_ids_and_nothing_from_a_broken_file(written, damage):
    path, _ = written
    assert peek_tokens(path) == list(range(32))
    damage(path)
    assert peek_tokens(path) is None


def test_read_chunk_refuses_a_sound_file_of_another_model_codec_or_key(written, tmp_path):
    path, key = written
    read_chunk(path, EXACT, FP, key, DTYPE, CPU)
    with pytest.raises(CacheError, match="fingerprint"):
        read_chunk(path, EXACT, "e" * 32, key, DTYPE, CPU)
    # a lossy chunk under the lossless policy: refused, whatever the key says
    int8_key, blob, _, _ = make_chunk(list(range(32)), codec=get_codec("int8"))
    write_atomic(tmp_path / "int8.safetensors", blob)
    read_chunk(tmp_path / "int8.safetensors", get_policy("int8"), FP, int8_key, DTYPE, CPU)
    with pytest.raises(CacheError, match="codec 'int8', which policy 'fp16' refuses"):
        read_chunk(tmp_path / "int8.safetensors", EXACT, FP, int8_key, DTYPE, CPU)
    with pytest.raises(CacheError, match="key"):
        read_chunk(path, EXACT, FP, "0" * 64, DTYPE, CPU)
    with pytest.raises(CacheError, match="dtype"):
        read_chunk(path, EXACT, FP, key, torch.bfloat16, CPU)


def test_write_atomic_leaves_only_the_finished_file(tmp_path, monkeypatch):
    target = tmp_path / "ab" / "cd" / "x.safetensors"
    write_atomic(target, b"first")
    write_atomic(target, b"second")  # replacing is atomic too
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.safetensors"]

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        write_atomic(tmp_path / "ab" / "cd" / "y.safetensors", b"never")
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.safetensors"]
    assert target.read_bytes() == b"second"


# -- index and maintenance -------------------------------------------------------------


def index_chunk(store, kv_dir: Path, tokens, parent=None, start=0, seed=0, used_at=None) -> ChunkRecord:
    """Write a chunk file and index it; returns its record."""
    key, blob, checksum, _ = make_chunk(tokens, parent=parent, start=start, seed=seed)
    write_atomic(kv_dir / relpath(key), blob)
    now = used_at or datetime.now(UTC)
    rec = ChunkRecord(
        key=key,
        parent=parent,
        fingerprint=FP,
        codec=FP16.tag,
        start=start,
        n_tokens=len(tokens),
        partial=False,
        path=relpath(key),
        nbytes=len(blob),
        checksum=checksum,
        created_at=now,
        last_used_at=now,
    )
    store.add_chunk(rec)
    return rec


def test_verify_file_checks_the_file_against_its_record(tmp_path, store):
    kv = tmp_path / "kv"
    rec = index_chunk(store, kv, list(range(32)))
    path = kv / rec.path
    assert verify_file(path, rec) is None
    other = ChunkRecord(**{**rec.__dict__, "n_tokens": 16})
    assert "n_tokens" in verify_file(path, other)
    other = ChunkRecord(**{**rec.__dict__, "fingerprint": "e" * 32})
    assert "fingerprint" in verify_file(path, other)
    other = ChunkRecord(**{**rec.__dict__, "start": 64})
    assert "start" in verify_file(path, other)
    rewrite_metadata(path, format="chatkv-kv/0")
    assert "format" in verify_file(path, rec)
    rewrite_metadata(path, format="chatkv-kv/2")
    assert verify_file(path, rec) is None
    flip_data_bytes(path)
    assert "checksum" in verify_file(path, rec)
    path.write_bytes(path.read_bytes()[:100])
    assert "truncated" in verify_file(path, rec)
    path.unlink()
    assert "unreadable" in verify_file(path, rec)


def test_maintenance_verify_reports_and_removes_bad_chunks(tmp_path, store):
    kv = tmp_path / "kv"
    good = index_chunk(store, kv, list(range(32)))
    bad = index_chunk(store, kv, list(range(32, 64)), parent=good.key, start=32, seed=1)
    gone = index_chunk(store, kv, list(range(64, 96)), parent=bad.key, start=64, seed=2)
    flip_data_bytes(kv / bad.path)
    (kv / gone.path).unlink()

    report = maintenance.verify(store, kv, fix=False)
    assert report.checked == 3 and report.removed == 0
    assert {k for k, _ in report.bad} == {bad.key, gone.key}
    assert set(store.get_chunks([good.key, bad.key, gone.key])) == {good.key, bad.key, gone.key}

    report = maintenance.verify(store, kv, fix=True)
    assert report.removed == 2
    assert set(store.get_chunks([good.key, bad.key, gone.key])) == {good.key}
    assert not (kv / bad.path).exists() and (kv / good.path).exists()
    assert maintenance.verify(store, kv).bad == []


def test_gc_removes_missing_rows_orphan_files_and_lru_down_to_budget(tmp_path, store):
    kv = tmp_path / "kv"
    t0 = datetime.now(UTC) - timedelta(hours=1)
    recs = [
        index_chunk(store, kv, list(range(i * 32, i * 32 + 32)), seed=i, used_at=t0 + timedelta(minutes=i))
        for i in range(5)
    ]
    # a row whose file is gone, a file no row points at, and a spill's temp file
    (kv / recs[2].path).unlink()
    key, blob, _, _ = make_chunk(list(range(500, 532)), seed=9)
    orphan = kv / relpath(key)
    write_atomic(orphan, blob)
    temp = kv / recs[0].path[:5] / ".tmp-abc.part"
    temp.write_bytes(b"half a chunk")
    long_ago = (datetime.now() - timedelta(hours=1)).timestamp()
    for p in (orphan, temp):
        os.utime(p, (long_ago, long_ago))
    # A young unindexed file may be a running spill's, between writing and indexing: kept.
    in_flight = kv / recs[1].path[:5] / ".tmp-def.part"
    in_flight.write_bytes(b"being written")

    size = recs[0].nbytes
    report = maintenance.gc(store, kv, max_bytes=2 * size)
    assert report.missing_files == 1
    assert report.orphan_files == 2
    assert not orphan.exists() and not temp.exists() and in_flight.exists()
    # 4 indexed chunks remain after the missing one; LRU keeps the two used last.
    assert report.removed == 2 and report.freed == 2 * size
    left = store.all_chunks()
    assert {r.key for r in left} == {recs[3].key, recs[4].key}
    assert store.chunk_stats()["bytes"] <= 2 * size
    files = sorted(p for p in kv.rglob("*") if p.is_file())
    assert files == sorted([in_flight] + [kv / r.path for r in left])
    os.utime(in_flight, (long_ago, long_ago))  # a spill killed half-way, a while ago

    again = maintenance.gc(store, kv, max_bytes=2 * size)
    assert (again.removed, again.orphan_files, again.missing_files) == (0, 1, 0)
    assert not in_flight.exists()
    emptied = maintenance.gc(store, kv, max_bytes=0)
    assert emptied.removed == 2 and store.all_chunks() == []
    assert not [p for p in kv.rglob("*") if p.is_file()]


def test_evict_lru_spares_kept_keys(tmp_path, store):
    kv = tmp_path / "kv"
    t0 = datetime.now(UTC) - timedelta(hours=1)
    recs = [
        index_chunk(store, kv, list(range(i * 32, i * 32 + 32)), seed=i, used_at=t0 + timedelta(minutes=i))
        for i in range(3)
    ]
    removed, freed = maintenance.evict_lru(store, kv, recs[0].nbytes, keep={recs[0].key})
    assert removed == 2 and freed == recs[1].nbytes + recs[2].nbytes
    assert [r.key for r in store.all_chunks()] == [recs[0].key]
    assert (kv / recs[0].path).exists() and not (kv / recs[1].path).exists()


# -- live pool ------------------------------------------------------------------------


def test_live_pool_evicts_least_recently_used_by_bytes(monkeypatch):
    class Cache:
        def __init__(self, nbytes: int):
            self.size = nbytes

    # The pool's policy alone: a cache's size is what live.nbytes says it is.
    monkeypatch.setattr(live, "nbytes", lambda cache: cache.size)
    pool = LivePool(budget=300)
    for conv in ("a", "b", "c"):
        pool.put(conv, list(range(10)), Cache(100))
    assert pool.bytes == 300 and all(c in pool for c in "abc")

    # "a" is used again (taken and put back): "b" is now the least recently used.
    item = pool.take("a")
    assert item is not None and "a" not in pool and item.tokens == list(range(10))
    pool.put("a", item.tokens, item.cache)
    pool.put("d", list(range(10)), Cache(100))
    assert "b" not in pool and all(c in pool for c in "acd")
    assert pool.bytes == 300

    # A bigger cache pushes out as many old ones as it needs, oldest first.
    pool.put("e", list(range(20)), Cache(200))
    assert "e" in pool and "d" in pool and "a" not in pool and "c" not in pool
    assert pool.peek_tokens("e") == 20 and pool.peek_tokens("a") == 0
    assert pool.bytes == 300

    # Putting a conversation again replaces its entry instead of counting it twice.
    pool.put("d", list(range(12)), Cache(100))
    assert pool.bytes == 300 and pool.peek_tokens("d") == 12 and "e" in pool

    # A cache over the whole budget is not kept at all, and pushes nothing out.
    pool.put("f", list(range(40)), Cache(301))
    assert "f" not in pool and "e" in pool and "d" in pool
    assert pool.bytes == 300
    pool.drop("d")
    assert "d" not in pool and pool.take("d") is None and pool.bytes == 200


def test_untear_and_crop_leave_sliding_window_layers_alone():
    """A sliding-window layer keeps only its last positions: its length is not the cache's.
    untear and crop_to judge by the full layers, and a crop into a window that has moved on
    is refused (the caller starts anew) rather than keeping the wrong positions."""
    from transformers import MistralConfig
    from transformers.cache_utils import DynamicCache, DynamicLayer

    config = MistralConfig(
        num_hidden_layers=2, sliding_window=4, hidden_size=32, num_attention_heads=2, num_key_value_heads=1
    )

    def cache(mixed: bool) -> DynamicCache:
        c = DynamicCache(config=config)
        if mixed:
            c.layers[1] = DynamicLayer()
        k = torch.randn(1, 1, 6, 16)
        for i in range(2):
            c.update(k, k, i)
        return c

    sliding = cache(mixed=False)
    assert [layer.keys.shape[-2] for layer in sliding.layers] == [3, 3]  # the window, of 6 positions
    assert live.untear(sliding) == 6 and [layer.keys.shape[-2] for layer in sliding.layers] == [3, 3]
    assert not live.crop_to(sliding, 5) and [layer.keys.shape[-2] for layer in sliding.layers] == [3, 3]
    assert live.crop_to(sliding, 6)  # nothing to crop
    mixed = cache(mixed=True)
    assert live.untear(mixed) == 6 and mixed.layers[1].keys.shape[-2] == 6
    torn = mixed.layers[1]
    torn.keys, torn.values = torn.keys[..., :5, :], torn.values[..., :5, :]  # as a step cut short would
    mixed.layers[1] = torn
    assert live.untear(mixed) == 5 and mixed.layers[0].keys.shape[-2] == 3  # the window is left alone
