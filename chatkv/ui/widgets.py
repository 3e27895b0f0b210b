"""Reusable widgets of the chat screen: they behave, and tell the screen what happened
through messages. None of them calls the backend."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from rich.text import Text
from textual import events, on
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Input, Markdown, OptionList, Static, TextArea
from textual.widgets.option_list import Option

from chatkv.api import ConversationSummary, MessageView, TurnStats
from chatkv.fmt import format_bytes, relative_time


def compact_count(n: int) -> str:
    """1234 -> '1.2k', 56789 -> '57k', 999 -> '999'."""
    if n < 1000:
        return str(n)
    if n < 10_000:
        return f"{n / 1000:.1f}k"
    return f"{n // 1000}k"


def cache_label(conv: ConversationSummary) -> Text:
    """The cache state of a conversation as a short coloured label."""
    if conv.cache_state == "live":
        return Text("● live", style="green")
    if conv.cache_state == "disk":
        return Text(f"◆ on disk {format_bytes(conv.cache_bytes)}", style="cyan")
    return Text("○ no cache", style="dim")


def turn_summary(stats: TurnStats) -> str:
    """Where a turn's cache came from and what it saved, e.g.
    'resumed 3,812 tokens from disk in 48 ms · prefilled 14 · first token 61 ms · 48.5 tok/s'."""
    if stats.cache_source == "disk" and stats.cached_tokens:
        head = f"resumed {stats.cached_tokens:,} tokens from disk in {stats.cache_load_s * 1000:.0f} ms"
    elif stats.cache_source == "memory" and stats.cached_tokens:
        head = f"reused {stats.cached_tokens:,} tokens from memory"
    else:
        head = "no cache"
    parts = [
        head,
        f"prefilled {stats.prefilled_tokens:,}",
        f"first token {stats.ttft_s * 1000:.0f} ms",
        f"{stats.decode_tps:.1f} tok/s",
    ]
    if stats.finish_reason == "cancelled":
        parts.append("stopped")
    elif stats.finish_reason == "length":
        parts.append("hit max tokens")
    if stats.dropped_messages:
        parts.append(f"{stats.dropped_messages} old messages left out")
    return " · ".join(parts)


#: Titles in the list are cut to this many characters.
TITLE_CHARS = 28


class ConversationList(Vertical):
    """Saved conversations, most recent first, with a filter box above them.

    Typing while the list has focus goes to the filter. Posts `Selected` when one is
    chosen and `FilterChanged` when the filter text changes.
    """

    DEFAULT_CSS = """
    ConversationList { width: 34; }
    ConversationList > OptionList { padding: 0 1 0 0; }
    ConversationList > Input { margin: 0; }
    ConversationList > OptionList { height: 1fr; }
    """

    @dataclass
    class Selected(Message):
        conversation_id: int

    @dataclass
    class FilterChanged(Message):
        query: str

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.conversations: list[ConversationSummary] = []
        self.now: datetime = datetime.now(UTC)

    def compose(self) -> ComposeResult:
        yield Input(placeholder="Type to filter…", id="filter", select_on_focus=False)
        yield OptionList(id="conversations")

    @property
    def filter_input(self) -> Input:
        return self.query_one("#filter", Input)

    @property
    def option_list(self) -> OptionList:
        return self.query_one("#conversations", OptionList)

    def show(self, conversations: Iterable[ConversationSummary], selected: int | None, now: datetime) -> None:
        """Replace the list; highlight `selected` if it is in it."""
        self.conversations = list(conversations)
        self.now = now
        options = self.option_list
        options.clear_options()
        options.add_options([Option(self._render_item(c), id=str(c.id)) for c in self.conversations])
        if selected is not None:
            try:
                options.highlighted = options.get_option_index(str(selected))
            except Exception:  # not in the filtered list
                options.highlighted = None

    def _render_item(self, conv: ConversationSummary) -> Text:
        title = conv.title or "Untitled"
        if len(title) > TITLE_CHARS:
            title = title[: TITLE_CHARS - 1] + "…"
        line = Text(title, style="bold")
        line.append("\n")
        line.append(
            f"{relative_time(conv.updated_at, self.now)} · {compact_count(conv.token_count)} tok · ",
            style="dim",
        )
        if conv.cache_state == "live":
            line.append("● live", style="green")
        elif conv.cache_state == "disk":
            line.append(f"◆ {format_bytes(conv.cache_bytes).replace(' ', '')}", style="cyan")
        else:
            line.append("○ none", style="dim")
        return line

    @on(OptionList.OptionSelected, "#conversations")
    def _selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id is not None:
            self.post_message(self.Selected(int(event.option.id)))

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.post_message(self.FilterChanged(event.value))

    @on(Input.Submitted, "#filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.option_list.focus()
        if self.option_list.highlighted is None and self.option_list.option_count:
            self.option_list.highlighted = 0

    def on_key(self, event: events.Key) -> None:
        # Type to filter: printable keys pressed on the list go to the filter box.
        if self.option_list.has_focus and event.is_printable and event.character not in (None, " "):
            event.stop()
            event.prevent_default()
            box = self.filter_input
            box.focus()
            box.insert_text_at_cursor(event.character or "")


class ChatMessage(Vertical, can_focus=True):
    """One message of the conversation. Assistant replies render as Markdown and can
    grow while they stream (`append`); focus a message to copy or edit it."""

    DEFAULT_CSS = """
    ChatMessage { height: auto; padding: 0 1; margin: 0 0 1 0; }
    ChatMessage > .role { height: 1; text-style: bold; }
    ChatMessage > .stats { height: 1; color: $text-muted; }
    ChatMessage > Markdown { margin: 0; padding: 0; }
    ChatMessage > .user-text { height: auto; }
    """

    def __init__(
        self, role: str, content: str = "", message: MessageView | None = None, *, pending: bool = False
    ):
        super().__init__(classes=f"message -{role}" + (" -pending" if pending else ""))
        self.role = role
        self.message = message
        self.content = content

    def compose(self) -> ComposeResult:
        label = {"user": "You", "assistant": "Assistant", "system": "System"}.get(self.role, self.role)
        yield Static(label, classes="role")
        if self.role == "assistant":
            yield Markdown(self.content)
        else:
            yield Static(Text(self.content), classes="user-text")
        yield Static("", classes="stats")

    def on_mount(self) -> None:
        self.set_stats()

    @property
    def streaming(self) -> bool:
        return self.query_one(".role").has_class("-streaming")

    @streaming.setter
    def streaming(self, value: bool) -> None:
        # On the label, not the message: restyling a long reply's subtree is slow.
        self.query_one(".role").set_class(value, "-streaming")

    async def append(self, text: str) -> None:
        """Add streamed text to an assistant reply."""
        self.content += text
        await self.query_one(Markdown).append(text)

    def finish(self, message: MessageView | None) -> None:
        """The reply ended: remember the saved message and show what the turn cost."""
        self.message = message
        self.streaming = False
        self.set_stats()

    def set_stats(self) -> None:
        stats_line = self.query_one(".stats", Static)
        stats = self.message.stats if self.message else None
        stats_line.display = stats is not None or self.has_class("-pending")
        if self.has_class("-pending"):
            stats_line.update("waiting for the model to load…")
        elif stats is not None:
            stats_line.update(turn_summary(stats))


class ChatLog(VerticalScroll):
    """The scrolling conversation; stays at the bottom while a reply streams unless the
    user scrolls up."""

    DEFAULT_CSS = """
    ChatLog { height: 1fr; }
    """

    def on_mount(self) -> None:
        self.anchor()

    @property
    def messages(self) -> list[ChatMessage]:
        return list(self.query(ChatMessage))


class PromptInput(TextArea):
    """Multi-line input: Enter sends (posts `Submitted`), the configured newline keys
    insert a line break, pasted text keeps its lines."""

    DEFAULT_CSS = """
    PromptInput { height: auto; min-height: 3; max-height: 12; }
    """

    @dataclass
    class Submitted(Message):
        input: PromptInput
        text: str

    def __init__(self, newline_keys: str = "shift+enter,ctrl+j", *, id: str | None = None):
        super().__init__(
            id=id,
            soft_wrap=True,
            show_line_numbers=False,
            tab_behavior="focus",
            compact=True,
            placeholder="Message… (Enter sends)",
        )
        keys = [k.strip() for k in newline_keys.split(",") if k.strip()]
        self.newline_keys = keys
        for i, key in enumerate(keys):
            self._bindings.bind(key, "newline", "Newline", show=i == 0, priority=True)

    def action_newline(self) -> None:
        self.insert("\n")

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        await super()._on_key(event)


class StatusBar(Static):
    """One line: model and device (or its loading state), context used / maximum, and
    what the last turn took from the cache."""

    DEFAULT_CSS = """
    StatusBar { height: 1; padding: 0 1; background: $panel; color: $text; }
    """

    def __init__(self, *, id: str | None = None):
        super().__init__("", id=id)
        self.model = ""
        self.device = ""
        self.model_state = "loading"  # loading | ready | failed
        self.context = (0, 0)
        self.cache: ConversationSummary | None = None  # the open conversation's cache state
        self.turn = ""

    def show(self, **values: object) -> None:
        for key, value in values.items():
            setattr(self, key, value)
        self.update(self.status_text())

    def status_text(self) -> Text:
        text = Text(no_wrap=True, overflow="ellipsis")
        if self.model_state == "loading":
            text.append(f"◌ loading {self.model}…", style="yellow")
        elif self.model_state == "failed":
            text.append(f"✗ {self.model} failed to load", style="red")
        else:
            text.append("● ", style="green")
            text.append(self.model)
        text.append(f" · {self.device}", style="dim")
        used, limit = self.context
        text.append(f"  │  ctx {used:,} / {limit:,}")
        if self.cache is not None:
            text.append("  │  ")
            text.append_text(cache_label(self.cache))
        if self.turn:
            text.append(f"  │  {self.turn}", style="dim" if self.turn.startswith("generating") else "")
        return text
