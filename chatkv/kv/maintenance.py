"""Keeping the chunk store within budget and honest: LRU eviction, orphan cleanup,
verification. None of it needs the model: evicting a chunk only costs a future prefill."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chatkv.kv.chunks import verify_file


@dataclass
class GcReport:
    removed: int = 0
    freed: int = 0
    orphan_files: int = 0
    missing_files: int = 0


@dataclass
class VerifyReport:
    checked: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    removed: int = 0


def remove(store, kv_dir: Path, recs) -> None:
    """Drop chunks from the index, then their files (a crash in between leaves an orphan
    file, which gc removes)."""
    store.delete_chunks([r.key for r in recs])
    for r in recs:
        try:
            (kv_dir / r.path).unlink()
        except OSError:
            pass


def remove_keys(store, kv_dir: Path, keys) -> int:
    """Remove chunks by key: their index rows and their files, indexed or not (a file whose
    row was lost still holds token ids). Returns how many files went."""
    from chatkv.kv.chunks import relpath

    keys = list(keys)
    store.delete_chunks(keys)
    gone = 0
    for key in keys:
        try:
            (kv_dir / relpath(key)).unlink()
            gone += 1
        except OSError:
            pass
    return gone


def evict_lru(
    store, kv_dir: Path, max_bytes: int, keep: frozenset[str] | set[str] = frozenset()
) -> tuple[int, int]:
    """Remove least recently used chunks until the store holds at most `max_bytes`.
    Returns (chunks removed, bytes freed)."""
    total = store.chunk_stats()["bytes"]
    if total <= max_bytes:
        return 0, 0
    removed, freed = [], 0
    for rec in store.chunks_by_last_use():
        if total - freed <= max_bytes:
            break
        if rec.key not in keep:
            removed.append(rec)
            freed += rec.nbytes
    remove(store, kv_dir, removed)
    return len(removed), freed


# A file no row points at may be a spill of a running chatkv between writing and
# indexing it (a temp file, or a chunk renamed a moment ago): leave young ones alone.
ORPHAN_MIN_AGE_S = 300.0


def gc(store, kv_dir: Path, max_bytes: int, orphan_min_age_s: float = ORPHAN_MIN_AGE_S) -> GcReport:
    """Index rows whose file is gone, files no row points at (older than
    `orphan_min_age_s`), then LRU down to `max_bytes`."""
    report = GcReport()
    young = time.time() - orphan_min_age_s
    recs = store.all_chunks()
    missing = [r for r in recs if not (kv_dir / r.path).is_file()]
    if missing:
        store.delete_chunks([r.key for r in missing])
    report.missing_files = len(missing)
    indexed = {r.path for r in recs}
    for path in kv_dir.rglob("*"):
        if not path.is_file():
            continue
        rel = path.relative_to(kv_dir).as_posix()
        # temp files of a spill killed half-way, and chunk files never indexed
        if rel not in indexed:
            try:
                if path.stat().st_mtime > young:
                    continue
            except FileNotFoundError:
                continue
            path.unlink(missing_ok=True)
            report.orphan_files += 1
    report.removed, report.freed = evict_lru(store, kv_dir, max_bytes)
    return report


def verify(
    store, kv_dir: Path, fix: bool = True, progress: Callable[[int, int], None] | None = None
) -> VerifyReport:
    """Read every indexed chunk and check it against its record and checksum.
    With `fix`, bad chunks are removed (their tokens will be prefilled again)."""
    report = VerifyReport()
    recs = store.all_chunks()
    bad = []
    for i, rec in enumerate(recs):
        problem = verify_file(kv_dir / rec.path, rec)
        if problem and rec.key not in store.get_chunks([rec.key]):
            continue  # removed while we looked (a spill replacing a tail chunk): not damage
        report.checked += 1
        if problem:
            report.bad.append((rec.key, problem))
            bad.append(rec)
        if progress:
            progress(i + 1, len(recs))
    if fix and bad:
        remove(store, kv_dir, bad)
        report.removed = len(bad)
    return report
