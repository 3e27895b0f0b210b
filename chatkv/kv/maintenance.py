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
from chatkv.kv.chunks import (
    KEY_RE,
    FileId,
    chunk_path,
    file_id,
    inspect_chunk,
    relpath,
    verify_chunk,
    write_atomic,
)
from chatkv.kv.codecs import get_codec

if TYPE_CHECKING:
    from chatkv.kv.objects import ObjectStore, Tiers
    from chatkv.store.chunk_index import ChunkIndex, ChunkRecord


@dataclass
class GcReport:
    removed: int = 0  # chunks evicted to meet the budget
    freed: int = 0
    orphan_files: int = 0
    missing_files: int = 0
    damaged_rows: int = 0  # index rows with a malformed key (dropped, no file touched)
    temp_files: int = 0  # of the orphan files, leftover `.tmp-*.part` files of interrupted spills
    # With cache.url (gc_tiers): local copies trimmed to cache.local_bytes, the bucket's
    # objects no row names removed, and why the bucket was left alone ("" when it was not).
    local_removed: int = 0
    local_freed: int = 0
    objects_removed: int = 0
    objects_freed: int = 0
    remote_error: str = ""


@dataclass
class VerifyReport:
    checked: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    removed: int = 0
    unreadable: int = 0  # transient read errors (or the bucket unreachable): kept, checked again next time
    refetched: int = 0  # damaged local copies replaced by the bucket's sound object


@dataclass
class RebuildReport:
    indexed: int = 0
    bytes: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file relative to kv dir, reason)
    objects: int = 0  # of `indexed`, chunks indexed from the bucket's objects (cache.url)


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


def remove_keys(
    store: ChunkIndex, kv_dir: Path, keys: Iterable[str], remote: ObjectStore | None = None
) -> int:
    """Remove chunks by key, whether indexed or not (a file whose row was lost still holds
    token ids): for `chatkv rm`, which takes the chunks only its conversation used. With a
    `remote` (cache.url), their objects go from it too, every version of each key.
    Malformed keys are skipped. Returns how many local files went.

    Raises CacheError (damaged=False) when the remote could not be listed or written: the
    rows and local files are gone by then, and the keys stay listed in UNREMOVED (written
    before the bucket is asked, so a kill meanwhile leaves them listed too) for
    `chatkv cache gc` to remove when the bucket answers again."""
    keys = [k for k in dict.fromkeys(keys) if isinstance(k, str) and KEY_RE.fullmatch(k)]
    if remote is not None and keys:
        _note_unremoved(kv_dir, lambda old: [*old, *keys])
    store.delete_chunks(keys)
    gone = 0
    for key in keys:
        try:
            chunk_path(kv_dir, key).unlink()
            gone += 1
        except (OSError, CacheError):
            pass
    if remote is not None and keys:
        from chatkv.kv.objects import remove_objects

        try:
            remove_objects(remote, keys)
        except OSError as e:  # its text names the bucket and an error code, never a credential
            raise CacheError(
                f"the {len(keys)} cache chunks only it used could not be removed from {remote.where} ({e}); "
                "`chatkv cache gc` removes them once the bucket is reachable again",
                damaged=False,
            ) from None
        done = set(keys)
        _note_unremoved(kv_dir, lambda old: [k for k in old if k not in done])
    return gone


# Keys of deleted conversations' chunks whose bucket objects are still to remove (a bucket
# that did not answer `chatkv rm`): one a line, next to kv/ (whose unindexed files gc takes
# for orphans). Keys are hashes: the file holds nothing of a conversation.
UNREMOVED = "unremoved-objects.txt"


def _unremoved(kv_dir: Path) -> list[str]:
    try:
        text = (kv_dir.parent / UNREMOVED).read_text(encoding="ascii", errors="replace")
    except OSError:
        return []
    return list(dict.fromkeys(k for k in text.split() if KEY_RE.fullmatch(k)))


def _note_unremoved(kv_dir: Path, change: Callable[[list[str]], list[str]]) -> None:
    """Rewrite UNREMOVED as `change` makes its keys, under a lock: two `rm`s, or an `rm`
    and a `cache gc`, each reading it before the other wrote dropped keys."""
    import fcntl

    path = kv_dir.parent / UNREMOVED
    fd = os.open(kv_dir.parent / (UNREMOVED + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        keys = change(_unremoved(kv_dir))
        if keys:
            write_atomic(path, "".join(f"{k}\n" for k in dict.fromkeys(keys)).encode("ascii"))
        else:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def retry_unremoved(store: ChunkIndex, kv_dir: Path, remote: ObjectStore) -> int:
    """Remove the bucket objects `chatkv rm` could not (UNREMOVED), of the keys no index row
    names now (a chunk of the same tokens written since is another conversation's). Returns
    how many objects went; raises OSError when the bucket does not answer."""
    from chatkv.kv.objects import remove_objects

    keys = _unremoved(kv_dir)
    if not keys:
        return 0
    named = store.get_chunks(keys)
    removed = remove_objects(remote, [k for k in keys if k not in named])
    done = set(keys)
    _note_unremoved(kv_dir, lambda old: [k for k in old if k not in done])  # an rm may have added some
    return removed


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


def _count(kv_dir: Path, wanted: Callable[[Path, str], bool]) -> tuple[int, int]:
    """(count, bytes) of the files under kv_dir that `wanted(path, relative path)` picks."""
    count = size = 0
    for path, rel in _files(kv_dir):
        if wanted(path, rel):
            try:
                size += os.lstat(path).st_size
                count += 1
            except OSError:  # removed meanwhile
                pass
    return count, size


def temp_files(kv_dir: Path) -> tuple[int, int]:
    """(count, bytes) of leftover `.tmp-*.part` files."""
    return _count(kv_dir, lambda path, _: _is_temp(path.name))


def chunk_files(kv_dir: Path) -> tuple[int, int]:
    """(count, bytes) of the chunk files in kv_dir (this host's local tier)."""
    return _count(kv_dir, lambda path, rel: rel.endswith(".safetensors") and not _is_temp(path.name))


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


def _gc_start(
    store: ChunkIndex, kv_dir: Path, orphan_min_age_s: float
) -> tuple[GcReport, float, list[ChunkRecord]]:
    """What every gc does first: temp files removed, rows with a malformed key dropped.
    Returns the report so far, the mtime before which an unnamed file is an orphan, and the
    well-formed rows."""
    temps = clean_temp(kv_dir, orphan_min_age_s)
    report = GcReport(temp_files=temps, orphan_files=temps)
    recs, damaged = split_rows(store.all_chunks())
    if damaged:
        store.delete_chunks([r.key for r in damaged])
    report.damaged_rows = len(damaged)
    return report, time.time() - orphan_min_age_s, recs


def gc(
    store: ChunkIndex, kv_dir: Path, max_bytes: int, orphan_min_age_s: float = ORPHAN_MIN_AGE_S
) -> GcReport:
    """Temp files and files no row points at (older than `orphan_min_age_s`), rows with a
    malformed key or without a file, then eviction down to `max_bytes` (chunks that cannot
    attach first). Those are kept until then: when their missing ancestor is computed and
    spilled again (same key), they attach again."""
    report, young, recs = _gc_start(store, kv_dir, orphan_min_age_s)
    missing = [r for r in recs if _file_missing(kv_dir, r.key)]
    report.missing_files = len(store.delete_chunks_if(missing)) if missing else 0
    gone = {r.key for r in missing}
    recs = [r for r in recs if r.key not in gone]
    report.orphan_files += _remove_orphans(kv_dir, recs, young)
    report.removed, report.freed = evict_lru(store, kv_dir, max_bytes)
    return report


def _remove_orphans(kv_dir: Path, recs: Sequence[ChunkRecord], young: float) -> int:
    """Remove the files of kv_dir no record of `recs` names, written before `young`."""
    indexed, removed = {relpath(r.key) for r in recs}, 0
    for path, rel in _files(kv_dir):
        if rel in indexed or _is_temp(path.name):
            continue
        try:
            if os.lstat(path).st_mtime > young:
                continue
            path.unlink()
        except OSError:
            continue
        removed += 1
    return removed


def _named_object(rec: ChunkRecord) -> str | None:
    from chatkv.kv.objects import object_name

    try:
        return object_name(rec)
    except (ValueError, CacheError):  # a damaged row names no object
        return None


def gc_tiers(
    store: ChunkIndex,
    tiers: Tiers,
    max_bytes: int | None,
    orphan_min_age_s: float = ORPHAN_MIN_AGE_S,
    grace_s: float | None = None,
    collect_objects: bool = True,
) -> GcReport:
    """gc with cache.url: the index is shared, and a row whose chunk is not in this host's
    kv/ is another host's chunk, in the bucket. So a row goes only when its chunk is in
    neither (the bucket listed fine); then the index comes down to `max_bytes` (None: no
    bound; eviction as `gc`: a miss for every host, recomputed), this host's copies to the tiers' local
    budget, and the bucket loses the objects no row names, older than `grace_s`
    (objects.collect: evicted and deleted chunks, old versions of re-coded ones). A bucket
    that cannot be listed is left alone (`remote_error` says why); the rest is done.
    `collect_objects` False: the bucket may hold objects of indexes other than this one (an
    index private to this host, or a team prefix written under several roles), so objects
    no row here names are not this gc's to remove."""
    from chatkv.kv.objects import GC_GRACE_S, collect

    kv_dir = tiers.kv_dir
    report, young, recs = _gc_start(store, kv_dir, orphan_min_age_s)
    listed: set[str] | None
    listing: list[tuple[str, int, float]] = []
    try:  # read after the rows: a row is written after its object, so its object is listed
        listing = list(tiers.remote.names())
        listed = {name for name, _, _ in listing}
    except OSError as e:
        listed, report.remote_error = None, str(e)
    if listed is not None:
        missing = [r for r in recs if _named_object(r) not in listed and _file_missing(kv_dir, r.key)]
        report.missing_files = len(store.delete_chunks_if(missing)) if missing else 0
        gone = {r.key for r in missing}
        recs = [r for r in recs if r.key not in gone]
    report.orphan_files += _remove_orphans(kv_dir, recs, young)
    if max_bytes is not None:  # cache.remote_bytes unset: the bucket is unbounded
        report.removed, report.freed = evict_lru(store, kv_dir, max_bytes)
    report.local_removed, report.local_freed = tiers.trim()
    if listed is not None and collect_objects:
        try:
            report.objects_removed, report.objects_freed = collect(
                tiers.remote, store.all_chunks(), GC_GRACE_S if grace_s is None else grace_s, listing
            )
        except OSError as e:
            report.remote_error = str(e)
    if listed is not None:  # after collect: it may have taken some of them already
        try:
            report.objects_removed += retry_unremoved(store, kv_dir, tiers.remote)
        except OSError as e:
            report.remote_error = str(e)
    return report


def verify(
    store: ChunkIndex,
    kv_dir: Path,
    fix: bool = True,
    progress: Callable[[int, int], None] | None = None,
    tiers: Tiers | None = None,
) -> VerifyReport:
    """Read every indexed chunk and check it against its record and checksum.
    With `fix`, bad chunks are removed (their tokens will be prefilled again); a chunk that
    could not be read for a transient reason (EIO, EMFILE...) is kept and counted apart.

    With `tiers` (cache.url), a chunk is read through them: one not in kv/ is fetched from
    the bucket (the copies are trimmed to the local budget after), a damaged local copy is
    replaced by the bucket's object when that one is sound, a chunk in neither is bad (its
    row goes), and one the bucket could not be asked for is unreadable (kept)."""
    report = VerifyReport()
    recs = store.all_chunks()
    bad: list[ChunkRecord] = []
    judged: dict[str, FileId | None] = {}
    for i, rec in enumerate(recs):
        try:
            if not (isinstance(rec.key, str) and KEY_RE.fullmatch(rec.key)):
                raise CacheError(f"malformed key {str(rec.key)[:80]!r} (a damaged index row)")
            if tiers is not None:
                tiers.prefetch(
                    r for r in recs[i : i + 16] if isinstance(r.key, str) and KEY_RE.fullmatch(r.key)
                )
                if not _verify_through(tiers, rec, report):
                    report.unreadable += 1
                    continue
            else:
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
        finally:
            if tiers is not None and i % 256 == 255:
                tiers.trim()
        if progress:
            progress(i + 1, len(recs))
    if fix and bad:
        report.removed = remove(store, kv_dir, bad, judged)
    if tiers is not None:
        tiers.trim()
    return report


def _verify_through(tiers: Tiers, rec: ChunkRecord, report: VerifyReport) -> bool:
    """Check one chunk read through the tiers: True when it is sound, False when it could
    not be read this time (the bucket unreachable); raises CacheError when it is bad."""
    path = chunk_path(tiers.kv_dir, rec.key)
    where = tiers.ensure_local(rec)
    if where == "failed":
        return False
    if where == "missing":
        raise CacheError(f"chunk {rec.key[:12]} is neither in {tiers.kv_dir} nor in {tiers.remote.where}")
    try:
        verify_chunk(path, rec)
        return True
    except CacheError as e:
        if not e.damaged or where != "local":
            raise
        # The local copy is damaged; the bucket's object may be sound: fetch it again.
        if e.file_id is not None and _stat_id(path) == e.file_id:
            path.unlink(missing_ok=True)
        again = tiers.ensure_local(rec)
        if again == "failed":
            return False
        if again == "missing":
            raise
        verify_chunk(path, rec)
        report.refetched += 1
        return True


def record_of(path: Path, key: str, rel: str, checksum: str | None = None) -> ChunkRecord:
    """The index row of the chunk file at `path`, from its own metadata (`checksum`: the one
    it must have). Raises CacheError when the file fails verification."""
    from chatkv.store.chunk_index import ChunkRecord

    if relpath(key) != rel:
        raise CacheError(f"{rel} is not where chunk {key[:12]} belongs")
    meta, _, fid = inspect_chunk(path, key, checksum=checksum)
    mtime = datetime.fromtimestamp(os.lstat(path).st_mtime, UTC)
    return ChunkRecord(
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


def _local_records(kv_dir: Path, report: RebuildReport, skip: set[str]) -> list[ChunkRecord]:
    """Rows for every sound chunk file of kv_dir whose key is not in `skip`."""
    recs = []
    for path, rel in _files(kv_dir):
        if _is_temp(path.name) or not rel.endswith(".safetensors"):
            continue
        key = path.name.removesuffix(".safetensors")
        if key in skip:
            continue
        try:
            recs.append(record_of(chunk_path(kv_dir, key), key, rel))
        except CacheError as e:
            report.bad.append((rel, str(e)))
    return recs


def rebuild(store: ChunkIndex, kv_dir: Path) -> RebuildReport:
    """Drop the whole chunk index and index again every chunk file that passes verification,
    from the file's own metadata. Files that fail are reported, not removed (gc removes
    them later as orphans). Works whatever state the `kv_chunks` table is in."""
    report = RebuildReport()
    recs = _local_records(kv_dir, report, set())
    store.replace_chunk_index(recs)
    report.indexed, report.bytes = len(recs), sum(r.nbytes for r in recs)
    return report


def rebuild_tiers(store: ChunkIndex, tiers: Tiers) -> RebuildReport:
    """rebuild with cache.url: the shared index again from the bucket's objects (for each
    key, its newest sound version, fetched unless this host has that exact copy), then from
    this host's chunk files the bucket lacks (a push that failed). Refuses with CacheError,
    changing nothing, when the bucket cannot be listed: an index of this host's files alone
    would drop every other host's chunks."""
    from chatkv.kv.objects import SUFFIX

    kv_dir, report = tiers.kv_dir, RebuildReport()
    try:
        listing = list(tiers.remote.names())
    except OSError as e:
        raise CacheError(
            f"cannot list the chunk store {tiers.remote.where} ({e}); the chunk index is left as it "
            "is; run `chatkv cache rebuild` again once the bucket is reachable",
            damaged=False,
        ) from None
    versions: dict[str, list[tuple[float, str, int, str]]] = {}
    for name, size, written in listing:
        parts = name.split("/")
        if (
            len(parts) != 3
            or not KEY_RE.fullmatch(parts[1])
            or parts[0] != parts[1][:2]
            or not name.endswith(SUFFIX)
        ):
            report.bad.append((name, "not the name of a chunk object"))
            continue
        versions.setdefault(parts[1], []).append((written, name, size, parts[2].removesuffix(SUFFIX)))
    recs: list[ChunkRecord] = []
    for key, objs in versions.items():
        path, rel = chunk_path(kv_dir, key), relpath(key)
        for _, name, size, checksum in sorted(objs, reverse=True):  # newest first
            try:
                try:
                    recs.append(record_of(path, key, rel, checksum))  # this host's copy is that object
                    break
                except CacheError:
                    pass
                blob = tiers.remote.get(name, size)
                if blob is None:
                    raise CacheError("gone from the bucket while the index was rebuilt")
                write_atomic(path, blob)
                recs.append(record_of(path, key, rel, checksum))
                break
            except CacheError as e:
                report.bad.append((name, str(e)))
            except OSError as e:
                raise CacheError(
                    f"reading {tiers.remote.where} failed ({e}); the chunk index is left as it is; "
                    "run `chatkv cache rebuild` again once the bucket is reachable",
                    damaged=False,
                ) from None
        if len(recs) % 256 == 255:  # the copies fetched so far, within the local budget
            tiers.trim()
    report.objects = len(recs)
    recs += _local_records(kv_dir, report, set(versions))
    store.replace_chunk_index(recs)
    tiers.trim()
    report.indexed, report.bytes = len(recs), sum(r.nbytes for r in recs)
    return report
