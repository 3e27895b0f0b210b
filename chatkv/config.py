"""Configuration: shipped defaults < user file < CHATKV_* environment < command-line flags.

Every value is validated on load; an invalid one raises ConfigError naming the key,
the value and what is allowed.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from chatkv.errors import ConfigError
from chatkv.paths import config_file, package_file

log = logging.getLogger(__name__)

INT64_MAX = 2**63 - 1  # SQLite stores int64; no count or size chatkv keeps is larger
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 0..2**64-1

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_size(value: Any) -> int:
    """Parse a byte size: an int, or a string like "512MiB" / "2GB", at most 2**63-1.
    Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if not 0 <= value <= INT64_MAX:
            raise ValueError(f"size out of range: {value}")
        return value
    m = _SIZE.match(str(value))
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise ValueError(f"not a size: {value!r}")
    size = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    if not size <= INT64_MAX:  # also "9" * 400, which float() makes infinite
        raise ValueError(f"size out of range: {value!r}")
    if not m.group(2) and size != int(size):  # "0.5" was 0 bytes, silently ("1.2GiB" rounds down)
        raise ValueError(f"not a whole number of bytes: {value!r}")
    return int(size)


def _choice(*options: str) -> tuple[Callable[[Any], Any], str]:
    def check(v: Any) -> str:
        if v not in options:
            raise ValueError
        return v

    return check, "one of " + ", ".join(repr(o) for o in options)


def _int(lo: int, hi: int = INT64_MAX) -> tuple[Callable[[Any], Any], str]:
    def check(v: Any) -> int:
        if isinstance(v, str):
            v = int(v.strip())
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError
        return v

    return check, f"an integer from {lo} to {hi}"


def _float(lo: float, hi: float) -> tuple[Callable[[Any], Any], str]:
    def check(v: Any) -> float:
        if isinstance(v, str):
            v = float(v.strip())
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise ValueError
        return float(v)

    return check, f"a number from {lo} to {hi}"


def _str() -> tuple[Callable[[Any], Any], str]:
    def check(v: Any) -> str:
        if not isinstance(v, str):
            raise ValueError
        return v

    return check, "a string"


def _nonempty() -> tuple[Callable[[Any], Any], str]:
    def check(v: Any) -> str:
        if not isinstance(v, str) or not v.strip():
            raise ValueError
        return v.strip()

    return check, "a non-empty string"


def _strlist() -> tuple[Callable[[Any], Any], str]:
    def check(v: Any) -> list[str]:
        if isinstance(v, str):  # from the environment: comma-separated
            v = [s for s in v.split(",") if s]
        if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
            raise ValueError
        return v

    return check, "a list of non-empty strings"


def _size() -> tuple[Callable[[Any], Any], str]:
    return parse_size, 'a byte size such as 1073741824, "512MiB" or "2GB"'


def _size_or_unset() -> tuple[Callable[[Any], Any], str]:
    """A byte size, or "" for none set (None: what the key's comment in default.toml says)."""

    def check(v: Any) -> int | None:
        if isinstance(v, str) and not v.strip():
            return None
        return parse_size(v)

    return check, '"" (unset) or a byte size such as 1073741824, "512MiB" or "2GB"'


def _bool() -> tuple[Callable[[Any], Any], str]:
    def check(v: Any) -> bool:
        if isinstance(v, str):  # from the environment
            v = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(v.lower())
        if not isinstance(v, bool):
            raise ValueError
        return v

    return check, "true or false"


NEEDS_BOTO3 = "cache.url names S3, which needs boto3: pip install 'chatkv[shared]'"


def client_missing(url: str) -> str | None:
    """The one-line error for a cache.url whose client library is not installed (found
    without importing it, so a command can say so before loading a model), else None."""
    import importlib.util

    if url.partition(":")[0] == "s3" and importlib.util.find_spec("boto3") is None:
        return NEEDS_BOTO3
    return None


def _url(*schemes: str) -> tuple[Callable[[Any], Any], str]:
    """ "" (the default) or a URL whose scheme is one of `schemes`. Only the scheme is checked
    here (without importing a client); opening the store or cache checks the rest."""

    def check(v: Any) -> str:
        if not isinstance(v, str):
            raise ValueError
        v = v.strip()
        if v and (v.split("://", 1)[0] not in schemes or "://" not in v):
            raise ValueError
        return v

    return check, '"" (the default) or a URL starting ' + " or ".join(f"{s}://" for s in schemes)


# `cache.codec` names a storage policy (kv/policy.py): "tiered" by age, or one fixed codec.
# Listed here, not imported, so that reading the config never imports torch.
CODEC_NAMES = ("tiered", "fp16", "int8", "int4", "int2")

SCHEMA: dict[str, tuple[Callable[[Any], Any], str]] = {
    "model.name": _nonempty(),
    "model.device": _choice("auto", "cpu", "cuda"),
    "model.dtype": _choice("auto", "float32", "bfloat16", "float16"),
    "model.load_in": _choice("none", "8bit", "4bit"),
    "model.context": _int(0),
    "generation.max_new_tokens": _int(1, 1_000_000),
    "generation.temperature": _float(0.0, 5.0),
    "generation.top_p": _float(0.0, 1.0),
    "generation.top_k": _int(0),
    "generation.seed": _int(-1, SEED_MAX),  # -1: a fresh seed each turn
    "generation.stop": _strlist(),
    "cache.codec": _choice(*CODEC_NAMES),
    "cache.chunk_tokens": _int(16, 65536),
    "cache.live_bytes": _size(),
    "cache.disk_bytes": _size(),
    "cache.url": _url("s3", "file"),
    "cache.local_bytes": _size_or_unset(),
    "cache.remote_bytes": _size_or_unset(),
    "cache.shared": _bool(),
    "store.url": _url("postgresql", "postgresql+psycopg", "sqlite"),
    "chat.system_prompt": _str(),
    "batch.batch_size": _int(0, 4096),
    "ui.theme": _nonempty(),
    "ui.export_dir": _str(),
}
UI_KEYS = (
    "new",
    "rename",
    "delete",
    "stop",
    "regenerate",
    "edit",
    "system_prompt",
    "copy",
    "export",
    "theme",
    "help",
    "newline",
    "conversations",
    "next_conversation",
    "previous_conversation",
    "sidebar",
    "copy_code",
    "versions",
    "model",
)
for _k in UI_KEYS:
    SCHEMA[f"ui.keys.{_k}"] = _nonempty()


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return _flatten(tomllib.load(f))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:  # tomllib decodes UTF-8 itself
        raise ConfigError(f"{what} {path} is not valid TOML ({e}); fix or remove it") from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None


# "scheme://user:password@": a URL's password, never repeated in an error message
_PASSWORD = re.compile(r"(://[^/@:]*:)[^/@]*@")


def shown(value: Any) -> Any:
    """A setting's value as it may be printed: a URL's password as ***."""
    return _PASSWORD.sub(r"\1***@", value) if isinstance(value, str) else value


def validate(key: str, value: Any, source: str) -> Any:
    """Check one value against the schema; return it normalised or raise ConfigError."""
    if key not in SCHEMA:
        close = difflib.get_close_matches(key, list(SCHEMA), 1, 0.7)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"unknown config key {key!r} in {source}; {hint}`chatkv config show` lists every key"
        )
    check, allowed = SCHEMA[key]
    try:
        return check(value)
    except (ValueError, TypeError, OverflowError):
        raise ConfigError(
            f"invalid value for {key} in {source}: {_written(shown(value))} (allowed: {allowed})"
        ) from None


def _written(value: Any) -> str:
    """A value as JSON writes it (true, "", [""], 1e+30), as it was given in a batch line, a
    TOML file or a flag; repr() for what JSON has no form for."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


class Settings:
    """Validated settings. Read with `settings.get("cache.codec")` or `settings.cache.codec`.

    Remembers which keys the user set (config file, environment, flag or `set`) as opposed
    to the shipped defaults: a model's recommended sampling replaces only the latter."""

    def __init__(self, values: dict[str, Any], user_keys: set[str] | frozenset[str] = frozenset()):
        self._values = dict(values)
        self._user_keys = set(user_keys)

    def get(self, key: str) -> Any:
        return self._values[key]

    def set(self, key: str, value: Any, source: str = "command line") -> None:
        self._values[key] = validate(key, value, source)
        self._user_keys.add(key)

    def is_user_set(self, key: str) -> bool:
        """Whether `key` comes from the user (file, environment, flag), not the shipped defaults."""
        return key in self._user_keys

    def copy(self) -> Settings:
        return Settings(self._values, self._user_keys)

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def __getattr__(self, section: str) -> Any:
        if section.startswith("_"):
            raise AttributeError(section)
        prefix = section + "."
        items = {k[len(prefix) :]: v for k, v in self._values.items() if k.startswith(prefix)}
        if not items:
            raise AttributeError(section)
        return _namespace(items)


def _namespace(items: dict[str, Any]) -> SimpleNamespace:
    nested: dict[str, Any] = {}
    for key, value in items.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            nested[head] = value
    return SimpleNamespace(**{k: _namespace(v) if isinstance(v, dict) else v for k, v in nested.items()})


def env_name(key: str) -> str:
    return "CHATKV_" + key.replace(".", "_").upper()


def load_settings(user_file: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Load defaults, then the user file, then CHATKV_* variables; validate everything."""
    environ = os.environ if environ is None else environ
    defaults = _read_toml(package_file("config/default.toml"), "default config")
    values = {k: validate(k, v, "default config") for k, v in defaults.items()}
    user: set[str] = set()
    path = user_file or config_file()
    if path.exists():
        for key, value in _read_toml(path, "config file").items():
            values[key] = validate(key, value, str(path))
            user.add(key)
    for key in SCHEMA:
        name = env_name(key)
        if name in environ:
            values[key] = validate(key, environ[name], f"environment variable {name}")
            user.add(key)
    _warn_unknown_variables(environ)
    return Settings(values, user)


OTHER_VARIABLES = frozenset({"CHATKV_HOME"})  # chatkv's own variables that name no setting
_warned: set[str] = set()


def _warn_unknown_variables(environ: Mapping[str, str]) -> None:
    """One warning for each CHATKV_* variable that names no setting (a misspelt one was
    ignored without a word), with the closest name when there is one. A warning, not an
    error as an unknown key in the config file is: a variable may be meant for another
    version of chatkv, or for a script around it."""
    known = {env_name(key) for key in SCHEMA} | OTHER_VARIABLES
    for name in sorted(environ):
        if name.startswith("CHATKV_") and name not in known and name not in _warned:
            _warned.add(name)
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"did you mean {close[0]}?" if close else "`chatkv config show` lists the settings"
            log.warning("environment variable %s names no setting and is ignored; %s", name, hint)
