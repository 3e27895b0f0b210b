"""Plain-text formatting shared by the CLI and the TUI (no Textual import: `chatkv ls` stays fast)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chatkv.api import TurnStats


def relative_time(then: datetime, now: datetime) -> str:
    """Short age: 'now', '5m', '3h', '2d', then the date ('Mar 03', or '2023-11' in another year)."""
    if (then.tzinfo is None) != (now.tzinfo is None):  # compare naive and aware as UTC
        then, now = then.replace(tzinfo=UTC), now.replace(tzinfo=UTC)
    seconds = (now - then).total_seconds()
    if seconds < 60:
        return "now"
    if seconds < 3600:
        return f"{int(seconds // 60)}m"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h"
    if seconds < 30 * 86400:
        return f"{int(seconds // 86400)}d"
    return then.strftime("%b %d" if then.year == now.year else "%Y-%m")


def format_bytes(n: int) -> str:
    """Bytes in binary units with one decimal: 512 B, 1.5 KiB, 34.2 MiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # unreachable


def display_title(title: str, width: int = 0, source: str = "") -> str:
    """A conversation title for display: '(untitled)' when empty, and cut to `width`
    characters (0: no limit) with a trailing '…' so a cut title reads as one.

    `source`: the first user message, when known. The store titles a conversation with the
    start of its first line, cut without a mark; a title that is a shorter prefix of that
    line gets its '…' here."""
    first = next((line.strip() for line in source.splitlines() if line.strip()), "")
    cut = bool(title) and len(first) > len(title) and first.startswith(title)
    title = " ".join(title.split()) or "(untitled)"
    if width and len(title) > width:
        return title[: width - 1].rstrip() + "…"
    return title + "…" if cut else title


def stats_text(s: TurnStats) -> str:
    """A turn's statistics on one line, as `chatkv ask --stats` and `chatkv show` print them."""
    cached = (
        f"{s.cached_tokens:,} cached from {s.cache_source} in {s.cache_load_s * 1000:.0f} ms"
        if s.cached_tokens
        else "nothing cached"
    )
    rate = f" at {s.decode_tps:.1f}/s" if s.completion_tokens > 1 else ""
    return (
        f"{s.prompt_tokens:,} prompt tokens, {cached}, {s.prefilled_tokens:,} prefilled; first token "
        f"{s.ttft_s * 1000:.0f} ms; {s.completion_tokens:,} token{'' if s.completion_tokens == 1 else 's'}"
        f"{rate} ({s.finish_reason})"
    )


# C0 controls but tab and newline, DEL and the C1 controls: what a terminal would act on
# (escape sequences move the cursor, retitle the window, ring the bell) rather than show.
_CONTROLS = {c: f"^{chr(c + 64)}" for c in range(0x20) if c not in (0x09, 0x0A)}
_CONTROLS |= {0x7F: "^?"} | {c: f"\\x{c:02x}" for c in range(0x80, 0xA0)}
# Bidirectional overrides and isolates reorder how the rest of the line shows ("Trojan
# Source"); written out as well. Right-to-left text does not need them to show right.
_CONTROLS |= {c: f"<U+{c:04X}>" for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]}


def visible(text: str, terminal: bool) -> str:
    """`text` to print: for a terminal, its control characters written out (ESC as ^[),
    so stored text (a pasted escape sequence, a model's output) cannot drive the terminal;
    for a file or pipe, as stored."""
    return text.translate(_CONTROLS) if terminal else text
