"""The Textual application and the factory that the CLI and the tests share."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import partial

from textual.app import App, SystemCommand
from textual.screen import Screen

from chatkv.api import ChatBackend
from chatkv.config import Settings
from chatkv.ui.screens import ACTIONS, ChatScreen

DEFAULT_THEME = "textual-dark"

#: Longest wait for a stopped reply to be saved when quitting.
QUIT_WAIT_S = 15.0


class ChatKVApp(App):
    """chatkv's terminal chat. Build it with `create_app`."""

    CSS_PATH = "app.tcss"
    TITLE = "chatkv"

    def __init__(
        self,
        backend: ChatBackend,
        settings: Settings,
        conversation_id: int | None = None,
        *,
        now: Callable[[], datetime] | None = None,
    ):
        super().__init__()
        self.backend = backend
        self.settings = settings
        self.conversation_id = conversation_id
        self.now: Callable[[], datetime] = now or (lambda: datetime.now(UTC))
        self.chat_screen = ChatScreen(backend, settings, conversation_id)

    def get_default_screen(self) -> Screen:
        return self.chat_screen

    def on_mount(self) -> None:
        wanted = self.settings.ui.theme
        if wanted in self.available_themes:
            self.theme = wanted
        else:
            self.theme = DEFAULT_THEME
            self.notify(f"Unknown theme {wanted!r} in the config; using {DEFAULT_THEME}.", severity="warning")

    def next_theme(self) -> None:
        """Switch to the next of Textual's themes (alphabetical order) and say which."""
        names = sorted(self.available_themes)
        index = names.index(self.theme) if self.theme in names else -1
        self.theme = names[(index + 1) % len(names)]
        self.notify(f"Theme: {self.theme}", timeout=2)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if isinstance(screen, ChatScreen):
            for _name, action, _label, text in ACTIONS:
                title = text.split(" (")[0]
                yield SystemCommand(title, f"{text}.", partial(screen.run_action, action))

    async def action_quit(self) -> None:
        """Quit; a reply that is streaming is stopped first and its partial text saved."""
        await self.shutdown_backend()
        self.exit()

    async def shutdown_backend(self) -> None:
        """Stop generation, wait until the partial reply is saved, then close the backend."""
        screen = self.chat_screen
        worker = screen.generation_worker()
        if worker is not None:
            screen.request_stop()
            try:
                await asyncio.wait_for(worker.wait(), QUIT_WAIT_S)
            except Exception:  # a timeout or the worker's own error: closing still flushes
                pass
        try:
            await asyncio.to_thread(self.backend.close)
        except Exception as exc:
            self.log.error(f"backend.close failed: {exc}")


def create_app(
    backend: ChatBackend,
    settings: Settings,
    conversation_id: int | None = None,
    *,
    now: Callable[[], datetime] | None = None,
) -> ChatKVApp:
    """Build the app over a backend. `now` fixes the clock of relative times (for tests)."""
    return ChatKVApp(backend, settings, conversation_id, now=now)
