"""The modal dialogs of the chat screen: help, a yes/no question, a text prompt, earlier
versions of a message and the model picker.

Each says its keys in a hint line and shows its own footer, so the main screen's
bindings never appear to apply while a dialog is open."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.keys import format_key
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, OptionList, Static, TextArea
from textual.widgets.option_list import Option

from chatkv.api import MessageView, ModelInfo
from chatkv.config import Settings
from chatkv.fmt import format_bytes
from chatkv.ui.actions import ACTIONS, key_label


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
            ("pgup / pgdn", "Scroll the conversation from the input"),
            (format_key("f7"), "Select all text in the input"),
            ("tab / shift+tab", "Move focus (conversation list, messages, input)"),
            ("type in the list", "Filter conversations"),
            (format_key("ctrl+p"), "Command palette (every action, and open any conversation)"),
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
        yield Footer(compact=True)


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question: y answers yes, n or Esc no."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("escape,n", "answer(False)", "Cancel")]

    def __init__(self, question: str, yes: str = "Yes"):
        super().__init__()
        self.question = question
        self.yes = yes

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.question, classes="title")
            yield Label(f"y {self.yes.lower()} · n or Esc cancel", classes="hint")
            with Horizontal(classes="buttons"):
                yield Button(f"{self.yes} (y)", variant="error", id="yes", compact=True)
                yield Button("Cancel (n)", id="no", compact=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class TextPromptScreen(ModalScreen[str | None]):
    """Ask for a line (Enter or Ctrl+S saves) or a block of text (Ctrl+S saves); Esc cancels.
    The cursor starts at the end of the text."""

    BINDINGS = [Binding("ctrl+s", "save", "Save", priority=True), Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, value: str = "", *, multiline: bool = False, note: str = ""):
        super().__init__()
        self.title_text = title
        self.value = value
        self.multiline = multiline
        self.note = note

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="-multiline" if self.multiline else ""):
            yield Label(self.title_text, classes="title")
            if self.multiline:
                yield TextArea(self.value, id="value", soft_wrap=True, tab_behavior="focus")
            else:
                yield Input(self.value, id="value", select_on_focus=False)
            if self.note:
                yield Label(self.note, classes="hint", id="note")
            keys = "Ctrl+S saves" if self.multiline else "Enter or Ctrl+S saves"
            yield Label(f"{keys} · Esc cancels", classes="hint")
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save", compact=True)
                yield Button("Cancel", id="cancel", compact=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        widget = self.query_one("#value")
        widget.focus()
        if isinstance(widget, TextArea):
            widget.move_cursor(widget.document.end)
        elif isinstance(widget, Input):
            widget.cursor_position = len(widget.value)

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


class VersionsScreen(ModalScreen[int | None]):
    """Earlier versions of a message (regenerated replies, edited messages), newest first;
    Enter restores the highlighted one, Esc keeps the current."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, current: str, versions: list[MessageView]):
        super().__init__()
        self.current = current
        self.versions = versions

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(f"Earlier versions ({len(self.versions)}) of this message", classes="title")
            options = []
            for n, version in reversed(list(enumerate(self.versions, 1))):
                text = Text(f"{n}. ", style="bold")
                text.append(" ".join(version.content.split())[:200] or "(empty)")
                options.append(Option(text, id=str(version.id)))
            yield OptionList(*options, id="versions")
            yield Label("Enter makes it the current version · Esc cancels", classes="hint")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(int(event.option.id) if event.option.id is not None else None)

    def action_cancel(self) -> None:
        self.dismiss(None)


#: Longest model name the picker shows whole; longer ones (paths) keep their end.
NAME_WIDTH = 60


def model_option(model: ModelInfo, current: bool) -> Option:
    """One model of the picker, two lines: its name and kind (marked when current), then
    its size, its KV chunks on disk and whether it can be used. Unavailable: disabled."""
    name = model.name if len(model.name) <= NAME_WIDTH else "…" + model.name[-(NAME_WIDTH - 1) :]
    text = Text()
    text.append("● " if current else "  ", style="green")
    text.append(name, style="bold")
    text.append(f"  {model.kind}", style="dim")
    details = [format_bytes(model.size_bytes) if model.size_bytes else "size unknown"]
    if model.chunk_count:
        details.append(f"{model.chunk_count:,} chunks on disk ({format_bytes(model.chunk_bytes)})")
    else:
        details.append("no chunks on disk")
    details.append("current" if current else "ready" if model.available else "unavailable")
    text.append("\n    " + " · ".join(details), style="dim")
    if model.note and not model.available:  # how to make it available: a line of its own
        text.append(f"\n    {model.note}", style="dim")
    return Option(text, id=model.name, disabled=not model.available)


class ModelPickerScreen(ModalScreen[str | None]):
    """The models usable offline (`ChatBackend.models()`), the current one highlighted; Enter
    chooses the highlighted one, Esc keeps the current. Unavailable ones are greyed and
    cannot be chosen; their note says why."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, models: list[ModelInfo], current: str):
        super().__init__()
        self.models = models
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Switch model", classes="title")
            options = [model_option(m, m.name == self.current) for m in self.models]
            yield OptionList(*options, id="models")
            yield Label(
                "Enter switches this conversation to it (its cache starts anew) · Esc cancels",
                classes="hint",
            )
        yield Footer(compact=True)

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        names = [m.name for m in self.models]
        if self.current in names:
            options.highlighted = names.index(self.current)
        options.focus()

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)
