"""The Textual application and the factory that the CLI and the tests share."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from textual.app import App, SystemCommand
from textual.screen import Screen

from chatkv.api import ChatBackend
from chatkv.config import Settings
from chatkv.ui.actions import ACTIONS
from chatkv.ui.chat_screen import ChatScreen
from chatkv.ui.commands import ConversationCommands
from chatkv.ui.state import UIState, load_state, save_state, state_path, unsent_key

DEFAULT_THEME = "textual-dark"

#: Longest wait for a stopped reply to be saved when quitting.
QUIT_WAIT_S = 15.0


class ChatKVApp(App):
    """chatkv's terminal chat. Build it with `create_app`."""

    CSS_PATH = "app.tcss"
    TITLE = "chatkv"
    COMMANDS = App.COMMANDS | {ConversationCommands}

    def __init__(
        self,
        backend: ChatBackend,
        settings: Settings,
        conversation_id: int | None = None,
        *,
        now: Callable[[], datetime] | None = None,
        state_file: Path | None = None,
    ):
        super().__init__()
        self.backend = backend
        self.settings = settings
        self.quitting = False
        self.conversation_id = conversation_id
        self.now: Callable[[], datetime] = now or (lambda: datetime.now(UTC))
        self.state_file = state_file if state_file is not None else state_path()
        self.state = load_state(self.state_file)
        self.chat_screen = ChatScreen(backend, settings, conversation_id)

    def get_default_screen(self) -> Screen:
        return self.chat_screen

    def on_mount(self) -> None:
        remembered = self.state.theme
        wanted = self.settings.ui.theme
        if remembered in self.available_themes:
            self.theme = remembered
        elif wanted in self.available_themes:
            self.theme = wanted
        else:
            self.theme = DEFAULT_THEME
            self.notify(f"Unknown theme {wanted!r} in the config; using {DEFAULT_THEME}.", severity="warning")
        # However the theme changes (Ctrl+T or the palette's own theme picker), remember it; but
        # not the one set here, or a theme later set in the config file would never apply.
        launch_theme = self.theme

        def changed(theme) -> None:
            if theme.name != launch_theme or self.state.theme is not None:
                self.remember(theme=theme.name)

        self.theme_changed_signal.subscribe(self, changed)

    def next_theme(self) -> None:
        """Switch to the next of Textual's themes (alphabetical order) and say which."""
        names = sorted(self.available_themes)
        index = names.index(self.theme) if self.theme in names else -1
        self.theme = names[(index + 1) % len(names)]
        self.notify(f"Theme: {self.theme}", timeout=2)

    def remember(self, **changes: object) -> None:
        """Update the UI state file (theme, last conversation); a failure only logs."""
        state = UIState(**{**self.state.__dict__, **changes})
        if state == self.state:
            return
        self.state = state
        try:
            save_state(self.state_file, state)
        except OSError as exc:  # remembering is a convenience, never worth interrupting the chat
            self.log.warning(f"could not save the UI state to {self.state_file}: {exc}")

    def remember_unsent(self, conversation_id: int | None, text: str | None) -> None:
        """Set (or with None clear) one conversation's unsent text, on the state file as it is
        now: another chatkv window may have kept text for another conversation since."""
        unsent, key = load_state(self.state_file).unsent, unsent_key(conversation_id)
        if text:
            unsent[key] = text
        else:  # only this conversation's: another's is kept until it is opened again
            unsent.pop(key, None)
        self.remember(unsent=unsent)

    def remembered_conversation(self) -> int | None:
        """The conversation open when the app last ran, if it still exists."""
        cid = self.state.last_conversation
        if cid is None:
            return None
        try:
            self.backend.get_conversation(cid)
        except Exception:  # deleted since (NotFoundError) or unreadable: start a draft instead
            return None
        return cid

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
        """Keep what is typed but not sent (or waits for the model) for the next launch, stop
        generation, wait until the partial reply is saved, then close the backend."""
        self.quitting = True  # a model that finishes loading now starts no turn
        screen = self.chat_screen
        self.remember_unsent(screen.conversation_id, screen.unsent_text())
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
    state_file: Path | None = None,
) -> ChatKVApp:
    """Build the app over a backend. `now` fixes the clock of relative times (for tests);
    `state_file` is where the theme and last conversation are remembered (default: data dir)."""
    return ChatKVApp(backend, settings, conversation_id, now=now, state_file=state_file)
