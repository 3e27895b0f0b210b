"""The models loaded before: `<data dir>/models/seen.json`, written by `load_model`.

Chunk files and the index name a model only by its fingerprint (a hash); this small
registry maps each fingerprint back to the model it came from, so `chatkv cache stats`
and `chatkv models` can say "smollm2" instead of a hash, and lists what can be used
offline. JSON (never pickle), mode 0600, replaced atomically. Losing it loses only
names: it is rebuilt as models load.

Layout: {"format": 1, "models": {name: {"kind", "identity", "path", "size", "converted",
"fingerprints": [...], "last_loaded"}}}.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chatkv.paths import models_dir

log = logging.getLogger(__name__)

FILE = "seen.json"
FORMAT = 1


def path() -> Path:
    return models_dir() / FILE


def load() -> dict[str, dict[str, Any]]:
    """The recorded models by name ({} when there is no registry or it cannot be read)."""
    try:
        data = json.loads(path().read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring the model registry %s (%s); it is rewritten as models load", path(), e)
        return {}
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        return {}
    return {k: v for k, v in models.items() if isinstance(k, str) and isinstance(v, dict)}


def names_by_fingerprint() -> dict[str, str]:
    """fingerprint -> the name of the model last loaded with it."""
    out: dict[str, str] = {}
    entries = sorted(load().items(), key=lambda kv: str(kv[1].get("last_loaded", "")))
    for name, entry in entries:  # oldest first: a later load of the same weights wins
        for fp in entry.get("fingerprints") or ():
            if isinstance(fp, str):
                out[fp] = name
    return out


def record(
    name: str, kind: str, identity: str, fingerprint: str, where: str, size: int, converted: str | None = None
) -> None:
    """Remember that model `name` loaded with `fingerprint`. Never raises: a registry that
    cannot be written costs only names in listings."""
    try:
        models = load()
        entry = models.get(name, {})
        fps = [f for f in entry.get("fingerprints") or () if isinstance(f, str) and f != fingerprint]
        if fingerprint:
            fps.append(fingerprint)
        models[name] = {
            "kind": kind,
            "identity": identity,
            "path": where,
            "size": int(size),
            "converted": converted,
            "fingerprints": fps[-16:],  # a few dtypes and devices; bounded all the same
            "last_loaded": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        _write(path(), json.dumps({"format": FORMAT, "models": models}, indent=1, sort_keys=True))
    except OSError as e:
        log.warning("could not record the model in %s: %s", path(), e)


def _write(target: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-seen-")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def weights_size(where: Path) -> int:
    """Bytes of the weights at `where`: a file's size, or a directory's weight files."""
    try:
        if where.is_file():
            return where.stat().st_size
        if where.is_dir():
            return sum(
                p.stat().st_size for p in where.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf")
            )
    except OSError:
        pass
    return 0


def dir_size(where: Path) -> int:
    """Total bytes of the files under `where` (0 when it is missing)."""
    total = 0
    for root, _dirs, files in os.walk(where):
        for f in files:
            try:
                total += (Path(root) / f).stat().st_size
            except OSError:
                pass
    return total
