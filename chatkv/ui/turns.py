"""What passes between the chat screen and its workers: how a turn starts, the buffer
its pieces go through, and the messages the workers post back."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass

from textual.message import Message

from chatkv.api import ChatBackend, GenerationSettings, MessageView, TurnStream
from chatkv.ui.widgets import ChatMessage


def send_new(
    backend: ChatBackend, text: str, settings: GenerationSettings | None, system_prompt: str | None
) -> tuple[TurnStream, int]:
    """Start the first turn of a draft: the conversation is created with its message.

    A backend whose `send` does not yet take `system_prompt` (the older contract) gets the
    conversation created first, then the message."""
    if "system_prompt" in inspect.signature(backend.send).parameters:
        stream = backend.send(None, text, settings, system_prompt=system_prompt)
        return stream, stream.conversation_id
    conv = backend.new_conversation(system_prompt=system_prompt)
    stream = backend.send(conv.id, text, settings)
    return stream, conv.id


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
class TurnStarted(Message):
    """The backend accepted the turn; a draft now has its conversation id."""

    conversation_id: int


@dataclass
class TurnEnded(Message):
    """The generation worker finished: the saved reply, or the error that stopped it."""

    widget: ChatMessage
    buffer: ReplyBuffer
    message: MessageView | None
    error: BaseException | None
    restore_text: str | None
    kept_aside: bool = False  # a stopped regenerate/edit: nothing changed, its partial reply kept aside


@dataclass
class ModelLoaded(Message):
    """The background model load ended (error is None on success)."""

    error: BaseException | None


@dataclass
class ModelSwitched(Message):
    """The background model switch ended (error is None on success)."""

    name: str
    conversation_id: int | None
    error: BaseException | None


#: A turn's starter: makes the stream in the worker thread, returns it and its conversation.
Starter = Callable[[], tuple[TurnStream, int]]
