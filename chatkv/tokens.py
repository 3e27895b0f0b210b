"""Helpers over token-id sequences that the session layer and the KV layer both use
(a neutral module: it imports nothing of chatkv, so either side may depend on it)."""

from __future__ import annotations

from collections.abc import Sequence


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
