"""Hugging Face hub ids for --model, looked up in the local cache; no torch import here.

chatkv usually runs where no hub is reachable, and transformers would spend ~50 s retrying
one for a mistyped name. So a hub id is taken from the local cache unless HF_HUB_OFFLINE=0,
and the CLI checks the name (`precheck`) before it imports torch: a wrong --model fails in
about a second.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from chatkv.errors import ModelError

EMBEDDED = "smollm2"  # chatkv.engine.model.EMBEDDED, repeated so this module never imports torch


def hub_offline() -> bool:
    """Whether hub ids come from the local cache only: the default. HF_HUB_OFFLINE=0 (or
    false/no/off) lets transformers download."""
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() not in ("0", "false", "no", "off")


def snapshot(name: str) -> Path | None:
    """The local snapshot directory of hub model `name` (its main revision), or None."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json", cache_dir=constants.HF_HUB_CACHE)
    except ValueError:  # not a valid repo id (HFValidationError)
        return None
    return Path(found).parent if isinstance(found, str) else None


def cached_models() -> list[str]:
    """Ids of the models in the local hub cache."""
    from huggingface_hub import constants, scan_cache_dir

    try:
        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except Exception:  # no cache directory, or one it cannot read: nothing is cached
        return []
    return sorted(r.repo_id for r in info.repos if r.repo_type == "model")


def unknown_model(name: str) -> ModelError:
    """The one-line error for a --model that is nothing chatkv can load offline."""
    cached = cached_models()
    hint = difflib.get_close_matches(name, [EMBEDDED, *cached], 1)
    listed = f" (cached here: {', '.join(cached[:5])}{', ...' if len(cached) > 5 else ''})" if cached else ""
    return ModelError(
        f"unknown model {name!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}: --model takes "
        f"{EMBEDDED!r} (the embedded model), a model directory, a .gguf file, or a Hugging Face id "
        f"already in the local cache{listed}; set HF_HUB_OFFLINE=0 to download from the hub"
    )


def looks_like_path(name: str) -> bool:
    """A name meant as a file or directory rather than a hub id ("org/model")."""
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1)


def precheck(name: str) -> None:
    """Raise ModelError at once for a --model that is not the embedded model, not an
    existing path and, offline, not a cached hub id. (Paths are checked fully by
    chatkv.engine.model.resolve when the model loads.)"""
    if "\0" in name:
        raise ModelError("--model contains a NUL character; give a model name or path")
    if name == EMBEDDED or looks_like_path(name) or Path(name).expanduser().exists():
        return
    if hub_offline() and snapshot(name) is None:
        raise unknown_model(name)
