"""Progress of long work (converting and loading a model, prefilling a long prompt, a batch).

The work reports through a small protocol, `Progress`: `start(label, total, unit)`, then
`advance(n)` as it goes, then `done()`. `NullProgress` (the default everywhere) ignores
it; `RichProgress` draws a bar on stderr with `rich` (which ships with Textual) for the
CLI; `CallbackProgress` turns the events into `(label, done, total)` calls, which is what
`chatkv.session.Chat.on_progress` and the TUI consume.

A total of 0 means "unknown": a spinner and a count, not a bar.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol, TextIO


class Progress(Protocol):
    """Receives the progress of one piece of work at a time."""

    def start(self, label: str, total: int = 0, unit: str = "") -> None:
        """A new piece of work: `total` units (0: unknown) of `unit` ("tokens", "lines")."""

    def advance(self, n: int = 1) -> None:
        """`n` more units are done."""

    def done(self) -> None:
        """The current piece of work is finished (or abandoned)."""


class NullProgress:
    """Reports nothing."""

    def start(self, label: str, total: int = 0, unit: str = "") -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def done(self) -> None:
        pass


NULL = NullProgress()


class CallbackProgress:
    """Calls `fn(label, done, total)` on start, on each advance and at the end (done == total
    then, or done == -1 for work of unknown size), from whatever thread does the work."""

    def __init__(self, fn: Callable[[str, int, int], None]):
        self.fn = fn
        self.label, self.total, self.count = "", 0, 0

    def start(self, label: str, total: int = 0, unit: str = "") -> None:
        self.label, self.total, self.count = label, total, 0
        self.fn(label, 0, total)

    def advance(self, n: int = 1) -> None:
        self.count += n
        self.fn(self.label, self.count, self.total)

    def done(self) -> None:
        self.fn(self.label, self.total if self.total else -1, self.total)


class RichProgress:
    """A `rich.progress` bar on `stream` (stderr), one task per piece of work, removed when it
    is done (so the reply that follows starts on a clean line). Draws nothing when the stream
    is not a terminal: scripts and `--json` output stay clean."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None, transient: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.transient = transient
        self._bar: Any = None
        self._task: Any = None
        self._lock = threading.Lock()

    def _make(self, total: int, unit: str) -> Any:
        import rich.progress as rp
        from rich.console import Console

        console = Console(file=self.stream, force_terminal=self.enabled or None)
        columns: list[Any] = [rp.SpinnerColumn(), rp.TextColumn("[progress.description]{task.description}")]
        if total:
            columns += [rp.BarColumn(), rp.MofNCompleteColumn(), rp.TextColumn(unit)]
            columns += [rp.TimeRemainingColumn()]
        else:
            columns += [rp.TimeElapsedColumn()]
        return rp.Progress(*columns, console=console, transient=self.transient)

    def start(self, label: str, total: int = 0, unit: str = "") -> None:
        if not self.enabled:
            return
        with self._lock:
            self._stop()
            self._bar = self._make(total, unit)
            self._bar.start()
            self._task = self._bar.add_task(label, total=total or None)

    def advance(self, n: int = 1) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.advance(self._task, n)

    def done(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = self._task = None


def driver(progress: Progress) -> Callable[[str, int, int], None]:
    """The reverse of CallbackProgress: an `on_progress(label, done, total)` callback (what
    `Chat.on_progress` takes) that drives `progress` (a RichProgress bar, say)."""
    state: dict[str, Any] = {"label": None, "done": 0}

    def on_progress(label: str, done: int, total: int) -> None:
        if done == 0 or label != state["label"]:
            state["label"], state["done"] = label, 0
            progress.start(label, total, "tokens" if total else "")
            if done == 0:
                return
        if done < 0 or (total and done >= total):
            progress.advance(max(0, done - state["done"]))
            progress.done()
            state["label"] = None
            return
        progress.advance(done - state["done"])
        state["done"] = done

    return on_progress
