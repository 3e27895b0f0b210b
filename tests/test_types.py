"""The type checker holds the contracts tests cannot: `chatkv.session.Chat` and the UI tests'
fake backend both implement `chatkv.api.ChatBackend`, and the strictly typed modules
(see [tool.mypy] in pyproject.toml) stay so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_passes():
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kv_and_engine_are_checked_strictly():
    """Every module of chatkv/kv and chatkv/engine is in mypy's `files` and under a strict
    override, so an untyped function or a drifted signature there fails `test_mypy_passes`."""
    import fnmatch
    import tomllib

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    strict = [p for o in conf.get("overrides", []) if o.get("strict") for p in o["module"]]
    for pkg in ("kv", "engine"):
        for path in sorted((ROOT / "chatkv" / pkg).glob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            assert any(fnmatch.fnmatch(rel, f) for f in conf["files"]), f"{rel} is not in [tool.mypy] files"
            module = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            assert any(_covers(p, module) for p in strict), f"{module} is not under a strict override"


def _covers(pattern: str, module: str) -> bool:
    """mypy's override patterns: `a.b` is that module, `a.b.*` it and everything under it."""
    if pattern.endswith(".*"):
        return module == pattern[:-2] or module.startswith(pattern[:-1])
    return module == pattern
