"""What the benchmarks share: loading the model outside the timed part, a private
scratch data dir so a benchmark never touches the user's conversations, and output."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path


def load(settings):
    """Load the configured model (not timed by any benchmark)."""
    from chatkv.engine.model import load_model

    m = settings.model
    return load_model(m.name, device=m.device, dtype=m.dtype, load_in=m.load_in, context=m.context)


@contextmanager
def scratch_home():
    """Point CHATKV_HOME at a temporary directory for the block (after the model is loaded,
    so its converted copy is still found in the real data dir), and hide a shared store
    (CHATKV_STORE_URL, CHATKV_CACHE_URL) from the CLI processes a bench starts: a bench's
    `cache gc --max-bytes 0` must never reach the user's database or bucket."""
    names = ("CHATKV_HOME", "CHATKV_STORE_URL", "CHATKV_CACHE_URL")
    old = {name: os.environ.get(name) for name in names}
    with tempfile.TemporaryDirectory(prefix="chatkv-bench-") as tmp:
        os.environ["CHATKV_HOME"] = tmp
        os.environ.pop("CHATKV_STORE_URL", None)
        os.environ.pop("CHATKV_CACHE_URL", None)
        try:
            yield Path(tmp)
        finally:
            for name, value in old.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def emit(result: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print("\n".join(lines))


def history_messages(tokenizer, n_tokens: int, system: str = "") -> list[dict[str, str]]:
    """A chat of alternating user/assistant turns cut from the bundled text, about n_tokens long."""
    from chatkv.bench.quality import sample_text
    from chatkv.engine.model import chat_ids

    words = sample_text().split()
    msgs = [{"role": "system", "content": system}] if system else []
    i, role = 0, "user"
    while True:
        piece = " ".join(words[i % len(words) : i % len(words) + 120]) or " ".join(words[:120])
        msgs.append({"role": role, "content": piece})
        i += 120
        role = "assistant" if role == "user" else "user"
        if role == "user" and len(chat_ids(tokenizer, msgs, False)) >= n_tokens:
            return msgs
