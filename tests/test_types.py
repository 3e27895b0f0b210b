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
