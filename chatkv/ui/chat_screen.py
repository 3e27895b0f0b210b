"""The chat screen: it owns the flow of a conversation and its workers.

It calls the fast backend methods directly and runs `load()` and the iteration of a
TurnStream in thread workers. A new conversation is a *draft* (no id, nothing saved)
until its first message is sent: `send(None, …)` creates it together with that message.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import TYPE_CHECKING

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Header
from textual.worker import Worker, get_current_worker

from chatkv.api import ChatBackend, ConversationSummary, GenerationSettings, TurnStream
from chatkv.config import Settings
from chatkv.errors import ChatKVError, NotFoundError
from chatkv.ui.actions import ACTIONS, FOOTER_ACTIONS, key_label
from chatkv.ui.chat_actions import ConversationActions
from chatkv.ui.dialogs import TextPromptScreen
from chatkv.ui.model_actions import ModelActions
from chatkv.ui.state import unsent_key
from chatkv.ui.turns import ModelLoaded, ReplyBuffer, Starter, TurnEnded, TurnStarted, send_new
from chatkv.ui.widgets import ChatLog, ChatMessage, ConversationList, PromptInput, StatusBar, turn_summary

if TYPE_CHECKING:
    from chatkv.ui.app import ChatKVApp

#: Cadence of UI updates while a reply streams: pieces are batched for this long.
FLUSH_S = 0.05

#: How often the screen asks the backend what it is doing while the user waits.
ACTIVITY_S = 0.25

#: Waits shorter than this show no seconds counter (most never get there).
SHOW_SECONDS_AFTER = 3.0

#: Sidebar width by terminal width; below the last step the sidebar hides (F2 shows it).
SIDEBAR_WIDTHS = ((120, 34), (90, 28), (70, 24))

FAILED = "Something went wrong"


def error_text(exc: BaseException) -> str:
    """A user-facing message: ChatKVError messages as they are, others short with their text."""
    if isinstance(exc, ChatKVError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    return f"{FAILED}: {type(exc).__name__}: {exc}"


def sidebar_width(terminal_width: int) -> int | None:
    """The sidebar's width for a terminal this wide; None: too narrow to show it by default."""
    for at_least, width in SIDEBAR_WIDTHS:
        if terminal_width >= at_least:
            return width
    return None


class ChatScreen(ConversationActions, ModelActions, Screen):
    """The main screen: conversation list, conversation, input, status bar and footer."""

    def __init__(self, backend: ChatBackend, settings: Settings, conversation_id: int | None = None):
        super().__init__()
        self.backend = backend
        self.settings = settings
        self.conversation_id: int | None = None  # None: a draft, not saved yet
        self.draft_system_prompt = settings.chat.system_prompt
        self._initial_id = conversation_id
        self.pending: tuple[ChatMessage, str] | None = None  # sent before the model was ready
        self.stream: TurnStream | None = None
        self.generating = False
        self._stop_requested = False
        self._drain_timer: Timer | None = None
        self._users_before = 0  # the open conversation's messages of the user's when a turn started
        self._drain_lock = asyncio.Lock()  # one drain at a time: the timer's and the turn end's
        self._reply_widget: ChatMessage | None = None  # the reply being generated
        self._wait_started = time.monotonic()
        self.turns_done = 0  # turns that ended since launch
        self.sidebar_shown: bool | None = None  # None: by terminal width; F2 decides otherwise
        self.model_state = "ready" if backend.ready else "loading"
        keys = settings.ui.keys
        for name, action, label, _ in ACTIONS:
            alternatives = [k.strip() for k in getattr(keys, name).split(",") if k.strip()]
            for i, key in enumerate(alternatives):
                show = i == 0 and action in FOOTER_ACTIONS
                self._bindings.bind(key, action, label, show=show, priority=True)

    @property
    def chat_app(self) -> ChatKVApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="body"):
            heading = f"Conversations  {self.settings.ui.keys.conversations.split(',')[0]}"
            yield ConversationList(heading, id="sidebar")
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
        initial = self._initial_id
        if initial is None:
            initial = self.chat_app.remembered_conversation()
        await self.open_conversation(initial)
        self.prompt.focus()
        self.set_interval(ACTIVITY_S, self.show_activity)
        if not self.backend.ready:
            self._wait_started = time.monotonic()
            self.load_model()

    def on_resize(self) -> None:
        self.layout_sidebar()
        # A short terminal gives the header's row and the input's spare lines to the chat.
        self.set_class(self.size.height < 20, "-short")
        # A narrow one gives the palette's corner of the footer to the keys (Ctrl+P still works).
        self.query_one(Footer).show_command_palette = self.size.width >= 60

    def layout_sidebar(self) -> None:
        """Size the sidebar to the terminal; hide it where the chat would be too narrow."""
        width = sidebar_width(self.size.width)
        shown = self.sidebar_shown if self.sidebar_shown is not None else width is not None
        self.sidebar.display = shown
        self.sidebar.styles.width = width or 24

    # -- what the user is waiting for ----------------------------------------------

    def waited(self) -> str:
        seconds = time.monotonic() - self._wait_started
        return f" · {seconds:.0f}s" if seconds >= SHOW_SECONDS_AFTER else ""

    def show_activity(self) -> None:
        """Tell the user what loading or the coming first token waits for (backend.activity)."""
        activity = getattr(self.backend, "activity", "") or ""
        if self.model_state == "loading":
            self.status.show(activity=activity + self.waited())
            if self.pending is not None:
                self.pending[0].set_waiting(f"waiting for the model to load…{self.waited()}")
            return
        widget = self._reply_widget
        if widget is not None and self.generating and not widget.content and not self._stop_requested:
            if activity:
                what = activity
            elif not self.turns_done:  # the first turn of a run also warms the model up
                what = "warming up the model (the first turn is the slowest)"
            else:
                what = "reading the conversation into the model"
            widget.set_waiting(f"waiting for the first token: {what}{self.waited()}")

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
            self.status.show(model_state="failed", activity="")
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
            self.refresh_bindings()  # nothing left to stop: Esc leaves the footer
            return
        self.model_state = "ready"
        self.status.show(model_state="ready", activity="", device=self.backend.device)
        self.update_context()
        self.update_draft_count()
        if self.pending is not None and not self.chat_app.quitting:  # else kept for the next launch
            widget, text = self.pending
            self.pending = None
            widget.remove_class("-pending")
            widget.set_waiting("")
            await self.start_turn(self.send_starter(text), text)

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
        self._filter_in_thread(self.sidebar.filter_input.value)

    @work(thread=True, exclusive=True, group="filter")
    def _filter_in_thread(self, query: str) -> None:
        """The list for a filter typed, searched off the UI thread: a query under three
        characters scans every message (no full-text index for it), which on a large
        imported history takes long enough to stall typing. A newer keystroke cancels it."""
        worker = get_current_worker()
        try:
            conversations = self.backend.list_conversations(query)
        except Exception as exc:
            self.app.call_from_thread(self.report, exc, "list conversations")
            return
        if not worker.is_cancelled:
            self.app.call_from_thread(self._show_filtered, query, conversations)

    def _show_filtered(self, query: str, conversations: list[ConversationSummary]) -> None:
        if self.sidebar.filter_input.value == query:  # still what is typed
            self.sidebar.show(conversations, self.conversation_id, self.chat_app.now())

    @on(ConversationList.Selected)
    async def _selected(self, event: ConversationList.Selected) -> None:
        await self.switch_to(event.conversation_id)

    async def switch_to(self, conversation_id: int) -> None:
        """Open a conversation from the list, the palette or next/previous; focus the input."""
        if conversation_id != self.conversation_id:
            if self.busy("switch conversations"):
                self.sidebar.highlight_selected()  # the list shows what is still open
                return
            await self.open_conversation(conversation_id)
        self.prompt.focus()

    async def open_conversation(self, conversation_id: int | None) -> None:
        """Show a saved conversation, or an empty draft for None."""
        log = self.log_view
        if conversation_id is None:
            self.conversation_id = None
            self.draft_system_prompt = self.settings.chat.system_prompt
            await log.remove_children()
            self.sub_title = "new conversation"
            self.status.show(context=(0, self.backend.context_limit), turn="", turn_stats=None, cache=None)
            self.refresh_list()
            self.refresh_bindings()
            self._give_back_unsent()
            return
        try:
            conv = self.backend.get_conversation(conversation_id)
            messages = [m for m in self.backend.messages(conversation_id) if m.role != "system"]
        except Exception as exc:
            self.report(exc, "open the conversation")
            return
        self.conversation_id = conversation_id
        self.chat_app.remember(last_conversation=conversation_id)
        self.sub_title = conv.title
        await log.remove_children()
        await log.mount_all([ChatMessage(m.role, m.content, m) for m in messages])
        log.anchor()
        last = next((m.stats for m in reversed(messages) if m.stats is not None), None)
        log.mark_dropped(last.dropped_messages if last else 0)
        self.status.show(turn=turn_summary(last) if last else "", turn_stats=last, cache=conv)
        if conv.model and conv.model != self.backend.model_name:
            # Its cache was made by that model: this one recomputes the history on the next turn.
            self.notify(
                f"This conversation was with {conv.model}; replies now come from "
                f"{self.backend.model_name} (Ctrl+K switches models)",
                title="Model",
                timeout=8,
            )
        self.update_context()
        self.refresh_list()
        self.refresh_bindings()
        self._give_back_unsent()

    def update_context(self) -> None:
        used = 0
        if self.conversation_id is not None:
            try:
                used = self.backend.context_used(self.conversation_id)
            except Exception:  # an estimate only; never worth an error
                used = 0
        self.status.show(context=(used, self.backend.context_limit))

    @on(PromptInput.Changed, "#prompt")
    def update_draft_count(self) -> None:
        """Tokens of the message being typed (an estimate, marked '~', until the model loads)."""
        text = self.prompt.text
        if not text.strip():
            self.status.show(draft=None)
            return
        counter = getattr(self.backend, "count_tokens", None)
        try:
            count = counter(text) if counter is not None else None
        except Exception:  # a count is a hint; never worth an error
            count = None
        self.status.show(draft=(len(text) // 4 + 1, True) if count is None else (count, False))

    @on(PromptInput.ScrollRequest)
    def _scroll_log(self, event: PromptInput.ScrollRequest) -> None:
        if event.pages < 0:
            self.log_view.scroll_page_up()
        else:
            self.log_view.scroll_page_down()

    # -- sending and streaming ----------------------------------------------------

    def generation_settings(self) -> GenerationSettings | None:
        """None: the backend's own, the model's recommended sampling where the user set none
        (chatkv.engine.defaults), as `chatkv ask` gets, and the new model's after a switch.
        Reading the [generation] section here sampled SmolLM2 at the shipped temperature 0.7,
        where its card says 0.2: replies that rambled from the first word."""
        return None

    def busy(self, what: str) -> bool:
        if self.generating:
            self.notify(f"A reply is being generated; stop it (Esc) to {what}.", severity="warning")
            return True
        if self.pending is not None:
            self.notify(
                f"A message waits for the model to load; take it back (Esc) to {what}.", severity="warning"
            )
            return True
        return False

    @on(PromptInput.Submitted)
    async def _submitted(self, event: PromptInput.Submitted) -> None:
        await self.send(event.text)

    def send_starter(self, text: str) -> Starter:
        """How to start the turn for `text`: into the open conversation, or a draft's first."""
        cid = self.conversation_id
        settings = self.generation_settings()
        if cid is None:
            system = self.draft_system_prompt  # "" too: a prompt cleared for this conversation
            return lambda: send_new(self.backend, text, settings, system)
        return lambda: (self.backend.send(cid, text, settings), cid)

    async def send(self, text: str) -> None:
        """Send `text` as the next user message (queued while the model loads)."""
        if not text.strip():
            return
        if self.busy("send another message"):
            return
        self.prompt.clear()
        log = self.log_view
        if not self.model_ready():
            widget = ChatMessage("user", text, pending=True)
            await log.mount(widget)
            widget.set_waiting("waiting for the model to load…")
            log.anchor()
            self.pending = (widget, text)
            if self.model_state == "failed":
                self.model_state = "loading"
                self.status.show(model_state="loading")
                self._wait_started = time.monotonic()
                self.load_model()
            self.refresh_bindings()
            return
        await log.mount(ChatMessage("user", text))
        await self.start_turn(self.send_starter(text), text)

    async def start_turn(self, starter: Starter, restore_text: str | None) -> None:
        """Mount an empty reply and stream into it from a worker; `starter` makes the stream."""
        widget = ChatMessage("assistant")
        await self.log_view.mount(widget)
        widget.streaming = True
        self._reply_widget = widget
        self._wait_started = time.monotonic()
        self.show_activity()
        self.log_view.anchor()
        self.generating = True
        self._stop_requested = False
        self.status.show(turn="generating…", turn_stats=None)
        self.refresh_bindings()
        buffer = ReplyBuffer()
        self._users_before = len(self._user_messages()) if restore_text is not None else 0
        self._drain_timer = self.set_interval(FLUSH_S, partial(self.drain, buffer, widget))
        self.generate(starter, buffer, widget, restore_text)

    async def drain(self, buffer: ReplyBuffer, widget: ChatMessage) -> None:
        """Show the pieces that arrived since the last call, after any drain under way."""
        async with self._drain_lock:
            await self._show(buffer, widget)

    async def _show(self, buffer: ReplyBuffer, widget: ChatMessage) -> None:
        text = buffer.take()
        if text and widget.is_attached:
            await widget.append(text)

    @work(thread=True, exclusive=True, group="generate")
    def generate(
        self,
        starter: Starter,
        buffer: ReplyBuffer,
        widget: ChatMessage,
        restore_text: str | None,
    ) -> None:
        worker = get_current_worker()
        stream: TurnStream | None = None
        error: BaseException | None = None
        try:
            stream, cid = starter()
            self.stream = stream
            self.post_message(TurnStarted(cid))
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
            kept_aside = bool(getattr(stream, "kept_aside", False))
            self.stream = None
            self.post_message(
                TurnEnded(widget, buffer, message, error, restore_text if error else None, kept_aside)
            )

    def on_turn_started(self, event: TurnStarted) -> None:
        if self.conversation_id is None:  # the draft is saved now
            self.conversation_id = event.conversation_id
            self.chat_app.remember(last_conversation=event.conversation_id)
            self.refresh_list()
            self.refresh_bindings()

    async def on_turn_ended(self, event: TurnEnded) -> None:
        # Stopping the timer cancels its task, and with it a drain under way (a piece taken
        # from the buffer, half laid out: lost from the reply shown): so it is stopped under
        # the drains' lock, once a drain under way is done (one waiting for the lock takes nothing).
        timer, self._drain_timer = self._drain_timer, None
        async with self._drain_lock:
            if timer is not None:
                timer.stop()
            await self._show(event.buffer, event.widget)
        self.generating = False
        self.stream = None
        self._reply_widget = None
        self.turns_done += 1
        widget = event.widget
        if event.error is not None:
            self.notify(error_text(event.error), title="Generation failed", severity="error", timeout=10)
            # Show what was saved, nothing more: the transcript is the source of truth
            # (a refused first message leaves the draft empty).
            system = self.draft_system_prompt
            cid = self.conversation_id
            if cid is not None and not self._exists(cid):  # a refused first message takes its
                cid = None  # conversation with it: back to the draft it was
            await self.open_conversation(cid)
            if self.conversation_id is None:
                self.draft_system_prompt = system
            if event.restore_text is not None:
                if self._saved_last(event.restore_text):  # not in the input too: sent again, twice
                    key = key_label(self.settings.ui.keys.regenerate.split(",")[0])
                    self.notify(f"Your message is saved; {key} generates its reply again.", timeout=8)
                else:
                    self.restore_input(event.restore_text)
            self.status.show(turn="last turn failed", turn_stats=None)
        elif event.kept_aside:
            # A stopped regenerate or edit changes nothing: show the conversation as saved.
            await self.open_conversation(self.conversation_id)
            self.notify(
                "Stopped: the previous reply is kept; the partial one is saved as an earlier version "
                "(Alt+V).",
                timeout=6,
            )
            self.status.show(turn="stopped; nothing changed", turn_stats=None)
        else:
            widget.finish(event.message)
            if event.message is not None and event.message.stats is not None:
                self.status.show(turn=turn_summary(event.message.stats), turn_stats=event.message.stats)
                self.log_view.mark_dropped(event.message.stats.dropped_messages)
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

    def _exists(self, conversation_id: int) -> bool:
        try:
            self.backend.get_conversation(conversation_id)
        except NotFoundError:
            return False
        except Exception:  # another error: opening it says which
            return True
        return True

    def _user_messages(self) -> list[str]:
        """The open conversation's saved messages of the user's (none for a draft)."""
        if self.conversation_id is None:
            return []
        try:
            return [m.content for m in self.backend.messages(self.conversation_id) if m.role == "user"]
        except Exception:
            return []

    def _saved_last(self, text: str) -> bool:
        """Whether the failed turn saved the user's `text` before failing: one message of the
        user's more than when it started, and it is `text`."""
        mine = self._user_messages()
        return len(mine) > self._users_before and mine[-1] == text

    def restore_input(self, text: str) -> None:
        """Put the user's text back in the input (before anything typed since)."""
        current = self.prompt.text
        self.prompt.load_text(text if not current.strip() else f"{text}\n{current}")
        self.prompt.focus()
        self.prompt.move_cursor(self.prompt.document.end)

    def report(self, exc: BaseException, what: str) -> None:
        self.notify(error_text(exc), title=f"Could not {what}", severity="error", timeout=10)

    def nothing(self, what: str) -> None:
        """Say why a key did nothing (a key that does nothing silently looks broken)."""
        self.notify(what, severity="warning", timeout=3)

    # -- actions ------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return self.generating or self.pending is not None
        return True

    async def action_new_conversation(self) -> None:
        if self.busy("start a new conversation"):
            return
        self.sidebar.filter_input.value = ""
        if self.conversation_id is not None or self.log_view.messages:
            await self.open_conversation(None)
        self.prompt.focus()

    def action_focus_list(self) -> None:
        if not self.sidebar.display:
            self.sidebar_shown = True
            self.layout_sidebar()
        self.sidebar.focus_list()

    async def action_next_conversation(self) -> None:
        await self._step_conversation(1)

    async def action_previous_conversation(self) -> None:
        await self._step_conversation(-1)

    async def _step_conversation(self, step: int) -> None:
        target = self.sidebar.neighbour(self.conversation_id, step)
        if target is None:
            if self.sidebar.conversations:
                self.nothing("No more conversations in that direction.")
            elif self.sidebar.filter_input.value.strip():
                self.nothing("No conversation matches the filter; clear it to see them all.")
            else:
                self.nothing("No saved conversations yet.")
            return
        await self.switch_to(target)

    def action_toggle_sidebar(self) -> None:
        self.sidebar_shown = not self.sidebar.display
        self.layout_sidebar()
        if not self.sidebar.display and self.sidebar.has_focus_within:
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
            if self._reply_widget is not None and self._reply_widget.waiting:
                self._reply_widget.set_waiting("stopping…")
            self.status.show(turn="stopping…")

    async def action_regenerate(self) -> None:
        cid = self.conversation_id
        if self.busy("regenerate"):
            return
        messages = self.log_view.messages
        if cid is None or not any(m.role == "user" for m in messages):
            self.nothing("Nothing to regenerate yet; send a message first.")
            return
        if not self.model_ready():
            self.nothing("The model is still loading; regenerate when it is ready.")
            return
        if messages[-1].role == "assistant":
            await messages[-1].remove()
        settings = self.generation_settings()
        await self.start_turn(lambda: (self.backend.regenerate(cid, settings), cid), None)

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
        if self.busy("edit a message"):
            return
        target = self.target_message("user")
        if self.conversation_id is None or target is None or target.message is None:
            self.nothing("No saved message of yours to edit yet; send one first.")
            return
        if not self.model_ready():
            self.nothing("The model is still loading; edit when it is ready.")
            return
        message = target.message
        cid = self.conversation_id

        async def done(text: str | None) -> None:
            self.prompt.focus()
            if text is None or not text.strip() or text == message.content:
                return
            widgets = self.log_view.messages
            index = widgets.index(target) if target in widgets else len(widgets)
            await self.log_view.remove_children(widgets[index:])
            await self.log_view.mount(ChatMessage("user", text))
            settings = self.generation_settings()
            # a failed edit changes nothing: its text comes back to the input, not lost
            await self.start_turn(lambda: (self.backend.edit(message.id, text, settings), cid), text)

        self.app.push_screen(
            TextPromptScreen("Edit message (the reply is generated again)", message.content, multiline=True),
            done,
        )

    # -- shutdown -----------------------------------------------------------------

    def generation_worker(self) -> Worker | None:
        for worker in self.workers:
            if worker.group == "generate" and not worker.is_finished:
                return worker
        return None

    def unsent_text(self) -> str | None:
        """Text the user wrote that no turn has taken: a message waiting for the model to
        load, and whatever is in the input (the pending one first)."""
        parts = [self.pending[1]] if self.pending is not None else []
        if self.prompt.text.strip():
            parts.append(self.prompt.text)
        return "\n".join(parts) if parts else None

    def _give_back_unsent(self) -> None:
        """Put text left unsent when the app last quit back in the input, in the conversation
        it was written in."""
        text = self.chat_app.state.unsent.get(unsent_key(self.conversation_id))
        if text is None:
            return
        self.restore_input(text)
        self.chat_app.remember_unsent(self.conversation_id, None)
        self.notify("What you had written but not sent when chatkv quit is back in the input.", timeout=6)

    def on_unmount(self) -> None:
        # However the app ends, a reply still streaming is stopped (and saved by the backend).
        self.request_stop()

    def request_stop(self) -> None:
        self._stop_requested = True
        if self.stream is not None:
            self.stream.cancel()
