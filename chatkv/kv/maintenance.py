"""Keeping the chunk store within budget and honest: eviction from the ends of chains,
orphan and temp-file cleanup, verification, and rebuilding the index from the files.
None of it needs the model: evicting a chunk only costs a future prefill.

No path is ever taken from the index: a chunk's file is derived from its key
(`chunks.chunk_path`), and a row whose key is malformed is dropped as damaged.
"""

from __future__ import annotations

import errno
import heapq
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from chatkv.errors import CacheError
from chatkv.kv.chunks import KEY_RE, FileId, chunk_path, file_id, inspect_chunk, relpath, verify_chunk
from chatkv.kv.codecs import get_codec

if TYPE_CHECKING:
    from chatkv.store.chunk_index import ChunkIndex, ChunkRecord


@dataclass
class GcReport:
    removed: int = 0  # chunks evicted to meet the budget
    freed: int = 0
    orphan_files: int = 0
    missing_files: int = 0
    damaged_rows: int = 0  # index rows with a malformed key (dropped, no file touched)
    temp_files: int = 0  # of the orphan files, leftover `.tmp-*.part` files of interrupted spills


@dataclass
class VerifyReport:
    checked: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    removed: int = 0
    unreadable: int = 0  # transient read errors: kept, checked again next time


@dataclass
class RebuildReport:
    indexed: int = 0
    bytes: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file relative to kv dir, reason)


# A file no row points at may be a spill of a running chatkv between writing and
# indexing it (a temp file, or a chunk renamed a moment ago): leave young ones alone.
ORPHAN_MIN_AGE_S = 300.0


def _stat_id(path: Path) -> FileId | None:
    try:
        return file_id(os.lstat(path))
    except OSError:
        return None


def split_rows(recs: Sequence[ChunkRecord]) -> tuple[list[ChunkRecord], list[ChunkRecord]]:
    """(rows with a well-formed key, the others). The others are damaged: never made into a path."""
    good = [r for r in recs if isinstance(r.key, str) and KEY_RE.fullmatch(r.key)]
    return good, [r for r in recs if not (isinstance(r.key, str) and KEY_RE.fullmatch(r.key))]


def remove(
    store: ChunkIndex,
    kv_dir: Path,
    recs: Sequence[ChunkRecord],
    judged: dict[str, FileId | None] | None = None,
) -> int:
    """Drop chunks from the index, then their files, without undoing a concurrent spill:
    a row goes only if it still has the record's checksum and size, and a file only if it
    is still the one judged (`judged[key]`, its file id when it was found bad; else as
    found now, before the row goes). A crash in between leaves an orphan file, which gc
    removes. Returns how many rows went."""
    good, damaged = split_rows(recs)
    if damaged:
        store.delete_chunks([r.key for r in damaged])
    paths: dict[str, Path] = {}
    for r in good:
        try:
            paths[r.key] = chunk_path(kv_dir, r.key)
        except CacheError:  # resolves outside kv_dir: drop the row, touch no file
            store.delete_chunks([r.key])
    before = {k: (judged or {}).get(k) or _stat_id(p) for k, p in paths.items()}
    gone = store.delete_chunks_if([r for r in good if r.key in paths])
    for key in gone:
        fid = before[key]
        if fid is not None and _stat_id(paths[key]) == fid:
            try:
                paths[key].unlink()
            except OSError:
                pass
    return len(gone) + len(damaged)


def remove_keys(store: ChunkIndex, kv_dir: Path, keys: Iterable[str]) -> int:
    """Remove chunks by key, whether indexed or not (a file whose row was lost still holds
    token ids): for `chatkv rm`, which takes the chunks only its conversation used.
    Malformed keys are skipped. Returns how many files went."""
    keys = [k for k in dict.fromkeys(keys) if isinstance(k, str) and KEY_RE.fullmatch(k)]
    store.delete_chunks(keys)
    gone = 0
    for key in keys:
        try:
            chunk_path(kv_dir, key).unlink()
            gone += 1
        except (OSError, CacheError):
            pass
    return gone


def reachable(recs: Sequence[ChunkRecord]) -> set[str]:
    """Keys of the chunks whose whole parent chain is indexed, back to a chunk at position 0:
    only those can ever be attached."""
    by_key = {r.key: r for r in recs}
    memo: dict[str, bool] = {}
    for r in recs:
        walked, key, ok = [], r.key, False
        while True:
            if key in memo:
                ok = memo[key]
                break
            rec = by_key.get(key)
            if rec is None or key in walked:  # a missing ancestor, or a cycle
                break
            walked.append(key)
            if rec.parent is None:
                ok = rec.start == 0
                break
            key = rec.parent
        for k in walked:
            memo[k] = ok
    return {k for k, ok in memo.items() if ok}


def reachable_stats(store: ChunkIndex) -> dict[str, int]:
    """{"reachable_bytes", "unreachable", "unreachable_bytes"} of the index."""
    recs, _ = split_rows(store.all_chunks())
    reach = reachable(recs)
    lost = [r for r in recs if r.key not in reach]
    return {
        "reachable_bytes": sum(r.nbytes for r in recs if r.key in reach),
        "unreachable": len(lost),
        "unreachable_bytes": sum(r.nbytes for r in lost),
    }


def evict_lru(
    store: ChunkIndex, kv_dir: Path, max_bytes: int, keep: frozenset[str] | set[str] = frozenset()
) -> tuple[int, int]:
    """Bring the store down to at most `max_bytes`: first every chunk that can never be
    attached (its parent chain is not indexed), then leaves (chunks no indexed chunk
    continues) by last use, repeatedly, so that chains shrink from their ends and every
    chunk left stays usable. Chunks in `keep` stay. Returns (chunks removed, bytes freed)."""
    recs, damaged = split_rows(store.chunks_by_last_use())  # least recently used first
    if damaged:
        store.delete_chunks([r.key for r in damaged])
    total = sum(r.nbytes for r in recs)
    if total <= max_bytes:
        return 0, 0
    reach = reachable(recs)
    victims = [r for r in recs if r.key not in reach and r.key not in keep]
    freed = sum(r.nbytes for r in victims)
    live = [r for r in recs if r.key in reach]
    by_key = {r.key: r for r in live}
    children = Counter(r.parent for r in live if r.parent)
    order = {r.key: i for i, r in enumerate(live)}  # position in last-use order
    leaves = [(order[r.key], r.key) for r in live if not children[r.key] and r.key not in keep]
    heapq.heapify(leaves)
    while total - freed > max_bytes and leaves:
        _, key = heapq.heappop(leaves)
        rec = by_key[key]
        victims.append(rec)
        freed += rec.nbytes
        parent = rec.parent
        if parent in by_key:
            children[parent] -= 1
            if not children[parent] and parent not in keep:
                heapq.heappush(leaves, (order[parent], parent))
    remove(store, kv_dir, victims)
    return len(victims), freed


def _files(kv_dir: Path) -> Iterator[tuple[Path, str]]:
    """Every file under kv_dir (symlinks included, never followed), with its relative path."""
    for root, dirs, names in os.walk(kv_dir, followlinks=False):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = Path(root) / name
            yield path, path.relative_to(kv_dir).as_posix()


def _is_temp(name: str) -> bool:
    return name.startswith(".tmp-") and name.endswith(".part")


def temp_files(kv_dir: Path) -> tuple[int, int]:
    """(count, bytes) of leftover `.tmp-*.part` files."""
    count = size = 0
    for path, _ in _files(kv_dir):
        if _is_temp(path.name):
            try:
                size += os.lstat(path).st_size
                count += 1
            except OSError:  # removed meanwhile
                pass
    return count, size


def clean_temp(kv_dir: Path, min_age_s: float = ORPHAN_MIN_AGE_S) -> int:
    """Remove `.tmp-*.part` files older than `min_age_s` (spills killed half-way); how many."""
    young, removed = time.time() - min_age_s, 0
    for path, _ in _files(kv_dir):
        if _is_temp(path.name):
            try:
                if os.lstat(path).st_mtime > young:
                    continue
                path.unlink()
                removed += 1
            except OSError:
                pass
    return removed


def _file_missing(kv_dir: Path, key: str) -> bool:
    """No regular file at the chunk's path (or the path leads outside kv_dir). A transient
    error (EIO, EACCES...) says nothing about the file: not missing."""
    try:
        return not stat.S_ISREG(os.lstat(chunk_path(kv_dir, key)).st_mode)
    except CacheError:
        return True
    except OSError as e:
        return e.errno in (errno.ENOENT, errno.ENOTDIR)


def gc(
    store: ChunkIndex, kv_dir: Path, max_bytes: int, orphan_min_age_s: float = ORPHAN_MIN_AGE_S
) -> GcReport:
    """Temp files and files no row points at (older than `orphan_min_age_s`), rows with a
    malformed key or without a file, then eviction down to `max_bytes` (chunks that cannot
    attach first). Those are kept until then: when their missing ancestor is computed and
    spilled again (same key), they attach again."""
    temps = clean_temp(kv_dir, orphan_min_age_s)
    report = GcReport(temp_files=temps, orphan_files=temps)
    young = time.time() - orphan_min_age_s
    recs, damaged = split_rows(store.all_chunks())
    if damaged:
        store.delete_chunks([r.key for r in damaged])
    report.damaged_rows = len(damaged)
    missing = [r for r in recs if _file_missing(kv_dir, r.key)]
    report.missing_files = len(store.delete_chunks_if(missing)) if missing else 0
    gone = {r.key for r in missing}
    recs = [r for r in recs if r.key not in gone]
    indexed = {relpath(r.key) for r in recs}
    for path, rel in _files(kv_dir):
        if rel in indexed or _is_temp(path.name):
            continue
        try:
            if os.lstat(path).st_mtime > young:
                continue
            path.unlink()
        except OSError:
            continue
        report.orphan_files += 1
    report.removed, report.freed = evict_lru(store, kv_dir, max_bytes)
    return report


def verify(
    store: ChunkIndex, kv_dir: Path, fix: bool = True, progress: Callable[[int, int], None] | None = None
) -> VerifyReport:
    """Read every indexed chunk and check it against its record and checksum.
    With `fix`, bad chunks are removed (their tokens will be prefilled again); a chunk that
    could not be read for a transient reason (EIO, EMFILE...) is kept and counted apart."""
    report = VerifyReport()
    recs = store.all_chunks()
    bad: list[ChunkRecord] = []
    judged: dict[str, FileId | None] = {}
    for i, rec in enumerate(recs):
        try:
            if not (isinstance(rec.key, str) and KEY_RE.fullmatch(rec.key)):
                raise CacheError(f"malformed key {str(rec.key)[:80]!r} (a damaged index row)")
            verify_chunk(chunk_path(kv_dir, rec.key), rec)
            report.checked += 1
        except CacheError as e:
            if not e.damaged:
                report.unreadable += 1
                continue
            now = store.get_chunks([rec.key]).get(rec.key)
            if now is None or (now.checksum, now.nbytes) != (rec.checksum, rec.nbytes):
                continue  # replaced or removed while we looked (a spill replacing a tail chunk)
            report.checked += 1
            report.bad.append((rec.key, str(e)))
            bad.append(rec)
            judged[rec.key] = e.file_id
        if progress:
            progress(i + 1, len(recs))
    if fix and bad:
        report.removed = remove(store, kv_dir, bad, judged)
    return report


def rebuild(store: ChunkIndex, kv_dir: Path) -> RebuildReport:
    """Drop the whole chunk index and index again every chunk file that passes verification,
    from the file's own metadata. Files that fail are reported, not removed (gc removes
    them later as orphans). Works whatever state the `kv_chunks` table is in."""
    from chatkv.store.chunk_index import ChunkRecord

    report, recs = RebuildReport(), []
    for path, rel in _files(kv_dir):
        if _is_temp(path.name) or not rel.endswith(".safetensors"):
            continue
        key = path.name.removesuffix(".safetensors")
        try:
            if relpath(key) != rel:
                raise CacheError(f"{rel} is not where chunk {key[:12]} belongs")
            meta, _, fid = inspect_chunk(chunk_path(kv_dir, key), key)
        except CacheError as e:
            report.bad.append((rel, str(e)))
            continue
        mtime = datetime.fromtimestamp(os.lstat(path).st_mtime, UTC)
        recs.append(
            ChunkRecord(
                key=key,
                parent=meta["parent"] or None,
                fingerprint=meta["fingerprint"],
                codec=get_codec(meta["codec"]).tag,  # inspect_chunk checked it is registered
                start=int(meta["start"]),
                n_tokens=int(meta["n_tokens"]),
                partial=meta["partial"] == "1",
                path=rel,
                nbytes=fid[3],
                checksum=meta["checksum"],
                created_at=mtime,
                last_used_at=mtime,
            )
        )
    store.replace_chunk_index(recs)
    report.indexed, report.bytes = len(recs), sum(r.nbytes for r in recs)
    return report
