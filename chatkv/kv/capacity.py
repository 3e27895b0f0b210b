"""How much room a live cache buffer is given (kv/appending.py), in a module of its own: the
prefetch thread sizes its buffers with it without importing transformers, which a transformers load
imports meanwhile (kv/prefetch.py)."""

GROW_TOKENS = 256  # capacity is rounded up to this many positions


def capacity(n: int) -> int:
    """Positions to allocate for `n`: a quarter more, rounded up to GROW_TOKENS."""
    return (n * 5 // 4 + GROW_TOKENS - 1) // GROW_TOKENS * GROW_TOKENS
