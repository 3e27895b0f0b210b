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

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from chatkv.errors import CacheError
from chatkv.kv.codecs import Codec, get_codec

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


def relpath(key: str) -> str:
    """Where a chunk lives under the kv dir: fan out on the key's first bytes."""
    return f"{key[:2]}/{key[2:4]}/{key}.safetensors"


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


def _header(blob: bytes) -> dict:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n])


def write_atomic(path: Path, blob: bytes) -> None:
    """Write a file so that readers see all of it or none: temp file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
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


def read_chunk(
    path: Path,
    policy,
    fingerprint: str,
    key: str,
    dtype: torch.dtype,
    device: torch.device,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ChunkData:
    """Read, verify and decode a chunk file. Raises CacheError if it cannot be trusted.

    The file is decoded with the codec its metadata names, which must be registered with
    the same parameters and allowed by `policy` (a kv.policy.Policy): the file, not the
    index row, says what it holds, so a reader racing a re-code decodes what it read.

    With `out` — key and value storage of shape (L, B, H, n_tokens, D), e.g. views of a
    preallocated cache — the chunk is decoded straight into it and the returned
    ChunkData's `k` and `v` are those views.
    """
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise CacheError(f"chunk {key[:12]} unreadable: {e.strerror or e}") from None
    try:
        meta = _header(blob).get("__metadata__") or {}
    except (ValueError, struct.error, UnicodeDecodeError):
        raise CacheError(f"chunk {key[:12]} is not a safetensors file") from None
    try:
        codec = get_codec(str(meta.get("codec")))
    except ValueError:
        raise CacheError(f"chunk {key[:12]} has unregistered codec {meta.get('codec')!r}") from None
    if not policy.allows(codec):
        raise CacheError(f"chunk {key[:12]} has codec {codec.name!r}, which policy {policy.name!r} refuses")
    expect = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "key": key,
        "codec_params": json.dumps(codec.params(), sort_keys=True),
        "dtype": str(dtype).removeprefix("torch."),
    }
    for field, want in expect.items():
        if meta.get(field) != want:
            raise CacheError(f"chunk {key[:12]} has {field} {meta.get(field)!r}, expected {want!r}")
    try:
        tensors = st_load(blob)
    except Exception:  # safetensors raises its own error type for a truncated file
        raise CacheError(f"chunk {key[:12]} is truncated or corrupt") from None
    if tensors_checksum(tensors) != meta.get("checksum"):
        raise CacheError(f"chunk {key[:12]} fails its checksum (corrupt)")
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
        raise CacheError(f"chunk {key[:12]} is malformed: {e}") from None
    if len(tokens) != n:
        raise CacheError(f"chunk {key[:12]} holds {len(tokens)} tokens, header says {n}")
    return ChunkData(
        key, meta["parent"] or None, int(meta["start"]), tokens, meta["partial"] == "1", k, v, codec.name
    )


def verify_file(path: Path, rec) -> str | None:
    """Check a chunk file against its index record without decoding it.
    Returns what is wrong, or None if the file is sound."""
    try:
        blob = path.read_bytes()
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    try:
        meta = _header(blob).get("__metadata__") or {}
        tensors = st_load(blob)
    except Exception:
        return "truncated or not a safetensors file"
    if meta.get("format") != FORMAT:
        return f"format {meta.get('format')!r}, expected {FORMAT!r}"
    # The codec is not compared with the row: a re-code rewrites the file before the row,
    # and the file says what it holds. It must be a registered codec with its parameters.
    try:
        if meta.get("codec_params") != json.dumps(get_codec(str(meta.get("codec"))).params(), sort_keys=True):
            return f"codec {meta.get('codec')!r} with other parameters than this version's"
    except ValueError:
        return f"codec {meta.get('codec')!r} is not registered"
    for field, want in (
        ("key", rec.key),
        ("fingerprint", rec.fingerprint),
        ("n_tokens", str(rec.n_tokens)),
        ("start", str(rec.start)),
    ):
        if meta.get(field) != want:
            return f"{field} {meta.get(field)!r} does not match the index ({want!r})"
    if tensors_checksum(tensors) != meta.get("checksum"):
        return "checksum mismatch (corrupt)"
    return None
