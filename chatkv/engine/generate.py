"""Prefill and decode as a generator of token ids.

One loop, many callers: the TUI, `chatkv ask`, `chatkv batch` and the tests all
consume `generate()`. Split like gpt-fast into `prefill` and `decode_one` so a
faster kernel for either can be dropped in without restructuring.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from chatkv.api import FinishReason, GenerationSettings
from chatkv.engine.lean import lean_for, prefill_step_for

if TYPE_CHECKING:
    from chatkv.kv.live import Cache

PREFILL_STEP = 512  # tokens per forward pass during prefill: bounds activation memory


@dataclass
class Step:
    """One generated token, or the reason generation ended (token is None)."""

    token: int | None
    finish_reason: FinishReason | None = None


SEED_MAX = 2**64 - 1  # what torch.Generator.manual_seed accepts


class Sampler:
    """Greedy, or temperature / top-k / top-p sampling with an optional seed.

    `settings.seed`: 0..2**64-1 makes sampling repeatable; a negative seed (the default
    -1) draws a fresh one each turn. A larger seed raises ValueError (the config and the
    CLI bound it first)."""

    def __init__(self, settings: GenerationSettings, device: torch.device):
        self.s = settings
        self.gen: torch.Generator | None = None
        if settings.seed > SEED_MAX:
            raise ValueError(f"seed {settings.seed} is larger than 2**64-1; use -1 for a fresh seed")
        if settings.temperature > 0:
            self.gen = torch.Generator(device="cpu")
            if settings.seed >= 0:
                self.gen.manual_seed(settings.seed)
            else:
                self.gen.seed()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: (B, V) -> token ids (B,)."""
        if self.gen is None:
            # float32 first: argmax over a bfloat16 vocabulary is ~20x slower on the CPU (the
            # conversion is exact, so the same token wins)
            return logits.float().argmax(dim=-1)
        logits = logits.float() / self.s.temperature
        if self.s.top_k > 0:
            k = min(self.s.top_k, logits.shape[-1])
            kth = torch.topk(logits, k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if 0 < self.s.top_p < 1:
            sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop = cum - sorted_logits.softmax(dim=-1) > self.s.top_p  # keep the token that crosses top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
        probs = logits.softmax(dim=-1).cpu()
        return torch.multinomial(probs, 1, generator=self.gen).squeeze(-1).to(logits.device)


@torch.inference_mode()
def prefill(
    model: Any,  # a transformers causal LM (untyped)
    ids: Sequence[int],
    cache: Cache,
    start: int,
    step: int = PREFILL_STEP,
    cancel: threading.Event | None = None,
    on_prefill: Callable[[int, int], None] | None = None,
) -> torch.Tensor | None:
    """Run `ids` (the tokens after the cached `start`) through the model, extending `cache`.

    Returns the logits of the last position, (1, V), or None when `cancel` was set
    between two steps. Only the last position's logits
    are computed: a 4k-token prompt would otherwise allocate 4k x vocab floats.
    Llama-family models in bfloat16 or float16 take the lean prefill (engine/lean.py:
    fused weights, float32 products on a CPU without AMX); others, and float32 (whose
    re-prefill is bit-exact through transformers' forward), transformers' forward.
    `on_prefill(done, total)` is called before the first step (done 0) and after each.
    """
    if not ids:
        raise ValueError("prefill needs at least one token")
    device = model.device
    logits = None
    if on_prefill is not None:
        on_prefill(0, len(ids))
    for i in range(0, len(ids), step):
        if cancel is not None and cancel.is_set():
            return None  # stopped between steps; the cache covers ids[:i]
        piece = torch.tensor([ids[i : i + step]], device=device)  # (1, T)
        lean = prefill_step_for(model, piece.shape[1])
        if lean is not None:
            logits = lean.prefill(piece, cache, start + i)
        else:
            pos = torch.arange(start + i, start + i + piece.shape[1], device=device)
            out = model(
                input_ids=piece,
                **cache_arg(model, cache),
                use_cache=True,
                cache_position=pos,
                position_ids=pos[None],
                logits_to_keep=1,
            )
            logits = out.logits[:, -1, :]
        if on_prefill is not None:
            on_prefill(i + piece.shape[1], len(ids))
    return logits


def cache_arg(model: Any, cache: Any) -> dict[str, Any]:
    """`cache` as the keyword transformers' forward of `model` takes it: `cache` in newer 5.x
    releases, where `past_key_values` still works but warns at every call site that it is
    deprecated (a FutureWarning on the user's terminal); `past_key_values` before, where an
    unknown `cache` would vanish into **kwargs and the cache be silently ignored."""
    from chatkv.engine.leanload import LeanModel

    target = model.full() if isinstance(model, LeanModel) else model  # its forward is full()'s
    return {_cache_keyword(type(target)): cache}


_keywords: dict[type, str] = {}


def _cache_keyword(cls: type) -> str:
    if cls not in _keywords:
        try:
            takes = "cache" in inspect.signature(getattr(cls, "forward")).parameters  # noqa: B009
        except (AttributeError, TypeError, ValueError):  # no inspectable forward: the old name
            takes = False
        _keywords[cls] = "cache" if takes else "past_key_values"
    return _keywords[cls]


@torch.inference_mode()
def decode_one(model: Any, token: torch.Tensor, cache: Cache, pos: int) -> torch.Tensor:
    """Feed one token (shape (1,)) at position `pos`; return next-token logits (1, V).

    Llama-family models take the lean step (engine/lean.py: the model's own weights
    without transformers' per-call machinery, 2-3x fewer milliseconds per token on a
    small model); every other model, transformers' forward."""
    step = lean_for(model)
    if step is not None:
        return step.step(token, cache, pos)
    p = torch.tensor([pos], device=model.device)
    out = model(
        input_ids=token.view(1, 1),
        **cache_arg(model, cache),
        use_cache=True,
        cache_position=p,
        position_ids=p[None],
        logits_to_keep=1,
    )
    logits: torch.Tensor = out.logits[:, -1, :]
    return logits


def generate(
    model: Any,  # a transformers causal LM (untyped)
    ids: Sequence[int],
    cache: Cache,
    cached: int,
    settings: GenerationSettings,
    eos_ids: Sequence[int],
    max_positions: int,
    cancel: threading.Event | None = None,
    on_prefill: Callable[[int, int], None] | None = None,
) -> Iterator[Step]:
    """Yield generated tokens one at a time, then a final Step with the finish reason.

    Args:
        ids: the whole prompt's token ids; `cache` already covers `ids[:cached]`.
        max_positions: the model's context limit; generation stops with "length" there.
        cancel: set from any thread to stop before the next token ("cancelled").
        on_prefill: told (done, total) prompt tokens as the prefill goes (not called while
            decoding: the per-token loop stays as it is).
    The cache covers every fed token afterwards: the prompt and all generated tokens
    but the last one.
    """
    sampler = Sampler(settings, model.device)
    logits = prefill(model, ids[cached:], cache, cached, cancel=cancel, on_prefill=on_prefill)
    if logits is None:
        yield Step(None, "cancelled")
        return
    pos = len(ids)
    eos = set(eos_ids)
    for n in range(settings.max_new_tokens):
        if cancel is not None and cancel.is_set():
            yield Step(None, "cancelled")
            return
        token = sampler(logits)
        tid = int(token)
        if tid in eos:
            yield Step(None, "stop")
            return
        yield Step(tid)
        if n + 1 == settings.max_new_tokens or pos + 1 >= max_positions:
            break
        logits = decode_one(model, token, cache, pos)
        pos += 1
    yield Step(None, "length")


class TextStream:
    """Turns token ids into text pieces as they come, never splitting a UTF-8 character,
    and stops at stop strings (holding back text that might begin one)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:  # a transformers tokenizer
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all decoded text
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text that can be shown now ("" while undecidable)."""
        self.ids.append(token)
        prev = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        new = self.tok.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(new) > len(prev) and not new.endswith("\ufffd"):
            self.text += new[len(prev) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release()

    def _release(self, final: bool = False) -> str:
        for s in self.stop:
            i = self.text.find(s)
            if i != -1:
                self.text = self.text[:i]
                self.stopped = True
                final = True
        end = len(self.text)
        if not final:
            for s in self.stop:  # hold back a suffix that could start a stop string
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):  # not `end`: another may have cut it
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return out

    def finish(self) -> str:
        """Flush what is held back at the end of generation."""
        rest = self.tok.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        prev = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        if len(rest) > len(prev):
            self.text += rest[len(prev) :].rstrip("\ufffd")
            self.prefix_offset = self.read_offset = len(self.ids)
        return self._release(final=True)
