"""What models can be used offline: `chatkv models` and `ChatBackend.models()`.

The embedded model (installed or not), every model loaded before (the registry in
chatkv.engine.seen: GGUF files, local directories, hub ids), and converted copies under
`<data dir>/models/` that no recorded model claims. For each: its size, and the KV chunks
on disk made with it (the chunk index's bytes by fingerprint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chatkv.api import ModelInfo
from chatkv.engine import seen
from chatkv.engine.embedded import EMBEDDED, embedded_gguf
from chatkv.errors import ModelError
from chatkv.paths import models_dir


def _embedded() -> tuple[str, int, str]:
    """(path, size, note) of the embedded GGUF ("" and a hint when it is not installed)."""
    try:
        path = embedded_gguf()
    except ModelError as e:
        return "", 0, str(e)
    return str(path), path.stat().st_size, ""


def _available(kind: str, where: str) -> bool:
    if kind == "hub":
        from chatkv.engine import hub

        return hub.snapshot(where) is not None or Path(where).exists()
    return bool(where) and Path(where).exists()


def list_models(chunk_stats: dict[str, Any] | None = None) -> list[ModelInfo]:
    """The models usable offline, embedded first, then by most recent load.

    Args:
        chunk_stats: `Store.chunk_stats()` (its "by_fingerprint" counts chunks per model);
            None lists no chunks.
    """
    by_fp: dict[str, dict[str, int]] = (chunk_stats or {}).get("by_fingerprint") or {}
    registry = seen.load()
    out: list[ModelInfo] = []
    path, size, note = _embedded()
    entry = registry.pop(EMBEDDED, {})
    out.append(_info(EMBEDDED, "embedded", path, bool(path), size, entry, by_fp, note))
    for name, entry in sorted(registry.items(), key=lambda kv: str(kv[1].get("last_loaded")), reverse=True):
        kind = entry.get("kind") if entry.get("kind") in ("gguf", "dir", "hub") else "dir"
        where = str(entry.get("path") or name)
        out.append(
            _info(name, kind, where, _available(kind, where), int(entry.get("size") or 0), entry, by_fp)
        )
    claimed = {str(e.get("converted")) for e in [*seen.load().values()] if e.get("converted")}
    root = models_dir()
    for d in sorted(root.iterdir()) if root.is_dir() else ():
        if d.is_dir() and not d.name.startswith(".") and (d / "done").exists() and str(d) not in claimed:
            out.append(
                ModelInfo(
                    name=str(d),
                    kind="converted",
                    path=str(d),
                    available=True,
                    size_bytes=seen.dir_size(d),
                    note="a converted copy of a GGUF file not loaded since; usable as a model directory",
                )
            )
    return out


def _info(
    name: str,
    kind: str,
    where: str,
    available: bool,
    size: int,
    entry: dict[str, Any],
    by_fp: dict[str, dict[str, int]],
    note: str = "",
) -> ModelInfo:
    fps = [f for f in entry.get("fingerprints") or () if isinstance(f, str)]
    conv = entry.get("converted")
    converted_bytes = seen.dir_size(Path(conv)) if isinstance(conv, str) and Path(conv).is_dir() else 0
    if not available and not note:
        note = "its files are gone" if kind != "hub" else "no longer in the local hub cache"
    return ModelInfo(
        name=name,
        kind=kind,  # type: ignore[arg-type]
        path=where,
        available=available,
        size_bytes=size,
        converted_bytes=converted_bytes,
        chunk_count=sum(by_fp.get(f, {}).get("count", 0) for f in fps),
        chunk_bytes=sum(by_fp.get(f, {}).get("bytes", 0) for f in fps),
        fingerprints=fps,
        last_loaded=str(entry.get("last_loaded") or ""),
        note=note,
    )
