"""Chunk files: one chunk of a KV cache as a safetensors file.

A chunk covers `n_tokens` consecutive positions starting at `start`. Its key is a
hash of (format, model fingerprint, parent key, token ids), so a chunk is only ever
found after exactly the chain of chunks it was computed after: keys hold
RoPE-rotated, position-dependent values. The codec is not part of the key: a chunk
is re-coded to a coarser codec as it ages (see kv/policy.py) under the same key, and
the file's metadata says what it holds; the index row records it too.

File layout: tensors `k.{field}` / `v.{field}` as the codec names them, for all
layers at once (stacked along the batch axis), plus `tokens` (int32), and for a chunk
at position 0 `sink.k` / `sink.v`: its first `sink` tokens as computed (lossless), the
codec's tensors covering the rest; `__metadata__` holds the format version, codec and
its parameters, fingerprint, key, parent, start, n_tokens, partial, the compute dtype,
a sha256 of the tensor data, and `sink`. A reader decodes with the codec the file
names (which must be registered with the same parameters) if the policy in force
allows it, and refuses anything that does not match.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import stat
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from chatkv.errors import CacheError
from chatkv.kv.codecs import CODECS, Codec, get_codec

if TYPE_CHECKING:
    from chatkv.kv.policy import Policy
    from chatkv.store.chunk_index import ChunkRecord

FORMAT = "chatkv-kv/2"

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v), each (B, H, T, D)


def chunk_key(fingerprint: str, parent: str | None, tokens: Sequence[int]) -> str:
    """Content address of a chunk: chained over its parent, so equal keys mean equal prefixes.
    Not over the codec: re-coding a chunk as it ages must not change its key or its
    descendants' (the codec is in the file and the index row)."""
    h = hashlib.sha256()
    h.update(f"{FORMAT}|{fingerprint}|{parent or ''}|".encode())
    h.update(torch.tensor(list(tokens), dtype=torch.int32).numpy().tobytes())
    return h.hexdigest()


def chain_keys(fingerprint: str, tokens: Sequence[int], chunk_tokens: int) -> list[str]:
    """Keys of the full chunks of `tokens`, in order (the trailing partial one excluded)."""
    keys: list[str] = []
    parent = None
    for i in range(0, len(tokens) - chunk_tokens + 1, chunk_tokens):
        parent = chunk_key(fingerprint, parent, tokens[i : i + chunk_tokens])
        keys.append(parent)
    return keys


KEY_RE = re.compile(r"[0-9a-f]{64}")


def check_key(key: object) -> str:
    """`key` if it is a chunk key (64 lowercase hex digits), else CacheError: a path is only
    ever built from a key of this form, so no index row or file name can point outside."""
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise CacheError(f"chunk key {str(key)[:80]!r} is not 64 lowercase hex digits (a damaged index row)")
    return key


def relpath(key: str) -> str:
    """Where a chunk lives under the kv dir: fan out on the key's first bytes."""
    check_key(key)
    return f"{key[:2]}/{key[2:4]}/{key}.safetensors"


def chunk_path(kv_dir: Path, key: str) -> Path:
    """The file of chunk `key` under `kv_dir`, derived from the key alone (the index's
    `path` column is never trusted). CacheError if the key is malformed or the path
    resolves outside `kv_dir` (a fan-out directory replaced by a symlink)."""
    path = kv_dir / relpath(key)
    if not path.resolve().is_relative_to(kv_dir.resolve()):
        raise CacheError(f"chunk {key[:12]} resolves outside {kv_dir}; remove the symlink there")
    return path


@dataclass
class ChunkData:
    key: str
    parent: str | None
    start: int
    tokens: list[int]
    partial: bool
    k: torch.Tensor  # (L, B, H, T, D): every layer's keys
    v: torch.Tensor  # (L, B, H, T, D)
    codec: str = "fp16"  # the codec the file holds (a re-code may have changed it since indexing)

    @property
    def layers(self) -> Layers:
        return list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))


def encode_chunk(
    codec: Codec,
    fingerprint: str,
    key: str,
    parent: str | None,
    start: int,
    tokens: Sequence[int],
    layers: Layers,
    partial: bool,
    sink: int = 0,
) -> tuple[bytes, str]:
    """Serialize a chunk; returns (file bytes, checksum).

    All layers are encoded in one codec call, stacked along the batch axis: every codec
    groups values within a (batch, head) row, so this quantizes exactly as layer by layer
    would, with 1/L as many tensor operations (and files with a handful of tensors).
    A chunk at `start` 0 keeps its first `sink` tokens apart, as computed: attention
    sinks, where quantization error costs the most. Other chunks ignore `sink`.
    """
    n_layers = len(layers)
    k = torch.cat([k for k, _ in layers], dim=0)  # (L*B, H, T, D)
    v = torch.cat([v for _, v in layers], dim=0)
    sink = min(sink, len(tokens) - 1) if start == 0 and not codec.lossless else 0  # as Policy.layout
    tensors: dict[str, torch.Tensor] = {}
    if sink > 0:
        tensors["sink.k"] = k[:, :, :sink].detach().contiguous().cpu()  # (L*B, H, sink, D)
        tensors["sink.v"] = v[:, :, :sink].detach().contiguous().cpu()
        k, v = k[:, :, sink:], v[:, :, sink:]  # (L*B, H, T - sink, D)
    tensors |= {name: t.detach().contiguous().cpu() for name, t in codec.encode(k, v).items()}
    tensors["tokens"] = torch.tensor(list(tokens), dtype=torch.int32)
    b, h, _, d = layers[0][0].shape
    meta = {
        "format": FORMAT,
        "codec": codec.name,
        "codec_params": json.dumps(codec.params(), sort_keys=True),
        "fingerprint": fingerprint,
        "key": key,
        "parent": parent or "",
        "start": str(start),
        "n_tokens": str(len(tokens)),
        "partial": "1" if partial else "0",
        "layers": str(n_layers),
        "batch": str(b),
        "kv_heads": str(h),
        "head_dim": str(d),
        "dtype": str(layers[0][0].dtype).removeprefix("torch."),
        "sink": str(sink),
    }
    checksum = tensors_checksum(tensors)
    return st_save(tensors, metadata=meta | {"checksum": checksum}), checksum


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# Metadata every chunk file must carry (README, "Chunk file").
REQUIRED_META = (
    "format",
    "codec",
    "codec_params",
    "fingerprint",
    "key",
    "parent",
    "start",
    "n_tokens",
    "partial",
    "layers",
    "batch",
    "kv_heads",
    "head_dim",
    "dtype",
    "checksum",
)
# Our headers list a handful of tensors: anything near safetensors' own 100 MB limit is crafted.
MAX_HEADER_BYTES = 1 << 20
# The bound on a read when the index gives no size (`cache rebuild`, a row without nbytes).
MAX_CHUNK_BYTES = 4 << 30
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# An OSError that says the file is not there (or not a file): the index row is damaged.
# Any other (EIO, EAGAIN, EMFILE, ENOMEM, EINTR, EACCES...) may pass: the chunk is kept.
_GONE = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP}

FileId = tuple[int, int, int, int]  # (st_dev, st_ino, st_mtime_ns, st_size)


def file_id(st: os.stat_result) -> FileId:
    """What identifies one version of a file: a rewrite under the same name changes it."""
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (POSIX); silently skipped where directories can't be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _make_private_dirs(path: Path) -> None:
    """Create the missing directories of `path`, each 0700 whatever the umask (mkdir's
    mode applies to the last one only), and fsync the directory that gains each entry: a
    power cut must not leave a committed row whose file's directory was never recorded."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue  # another writer made it meanwhile
        d.chmod(0o700)
        _fsync_dir(d.parent)


def write_atomic(path: Path, blob: bytes) -> None:
    """Write a file so that readers see all of it or none: temp file, fsync, rename, fsync
    of the directory (so that the rename itself survives a power cut)."""
    _make_private_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _unreadable(key: str, e: OSError) -> CacheError:
    return CacheError(f"chunk {key[:12]} unreadable: {e.strerror or e}", damaged=e.errno in _GONE)


def _read_checked(
    path: Path, key: str, nbytes: int | None, expect: dict[str, str]
) -> tuple[bytes, dict[str, str], FileId]:
    """The file's bytes and metadata. The header is read first (at most MAX_HEADER_BYTES) and
    its identity checked (format, `expect`, key); then the file's size against the index's
    `nbytes` (or MAX_CHUNK_BYTES); only then the rest, never more than that size."""
    try:
        # O_NOFOLLOW: a chunk file is never a symlink; one planted there is not followed.
        # O_NONBLOCK: opening a FIFO planted there would otherwise wait for a writer forever.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise _unreadable(key, e) from None
    fid = None
    try:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            fid = file_id(st)
            if not stat.S_ISREG(st.st_mode):
                raise CacheError(f"chunk {key[:12]} is not a regular file")
            head = f.read(8)
            if len(head) < 8:
                raise CacheError(f"chunk {key[:12]} is not a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > st.st_size:
                raise CacheError(
                    f"chunk {key[:12]} is truncated or not a safetensors file (header {n} bytes)"
                )
            raw = f.read(n)
            meta = _metadata(raw, key)
            for field, want in {"format": FORMAT, **expect, "key": key}.items():
                if meta.get(field) != want:
                    got = str(meta.get(field))[:80]
                    raise CacheError(f"chunk {key[:12]} has {field} {got!r}, expected {want!r}")
            if nbytes is not None and st.st_size != nbytes:
                what = "truncated or corrupt" if st.st_size < nbytes else "oversized or replaced"
                raise CacheError(f"chunk {key[:12]} is {st.st_size} bytes, the index says {nbytes} ({what})")
            if st.st_size > MAX_CHUNK_BYTES:
                raise CacheError(f"chunk {key[:12]} is {st.st_size} bytes, too large")
            f.seek(0)  # one read of the whole file: measured 25x faster than appending the rest
            blob = f.read(st.st_size + 1)
    except OSError as e:
        raise _unreadable(key, e) from None
    except CacheError as e:
        e.file_id = fid
        raise
    if len(blob) != st.st_size or blob[: 8 + n] != head + raw:  # changed while we read it: judge it later
        raise CacheError(f"chunk {key[:12]} changed while being read", damaged=False)
    return blob, meta, fid


def _metadata(raw: bytes, key: str) -> dict[str, str]:
    """The `__metadata__` of a safetensors header, with every REQUIRED_META entry."""
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[[[[..." crafted
        raise CacheError(f"chunk {key[:12]} is not a safetensors file") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CacheError(f"chunk {key[:12]} has no valid metadata")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CacheError(f"chunk {key[:12]} lacks metadata {', '.join(missing)}")
    return meta


def _meta_int(meta: dict[str, str], name: str, key: str, least: int = 0) -> int:
    value = meta[name]
    if not (value.isascii() and value.isdigit()) or int(value) < least:  # "²".isdigit() is True
        raise CacheError(f"chunk {key[:12]} has {name} {value[:40]!r}, not an integer >= {least}")
    return int(value)


@functools.lru_cache(maxsize=32)
def _expected_tensors(
    codec: Codec, params: str, shape: tuple[int, ...], dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of what `codec` writes for K and V of `shape` (L*B, H, T, D):
    found by encoding zeros, so every codec is checked without code of its own. Real zeros
    on the CPU: the meta device's first use in a process imports torch's compiler stack
    (seconds, measured 2-4 s), on the path of the first chunk read of a resumed conversation.
    One, two and three rows of (L*B) are encoded: where each part's first dimension is a
    multiple of the rows (every codec chatkv registers), that gives the whole chunk's parts
    without encoding a chunk's worth of zeros (0.13 s of a resumed turn's 0.4 s of chunk
    reads, for the four structures of a tiered conversation); any other codec encodes the
    whole shape."""

    def parts_of(rows: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        zeros = torch.zeros((rows, *shape[1:]), dtype=dtype)  # (rows, H, T, D)
        return {name: (tuple(t.shape), t.dtype) for name, t in codec.encode(zeros, zeros).items()}

    def scaled(one: dict[str, tuple[tuple[int, ...], torch.dtype]], rows: int) -> dict[str, Any]:
        return {name: ((rows * s[0], *s[1:]), dt) for name, (s, dt) in one.items()}

    one = parts_of(1)
    if shape[0] > 3 and all(s for s, _ in one.values()):
        if all(parts_of(rows) == scaled(one, rows) for rows in (2, 3)):
            return scaled(one, shape[0])
    return parts_of(shape[0])


def _check_structure(
    meta: dict[str, str],
    tensors: dict[str, torch.Tensor],
    codec: Codec,
    key: str,
    data_bytes: int,
    want_shape: tuple[int, ...] | None = None,
) -> tuple[int, ...]:
    """Check every tensor's name, shape and dtype against what `codec` writes for the header's
    shape, the token ids, and that no float is NaN or infinite. Returns the shape (L, B, H, T, D)."""
    dims = [
        _meta_int(meta, name, key, least=1)
        for name in ("layers", "batch", "kv_heads", "n_tokens", "head_dim")
    ]
    _meta_int(meta, "start", key)
    shape = tuple(dims)  # (L, B, H, T, D)
    if meta["partial"] not in ("0", "1"):
        raise CacheError(f"chunk {key[:12]} has partial {meta['partial'][:40]!r}")
    if meta["parent"]:
        check_key(meta["parent"])
    dtype = FLOAT_DTYPES.get(meta["dtype"])
    if dtype is None:
        raise CacheError(f"chunk {key[:12]} has dtype {meta['dtype'][:40]!r}")
    if want_shape is not None and shape != want_shape:
        raise CacheError(f"chunk {key[:12]} holds {shape}, the cache expects {want_shape}")
    numel = 2 * dims[0] * dims[1] * dims[2] * dims[3] * dims[4]
    if numel > 16 * data_bytes + 4096:  # no codec packs more than 4 values a byte: a crafted header
        raise CacheError(f"chunk {key[:12]} claims shape {shape}, more than its {data_bytes} bytes can hold")
    tok = tensors.get("tokens")
    if tok is None or tok.dtype != torch.int32 or tuple(tok.shape) != (dims[3],):
        found = "none" if tok is None else f"{tuple(tok.shape)} {tok.dtype}"
        raise CacheError(f"chunk {key[:12]} tokens are {found}, expected ({dims[3]},) int32")
    if chunk_key(meta["fingerprint"], meta["parent"] or None, tok.tolist()) != key:
        raise CacheError(f"chunk {key[:12]} holds token ids that are not its key's")
    # A chunk at position 0 keeps its first `sink` tokens apart, as computed (kv.policy).
    sink = _meta_int(meta, "sink", key) if "sink" in meta else 0
    if sink and (sink >= dims[3] or int(meta["start"]) != 0 or codec.lossless):
        raise CacheError(f"chunk {key[:12]} has sink {sink} at start {meta['start']} of {dims[3]} tokens")
    rows = dims[0] * dims[1]  # L*B
    expected = dict(
        _expected_tensors(codec, meta["codec_params"], (rows, dims[2], dims[3] - sink, dims[4]), dtype)
    )
    if sink:
        expected |= {f"sink.{side}": ((rows, dims[2], sink, dims[4]), dtype) for side in ("k", "v")}
    names = set(tensors) - {"tokens"}
    if names != set(expected):
        raise CacheError(
            f"chunk {key[:12]} holds tensors {sorted(names)}, codec {codec.name} writes {sorted(expected)}"
        )
    for name, (want, want_dtype) in expected.items():
        t = tensors[name]
        if tuple(t.shape) != want or t.dtype != want_dtype:
            raise CacheError(
                f"chunk {key[:12]} tensor {name} is {tuple(t.shape)} {t.dtype}, expected {want} {want_dtype}"
            )
    for name, t in tensors.items():
        # NaN and infinity survive a sum, and summing is 50x faster than isfinite().all() on
        # one CPU thread. A float32 sum overflows only past 3e38: such a chunk is refused too.
        if t.is_floating_point() and not bool(torch.isfinite(t.sum(dtype=torch.float32))):
            raise CacheError(f"chunk {key[:12]} tensor {name} holds NaN or infinity")
    return shape


def inspect_chunk(
    path: Path,
    key: str,
    nbytes: int | None = None,
    checksum: str | None = None,
    codec: Codec | None = None,
    want_shape: tuple[int, ...] | None = None,
    expect: dict[str, str] | None = None,
) -> tuple[dict[str, str], dict[str, torch.Tensor], FileId]:
    """Read and check a chunk file without decoding it: its header and key, the metadata
    fields in `expect`, its size against the index (`nbytes`), its checksum against the
    index (`checksum`) and its own data, and every tensor's name, shape and dtype against
    what the codec writes (and `want_shape`, (L, B, H, T, D), when given).
    Returns (metadata, tensors, file id).

    Raises CacheError (`damaged` False only for a transient read error); its `file_id` names
    the file judged.
    """
    check_key(key)
    blob, meta, fid = _read_checked(path, key, nbytes, expect or {})
    try:
        if checksum is not None and meta["checksum"] != checksum:
            raise CacheError(f"chunk {key[:12]} has checksum {meta['checksum'][:16]!r}, the index another")
        try:
            tensors = st_load(blob)
        except Exception:  # safetensors raises its own error type for a truncated file
            raise CacheError(f"chunk {key[:12]} is truncated or corrupt") from None
        if codec is None:
            try:
                codec = get_codec(meta["codec"])
            except ValueError:
                raise CacheError(f"chunk {key[:12]} has codec {meta['codec'][:40]!r}, unknown") from None
        params = json.dumps(codec.params(), sort_keys=True)
        if meta["codec"] != codec.name or meta["codec_params"] != params:
            raise CacheError(f"chunk {key[:12]} has codec {meta['codec']!r}, expected {codec.name!r}")
        _check_structure(meta, tensors, codec, key, len(blob), want_shape)
        if tensors_checksum(tensors) != meta["checksum"]:
            raise CacheError(f"chunk {key[:12]} fails its checksum (corrupt)")
    except CacheError as e:
        e.file_id = fid
        raise
    return meta, tensors, fid


def _peek(path: Path, read: Callable[[Any, dict[str, Any], int], Any]) -> Any:
    """`read(file, header, header length)` over a chunk file's parsed safetensors header,
    never through a link; None when the file or its header cannot be read (nothing is
    verified: for choosing what to read or for a better message, never for using data)."""
    try:
        with open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW | os.O_NONBLOCK)) as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                return None
            header = json.loads(f.read(n))
            return read(f, header if isinstance(header, dict) else {}, n)
    except (OSError, ValueError, TypeError, KeyError, struct.error, AttributeError, RecursionError):
        return None


def _peek_codec(path: Path) -> str | None:
    """The codec a chunk file's header names, or None (for a better error message only)."""

    def codec(_f: Any, header: dict[str, Any], _n: int) -> str | None:
        name = (header.get("__metadata__") or {}).get("codec")
        return name if isinstance(name, str) else None

    return _peek(path, codec)  # type: ignore[no-any-return]


def peek_tokens(path: Path) -> list[int] | None:
    """The token ids a chunk file holds, read from its header and `tokens` tensor alone
    (nothing verified: for choosing which chunk to read, never for using one), or None."""

    def tokens(f: Any, header: dict[str, Any], n: int) -> list[int] | None:
        entry = header.get("tokens") or {}
        begin, end = entry["data_offsets"]
        size = end - begin
        if entry.get("dtype") != "I32" or not 0 <= begin <= end or size % 4 or size > 1 << 24:
            return None
        f.seek(8 + n + begin)
        raw = f.read(size)
        return list(struct.unpack(f"<{size // 4}i", raw)) if len(raw) == size else None

    return _peek(path, tokens)  # type: ignore[no-any-return]


def read_chunk(
    path: Path,
    policy: Policy,
    fingerprint: str,
    key: str,
    dtype: torch.dtype,
    device: torch.device,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    nbytes: int | None = None,
    checksum: str | None = None,
) -> ChunkData:
    """Read, verify and decode a chunk file. Raises CacheError if it cannot be trusted.

    The file is decoded with the codec its metadata names, which must be registered with
    the same parameters and allowed by `policy` (a kv.policy.Policy): the file, not the
    index row, says what it holds, so a reader racing a re-code decodes what it read.

    With `out` — key and value storage of shape (L, B, H, n_tokens, D), e.g. views of a
    preallocated cache — the chunk is decoded straight into it and the returned
    ChunkData's `k` and `v` are those views. `nbytes` and `checksum`, the index's, must
    match the file when given.
    """
    expect = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "key": key,
        "dtype": str(dtype).removeprefix("torch."),
    }
    want_shape = tuple(out[0].shape) if out is not None else None
    # codec None: the file's own (registered, with this version's parameters) is checked and used
    try:
        meta, tensors, fid = inspect_chunk(path, key, nbytes, checksum, None, want_shape, expect)
    except CacheError as e:
        held = _peek_codec(path)
        if e.damaged and held is not None and held in CODECS and not policy.allows(CODECS[held]):
            # say the real reason: a chunk of another codec is not damaged, only not for this policy
            raise CacheError(
                f"chunk {key[:12]} has codec {held!r}, which policy {policy.name!r} refuses",
                file_id=e.file_id,
            ) from None
        raise
    codec = get_codec(meta["codec"])
    if not policy.allows(codec):
        raise CacheError(
            f"chunk {key[:12]} has codec {codec.name!r}, which policy {policy.name!r} refuses", file_id=fid
        )
    try:
        n = int(meta["n_tokens"])
        n_layers, b = int(meta["layers"]), int(meta["batch"])
        shape = (n_layers, b, int(meta["kv_heads"]), n, int(meta["head_dim"]))  # (L, B, H, T, D)
        parts = {name: t for name, t in tensors.items() if name not in ("tokens", "sink.k", "sink.v")}
        sink = int(meta.get("sink", "0"))
        if not 0 <= sink < n:
            raise ValueError(f"sink {sink} out of range for {n} tokens")
        if out is not None:
            k, v = out
            if tuple(k.shape) != shape or tuple(v.shape) != shape:
                raise ValueError(f"holds {shape}, the cache expects {tuple(k.shape)}")
        else:
            k = torch.empty(shape, dtype=dtype, device=device)
            v = torch.empty(shape, dtype=dtype, device=device)
        # .view raises where .flatten would silently copy (and the cache stay empty)
        k_all, v_all = k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])  # (L*B, H, T, D)
        if sink:
            k_all[:, :, :sink].copy_(tensors["sink.k"])
            v_all[:, :, :sink].copy_(tensors["sink.v"])
        codec.decode_into(parts, k_all[:, :, sink:], v_all[:, :, sink:])
        tokens = tensors["tokens"].tolist()
    except (KeyError, ValueError, IndexError, RuntimeError) as e:
        raise CacheError(f"chunk {key[:12]} is malformed: {e}", file_id=fid) from None
    return ChunkData(
        key, meta["parent"] or None, int(meta["start"]), tokens, meta["partial"] == "1", k, v, codec.name
    )


def verify_chunk(path: Path, rec: ChunkRecord) -> FileId:
    """Check a chunk file against its index record (everything `inspect_chunk` checks, plus the
    record's fingerprint, codec, start, n_tokens and parent) without decoding it.
    Returns the file's id; raises CacheError."""
    meta, _, fid = inspect_chunk(path, rec.key, rec.nbytes, rec.checksum)
    # The codec is not compared with the row: a re-code rewrites the file before the row, and
    # the file says what it holds (inspect_chunk checked it is registered, with its parameters).
    for field, want in (
        ("fingerprint", rec.fingerprint),
        ("n_tokens", str(rec.n_tokens)),
        ("start", str(rec.start)),
        ("parent", rec.parent or ""),
        ("partial", "1" if rec.partial else "0"),
    ):
        if meta.get(field) != want:
            raise CacheError(f"{field} {meta.get(field)!r} does not match the index ({want!r})", file_id=fid)
    return fid


def verify_file(path: Path, rec: ChunkRecord) -> str | None:
    """Check a chunk file against its index record without decoding it.
    Returns what is wrong, or None if the file is sound."""
    try:
        verify_chunk(path, rec)
    except CacheError as e:
        return str(e)
    return None
