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


def cache_label(conv: ConversationSummary, *, short: bool = False) -> Text:
    """The cache state of a conversation as a coloured label; the token count is what its
    cache covers (which can lag the context by the newest message). `short` is the sidebar's."""
    if short:
        # "cached", not "tok": the count is what the cache covers, which is not the context the
        # status bar shows ("ctx"): that adds the reply's opening and any message since.
        tokens = f" {compact_count(conv.token_count)} cached" if conv.token_count else ""
        if conv.cache_state == "live":
            return Text(f"● live{tokens}", style="green")
        if conv.cache_state == "disk":
            return Text(f"◆{tokens} {format_bytes(conv.cache_bytes).replace(' ', '')}", style="cyan")
        return Text("○ no cache", style="dim")
    cached = f" · {conv.token_count:,} tok cached" if conv.token_count else ""
    if conv.cache_state == "live":
        return Text(f"● live{cached}", style="green")
    if conv.cache_state == "disk":
        return Text(f"◆ on disk {format_bytes(conv.cache_bytes)}{cached}", style="cyan")
    return Text("○ no cache", style="dim")


def turn_outcome(stats: TurnStats) -> list[str]:
    """What the user must not miss about a turn: it was stopped, cut at max tokens, or
    left old messages out of the prompt. Shown first, so a narrow screen never hides it."""
    parts = []
    if stats.finish_reason == "cancelled":
        parts.append("stopped")
    elif stats.finish_reason == "length":
        parts.append("hit max tokens")
    elif stats.finish_reason == "error":
        parts.append("failed")
    if stats.dropped_messages:
        n = stats.dropped_messages
        parts.append(f"{n} old message{'s' if n != 1 else ''} left out")
    return parts


def turn_summary(stats: TurnStats, *, brief: bool = False) -> str:
    """Where a turn's cache came from and what it saved, outcome first, e.g.
    'stopped · resumed 3,812 tokens from disk in 48 ms · prefilled 14 · first token 61 ms · 48.5 tok/s'.
    `brief`: the outcome and where the cache came from only."""
    if stats.cache_source in ("disk", "remote") and stats.cached_tokens:
        where = "disk" if stats.cache_source == "disk" else "the shared cache"
        head = f"resumed {stats.cached_tokens:,} tokens from {where} in {stats.cache_load_s * 1000:.0f} ms"
    elif stats.cache_source == "memory" and stats.cached_tokens:
        head = f"reused {stats.cached_tokens:,} tokens from memory"
    else:
        head = "no cache"
    if brief:
        return " · ".join(turn_outcome(stats) + [head])
    parts = turn_outcome(stats) + [
        head,
        f"prefilled {stats.prefilled_tokens:,}",
        f"first token {stats.ttft_s * 1000:.0f} ms",
        f"{stats.decode_tps:.1f} tok/s",
    ]
    return " · ".join(parts)


#: Titles in the list are cut to the sidebar's width; this many characters before it is laid out.
TITLE_CHARS = 28


def cut(text: str, width: int) -> str:
    """`text` on one line, cut to `width` characters with '…' when longer."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


class ConversationList(Vertical):
    """Saved conversations, most recent first, with a filter box above them.

    Typing while the list has focus goes to the filter; Down in the filter goes to the
    list. Posts `Selected` when one is chosen and `FilterChanged` when the filter changes.
    """

    DEFAULT_CSS = """
    ConversationList { width: 34; }
    ConversationList > .heading { height: 1; padding: 0 1; color: $text-muted; text-style: bold; }
    ConversationList > .heading.-focused { color: $text; background: $accent 40%; }
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

    def __init__(self, heading: str = "Conversations", *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.heading = heading
        self.conversations: list[ConversationSummary] = []
        self.selected: int | None = None
        self.now: datetime = datetime.now(UTC)

    def compose(self) -> ComposeResult:
        yield Static(self.heading, classes="heading")
        yield Input(placeholder="Type to filter…", id="filter", select_on_focus=False)
        yield OptionList(id="conversations")

    @property
    def filter_input(self) -> Input:
        return self.query_one("#filter", Input)

    @property
    def option_list(self) -> OptionList:
        return self.query_one("#conversations", OptionList)

    def title_width(self) -> int:
        width = self.option_list.scrollable_content_region.width
        return max(width - 1, 8) if width else TITLE_CHARS

    def show(self, conversations: Iterable[ConversationSummary], selected: int | None, now: datetime) -> None:
        """Replace the list; highlight `selected` if it is in it."""
        self.conversations = list(conversations)
        self.selected = selected
        self.now = now
        self._render_options()

    def _render_options(self) -> None:
        options = self.option_list
        options.clear_options()
        options.add_options([Option(self._render_item(c), id=str(c.id)) for c in self.conversations])
        if self.selected is not None:
            self.highlight_selected()

    def highlight_selected(self) -> None:
        """Move the highlight back to the open conversation (after a refused switch)."""
        options, selected = self.option_list, self.selected
        try:
            options.highlighted = None if selected is None else options.get_option_index(str(selected))
        except Exception:  # not in the filtered list
            options.highlighted = None

    def on_resize(self) -> None:
        # Titles are cut to the width, so a new width needs them cut again.
        if self.conversations:
            self._render_options()

    def _render_item(self, conv: ConversationSummary) -> Text:
        # The open conversation keeps a mark while the highlight moves through the list.
        mark = "▸ " if conv.id == self.selected else ""
        line = Text(mark + cut(conv.title or "Untitled", self.title_width() - len(mark)), style="bold")
        line.append("\n")
        line.append(f"{relative_time(conv.updated_at, self.now)} · ", style="dim")
        line.append_text(cache_label(conv, short=True))
        return line

    def neighbour(self, current: int | None, step: int) -> int | None:
        """The id `step` places from `current` in the list (the first or last for a draft)."""
        ids = [c.id for c in self.conversations]
        if not ids:
            return None
        if current not in ids:
            return ids[0] if step > 0 else ids[-1]
        index = ids.index(current) + step
        return ids[index] if 0 <= index < len(ids) else None

    def focus_list(self) -> None:
        """Focus the list with something highlighted, so Enter opens it."""
        options = self.option_list
        options.focus()
        if options.highlighted is None and options.option_count:
            options.highlighted = 0

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
        self.focus_list()

    def on_descendant_focus(self, event: events.DescendantFocus) -> None:
        # Where the focus is must show: the heading lights up while the list or filter has it.
        # (A ':focus-within' rule on the heading is not re-applied when focus moves.)
        self.query_one(".heading").add_class("-focused")
        # Tab into the list also highlights an entry: Enter then always opens something.
        if event.widget is self.option_list and self.option_list.highlighted is None:
            if self.option_list.option_count:
                self.option_list.highlighted = 0

    def on_descendant_blur(self, event: events.DescendantBlur) -> None:
        self.call_after_refresh(self._blurred)

    def _blurred(self) -> None:
        self.query_one(".heading").set_class(self.has_focus_within, "-focused")

    def on_key(self, event: events.Key) -> None:
        if self.filter_input.has_focus and event.key == "down":
            event.stop()
            self.focus_list()
            return
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
    ChatMessage > .stats { height: auto; color: $text-muted; }
    ChatMessage > .note { height: auto; color: $warning; display: none; }
    ChatMessage.-dropped > .note { display: block; }
    ChatMessage.-dropped { opacity: 60%; }
    ChatMessage > Markdown { margin: 0; padding: 0; }
    ChatMessage > .user-text { height: auto; }
    """

    #: The note on a message that the last turn's prompt left out.
    DROPPED_NOTE = "left out of the last prompt: the context was full"

    def __init__(
        self, role: str, content: str = "", message: MessageView | None = None, *, pending: bool = False
    ):
        super().__init__(classes=f"message -{role}" + (" -pending" if pending else ""))
        self.role = role
        self.message = message
        self.content = content
        self.waiting = ""  # what the reply waits for before its first token

    def compose(self) -> ComposeResult:
        label = {"user": "You", "assistant": "Assistant", "system": "System"}.get(self.role, self.role)
        yield Static(label, classes="role")
        yield Static(self.DROPPED_NOTE, classes="note")
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
        if self.waiting:
            self.set_waiting("")
        self.content += text
        await self.query_one(Markdown).append(text)

    def finish(self, message: MessageView | None) -> None:
        """The reply ended: remember the saved message and show what the turn cost."""
        self.message = message
        self.streaming = False
        self.waiting = ""
        self.set_stats()

    def set_waiting(self, text: str) -> None:
        """Say what the reply (or a queued message) is waiting for; "" when it stops waiting."""
        self.waiting = text
        self.set_stats()

    def set_stats(self) -> None:
        stats_line = self.query_one(".stats", Static)
        stats = self.message.stats if self.message else None
        stats_line.display = stats is not None or bool(self.waiting)
        if self.waiting:
            stats_line.update(Text(self.waiting, style="italic"))
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

    def mark_dropped(self, count: int) -> None:
        """Dim the first `count` messages: the last turn's prompt left them out."""
        for i, widget in enumerate(self.messages):
            widget.set_class(i < count, "-dropped")


class PromptInput(TextArea):
    """Multi-line input: Enter sends (posts `Submitted`), the configured newline keys
    insert a line break, pasted text keeps its lines, PageUp/PageDown scroll the
    conversation (posts `ScrollRequest`)."""

    DEFAULT_CSS = """
    PromptInput { height: auto; min-height: 3; max-height: 12; }
    """

    @dataclass
    class Submitted(Message):
        input: PromptInput
        text: str

    @dataclass
    class ScrollRequest(Message):
        pages: int  # -1 up, 1 down

    def __init__(self, newline_keys: str = "shift+enter,ctrl+j", *, id: str | None = None):
        super().__init__(
            id=id,
            soft_wrap=True,
            show_line_numbers=False,
            tab_behavior="focus",
            compact=True,
            placeholder="Message… (Enter sends · F1 keys)",
        )
        keys = [k.strip() for k in newline_keys.split(",") if k.strip()]
        self.newline_keys = keys
        for key in keys:
            self._bindings.bind(key, "newline", "Newline", show=False, priority=True)

    def action_newline(self) -> None:
        self.insert("\n")

    def action_cursor_page_up(self) -> None:
        self.post_message(self.ScrollRequest(-1))

    def action_cursor_page_down(self) -> None:
        self.post_message(self.ScrollRequest(1))

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        await super()._on_key(event)


def context_text(used: int, limit: int, draft: int | None, draft_estimated: bool) -> Text:
    """'ctx 1,234 / 8,192' and the message being typed against what is left, e.g.
    ' · msg ~12 of 6,958 left'. Never claims more than the context: a history longer than
    it says 'full' (its oldest messages are left out of the prompt). `limit` 0 = unknown."""
    text = Text()
    if limit <= 0:
        text.append(f"ctx ~{used:,}")
    elif used > limit:
        text.append(f"ctx full {limit:,}", style="yellow")
    else:
        text.append(f"ctx {used:,} / {limit:,}")
    if draft is not None:
        mark = "~" if draft_estimated else ""
        text.append(f" · msg {mark}{draft:,}")
        if limit > 0:
            left = max(limit - used, 0)
            text.append(f" of {left:,} left", style="yellow" if draft > left else "")
    return text


class StatusBar(Static):
    """Model and device (or what loading is doing), context used / maximum with the message
    being typed, the open conversation's cache, and what the last turn took from it. It
    wraps onto a second line rather than cut a number off."""

    DEFAULT_CSS = """
    StatusBar { height: auto; max-height: 3; padding: 0 1; background: $panel; color: $text; }
    """

    def __init__(self, *, id: str | None = None):
        super().__init__("", id=id)
        self.model = ""
        self.device = ""
        self.model_state = "loading"  # loading | ready | failed
        self.activity = ""  # what loading is doing now
        self.context = (0, 0)
        self.draft: tuple[int, bool] | None = None  # tokens of the message being typed, estimated?
        self.cache: ConversationSummary | None = None  # the open conversation's cache state
        self.turn = ""  # the last turn's summary, or what the current one is doing
        self.turn_stats: TurnStats | None = None  # the last turn's, when `turn` summarises it

    def show(self, **values: object) -> None:
        for key, value in values.items():
            setattr(self, key, value)
        self.update(self.status_text())

    def on_resize(self) -> None:
        self.update(self.status_text())

    def status_text(self) -> Text:
        """The whole line; where it is wider than the bar, the compact form (no device, the
        sidebar's cache label), which still wraps rather than cut anything off."""
        width = self.content_size.width
        # From the most to the least said; the first that fits one line, else the least (wrapped).
        # The message lines keep the details the shorter forms leave out.
        for level in range(4):
            text = self._text(level)
            if not width or text.cell_len <= width:
                break
        return text

    def _text(self, level: int) -> Text:
        """level 0: everything; 1: no device, short cache label; 2: the last turn's outcome
        and cache only; 3: no cache label either."""
        compact = level >= 1
        sep = " │ "
        text = Text(overflow="fold")
        if self.model_state == "loading":
            text.append(f"◌ loading {self.model}…", style="yellow")
            if self.activity and not self.activity.startswith("loading"):  # said already
                text.append(f" {self.activity}", style="yellow")
        elif self.model_state == "failed":
            text.append(f"✗ {self.model} failed to load", style="red")
        else:
            text.append("● ", style="green")
            text.append(self.model)
        if self.device and not compact and self.model_state == "ready":
            text.append(f" · {self.device}", style="dim")
        used, limit = self.context
        draft, estimated = self.draft if self.draft is not None else (None, False)
        text.append(sep)
        text.append_text(context_text(used, limit, draft, estimated))
        if self.cache is not None and level < 3:
            text.append(sep)
            text.append_text(cache_label(self.cache, short=compact))
        turn = self.turn
        if level >= 2 and self.turn_stats is not None:
            turn = turn_summary(self.turn_stats, brief=True) if level == 2 else self.turn_outcome
        if turn:
            text.append(sep)
            text.append(turn, style="dim" if turn.startswith("generating") else "")
        return text

    @property
    def turn_outcome(self) -> str:
        return " · ".join(turn_outcome(self.turn_stats)) if self.turn_stats is not None else ""
