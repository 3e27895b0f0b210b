"""Chunk files beyond this machine: an object store behind one small interface, and the
tiers a resume reads through.

Tiers, each with its own budget and least recently used first out:
  memory      the live pool (kv/live.py, cache.live_bytes)
  local disk  the data dir's kv/ (cache.disk_bytes; with a remote, cache.local_bytes, or
              disk_bytes when that is unset, bounds the copies kept here: `local_budget`)
  (index)     with a remote the index is shared by every host: cache.remote_bytes bounds
              it and the bucket, enforced by `chatkv cache gc` only, never by a spill
  remote      cache.url: S3-compatible object storage (s3://BUCKET/PREFIX) or a shared
              directory (file:///PATH), read by every host

A chunk read from the remote is written to its local path (atomically, as a spill writes
it) before it is read, so the reader (kv/chunks.py read_chunk) trusts or refuses it exactly
as it does a chunk this host wrote: format, fingerprint, key, codec, size and checksum must
match the index, whichever host wrote it. A missing or unreadable object is a cache miss:
the tokens are prefilled again; nothing here raises into a turn.

Objects are named by the chunk's key and its checksum (`object_name`): content addressed,
so an object is written once and never changed, and two hosts writing the same chunk write
the same bytes — no locks. A chunk re-coded as it ages (same key, new bytes, new checksum)
is a new object; the old one is left for `chatkv cache gc`.

Credentials come from where the client looks by itself (AWS_* variables, ~/.aws, an
instance role; AWS_ENDPOINT_URL for a server other than AWS) and are never written into a
message, a log line or the database: messages name the bucket and prefix only.

Why boto3: the most used S3 client (moto, MinIO, R2 and Ceph all test against it), whose
client is thread-safe, so the reads of one resume run in parallel on a thread pool while
earlier chunks decode.
"""

from __future__ import annotations

import getpass
import logging
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

from chatkv.config import NEEDS_BOTO3
from chatkv.errors import CacheError, ConfigError
from chatkv.kv.chunks import check_key, chunk_path, write_atomic
from chatkv.store.chunk_index import ChunkRecord

log = logging.getLogger(__name__)

HEX64 = re.compile(r"[0-9a-f]{64}")
# Parallel object reads of one resume (S3 serves each GET at a few tens of MB/s; several at
# once fill the link).
FETCH_THREADS = 8
SUFFIX = ".safetensors"
# After the remote fails, it is not asked again for this long: a dead bucket costs a resume
# one time-out, not one per chunk.
REMOTE_BACKOFF_S = 30.0
# `collect` leaves objects younger than this: their index rows may not be written yet.
GC_GRACE_S = 3600.0
# `trim_after` looks at the local copies at least this often: other processes on the host
# add copies too, which this one's running total does not see.
RESCAN_S = 300.0


class ObjectStore(Protocol):
    """Bytes by name. Names are relative ("ab/<key>/<checksum>.safetensors")."""

    where: str  # for messages: the bucket and prefix, or the directory; never a credential

    def get(self, name: str, size: int) -> bytes | None:
        """The object's bytes; None when there is none of exactly `size` bytes (a larger
        one is not read at all). Raises OSError when the store cannot be reached."""
        ...

    def put(self, name: str, blob: bytes) -> None:
        """Store `blob` under `name` (all or nothing). Raises OSError."""
        ...

    def delete(self, names: Sequence[str]) -> None:
        """Remove objects; absent ones are no error. Raises OSError."""
        ...

    def names(self, under: str = "") -> Iterator[tuple[str, int, float]]:
        """Every object's (name, size, time written as a Unix timestamp), only those whose
        name starts with `under` when given (a key's folder, `key_folder`). Raises OSError."""
        ...


def object_name(rec: ChunkRecord) -> str:
    """The object holding exactly the chunk `rec` describes: its key and checksum (64 hex
    digits each, so no row can name anything outside the prefix)."""
    key = check_key(rec.key)
    if not isinstance(rec.checksum, str) or not HEX64.fullmatch(rec.checksum):
        raise ValueError(f"chunk {key[:12]} has no sha256 checksum: {str(rec.checksum)[:80]!r}")
    return f"{key_folder(key)}{rec.checksum}{SUFFIX}"


def key_folder(key: str) -> str:
    """The folder ("ab/<key>/") holding every object ever written for chunk `key`: each
    version it was coded in. Raises CacheError for a malformed key."""
    key = check_key(key)
    return f"{key[:2]}/{key}/"


def namespace(shared: bool, user: str | None = None) -> str:
    """The prefix under the cache URL: one per user by default (chunks hold token ids, which
    decode back to the conversation's text); "team" when sharing is chosen (cache.shared)."""
    if shared:
        return "team"
    name = re.sub(r"[^A-Za-z0-9._-]", "_", user or getpass.getuser()) or "_"
    return f"users/{name}"


class DirObjects:
    """Objects as files under a directory (a file:// cache URL: a shared mount, and tests)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.where = str(self.root)

    def _path(self, name: str) -> Path:
        return self.root / name

    def get(self, name: str, size: int) -> bytes | None:
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                return None
            blob = f.read(size + 1)
        return blob if len(blob) == size else None

    def put(self, name: str, blob: bytes) -> None:
        write_atomic(self._path(name), blob)

    def delete(self, names: Sequence[str]) -> None:
        for name in names:
            self._path(name).unlink(missing_ok=True)

    def names(self, under: str = "") -> Iterator[tuple[str, int, float]]:
        top = self.root / under if under else self.root
        for path in sorted(top.rglob("*" + SUFFIX)):
            if path.is_file() and not path.is_symlink():
                st = path.stat()
                yield path.relative_to(self.root).as_posix(), st.st_size, st.st_mtime


class S3Objects:
    """Objects in an S3-compatible bucket under a prefix, through boto3."""

    def __init__(self, bucket: str, prefix: str, client: Any = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.where = f"s3://{bucket}/{self.prefix}"
        self._client = client if client is not None else _s3_client()

    def get(self, name: str, size: int) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            obj = self._client.get_object(Bucket=self.bucket, Key=self.prefix + name)
        except ClientError as e:
            if _code(e) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise OSError(f"{self.where}: {_code(e)}") from None
        except BotoCoreError as e:
            raise OSError(f"{self.where}: {type(e).__name__}") from None
        body = obj["Body"]
        try:
            if obj.get("ContentLength") != size:
                return None  # another version of the chunk, or not ours: never read it
            blob: bytes = body.read(size + 1)
        except BotoCoreError as e:
            raise OSError(f"{self.where}: {type(e).__name__}") from None
        finally:
            body.close()
        return blob if len(blob) == size else None

    def put(self, name: str, blob: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=blob)
        except ClientError as e:
            raise OSError(f"{self.where}: {_code(e)}") from None
        except BotoCoreError as e:
            raise OSError(f"{self.where}: {type(e).__name__}") from None

    def delete(self, names: Sequence[str]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        names = list(names)
        try:
            for i in range(0, len(names), 1000):  # DeleteObjects takes 1,000 keys at most
                batch = [{"Key": self.prefix + n} for n in names[i : i + 1000]]
                self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        except ClientError as e:
            raise OSError(f"{self.where}: {_code(e)}") from None
        except BotoCoreError as e:
            raise OSError(f"{self.where}: {type(e).__name__}") from None

    def names(self, under: str = "") -> Iterator[tuple[str, int, float]]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + under
            )
            for page in pages:
                for item in page.get("Contents", []):
                    yield item["Key"][len(self.prefix) :], int(item["Size"]), item["LastModified"].timestamp()
        except ClientError as e:
            raise OSError(f"{self.where}: {_code(e)}") from None
        except BotoCoreError as e:
            raise OSError(f"{self.where}: {type(e).__name__}") from None


def _code(e: Any) -> str:
    """A ClientError's error code (NoSuchBucket, AccessDenied, SlowDown...): never its
    message, which may quote a request header."""
    return str(e.response.get("Error", {}).get("Code", "error"))


def _s3_client() -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError(NEEDS_BOTO3) from None
    # Short timeouts and few retries: a slow or failing bucket costs a resume a prefill,
    # never a hung turn.
    config = Config(
        connect_timeout=3,
        read_timeout=15,
        retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=FETCH_THREADS * 2,
    )
    return boto3.session.Session().client("s3", config=config)


def open_objects(url: str, shared: bool = False, user: str | None = None) -> ObjectStore:
    """The object store `url` (cache.url) names, under this user's namespace (see `namespace`).
    Raises ConfigError for a URL it cannot use."""
    scheme, _, rest = url.partition("://")
    ns = namespace(shared, user)
    if scheme == "file":
        if not rest.startswith("/"):
            raise ConfigError(f"cache.url {url!r} must be file:///ABSOLUTE/PATH")
        return DirObjects(Path(rest) / ns)
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise ConfigError(f"cache.url {url!r} does not name an S3 bucket; use s3://BUCKET/PREFIX")
        return S3Objects(bucket, "/".join(p for p in (prefix.strip("/"), ns) if p))
    raise ConfigError(f"cache.url {url!r} is not s3://BUCKET/PREFIX or file:///PATH")


class _FetchPool:
    """Up to `threads` daemon threads running submitted calls. Unlike ThreadPoolExecutor's
    workers, which the interpreter joins at exit, a fetch held up by a slow bucket (up to its
    read timeout, 15 s) never keeps a Ctrl-C'd chatkv from exiting: `shutdown` cancels the
    calls not started and returns at once. A fetch still running writes its chunk file
    atomically (a leftover temporary file is removed by `cache gc`)."""

    def __init__(self, threads: int) -> None:
        self._q: queue.SimpleQueue[tuple[Future[Any], Any, tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._max = threads
        self._started = 0
        self._idle = 0
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Any, *args: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the fetch pool is shut down")
            self._q.put((fut, fn, args))
            if self._idle > 0:  # a waiting thread takes it
                self._idle -= 1
            elif self._started < self._max:  # threads start as work comes
                self._started += 1
                threading.Thread(target=self._work, name=f"chatkv-fetch-{self._started}", daemon=True).start()
        return fut

    def _work(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fut, fn, args = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:  # handed to whoever waits on the future
                    fut.set_exception(e)
            with self._lock:
                self._idle += 1

    def shutdown(self) -> None:
        """Cancel the calls not started; each thread ends after its current one."""
        with self._lock:
            self._closed = True
            started = self._started
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in range(started):
            self._q.put(None)


class Tiers:
    """Local disk in front of a remote object store: `ensure_local` makes a chunk's file be
    there (fetching it when needed), `prefetch` starts that for a whole chain in parallel,
    `push` copies a spilled chunk to the remote, and `trim` keeps the copies within budget.

    Failures of the remote are logged once (no credentials in them) and count as misses.
    """

    def __init__(self, kv_dir: Path, remote: ObjectStore, local_bytes: int) -> None:
        self.kv_dir = kv_dir
        self.remote = remote
        self.local_bytes = local_bytes
        self._pool = _FetchPool(FETCH_THREADS)
        self._inflight: dict[str, Future[str]] = {}
        self._lock = threading.Lock()
        self._warned = False
        self._down_until = 0.0  # time.monotonic() before which the remote is not asked
        self.fetched_bytes = 0  # read from the remote since start, for statistics and tests
        # what the last scan of the local copies found (after trimming), when, and what this
        # process added since: `trim_after` scans only when that could be over budget
        self._scanned_total = 0
        self._scanned_at: float | None = None
        self._added = 0

    def _up(self) -> bool:
        return time.monotonic() >= self._down_until

    def _warn(self, what: str, e: BaseException) -> None:
        self._down_until = time.monotonic() + REMOTE_BACKOFF_S
        if not self._warned:
            self._warned = True
            log.warning(
                "the chunk store %s is not usable (%s: %s); recomputing instead", self.remote.where, what, e
            )

    def _local_ok(self, rec: ChunkRecord) -> bool:
        """Whether the local copy is there, of the row's size; marks it read now for `trim`
        (its access time only: the modification time is part of what identifies a file)."""
        try:
            path = chunk_path(self.kv_dir, rec.key)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_size != rec.nbytes:
                return False
            os.utime(path, ns=(time.time_ns(), st.st_mtime_ns), follow_symlinks=False)
        except (OSError, CacheError):
            return False
        return True

    def _fetch(self, rec: ChunkRecord) -> str:
        """Where the chunk is: "local" (already here), "remote" (copied here now), "missing"
        (in neither: a miss, the row is stale) or "failed" (the remote could not be read, or
        the copy not written: a miss this time only)."""
        if self._local_ok(rec):
            return "local"
        if not self._up():
            return "failed"
        try:
            blob = self.remote.get(object_name(rec), rec.nbytes)
        except (OSError, ValueError) as e:
            self._warn("read", e)
            return "failed"
        if blob is None:
            return "missing"
        try:
            write_atomic(chunk_path(self.kv_dir, rec.key), blob)
        except OSError as e:  # a full local disk: this resume recomputes; the remote keeps it
            log.warning("could not keep a copy of chunk %s: %s", rec.key[:12], e)
            return "failed"
        with self._lock:
            self.fetched_bytes += len(blob)
            self._added += len(blob)
        return "remote"

    def prefetch(self, recs: Iterable[ChunkRecord]) -> None:
        """Start fetching every chunk of `recs` not on local disk, in parallel."""
        with self._lock:
            for rec in recs:
                if rec.key not in self._inflight:
                    self._inflight[rec.key] = self._pool.submit(self._fetch, rec)

    def ensure_local(self, rec: ChunkRecord) -> str:
        """Make the chunk's local file be there: "local", "remote", "missing" or "failed"
        (see _fetch).
        Waits for a prefetch of it when one runs."""
        with self._lock:
            fut = self._inflight.pop(rec.key, None)
        return fut.result() if fut is not None else self._fetch(rec)

    def forget(self, recs: Iterable[ChunkRecord]) -> None:
        """Drop the prefetches of `recs` not waited for (a resume that stopped early), so that
        a later ensure_local looks again instead of trusting an old answer."""
        with self._lock:
            for rec in recs:
                fut = self._inflight.pop(rec.key, None)
                if fut is not None:
                    fut.cancel()

    def push(self, rec: ChunkRecord, blob: bytes) -> bool:
        """Copy a chunk just written locally to the remote; False (logged) when that failed:
        the chunk then serves this host only."""
        if not self._up():
            return False
        try:
            self.remote.put(object_name(rec), blob)
        except (OSError, ValueError) as e:
            self._warn("write", e)
            return False
        return True

    def trim_after(self, added: int = 0) -> tuple[int, int]:
        """`trim`, after this process wrote `added` bytes of copies (its fetches count by
        themselves), but without scanning the local copies while the last scan's total and
        what was added since stay within budget and that scan is recent: a spill on a host
        with many chunks no longer lists them all each time."""
        with self._lock:
            self._added += added
            recent = self._scanned_at is not None and time.monotonic() - self._scanned_at < RESCAN_S
            if recent and self._scanned_total + self._added <= self.local_bytes:
                return 0, 0
        return self.trim()

    def trim(self) -> tuple[int, int]:
        """Remove the least recently read local chunk files beyond `local_bytes`, oldest
        access first. They are in the remote (pushed or fetched; one whose push failed is
        a miss later, recomputed). Their index rows stay: they describe the remote's
        objects, which other hosts read. Returns (files removed, bytes freed)."""
        files: list[tuple[float, int, Path]] = []
        for path in self.kv_dir.glob("??/??/*" + SUFFIX):
            try:
                st = path.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                files.append((st.st_atime, st.st_size, path))
        total = sum(size for _, size, _ in files)
        removed = freed = 0
        for _, size, path in sorted(files):
            if total <= self.local_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            removed, freed = removed + 1, freed + size
        with self._lock:
            self._scanned_total, self._scanned_at, self._added = total, time.monotonic(), 0
        return removed, freed

    def close(self) -> None:
        """Cancel queued fetches, without waiting for running ones (an interrupted resume
        exits at once, not after a slow bucket's time-out); the tiers stay usable (a new pool
        starts no thread until a fetch is submitted)."""
        with self._lock:
            self._pool.shutdown()
            self._inflight.clear()
            self._pool = _FetchPool(FETCH_THREADS)


def collect(
    remote: ObjectStore,
    indexed: Iterable[ChunkRecord],
    grace_s: float = GC_GRACE_S,
    listing: Iterable[tuple[str, int, float]] | None = None,
) -> tuple[int, int]:
    """Remove the objects of `remote` that no chunk of the index (`indexed`) names and that
    were written more than `grace_s` ago: a spill writes its object before its index row,
    so a younger one may be a chunk about to be indexed. An object a row names is never
    removed, so a resume that has read the index finds every object it names (unless a
    host removes the row first: a miss, recomputed). `listing`: the bucket's `names()` as
    the caller has already listed them before reading `indexed` (gc lists a bucket once);
    objects written since are not in it, so they are left alone. Returns (objects removed,
    bytes)."""
    keep = set()
    for rec in indexed:
        try:
            keep.add(object_name(rec))
        except (ValueError, CacheError):  # a damaged row names no object
            continue
    cutoff = time.time() - grace_s
    names = remote.names() if listing is None else listing
    doomed = [(name, size) for name, size, written in names if name not in keep and written < cutoff]
    remote.delete([name for name, _ in doomed])
    return len(doomed), sum(size for _, size in doomed)


def remove_objects(remote: ObjectStore, keys: Iterable[str]) -> int:
    """Remove every object written for the chunks `keys` (each version: a re-coded chunk
    leaves its older objects under the same key). For `chatkv rm`: the caller has made
    sure no other conversation names these keys. Malformed keys are skipped. Returns how
    many objects went; raises OSError when the store cannot be listed or written."""
    doomed: list[str] = []
    for key in dict.fromkeys(keys):
        try:
            folder = key_folder(key)
        except CacheError:
            continue
        doomed += [name for name, _, _ in remote.names(folder)]
    if doomed:
        remote.delete(doomed)
    return len(doomed)


def local_budget(local_bytes: int | None, disk_bytes: int) -> int:
    """Bytes of local copies with a remote: cache.local_bytes, else cache.disk_bytes (which,
    with a remote, bounds nothing else: the shared index is cache.remote_bytes's)."""
    return disk_bytes if local_bytes is None else local_bytes


def tiers_for(kv_dir: Path, cache: Any) -> Tiers | None:
    """The tiers a [cache] section (url, shared, local_bytes, disk_bytes) asks for; None when
    its url is empty (the local kv/ only)."""
    if not cache.url:
        return None
    return Tiers(
        kv_dir, open_objects(cache.url, cache.shared), local_budget(cache.local_bytes, cache.disk_bytes)
    )
