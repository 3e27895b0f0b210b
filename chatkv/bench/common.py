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
    so its converted copy is still found in the real data dir)."""
    old = os.environ.get("CHATKV_HOME")
    with tempfile.TemporaryDirectory(prefix="chatkv-bench-") as tmp:
        os.environ["CHATKV_HOME"] = tmp
        try:
            yield Path(tmp)
        finally:
            if old is None:
                os.environ.pop("CHATKV_HOME", None)
            else:
                os.environ["CHATKV_HOME"] = old


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
