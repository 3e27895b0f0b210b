"""The chunk store's guarantees (issue 7, items 9-12 and `cache rebuild`):

- no index row, however crafted, makes gc, verify or a load touch a file outside the kv dir;
- eviction shrinks chains from their ends and removes chunks that can never attach first;
- every damaged or crafted chunk file is refused with a CacheError, counted bad by verify
  and removed; a transient read error removes nothing; removal never undoes a concurrent
  spill;
- the fingerprint covers the device and the attention implementation, and a hub model
  that cannot be identified keeps its caches in memory only;
- `chatkv cache rebuild` indexes the sound chunk files again from their own metadata.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import stat
import struct
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from chatkv.cli import main as cli_main
from chatkv.engine.generate import cache_arg
from chatkv.errors import CacheError
from chatkv.kv import chunks, maintenance
from chatkv.kv.chunks import (
    chunk_key,
    chunk_path,
    encode_chunk,
    file_id,
    read_chunk,
    relpath,
    tensors_checksum,
    write_atomic,
)
from chatkv.kv.codecs import get_codec
from chatkv.kv.manager import KVManager
from chatkv.kv.policy import get_policy
from chatkv.paths import data_dir, db_path, kv_dir
from chatkv.store import Store
from chatkv.store.common import ChunkRecord

FP = "f" * 32
FP16 = get_codec("fp16")
LOSSLESS = get_policy("fp16")
DTYPE = torch.float32
CPU = torch.device("cpu")


def layers(n_tokens: int, n_layers: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (1, 2, n_tokens, 16)  # (B, H, T, D)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(n_layers)]


def index_chunk(store, kv: Path, tokens, parent=None, start=0, seed=0, used_at=None) -> ChunkRecord:
    """Write a sound chunk file and index it; returns its record."""
    key = chunk_key(FP, parent, tokens)
    blob, checksum = encode_chunk(FP16, FP, key, parent, start, tokens, layers(len(tokens), seed=seed), False)
    write_atomic(kv / relpath(key), blob)
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


def index_chain(store, kv: Path, n: int, used_at=None, first_token: int = 0) -> list[ChunkRecord]:
    """A chain of `n` 32-token chunks; the root is used least recently unless `used_at` says."""
    t0 = datetime.now(UTC) - timedelta(hours=1)
    recs: list[ChunkRecord] = []
    for i in range(n):
        when = used_at[i] if used_at else t0 + timedelta(minutes=i)
        parent = recs[-1].key if recs else None
        tokens = list(range(first_token + i * 32, first_token + i * 32 + 32))
        recs.append(index_chunk(store, kv, tokens, parent, i * 32, i, when))
    return recs


@pytest.fixture
def kv(tmp_path):
    path = tmp_path / "kv"
    path.mkdir(mode=0o700)
    return path


def read(kv: Path, rec: ChunkRecord):
    return read_chunk(
        chunk_path(kv, rec.key), LOSSLESS, FP, rec.key, DTYPE, CPU, nbytes=rec.nbytes, checksum=rec.checksum
    )


# -- item 9: no file outside the data directory ----------------------------------------


def crafted_row(key: str, path: str) -> ChunkRecord:
    return ChunkRecord(
        key=key,
        parent=None,
        fingerprint=FP,
        codec="fp16",
        start=0,
        n_tokens=32,
        partial=False,
        path=path,
        nbytes=10,
        checksum="0" * 64,
    )


def test_crafted_index_rows_never_touch_a_file_outside_the_kv_dir(tmp_path, store, kv):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("precious")
    old = (datetime.now() - timedelta(hours=1)).timestamp()
    os.utime(sentinel, (old, old))
    good = index_chunk(store, kv, list(range(32)))
    rows = [
        crafted_row("../../sentinel.txt", "../../sentinel.txt"),  # a key that is a path
        crafted_row(str(sentinel), str(sentinel)),  # an absolute one
        crafted_row("a" * 64, "../sentinel.txt"),  # a sound key, a path column pointing out
        crafted_row("b" * 64, str(sentinel)),
        crafted_row("C" * 64, "../sentinel.txt"),  # uppercase: not a key of ours
    ]
    for r in rows:
        store.add_chunk(r)
    # a fan-out directory replaced by a symlink to elsewhere, holding a file named as a chunk
    outside = tmp_path / "elsewhere"
    key = "cd" + "e" * 62
    (outside / key[2:4]).mkdir(parents=True)
    victim = outside / key[2:4] / f"{key}.safetensors"
    victim.write_text("not a chunk of ours")
    os.utime(victim, (old, old))
    os.symlink(outside, kv / key[:2])
    store.add_chunk(crafted_row(key, relpath(key)))
    with pytest.raises(CacheError, match="outside"):
        chunk_path(kv, key)

    report = maintenance.verify(store, kv, fix=True)
    assert {k for k, _ in report.bad} == {r.key for r in rows} | {key}
    assert sentinel.read_text() == "precious" and victim.exists()
    for r in rows:
        store.add_chunk(r)
    store.add_chunk(crafted_row(key, relpath(key)))
    maintenance.remove(store, kv, rows + [crafted_row(key, relpath(key))])
    for r in rows:
        store.add_chunk(r)
    report = maintenance.gc(store, kv, max_bytes=0, orphan_min_age_s=0)
    assert sentinel.read_text() == "precious" and victim.read_text() == "not a chunk of ours"
    assert store.all_chunks() == [] and report.removed == 1
    assert not (kv / good.path).exists()


def test_a_chunk_file_that_is_a_symlink_is_not_followed(tmp_path, store, kv):
    sentinel = tmp_path / "sentinel.safetensors"
    rec = index_chunk(store, kv, list(range(32)))
    path = chunk_path(kv, rec.key)
    os.replace(path, sentinel)  # a sound chunk, but outside, reached through a symlink
    os.symlink(sentinel, path)
    with pytest.raises(CacheError, match="outside") as err:
        read(kv, rec)
    assert err.value.damaged
    with pytest.raises(CacheError, match="unreadable") as err:  # nor followed when opened
        read_chunk(path, LOSSLESS, FP, rec.key, DTYPE, CPU)
    assert err.value.damaged
    report = maintenance.verify(store, kv, fix=True)
    assert [k for k, _ in report.bad] == [rec.key] and store.all_chunks() == []
    assert sentinel.exists()
    maintenance.gc(store, kv, max_bytes=0, orphan_min_age_s=0)  # the link is an orphan: unlinked
    assert sentinel.exists() and not path.is_symlink()


def test_resuming_past_a_crafted_row_touches_nothing_outside(tmp_path, tiny_lm, store, kv):
    from chatkv.kv import live

    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("precious")
    kvm = KVManager(store, kv, tiny_lm, codec="fp16", chunk_tokens=16)
    tokens = list(range(3, 60))
    cache = live.new_cache(tiny_lm.model)
    with torch.no_grad():
        tiny_lm.model(torch.tensor([tokens[:48]]), **cache_arg(tiny_lm.model, cache), use_cache=True)
    kvm.spill(None, tokens[:48], cache)  # three full chunks, no tail
    kvm.flush()
    last = max(store.all_chunks(), key=lambda r: r.start)
    # a row claiming to continue the chain, newest of all, whose key is a path
    crafted = ChunkRecord(
        key="../../sentinel.txt",
        parent=last.key,
        fingerprint=tiny_lm.fingerprint,
        codec=FP16.tag,  # as a tail chunk is indexed, so that the resume considers it
        start=48,
        n_tokens=9,
        partial=True,
        path=str(sentinel),
        nbytes=8,
        checksum="0" * 64,
        created_at=datetime.now(UTC) + timedelta(hours=1),
    )
    store.add_chunk(crafted)
    att = kvm.attach(None, tokens + [7])
    assert att.cached == 48 and any("64 lowercase hex" in p for p in att.problems)
    assert sentinel.read_text() == "precious"
    assert crafted.key not in store.get_chunks([crafted.key]) and len(store.all_chunks()) == 3
    kvm.close()


def test_malformed_key_never_becomes_a_path():
    for bad in ("../../x", "/etc/passwd", "A" * 64, "a" * 63, "a" * 65, "g" * 64, "a" * 62 + "/x"):
        with pytest.raises(CacheError, match="64 lowercase hex"):
            relpath(bad)


def test_an_existing_data_dir_open_to_others_is_reported_and_its_kv_dir_tightened(chatkv_home, caplog):
    chatkv_home.mkdir(mode=0o755)
    os.chmod(chatkv_home, 0o755)
    (chatkv_home / "kv").mkdir(mode=0o755)
    os.chmod(chatkv_home / "kv", 0o755)
    with caplog.at_level(logging.WARNING, logger="chatkv.paths"):
        kv_dir()
        data_dir()
    # the user's own CHATKV_HOME is not changed behind their back, but they are told, once
    assert stat.S_IMODE(chatkv_home.stat().st_mode) == 0o755
    warnings = [r for r in caplog.records if "readable by other users" in r.getMessage()]
    assert len(warnings) == 1 and str(chatkv_home) in warnings[0].getMessage()
    # chatkv's own directory inside it holds the chunks: tightened
    assert stat.S_IMODE((chatkv_home / "kv").stat().st_mode) == 0o700


# -- item 10: eviction from the ends of chains -----------------------------------------


def test_a_budget_one_byte_under_a_chain_evicts_its_last_chunk_not_its_root(store, kv):
    recs = index_chain(store, kv, 5)  # the root is the least recently used
    total = sum(r.nbytes for r in recs)
    removed, freed = maintenance.evict_lru(store, kv, total - 1)
    assert (removed, freed) == (1, recs[-1].nbytes)
    assert not (kv / recs[-1].path).exists()
    chain = store.chunk_chain(recs[3].key)
    assert [r.key for r in chain] == [r.key for r in recs[:4]] and chain[0].parent is None
    for r in recs[:4]:  # every chunk left still attaches
        assert read(kv, r).start == r.start


def test_eviction_removes_chunks_that_cannot_attach_first_then_leaves(store, kv):
    t0 = datetime.now(UTC) - timedelta(hours=1)
    a = index_chain(store, kv, 3, used_at=[t0 + timedelta(minutes=m) for m in (50, 51, 52)])
    b = index_chain(store, kv, 4, used_at=[t0 + timedelta(minutes=m) for m in (1, 2, 3, 4)], first_token=1000)
    store.delete_chunks([b[1].key])  # b[2:] can never attach again: their parent chain is broken
    total = sum(r.nbytes for r in store.all_chunks())
    # one byte over: the unreachable chunks go first (all of them: they are worth nothing),
    # although b[0] was used less recently
    removed, freed = maintenance.evict_lru(store, kv, total - 1)
    assert (removed, freed) == (2, b[2].nbytes + b[3].nbytes)
    assert {r.key for r in store.all_chunks()} == {r.key for r in a} | {b[0].key}
    assert not (kv / b[3].path).exists()
    # then leaves by last use; a kept chain stays whole
    removed, _ = maintenance.evict_lru(store, kv, 3 * a[0].nbytes, keep={r.key for r in a})
    assert removed == 1 and {r.key for r in store.all_chunks()} == {r.key for r in a}
    # and without `keep`, chain a shrinks from its end even though its root is used least
    removed, _ = maintenance.evict_lru(store, kv, a[0].nbytes)
    assert removed == 2 and [r.key for r in store.all_chunks()] == [a[0].key]


# -- item 11: the hardened reader ------------------------------------------------------


def parts_of(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def resave(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write a self-consistent file: its own checksum matches its (crafted) tensors."""
    meta = meta | {"checksum": tensors_checksum(tensors)}
    path.write_bytes(st_save(tensors, metadata=meta))


def reindex(store, rec: ChunkRecord, path: Path) -> None:
    """Make the index agree with the crafted file, so that only the file's content gives it away."""
    _, meta = parts_of(path)
    store.add_chunk(
        ChunkRecord(**{**rec.__dict__, "nbytes": path.stat().st_size, "checksum": meta["checksum"]})
    )


def craft(change):
    def damage(path, store, rec):
        tensors, meta = parts_of(path)
        change(tensors, meta)
        resave(path, tensors, meta)
        reindex(store, rec, path)

    return damage


def rewrite_header(path: Path, store, rec, fn) -> None:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    header = fn(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + blob[8 + n :])
    store.add_chunk(ChunkRecord(**{**rec.__dict__, "nbytes": path.stat().st_size}))


def drop_meta(name):
    def fn(header):
        del header["__metadata__"][name]
        return header

    return lambda p, s, r: rewrite_header(p, s, r, fn)


def set_meta(**values):
    def fn(header):
        header["__metadata__"].update(values)
        return header

    return lambda p, s, r: rewrite_header(p, s, r, fn)


def nested_header(path: Path) -> bytes:
    """The file with its header replaced by JSON nested deeper than Python's recursion limit."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = b"[" * 100_000 + b"]" * 100_000
    return struct.pack("<Q", len(header)) + header + blob[8 + n :]


def _nan(t, m):
    t["k.data"][0, 0, 3, 5] = float("nan")


def _inf(t, m):
    t["v.data"][1, 1, 0, 0] = float("-inf")


DAMAGES = {
    "transposed": (
        craft(lambda t, m: t.update({"k.data": t["k.data"].transpose(2, 3).contiguous()})),
        "k.data",
    ),
    "float16-not-float32": (craft(lambda t, m: t.update({"v.data": t["v.data"].half()})), "v.data"),
    "nan": (craft(_nan), "NaN"),
    "inf": (craft(_inf), "infinity"),
    "extra-tensor": (craft(lambda t, m: t.update({"k.extra": torch.zeros(3)})), "tensors"),
    "missing-tensor": (craft(lambda t, m: t.pop("v.data")), "tensors"),
    "tokens-int64": (craft(lambda t, m: t.update({"tokens": t["tokens"].long()})), "tokens"),
    "fewer-tokens": (craft(lambda t, m: t.update({"tokens": t["tokens"][:31].clone()})), "tokens"),
    "oversized": (lambda p, s, r: p.write_bytes(p.read_bytes() + b"\0" * 4096), "oversized"),
    "db-checksum": (
        lambda p, s, r: s.add_chunk(ChunkRecord(**{**r.__dict__, "checksum": "1" * 64})),
        "checksum",
    ),
    "no-n_tokens": (drop_meta("n_tokens"), "lacks metadata n_tokens"),
    "no-checksum": (drop_meta("checksum"), "lacks metadata checksum"),
    "no-metadata": (
        lambda p, s, r: rewrite_header(
            p, s, r, lambda h: {k: v for k, v in h.items() if k != "__metadata__"}
        ),
        "metadata",
    ),
    "header-a-list": (lambda p, s, r: rewrite_header(p, s, r, lambda h: [1, 2]), "metadata"),
    "n_tokens-not-a-number": (set_meta(n_tokens="many"), "n_tokens"),
    "negative-start": (set_meta(start="-32"), "start"),
    "partial-odd": (set_meta(partial="yes"), "partial"),
    "parent-a-path": (set_meta(parent="../../etc/passwd"), "64 lowercase hex"),
    "huge-header-length": (
        lambda p, s, r: p.write_bytes(struct.pack("<Q", 1 << 40) + p.read_bytes()[8:]),
        "header",
    ),
    "huge-shape": (set_meta(layers="1000000"), "more than"),
    "a-fifo": (lambda p, s, r: (p.unlink(), os.mkfifo(p)), "not a regular file"),
    "unicode-digit": (set_meta(head_dim="\u00b2"), "head_dim"),
    "deeply-nested-header": (lambda p, s, r: p.write_bytes(nested_header(p)), "not a safetensors"),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_every_damaged_or_crafted_chunk_is_refused_counted_bad_and_removed(store, kv, case):
    damage, reason = DAMAGES[case]
    rec = index_chunk(store, kv, list(range(32)))
    path = kv / relpath(rec.key)
    read(kv, rec)  # sound before
    damage(path, store, rec)
    rec = store.get_chunks([rec.key])[rec.key]
    with pytest.raises(CacheError, match=reason) as err:
        read(kv, rec)
    assert err.value.damaged
    assert chunks.verify_file(path, rec) is not None
    report = maintenance.verify(store, kv, fix=True)
    assert [k for k, _ in report.bad] == [rec.key] and report.removed == 1
    assert store.all_chunks() == [] and not path.exists()


def test_a_transient_read_error_keeps_the_chunk(store, kv, monkeypatch):
    rec = index_chunk(store, kv, list(range(32)))
    real_open = os.open

    def flaky_open(path, flags, *args, **kwargs):
        if str(path).endswith(".safetensors"):
            raise OSError(errno.EIO, "Input/output error")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", flaky_open)
    with pytest.raises(CacheError, match="unreadable") as err:
        read(kv, rec)
    assert not err.value.damaged
    report = maintenance.verify(store, kv, fix=True)
    assert report.bad == [] and report.removed == 0 and report.unreadable == 1
    monkeypatch.setattr(os, "open", real_open)
    assert list(store.get_chunks([rec.key])) == [rec.key] and read(kv, rec).tokens == list(range(32))


def test_gc_does_not_take_a_transient_error_for_a_missing_file(store, kv, monkeypatch):
    rec = index_chunk(store, kv, list(range(32)))
    real = {"stat": os.stat, "lstat": os.lstat}

    def flaky(name):
        def call(path, *args, **kwargs):
            if str(path).endswith(".safetensors"):
                raise OSError(errno.EIO, "Input/output error")
            return real[name](path, *args, **kwargs)

        return call

    for name in real:
        monkeypatch.setattr(os, name, flaky(name))
    report = maintenance.gc(store, kv, max_bytes=1 << 30)
    for name, fn in real.items():
        monkeypatch.setattr(os, name, fn)
    assert report.missing_files == 0 and list(store.get_chunks([rec.key])) == [rec.key]
    assert read(kv, rec).tokens == list(range(32))


def test_a_transient_read_error_while_resuming_removes_nothing(tiny_lm, store, kv, monkeypatch):
    kvm = KVManager(store, kv, tiny_lm, codec="fp16", chunk_tokens=16)
    tokens = list(range(3, 60))
    from chatkv.kv import live

    cache = live.new_cache(tiny_lm.model)
    with torch.no_grad():
        tiny_lm.model(torch.tensor([tokens]), **cache_arg(tiny_lm.model, cache), use_cache=True)
    kvm.spill(None, tokens, cache)
    kvm.flush()
    before = {r.key for r in store.all_chunks()}
    assert len(before) == 4
    real_open = os.open

    def flaky_open(path, flags, *args, **kwargs):
        if str(path).endswith(".safetensors"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", flaky_open)
    att = kvm.attach(None, tokens + [7])
    assert att.cached == 0 and att.problems and "unreadable" in att.problems[0]
    monkeypatch.setattr(os, "open", real_open)
    assert {r.key for r in store.all_chunks()} == before
    assert all(chunk_path(kv, k).exists() for k in before)
    assert kvm.attach(None, tokens + [7]).cached == len(tokens)
    kvm.close()


def test_remove_never_undoes_a_concurrent_spill(store, kv):
    rec = index_chunk(store, kv, list(range(32)))
    path = chunk_path(kv, rec.key)
    judged = {rec.key: file_id(os.lstat(path))}
    # A spill rewrites the chunk (other bytes: a tail recomputed) and indexes it anew
    # after the chunk was judged bad: neither its row nor its file may go.
    fresh = index_chunk(store, kv, list(range(32)), seed=5)
    assert fresh.key == rec.key and fresh.checksum != rec.checksum
    assert maintenance.remove(store, kv, [rec], judged) == 0
    assert store.get_chunks([rec.key])[rec.key].checksum == fresh.checksum
    assert read(kv, fresh).tokens == list(range(32))
    # The same bytes written again (same row) after judging: the row goes, the new file
    # stays (an orphan for gc), so the judged file is never confused with a new one.
    judged = {rec.key: file_id(os.lstat(path))}
    again = index_chunk(store, kv, list(range(32)), seed=5)
    assert again.checksum == fresh.checksum
    assert maintenance.remove(store, kv, [fresh], judged) == 1
    assert store.get_chunks([rec.key]) == {} and path.exists()
    # Judged and unchanged: both go.
    index_chunk(store, kv, list(range(32)), seed=5)
    assert maintenance.remove(store, kv, [again]) == 1 and not path.exists()


def test_write_atomic_fsyncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_atomic(tmp_path / "ab" / "cd" / "x.safetensors", b"data")
    # the directories gaining the new ab/ and cd/, then the file, then its directory
    assert synced == [True, True, False, True]
    synced.clear()
    write_atomic(tmp_path / "ab" / "cd" / "y.safetensors", b"data")
    assert synced == [False, True]  # the directories were there: the file, then its directory


def test_old_temp_files_are_cleaned_at_the_first_spill_and_counted(tiny_lm, store, kv):
    stale = kv / "ab" / ".tmp-stale.part"
    stale.parent.mkdir()
    stale.write_bytes(b"x" * 100)
    young = kv / "ab" / ".tmp-young.part"
    young.write_bytes(b"y" * 10)
    old = (datetime.now() - timedelta(hours=1)).timestamp()
    os.utime(stale, (old, old))
    assert maintenance.temp_files(kv) == (2, 110)
    kvm = KVManager(store, kv, tiny_lm, codec="fp16", chunk_tokens=16)
    from chatkv.kv import live

    cache = live.new_cache(tiny_lm.model)
    tokens = list(range(3, 30))
    with torch.no_grad():
        tiny_lm.model(torch.tensor([tokens]), **cache_arg(tiny_lm.model, cache), use_cache=True)
    kvm.spill(None, tokens, cache)
    kvm.close()
    assert not stale.exists() and young.exists()
    assert maintenance.temp_files(kv) == (1, 10)


def test_spill_queue_keeps_only_the_newest_snapshot_of_a_conversation(tiny_lm, store, kv, monkeypatch):
    from chatkv.kv import live

    kvm = KVManager(store, kv, tiny_lm, codec="fp16", chunk_tokens=16, live_bytes=1 << 30)
    gate, started, spilled = threading.Event(), threading.Event(), []

    def slow_spill(conv_id, tokens, layers, *rest):
        started.set()
        gate.wait(30)
        spilled.append(len(tokens))
        return 0

    monkeypatch.setattr(kvm, "_spill", slow_spill)
    cache = live.new_cache(tiny_lm.model)
    tokens = list(range(3, 43))
    with torch.no_grad():
        tiny_lm.model(torch.tensor([tokens]), **cache_arg(tiny_lm.model, cache), use_cache=True)
    kvm.spill(1, tokens[:10], cache)
    assert started.wait(30)  # the first is being written
    for n in (20, 30, 40):
        kvm.spill(1, tokens[:n], cache)
    assert kvm._q.qsize() == 1 and len(kvm._pending) == 1  # one queued, the newest
    # the snapshots count in the live budget while their conversation's cache is not live
    snapshot = sum(k[..., :40, :].nbytes + v[..., :40, :].nbytes for k, v in live.layers_of(cache))
    assert kvm.pool.bytes == 2 * snapshot
    kvm.keep_live(1, tokens, cache)
    assert kvm.pool.bytes == live.nbytes(cache)
    gate.set()
    kvm.close()
    assert spilled == [10, 40]
    kvm.pool.drop(1)
    assert kvm.pool.bytes == 0


# -- item 12: fingerprint ----------------------------------------------------------------


def test_fingerprint_covers_device_and_attention_implementation(tiny_lm, tiny_model_dir, monkeypatch):
    from chatkv.engine import model as m

    source = m.resolve(str(tiny_model_dir))
    fp = lambda device="cpu": m.fingerprint(source, tiny_lm.model, tiny_lm.tokenizer, DTYPE, "none", device)  # noqa: E731
    assert fp() == tiny_lm.fingerprint
    assert fp("cuda") != fp("cpu")
    attn = tiny_lm.model.config._attn_implementation
    other = "eager" if attn != "eager" else "sdpa"
    monkeypatch.setattr(tiny_lm.model.config, "_attn_implementation", other, raising=False)
    assert fp() != tiny_lm.fingerprint


def test_a_hub_model_without_commit_hash_is_identified_by_its_files_or_not_persisted(
    tiny_lm, tiny_model_dir, store, kv, monkeypatch
):
    import huggingface_hub

    from chatkv.engine import model as m

    source = m.ModelSource("someone/tiny", "someone/tiny", None, "hub:someone/tiny")
    fp = lambda: m.fingerprint(source, tiny_lm.model, tiny_lm.tokenizer, DTYPE, "none", "cpu")  # noqa: E731
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name, **kw: None)
    assert fp() == ""
    monkeypatch.setattr(
        huggingface_hub,
        "try_to_load_from_cache",
        lambda repo, name, **kw: str(tiny_model_dir / "config.json"),
    )
    by_files = fp()
    assert by_files and by_files != tiny_lm.fingerprint  # the same files under another name
    # no fingerprint, nothing saved: the manager keeps caches live only
    monkeypatch.setattr(tiny_lm, "fingerprint", "")
    assert KVManager(store, kv, tiny_lm).persist is False


# -- item 5 (part): `chatkv cache rebuild` ----------------------------------------------


@pytest.mark.parametrize("damage", ["drop-table", "garbage-table"])
def test_cache_rebuild_indexes_the_sound_files_again(capsys, damage):
    with Store(db_path()) as s:
        recs = index_chain(s, kv_dir(), 4)
    bad = recs[2]
    (kv_dir() / bad.path).write_bytes((kv_dir() / bad.path).read_bytes()[:-100])
    (kv_dir() / "ab").mkdir(exist_ok=True)
    (kv_dir() / "ab" / "not-a-chunk.safetensors").write_bytes(b"junk")
    con = sqlite3.connect(db_path())
    con.execute("DROP TABLE kv_chunks")
    if damage == "garbage-table":
        con.execute("CREATE TABLE kv_chunks (nonsense TEXT)")
        con.execute("INSERT INTO kv_chunks VALUES ('../../etc/passwd')")
    con.commit()
    con.close()

    assert cli_main(["cache", "rebuild", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["indexed"] == 3
    assert sorted(b["file"] for b in out["bad"]) == sorted([bad.path, "ab/not-a-chunk.safetensors"])
    assert "truncated" in next(b["problem"] for b in out["bad"] if b["file"] == bad.path)
    with Store(db_path()) as s:
        got = {r.key: r for r in s.all_chunks()}
        assert set(got) == {r.key for r in recs} - {bad.key}
        for r in recs:
            if r.key in got:
                g = got[r.key]
                assert (g.parent, g.start, g.n_tokens, g.nbytes, g.checksum, g.fingerprint, g.codec) == (
                    r.parent,
                    r.start,
                    r.n_tokens,
                    r.nbytes,
                    r.checksum,
                    r.fingerprint,
                    r.codec,
                )
        assert maintenance.verify(s, kv_dir(), fix=False).bad == []
    assert cli_main(["cache", "rebuild"]) == 0
    assert "indexed 3 chunks" in capsys.readouterr().out


def test_cache_stats_counts_chunks_that_cannot_attach_and_leftover_temp_files(capsys):
    with Store(db_path()) as s:
        recs = index_chain(s, kv_dir(), 3)
        s.delete_chunks([recs[0].key])
    (kv_dir() / "ab").mkdir(exist_ok=True)
    (kv_dir() / "ab" / ".tmp-1.part").write_bytes(b"z" * 7)
    assert cli_main(["cache", "stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["count"] == 2 and stats["unreachable"] == 2 and stats["reachable_bytes"] == 0
    assert stats["unreachable_bytes"] == recs[1].nbytes + recs[2].nbytes
    assert (stats["temp_files"], stats["temp_bytes"]) == (1, 7)
    assert cli_main(["cache", "stats"]) == 0
    out = capsys.readouterr().out
    assert "2 chunks" in out and "cannot attach" in out and "1 leftover temp files" in out


def test_a_spill_marks_the_chunks_it_found_on_disk_as_used(tiny_lm, store, kv):
    from chatkv.kv import live

    kvm = KVManager(store, kv, tiny_lm, codec="fp16", chunk_tokens=16)
    tokens = list(range(3, 40))
    cache = live.new_cache(tiny_lm.model)
    with torch.no_grad():
        tiny_lm.model(torch.tensor([tokens]), **cache_arg(tiny_lm.model, cache), use_cache=True)
    conv = store.create_conversation().id  # a spill for a deleted conversation keeps no chunks
    kvm.spill(conv, tokens[:32], cache)
    kvm.flush()
    long_ago = datetime.now(UTC) - timedelta(days=30)
    for r in store.all_chunks():  # as if written a month ago and since served from memory only
        store.add_chunk(ChunkRecord(**{**r.__dict__, "last_used_at": long_ago}))
    kvm.spill(conv, tokens, cache)  # the next turn's spill: the two full chunks are already on disk
    kvm.close()
    used = {r.key: r.last_used_at for r in store.all_chunks()}
    assert len(used) == 3 and all(t > long_ago + timedelta(days=29) for t in used.values())


def test_an_attach_takes_the_partial_chunk_that_gives_the_most_tokens(tiny_lm, store, kv):
    """A shared system prompt's tail is an exact prefix of the prompt; the same prompt asked
    before (its tail then goes on with a reply) gives more of it, and is taken."""
    from chatkv.kv import live

    kvm = KVManager(store, kv, tiny_lm, codec="fp16", chunk_tokens=64)
    prompt = list(range(3, 40))  # 37 tokens: shorter than a chunk, so every tail is partial

    def computed(tokens):
        cache = live.new_cache(tiny_lm.model)
        with torch.no_grad():
            tiny_lm.model(torch.tensor([tokens]), **cache_arg(tiny_lm.model, cache), use_cache=True)
        return cache

    asked = prompt + [77, 78, 79]  # the prompt as asked before, and the start of its reply
    kvm.spill(store.create_conversation().id, prompt[:10], computed(prompt[:10]))
    kvm.flush()
    kvm.spill(store.create_conversation().id, asked, computed(asked))
    kvm.flush()
    other = [5, 6, 7, 8] * 12  # the newest, and unlike the prompt
    kvm.spill(store.create_conversation().id, other, computed(other))
    kvm.flush()
    got = kvm.attach(None, prompt)
    assert (got.source, got.cached) == ("disk", len(prompt) - 1)
    fresh = computed(prompt)
    for (k, v), (fk, fv) in zip(live.layers_of(got.cache), live.layers_of(fresh), strict=True):
        assert torch.equal(k[..., : len(prompt) - 1, :], fk[..., : len(prompt) - 1, :])
        assert torch.equal(v[..., : len(prompt) - 1, :], fv[..., : len(prompt) - 1, :])
    assert kvm.attach(None, [5, 6, 7, 8] * 3).cached == 11  # the newest one, where it alone begins alike
    kvm.close()


def test_close_does_not_deadlock_on_a_spill_queued_after_its_flush(tiny_lm, store, kv, monkeypatch):
    from chatkv.kv import live

    kvm = KVManager(store, kv, tiny_lm, codec="fp16", chunk_tokens=16)
    tokens = list(range(3, 40))
    cache = live.new_cache(tiny_lm.model)
    with torch.no_grad():
        tiny_lm.model(torch.tensor([tokens]), **cache_arg(tiny_lm.model, cache), use_cache=True)
    conv = store.create_conversation().id
    kvm.spill(conv, tokens[:20], cache)  # starts the worker
    kvm.flush()
    real_flush = kvm.flush

    def flush_then_a_late_spill():
        real_flush()
        kvm.spill(conv, tokens, cache)  # a turn finishing while the front end closes

    monkeypatch.setattr(kvm, "flush", flush_then_a_late_spill)
    closer = threading.Thread(target=kvm.close, daemon=True)
    closer.start()
    closer.join(20)
    assert not closer.is_alive()  # it hung for good before
    assert max(r.start + r.n_tokens for r in store.all_chunks()) == len(tokens)  # and the late spill landed


def test_a_disk_budget_of_0_keeps_only_the_latest_spill(tiny_lm, store, kv):
    """cache.disk_bytes = 0 meant "unlimited" to the spill and "remove everything" to
    `cache gc`; both now take it as nothing kept beyond what was just written."""
    from chatkv.kv import live

    kvm = KVManager(store, kv, tiny_lm, codec="fp16", chunk_tokens=16, disk_bytes=0)

    def spilled(tokens):
        cache = live.new_cache(tiny_lm.model)
        with torch.no_grad():
            tiny_lm.model(torch.tensor([tokens]), **cache_arg(tiny_lm.model, cache), use_cache=True)
        kvm.spill(None, tokens, cache)
        kvm.flush()
        return set(kvm.keys_of(tokens))

    first = spilled(list(range(3, 40)))
    assert {r.key for r in store.all_chunks()} == first
    second = spilled(list(range(100, 140)))
    assert {r.key for r in store.all_chunks()} == second
    kvm.close()
