"""Storage policies: which codec each chunk of a conversation is stored with.

Attention leans hardest on the first tokens of a sequence (attention sinks) and on the
most recent ones, and quantization error there flips greedy choices that are close to a
tie. So a policy stores by age:

- the unfinished tail chunk (rewritten every turn anyway) losslessly, so a conversation
  shorter than one chunk is exact on disk;
- the first ``sink`` tokens of the chunk at position 0 losslessly, whatever the codec;
- the ``exact_recent`` newest full chunks losslessly too;
- older full chunks with the codec of their age tier: ``tiers`` lists (age, codec) where
  age counts full chunks between a chunk and the tail (0: the newest full chunk).

A chunk is re-coded to a coarser tier by a later spill of the conversation, from its live
(exact, unless it was itself loaded from disk) cache. A reader accepts a chunk whose codec
is at least as precise as the coarsest tier of the policy in force: a user who sets the
lossless ``fp16`` policy never gets a lossy chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatkv.kv.codecs import CODECS, Codec, get_codec

LOSSLESS = "fp16"


@dataclass(frozen=True)
class Policy:
    """How one configuration stores chunks; see the module docstring."""

    name: str
    tiers: tuple[tuple[int, str], ...]  # (from this age on, codec name), ages ascending, first at 0
    sink: int = 4
    exact_recent: int = 0
    exact_tail: bool = True  # False only in the quality bench, to measure a bare codec

    def codec_for(self, age: int) -> Codec:
        """The codec of a full chunk ``age`` full chunks behind the tail (0: the newest)."""
        if age < self.exact_recent:
            return get_codec(LOSSLESS)
        name = self.tiers[0][1]
        for since, tier in self.tiers:
            if age >= since:
                name = tier
        return get_codec(name)

    @property
    def lossless(self) -> bool:
        return all(get_codec(name).lossless for _, name in self.tiers)

    @property
    def min_bits(self) -> int:
        return min(get_codec(name).bits for _, name in self.tiers)

    def allows(self, codec: Codec) -> bool:
        """Whether a chunk stored with ``codec`` may be used under this policy."""
        return codec.lossless or (not self.lossless and codec.bits >= self.min_bits)

    @property
    def allowed_tags(self) -> frozenset[str]:
        """Index tags of every registered codec this policy accepts."""
        return frozenset(c.tag for c in CODECS.values() if self.allows(c))

    @property
    def tail(self) -> Codec:
        """The codec of the unfinished tail chunk: lossless (but in the bench's bare codecs)."""
        return get_codec(LOSSLESS) if self.exact_tail else get_codec(self.tiers[0][1])

    def layout(self, n_tokens: int, chunk_tokens: int) -> list[tuple[int, int, Codec, int]]:
        """How a conversation of ``n_tokens`` is stored: per chunk (start, end, codec, sink
        tokens kept exact). What the spill writes, and what the quality bench measures."""
        full = n_tokens // chunk_tokens
        out = []
        for i in range(-(-n_tokens // chunk_tokens)):
            start, end = i * chunk_tokens, min((i + 1) * chunk_tokens, n_tokens)
            codec = self.codec_for(full - 1 - i) if i < full else self.tail
            sink = min(self.sink, end - start - 1) if i == 0 and not codec.lossless else 0
            out.append((start, end, codec, sink))
        return out


# int4 from this many full chunks behind the tail on, in the default policy. Measured with
# `chatkv bench quality` (README, "Cache fidelity").
INT4_AFTER = 4

POLICIES: dict[str, Policy] = {
    "tiered": Policy("tiered", ((0, "int8"), (INT4_AFTER, "int4"))),
    "fp16": Policy("fp16", ((0, "fp16"),), sink=0),
    "int8": Policy("int8", ((0, "int8"),)),
    "int4": Policy("int4", ((0, "int4"),)),
    "int2": Policy("int2", ((0, "int2"),)),
}
# Tiered by default: a 4k-token conversation in 0.35x fp16 instead of int8's 0.51x, every
# top-1 choice kept on held-out text (README, "Cache fidelity"). It was int8 while int4
# chunks took 17-32 ms each to decode; they take about 8 ms now (int8: 2 ms), which puts a
# resumed 4k-token conversation's first token within about 0.1 s of int8's, inside the
# run-to-run spread of `chatkv bench resume --codec tiered|int8` on the shared machine.
DEFAULT_POLICY = "tiered"


def get_policy(name: str) -> Policy:
    """The policy called ``name``: a named tiered policy or a single fixed codec."""
    try:
        return POLICIES[name]
    except KeyError:
        allowed = ", ".join(POLICIES)
        raise ValueError(f"unknown KV cache policy {name!r}; allowed: {allowed}") from None
