"""Screens: the chat screen (which owns the conversation flow and its workers) and the
modal dialogs it opens."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.keys import format_key
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.timer import Timer
from textual.widgets import Button, Footer, Header, Input, Label, Static, TextArea
from textual.worker import Worker, get_current_worker

from chatkv.api import ChatBackend, GenerationSettings, MessageView, TurnStream
from chatkv.config import Settings
from chatkv.errors import ChatKVError
from chatkv.ui.widgets import ChatLog, ChatMessage, ConversationList, PromptInput, StatusBar, turn_summary

if TYPE_CHECKING:
    from chatkv.ui.app import ChatKVApp

#: (config key under ui.keys, action of ChatScreen, footer label, help text)
ACTIONS: list[tuple[str, str, str, str]] = [
    ("new", "new_conversation", "New", "Start a new conversation"),
    ("rename", "rename", "Rename", "Rename the open conversation"),
    ("delete", "delete", "Delete", "Delete the open conversation (asks first)"),
    ("stop", "stop", "Stop", "Stop the reply being generated, keeping what it wrote"),
    ("regenerate", "regenerate", "Regenerate", "Generate the last reply again"),
    ("edit", "edit_message", "Edit", "Edit the focused (or last) user message and continue from there"),
    ("system_prompt", "system_prompt", "System", "Edit the conversation's system prompt"),
    ("copy", "copy_message", "Copy", "Copy the focused (or last) message to the clipboard"),
    ("export", "export", "Export", "Export the conversation to a Markdown file here"),
    ("theme", "next_theme", "Theme", "Switch to the next theme"),
    ("help", "help", "Help", "Show this help"),
]

#: Cadence of UI updates while a reply streams: pieces are batched for this long.
FLUSH_S = 0.05

FAILED = "Something went wrong"


def error_text(exc: BaseException) -> str:
    """A user-facing message: ChatKVError messages as they are, others short with their text."""
    if isinstance(exc, ChatKVError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    return f"{FAILED}: {type(exc).__name__}: {exc}"


def key_label(keys: str) -> str:
    """'shift+enter,ctrl+j' -> 'shift+enter / ctrl+j' in Textual's key notation."""
    return " / ".join(format_key(k.strip()) for k in keys.split(",") if k.strip())


class ReplyBuffer:
    """Pieces handed from the generation thread to the UI, which drains them on a timer:
    one screen update per FLUSH_S however fast the engine runs, and none held back
    while the engine pauses."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pieces: list[str] = []

    def push(self, piece: str) -> None:
        with self._lock:
            self._pieces.append(piece)

    def take(self) -> str:
        with self._lock:
            pieces, self._pieces = self._pieces, []
        return "".join(pieces)


@dataclass
class TurnEnded(Message):
    """The generation worker finished: the saved reply, or the error that stopped it."""

    widget: ChatMessage
    buffer: ReplyBuffer
    message: MessageView | None
    error: BaseException | None
    restore_text: str | None


@dataclass
class ModelLoaded(Message):
    """The background model load ended (error is None on success)."""

    error: BaseException | None


class ChatScreen(Screen):
    """The main screen: conversation list, conversation, input, status bar and footer.

    It owns the flow of a turn: it calls the fast backend methods directly and runs
    `load()` and the iteration of a TurnStream in thread workers.
    """

    def __init__(self, backend: ChatBackend, settings: Settings, conversation_id: int | None = None):
        super().__init__()
        self.backend = backend
        self.settings = settings
        self.conversation_id: int | None = None
        self._initial_id = conversation_id
        self.pending: tuple[ChatMessage, str] | None = None  # sent before the model was ready
        self.stream: TurnStream | None = None
        self.generating = False
        self._stop_requested = False
        self._drain_timer: Timer | None = None
        self.model_state = "ready" if backend.ready else "loading"
        keys = settings.ui.keys
        for name, action, label, _ in ACTIONS:
            alternatives = [k.strip() for k in getattr(keys, name).split(",") if k.strip()]
            for i, key in enumerate(alternatives):
                self._bindings.bind(key, action, label, show=i == 0, priority=True)

    @property
    def chat_app(self) -> ChatKVApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="body"):
            yield ConversationList(id="sidebar")
            with Vertical(id="main"):
                yield ChatLog(id="log")
                yield PromptInput(self.settings.ui.keys.newline, id="prompt")
        yield StatusBar(id="status")
        yield Footer(compact=True)

    @property
    def log_view(self) -> ChatLog:
        return self.query_one("#log", ChatLog)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one("#prompt", PromptInput)

    @property
    def status(self) -> StatusBar:
        return self.query_one("#status", StatusBar)

    @property
    def sidebar(self) -> ConversationList:
        return self.query_one("#sidebar", ConversationList)

    async def on_mount(self) -> None:
        self.status.show(
            model=self.backend.model_name,
            device=self.backend.device,
            model_state=self.model_state,
            context=(0, self.backend.context_limit),
        )
        self.refresh_list()
        if self._initial_id is not None:
            await self.open_conversation(self._initial_id)
        else:
            self.sub_title = "new conversation"
        self.prompt.focus()
        if not self.backend.ready:
            self.load_model()

    def on_resize(self) -> None:
        self.set_class(self.size.width < 100, "-narrow")

    # -- model loading ------------------------------------------------------------

    @work(thread=True, exclusive=True, group="load")
    def load_model(self) -> None:
        try:
            self.backend.load()
        except Exception as exc:  # reported in the UI, never raised into Textual
            self.post_message(ModelLoaded(exc))
        else:
            self.post_message(ModelLoaded(None))

    async def on_model_loaded(self, event: ModelLoaded) -> None:
        if event.error is not None:
            self.model_state = "failed"
            self.status.show(model_state="failed")
            self.notify(
                f"The model could not be loaded: {error_text(event.error)}",
                title="Model",
                severity="error",
                timeout=10,
            )
            if self.pending is not None:
                widget, text = self.pending
                self.pending = None
                await widget.remove()
                self.restore_input(text)
            return
        self.model_state = "ready"
        self.status.show(
            model_state="ready",
            device=self.backend.device,
            context=(self.status.context[0], self.backend.context_limit),
        )
        if self.pending is not None and self.conversation_id is not None:
            widget, text = self.pending
            self.pending = None
            widget.remove_class("-pending")
            widget.set_stats()
            cid = self.conversation_id
            await self.start_turn(lambda: self.backend.send(cid, text, self.generation_settings()), text)

    # -- the conversation list ----------------------------------------------------

    def refresh_list(self) -> None:
        query = self.sidebar.filter_input.value if self.sidebar.is_mounted else ""
        try:
            conversations = self.backend.list_conversations(query)
        except Exception as exc:
            self.report(exc, "list conversations")
            return
        self.sidebar.show(conversations, self.conversation_id, self.chat_app.now())

    @on(ConversationList.FilterChanged)
    def _filter(self, event: ConversationList.FilterChanged) -> None:
        self.refresh_list()

    @on(ConversationList.Selected)
    async def _selected(self, event: ConversationList.Selected) -> None:
        if event.conversation_id == self.conversation_id:
            self.prompt.focus()
            return
        if self.busy("switch conversations"):
            return
        await self.open_conversation(event.conversation_id)
        self.prompt.focus()

    async def open_conversation(self, conversation_id: int | None) -> None:
        """Show a saved conversation (or an empty screen for None)."""
        log = self.log_view
        if conversation_id is None:
            self.conversation_id = None
            await log.remove_children()
            self.sub_title = "new conversation"
            self.status.show(context=(0, self.backend.context_limit), turn="", cache=None)
            self.refresh_list()
            self.refresh_bindings()
            return
        try:
            conv = self.backend.get_conversation(conversation_id)
            messages = [m for m in self.backend.messages(conversation_id) if m.role != "system"]
        except Exception as exc:
            self.report(exc, "open the conversation")
            return
        self.conversation_id = conversation_id
        self.sub_title = conv.title
        await log.remove_children()
        await log.mount_all([ChatMessage(m.role, m.content, m) for m in messages])
        log.anchor()
        last = next((m.stats for m in reversed(messages) if m.stats is not None), None)
        self.status.show(turn=turn_summary(last) if last else "", cache=conv)
        self.update_context()
        self.refresh_list()
        self.refresh_bindings()

    def update_context(self) -> None:
        used = 0
        if self.conversation_id is not None:
            try:
                used = self.backend.context_used(self.conversation_id)
            except Exception:  # an estimate only; never worth an error
                used = 0
        self.status.show(context=(used, self.backend.context_limit))

    # -- sending and streaming ----------------------------------------------------

    def generation_settings(self) -> GenerationSettings:
        return GenerationSettings.from_settings(self.settings)

    def busy(self, what: str) -> bool:
        if self.generating or self.pending is not None:
            self.notify(f"A reply is being generated; stop it (Esc) to {what}.", severity="warning")
            return True
        return False

    @on(PromptInput.Submitted)
    async def _submitted(self, event: PromptInput.Submitted) -> None:
        await self.send(event.text)

    async def send(self, text: str) -> None:
        """Send `text` as the next user message (queued while the model loads)."""
        if not text.strip():
            return
        if self.busy("send another message"):
            return
        if self.conversation_id is None:
            try:
                system = self.settings.chat.system_prompt or None
                conv = self.backend.new_conversation(system_prompt=system)
            except Exception as exc:
                self.report(exc, "create a conversation")
                return
            self.conversation_id = conv.id
            self.sub_title = conv.title
        self.prompt.clear()
        log = self.log_view
        if not self.backend.ready:
            widget = ChatMessage("user", text, pending=True)
            await log.mount(widget)
            log.anchor()
            self.pending = (widget, text)
            if self.model_state == "failed":
                self.model_state = "loading"
                self.status.show(model_state="loading")
                self.load_model()
            self.refresh_bindings()
            return
        await log.mount(ChatMessage("user", text))
        cid = self.conversation_id
        await self.start_turn(lambda: self.backend.send(cid, text, self.generation_settings()), text)

    async def start_turn(self, starter: Callable[[], TurnStream], restore_text: str | None) -> None:
        """Mount an empty reply and stream into it from a worker; `starter` makes the stream."""
        widget = ChatMessage("assistant")
        await self.log_view.mount(widget)
        widget.streaming = True
        self.log_view.anchor()
        self.generating = True
        self._stop_requested = False
        self.status.show(turn="generating…")
        self.refresh_bindings()
        buffer = ReplyBuffer()
        self._drain_timer = self.set_interval(FLUSH_S, partial(self.drain, buffer, widget))
        self.generate(starter, buffer, widget, restore_text)

    async def drain(self, buffer: ReplyBuffer, widget: ChatMessage) -> None:
        """Show the pieces that arrived since the last call."""
        text = buffer.take()
        if text and widget.is_attached:
            await widget.append(text)

    @work(thread=True, exclusive=True, group="generate")
    def generate(
        self,
        starter: Callable[[], TurnStream],
        buffer: ReplyBuffer,
        widget: ChatMessage,
        restore_text: str | None,
    ) -> None:
        worker = get_current_worker()
        stream: TurnStream | None = None
        error: BaseException | None = None
        try:
            stream = starter()
            self.stream = stream
            if self._stop_requested or worker.is_cancelled:
                stream.cancel()
            for piece in stream:
                buffer.push(piece)
                if self._stop_requested or worker.is_cancelled:
                    stream.cancel()
        except Exception as exc:  # reported in the UI
            error = exc
        finally:
            message = stream.message if stream is not None else None
            self.stream = None
            self.post_message(TurnEnded(widget, buffer, message, error, restore_text if error else None))

    async def on_turn_ended(self, event: TurnEnded) -> None:
        if self._drain_timer is not None:
            self._drain_timer.stop()
        await self.drain(event.buffer, event.widget)
        self.generating = False
        self.stream = None
        widget = event.widget
        if event.error is not None:
            self.notify(error_text(event.error), title="Generation failed", severity="error", timeout=10)
            if event.restore_text is not None:
                self.restore_input(event.restore_text)
            # Show what was saved, nothing more: the transcript is the source of truth.
            if self.conversation_id is not None:
                await self.open_conversation(self.conversation_id)
            self.status.show(turn="last turn failed")
        else:
            widget.finish(event.message)
            if event.message is not None and event.message.stats is not None:
                self.status.show(turn=turn_summary(event.message.stats))
            self.sync_messages()
            self.update_context()
            self.refresh_list()
        self.refresh_bindings()

    def sync_messages(self) -> None:
        """Give the widgets their saved MessageViews (ids for edit); reload if they disagree."""
        if self.conversation_id is None:
            return
        try:
            saved = [m for m in self.backend.messages(self.conversation_id) if m.role != "system"]
            conv = self.backend.get_conversation(self.conversation_id)
        except Exception:
            return
        self.sub_title = conv.title
        self.status.show(cache=conv)
        widgets = self.log_view.messages
        if len(widgets) == len(saved) and all(w.role == m.role for w, m in zip(widgets, saved, strict=True)):
            for w, m in zip(widgets, saved, strict=True):
                w.message = m

    def restore_input(self, text: str) -> None:
        """Put the user's text back in the input (before anything typed since)."""
        current = self.prompt.text
        self.prompt.load_text(text if not current.strip() else f"{text}\n{current}")
        self.prompt.focus()
        self.prompt.move_cursor(self.prompt.document.end)

    def report(self, exc: BaseException, what: str) -> None:
        self.notify(error_text(exc), title=f"Could not {what}", severity="error", timeout=10)

    # -- actions ------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return self.generating or self.pending is not None
        if action in ("rename", "delete", "export", "regenerate", "edit_message", "copy_message"):
            return self.conversation_id is not None or None
        return True

    async def action_new_conversation(self) -> None:
        if self.busy("start a new conversation"):
            return
        try:
            conv = self.backend.new_conversation(system_prompt=self.settings.chat.system_prompt or None)
        except Exception as exc:
            self.report(exc, "create a conversation")
            return
        self.sidebar.filter_input.value = ""
        await self.open_conversation(conv.id)
        self.prompt.focus()

    async def action_stop(self) -> None:
        if self.pending is not None:
            widget, text = self.pending
            self.pending = None
            await widget.remove()
            self.restore_input(text)
            self.refresh_bindings()
            return
        if self.generating:
            self._stop_requested = True
            if self.stream is not None:
                self.stream.cancel()
            self.status.show(turn="stopping…")

    def action_rename(self) -> None:
        cid = self.conversation_id
        if cid is None:
            return
        title = self.backend.get_conversation(cid).title

        def done(new: str | None) -> None:
            if new is None or not new.strip() or new.strip() == title:
                return
            try:
                self.backend.rename(cid, new.strip())
            except Exception as exc:
                self.report(exc, "rename the conversation")
                return
            if cid == self.conversation_id:
                self.sub_title = new.strip()
            self.refresh_list()

        self.app.push_screen(TextPromptScreen("Rename conversation", title), done)

    def action_delete(self) -> None:
        cid = self.conversation_id
        if cid is None or self.busy("delete this conversation"):
            return
        title = self.backend.get_conversation(cid).title

        async def done(confirmed: bool | None) -> None:
            if not confirmed:
                return
            try:
                self.backend.delete(cid)
            except Exception as exc:
                self.report(exc, "delete the conversation")
                return
            self.notify(f"Deleted “{title}”.")
            await self.open_conversation(None)
            self.prompt.focus()

        self.app.push_screen(ConfirmScreen(f"Delete “{title}” and its cache?", "Delete"), done)

    async def action_regenerate(self) -> None:
        cid = self.conversation_id
        if cid is None or self.busy("regenerate"):
            return
        if not self.backend.ready:
            self.notify("The model is still loading.", severity="warning")
            return
        messages = self.log_view.messages
        if not messages or messages[-1].role != "assistant":
            if not any(m.role == "user" for m in messages):
                self.notify("Nothing to regenerate yet.", severity="warning")
                return
        else:
            await messages[-1].remove()
        await self.start_turn(lambda: self.backend.regenerate(cid, self.generation_settings()), None)

    def target_message(self, role: str | None) -> ChatMessage | None:
        """The focused message if it fits `role`, else the last message with that role."""
        focused = self.focused
        if isinstance(focused, ChatMessage) and role in (None, focused.role):
            return focused
        for widget in reversed(self.log_view.messages):
            if role in (None, widget.role):
                return widget
        return None

    def action_edit_message(self) -> None:
        if self.conversation_id is None or self.busy("edit a message"):
            return
        target = self.target_message("user")
        if target is None or target.message is None:
            self.notify("No saved user message to edit.", severity="warning")
            return
        if not self.backend.ready:
            self.notify("The model is still loading.", severity="warning")
            return
        message = target.message

        async def done(text: str | None) -> None:
            if text is None or not text.strip() or text == message.content:
                return
            widgets = self.log_view.messages
            index = widgets.index(target) if target in widgets else len(widgets)
            await self.log_view.remove_children(widgets[index:])
            await self.log_view.mount(ChatMessage("user", text))
            await self.start_turn(
                lambda: self.backend.edit(message.id, text, self.generation_settings()), None
            )

        self.app.push_screen(
            TextPromptScreen("Edit message (the reply is generated again)", message.content, multiline=True),
            done,
        )

    async def action_system_prompt(self) -> None:
        if self.busy("change the system prompt"):
            return
        if self.conversation_id is None:
            current = self.settings.chat.system_prompt
        else:
            current = self.backend.get_conversation(self.conversation_id).system_prompt

        async def done(text: str | None) -> None:
            if text is None or text == current:
                return
            try:
                if self.conversation_id is None:
                    conv = self.backend.new_conversation(system_prompt=text or None)
                    await self.open_conversation(conv.id)
                else:
                    self.backend.set_system_prompt(self.conversation_id, text)
            except Exception as exc:
                self.report(exc, "set the system prompt")
                return
            self.update_context()
            self.notify("System prompt saved.")

        self.app.push_screen(TextPromptScreen("System prompt", current, multiline=True), done)

    def action_copy_message(self) -> None:
        target = self.target_message(None)
        if isinstance(self.focused, ChatMessage) is False:
            target = self.target_message("assistant") or target
        if target is None or not target.content:
            self.notify("No message to copy.", severity="warning")
            return
        self.app.copy_to_clipboard(target.content)
        self.notify(f"Copied {len(target.content):,} characters.")

    def action_export(self) -> None:
        cid = self.conversation_id
        if cid is None:
            return
        try:
            conv = self.backend.get_conversation(cid)
            text = self.backend.export(cid, "md")
            path = unique_path(Path.cwd(), slug(conv.title) or f"conversation-{cid}", ".md")
            path.write_text(text, encoding="utf-8")
        except Exception as exc:
            self.report(exc, "export the conversation")
            return
        self.notify(f"Exported to {path}", title="Export")

    def action_next_theme(self) -> None:
        self.chat_app.next_theme()

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen(self.settings))

    # -- shutdown -----------------------------------------------------------------

    def generation_worker(self) -> Worker | None:
        for worker in self.workers:
            if worker.group == "generate" and not worker.is_finished:
                return worker
        return None

    def on_unmount(self) -> None:
        # However the app ends, a reply still streaming is stopped (and saved by the backend).
        self.request_stop()

    def request_stop(self) -> None:
        self._stop_requested = True
        if self.stream is not None:
            self.stream.cancel()


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:60]


def unique_path(directory: Path, stem: str, suffix: str) -> Path:
    path = directory / f"{stem}{suffix}"
    n = 2
    while path.exists():
        path = directory / f"{stem}-{n}{suffix}"
        n += 1
    return path


class HelpScreen(ModalScreen[None]):
    """Every action with its current key (from the config file)."""

    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        keys = self.settings.ui.keys
        table = Table(box=None, expand=True, show_header=True, header_style="bold", pad_edge=False)
        table.add_column("Key", style="bold", no_wrap=True)
        table.add_column("Action", ratio=1)
        rows = [(key_label(getattr(keys, name)), text) for name, _, _, text in ACTIONS]
        rows += [
            ("enter", "Send the message"),
            (key_label(keys.newline), "Insert a newline in the message"),
            ("tab / shift+tab", "Move focus (conversation list, messages, input)"),
            ("type in the list", "Filter conversations"),
            (format_key("ctrl+p"), "Command palette (every action is there too)"),
            (format_key("ctrl+q"), "Quit (a streaming reply is stopped and saved)"),
        ]
        for key, text in rows:
            table.add_row(Text(key), text)
        with Vertical(id="dialog"):
            yield Label("chatkv — keys", classes="title")
            with VerticalScroll():
                yield Static(table)
            yield Label(
                "Change keys in the [ui.keys] section of the config file.  Esc closes.", classes="hint"
            )


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question."""

    BINDINGS = [Binding("escape,n", "answer(False)", "Cancel"), Binding("y", "answer(True)", "Yes")]

    def __init__(self, question: str, yes: str = "Yes"):
        super().__init__()
        self.question = question
        self.yes = yes

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.question, classes="title")
            with Horizontal(classes="buttons"):
                yield Button(self.yes, variant="error", id="yes")
                yield Button("Cancel", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class TextPromptScreen(ModalScreen[str | None]):
    """Ask for a line (Enter saves) or a block of text (ctrl+s saves); Esc cancels."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save", priority=True)]

    def __init__(self, title: str, value: str = "", *, multiline: bool = False):
        super().__init__()
        self.title_text = title
        self.value = value
        self.multiline = multiline

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="-multiline" if self.multiline else ""):
            yield Label(self.title_text, classes="title")
            if self.multiline:
                yield TextArea(self.value, id="value", soft_wrap=True, tab_behavior="focus")
            else:
                yield Input(self.value, id="value")
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#value").focus()

    def current(self) -> str:
        widget = self.query_one("#value")
        return widget.text if isinstance(widget, TextArea) else widget.value  # type: ignore[attr-defined]

    def action_save(self) -> None:
        self.dismiss(self.current())

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted)
    def _submitted(self) -> None:
        self.action_save()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self.current() if event.button.id == "save" else None)
