"""Command palette (Ctrl+P) entries that open a conversation by its title."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from textual.command import DiscoveryHit, Hit, Hits, Provider

from chatkv.fmt import relative_time

if TYPE_CHECKING:
    from chatkv.ui.app import ChatKVApp

#: Conversations offered before anything is typed.
DISCOVER = 10


class ConversationCommands(Provider):
    """'Open: <title>' for each saved conversation."""

    def _entries(self) -> list[tuple[str, str, int]]:
        app: ChatKVApp = self.app  # type: ignore[assignment]
        try:
            convs = app.backend.list_conversations()
        except Exception:  # the palette must open even if the store cannot be read
            return []
        now = app.now()
        return [(f"Open: {c.title}", f"updated {relative_time(c.updated_at, now)}", c.id) for c in convs]

    def _open(self, conversation_id: int):
        app: ChatKVApp = self.app  # type: ignore[assignment]
        return partial(app.chat_screen.switch_to, conversation_id)

    async def discover(self) -> Hits:
        for text, help_text, cid in self._entries()[:DISCOVER]:
            yield DiscoveryHit(text, self._open(cid), help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for text, help_text, cid in self._entries():
            score = matcher.match(text)
            if score > 0:
                yield Hit(score, matcher.highlight(text), self._open(cid), text=text, help=help_text)
