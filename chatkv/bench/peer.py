"""llama.cpp on the same GGUF file, measured in the same run as chatkv: the peer the speed
benchmarks report ratios to.

Optional: `pip install chatkv[peer]` builds llama-cpp-python from source (minutes), so it
is never part of the default setup or CI. Without it, or for a model that is not a GGUF
file, `open_peer` says why in one line and the benchmarks report the rest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Peer:
    """A llama.cpp context over the model's GGUF file, greedy like chatkv's bench runs."""

    llm: Any  # llama_cpp.Llama
    path: Path
    version: str

    def prefill(self, ids: list[int]) -> float:
        """Evaluate `ids` from an empty context; return the seconds it took."""
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t0

    def rewind(self, n: int) -> None:
        """Forget every position from `n` on (the next eval drops them from the KV cache), so
        that decoding can be measured again after the same prefill."""
        self.llm.n_tokens = n

    def decode(self, n: int) -> float:
        """Greedily decode `n` tokens after what was prefilled; return tokens per second.

        The next token is the argmax of the last logits, as chatkv's greedy sampler takes it,
        and is fed back one at a time as a chat client would."""
        import numpy as np

        vocab = self.llm.n_vocab()
        t0 = time.perf_counter()
        for _ in range(n):
            # (V,) logits of the last position, read in place (Llama.scores holds them only
            # with logits_all, which would copy every position's)
            last = np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(vocab,))
            self.llm.eval([int(np.argmax(last))])
        return n / (time.perf_counter() - t0)


def gguf_of(model_name: str) -> Path | None:
    """The GGUF file behind a --model value (the embedded model included), or None."""
    from chatkv.engine.model import resolve

    source = resolve(model_name)
    return Path(source.path, source.gguf_file) if source.gguf_file else None


def open_peer(model_name: str, n_ctx: int, threads: int) -> tuple[Peer | None, str]:
    """llama.cpp over the model's GGUF with `n_ctx` positions and `threads` threads, or None
    and a one-line reason (llama-cpp-python missing, or a model that is not a GGUF file)."""
    path = gguf_of(model_name)
    if path is None:
        return None, f"no llama.cpp peer: {model_name} is not a GGUF file"
    try:
        import llama_cpp
    except ImportError:
        return None, "no llama.cpp peer: llama-cpp-python is not installed (pip install 'chatkv[peer]')"
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    version = getattr(llama_cpp, "__version__", "?")
    return Peer(llm, path, version), f"llama.cpp {version}"
