"""An in-memory ChatBackend for UI tests: no torch, no model, deterministic output.

Replies are scripted and streamed piece by piece (optionally with a delay per piece).
The backend can be told to fail loading, to fail a generation, to block in `load()`
until released, or to pause a stream after some pieces until released or cancelled.
`activity` is what it says it is doing (the UI shows it while it waits).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from chatkv.api import (
    ChatBackend,
    ConversationSummary,
    GenerationSettings,
    MessageView,
    ModelInfo,
    TurnStats,
)
from chatkv.config import Settings, load_settings
from chatkv.errors import InputError, ModelError, NotFoundError

#: The "now" of every fake timestamp; tests pass it as the app's clock.
FIXED_NOW = datetime(2025, 6, 1, 12, 0, 0)


def split_pieces(text: str) -> list[str]:
    """Cut a reply into word-sized pieces the way a tokenizer roughly would."""
    pieces: list[str] = []
    word = ""
    for ch in text:
        if ch in " \n" and word.strip():
            pieces.append(word)
            word = ""
        word += ch
    if word:
        pieces.append(word)
    return pieces


class FakeStream:
    """A TurnStream over a scripted reply."""

    def __init__(self, backend: FakeBackend, conversation_id: int, reply: str, cache_source: str):
        self.message: MessageView | None = None
        self.conversation_id = conversation_id
        self._backend = backend
        self._conversation_id = conversation_id
        self._reply = reply
        self._cache_source = cache_source
        self._cancelled = threading.Event()
        self.pieces_sent = 0
        # A regenerate or edit, as the real session does it: applied only when the reply is
        # saved; a stopped or failed one changes nothing and keeps its partial reply aside.
        self.replaces: tuple[int, int, str | None] | None = None  # (index, position, edited text)
        self.kept_aside = False
        self.refused: tuple[str, int, bool] | None = None  # (why, the message's id, conversation created)

    def cancel(self) -> None:
        self._cancelled.set()
        self._backend.pause_release.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[str]:
        b = self._backend
        if self.refused is not None:
            why, message_id, created = self.refused
            b._forget(self._conversation_id, message_id, created)
            b.streams_finished += 1
            raise InputError(why)
        start = time.perf_counter()
        ttft = 0.0
        text = ""
        finish = "stop"
        try:
            for i, piece in enumerate(split_pieces(self._reply)):
                if self._cancelled.is_set():
                    finish = "cancelled"
                    break
                if b.fail_generation_after is not None and i >= b.fail_generation_after:
                    finish = "error"
                    raise ModelError(b.fail_generation_message)
                if b.pause_after is not None and i == b.pause_after:
                    b.paused.set()
                    b.pause_release.wait(timeout=20)
                    if self._cancelled.is_set():
                        finish = "cancelled"
                        break
                if b.piece_delay:
                    time.sleep(b.piece_delay)
                if i == 0:
                    ttft = time.perf_counter() - start
                text += piece
                self.pieces_sent += 1
                yield piece
        finally:
            if text or finish != "error":
                stats = TurnStats(
                    prompt_tokens=b.context_used(self._conversation_id),
                    cached_tokens=b.cached_tokens,
                    prefilled_tokens=b.prefilled_tokens,
                    completion_tokens=len(split_pieces(text)),
                    cache_source=self._cache_source,  # type: ignore[arg-type]
                    cache_load_s=0.048 if self._cache_source == "disk" else 0.0,
                    ttft_s=b.fixed_ttft if b.fixed_ttft is not None else ttft,
                    decode_tps=b.fixed_tps,
                    finish_reason=finish,  # type: ignore[arg-type]
                    dropped_messages=b.dropped_messages,
                    codec="int8",
                )
                if self.replaces is not None and finish in ("cancelled", "error"):
                    b._keep_aside(self._conversation_id, self.replaces, text, stats)
                    self.kept_aside = True
                else:
                    if self.replaces is not None:
                        b._replace(self._conversation_id, self.replaces)
                    self.message = b._append(self._conversation_id, "assistant", text, stats)
            b.streams_finished += 1


class FakeBackend:
    """A ChatBackend held in memory. Every knob is a plain attribute tests may set."""

    def __init__(
        self,
        *,
        conversations: int = 0,
        replies: list[str] | None = None,
        piece_delay: float = 0.0,
        ready: bool = False,
    ):
        self.model_name = "fake-135M"
        self.device = "cpu float32"
        self.context_limit = 8192
        self.replies = list(replies or ["Hello! This is a **fake** reply."])
        self.piece_delay = piece_delay
        self.fail_load: str | None = None  # message of the ModelError load() raises
        self.fail_switch: str | None = None  # message of the ModelError switch_model() raises
        self.block_switch = False  # switch_model() waits for release_switch()
        self.switch_loses_model = False  # a failed switch cannot load the previous model back
        # What models() lists (the current model and two more: a GGUF seen before, whose
        # file is gone, and a local directory).
        self.model_list = [
            ModelInfo(
                name=self.model_name,
                kind="embedded",
                path="/fake/model.gguf",
                available=True,
                size_bytes=270_000_000,
                chunk_count=12,
                chunk_bytes=24_000_000,
            ),
            ModelInfo(
                name="/models/tinyllama.Q4_K_M.gguf",
                kind="gguf",
                path="/models/tinyllama.Q4_K_M.gguf",
                available=False,
                size_bytes=670_000_000,
                note="the file is gone; import it again",
            ),
            ModelInfo(
                name="/models/qwen2.5-0.5b-instruct",
                kind="dir",
                path="/models/qwen2.5-0.5b-instruct",
                available=True,
                size_bytes=990_000_000,
                chunk_count=3,
                chunk_bytes=5_500_000,
            ),
        ]
        self.block_load = False  # load() waits for release_load()
        self.fail_generation_after: int | None = None  # pieces before a generation fails
        self.fail_generation_message = "generation failed: out of memory"
        self.fail_send: Exception | None = None  # raised by send() itself
        self.pause_after: int | None = None  # pieces before a stream pauses
        self.paused = threading.Event()
        self.pause_release = threading.Event()
        self.cached_tokens = 3812
        self.prefilled_tokens = 14
        self.fixed_ttft: float | None = 0.061
        self.fixed_tps = 48.5
        self.dropped_messages = 0  # what each new turn's stats report as left out
        self.activity = ""  # what the backend says it is doing
        self.load_activity = ""  # `activity` while load() blocks
        self.builtin_system_prompt = "You are a helpful AI assistant named SmolLM."
        self.configured_system_prompt = ""  # chat.system_prompt: what send(None, ...) takes for None
        self._versions: dict[tuple[int, int], list[MessageView]] = {}  # replaced messages, oldest first
        self.calls: list[tuple[str, tuple[object, ...]]] = []
        self.streams: list[FakeStream] = []
        self.streams_finished = 0
        self.closed = 0
        self._ready = ready
        self._load_gate = threading.Event()
        self._switch_gate = threading.Event()
        self._lock = threading.RLock()
        self._convs: dict[int, ConversationSummary] = {}
        self._msgs: dict[int, list[MessageView]] = {}
        self._next_conv = 1
        self._next_msg = 1
        self._reply_index = 0
        self._live: set[int] = set()
        for i in range(conversations):
            self._seed(i)

    # -- test helpers -------------------------------------------------------------

    def _seed(self, i: int) -> None:
        topics = [
            "Rust lifetimes explained",
            "Sourdough starter schedule",
            "KV cache quantization",
            "Trip to Lisbon",
            "SQL window functions",
            "Poem about autumn",
        ]
        title = topics[i % len(topics)]
        conv = self.new_conversation(system_prompt="You are a helpful assistant.", title=title)
        t = FIXED_NOW - timedelta(hours=3 * i + 1, minutes=7 * i)
        self._append(conv.id, "user", f"Tell me about {title.lower()}.", None, at=t)
        stats = TurnStats(
            prompt_tokens=40 + i,
            prefilled_tokens=40 + i,
            completion_tokens=30,
            cache_source="none",
            ttft_s=0.2,
            decode_tps=25.0,
            codec="int8",
        )
        self._append(
            conv.id,
            "assistant",
            f"Here is a short overview of *{title.lower()}*:\n\n"
            "```python\nprint('hello')\n```\n\n- first point\n- second point",
            stats,
            at=t + timedelta(seconds=20),
        )
        states: tuple[Literal["live", "disk", "none"], ...] = ("disk", "none", "live")
        state = states[i % 3]
        self._convs[conv.id] = replace(
            self._convs[conv.id],
            created_at=t,
            updated_at=t + timedelta(seconds=20),
            token_count=1200 * (i + 1),
            cache_state=state,
            cache_bytes=(1200 * (i + 1) * 23040 // 2) if state == "disk" else 0,
        )

    def release_load(self) -> None:
        self._load_gate.set()

    def release_switch(self) -> None:
        self._switch_gate.set()

    def _append(
        self, cid: int, role: str, content: str, stats: TurnStats | None, at: datetime | None = None
    ) -> MessageView:
        with self._lock:
            msgs = self._msgs[cid]
            when = at or FIXED_NOW
            m = MessageView(
                id=self._next_msg,
                conversation_id=cid,
                position=len(msgs),
                role=role,  # type: ignore[arg-type]
                content=content,
                created_at=when,
                stats=stats,
            )
            self._next_msg += 1
            msgs.append(m)
            c = self._convs[cid]
            self._convs[cid] = replace(
                c, updated_at=when, message_count=len(msgs), token_count=self.context_used(cid)
            )
            return m

    def _conv(self, cid: int) -> ConversationSummary:
        if cid not in self._convs:
            raise NotFoundError(f"no conversation {cid}")
        return self._convs[cid]

    def _next_reply(self) -> str:
        reply = self.replies[self._reply_index % len(self.replies)]
        self._reply_index += 1
        return reply

    def _start(self, cid: int) -> FakeStream:
        source = (
            "memory" if cid in self._live else ("disk" if self._convs[cid].cache_state == "disk" else "none")
        )
        self._live.add(cid)
        self._convs[cid] = replace(self._convs[cid], cache_state="live")
        stream = FakeStream(self, cid, self._next_reply(), source)
        self.streams.append(stream)
        return stream

    # -- ChatBackend ----------------------------------------------------------------

    def load(self) -> None:
        self.calls.append(("load", ()))
        if self.block_load:
            self.activity = self.load_activity
            self._load_gate.wait(timeout=30)
            self.activity = ""
        if self.fail_load:
            raise ModelError(self.fail_load)
        self._ready = True

    @property
    def ready(self) -> bool:
        return self._ready

    def list_conversations(self, query: str = "", limit: int = 200) -> list[ConversationSummary]:
        with self._lock:
            convs = [c for c in self._convs.values() if query.lower() in c.title.lower()]
        convs.sort(key=lambda c: (c.updated_at, c.id), reverse=True)
        return convs[:limit]

    def get_conversation(self, conversation_id: int) -> ConversationSummary:
        return self._conv(conversation_id)

    def messages(self, conversation_id: int) -> list[MessageView]:
        self._conv(conversation_id)
        return [m for m in self._msgs[conversation_id] if m.role != "system"]

    def new_conversation(
        self, system_prompt: str | None = None, title: str | None = None
    ) -> ConversationSummary:
        with self._lock:
            cid = self._next_conv
            self._next_conv += 1
            conv = ConversationSummary(
                id=cid,
                title=title or "New conversation",
                model=self.model_name,
                system_prompt=system_prompt or "",
                created_at=FIXED_NOW,
                updated_at=FIXED_NOW,
            )
            self._convs[cid] = conv
            self._msgs[cid] = []
            self.calls.append(("new_conversation", (system_prompt, title)))
            return conv

    def rename(self, conversation_id: int, title: str) -> None:
        self._convs[conversation_id] = replace(self._conv(conversation_id), title=title)
        self.calls.append(("rename", (conversation_id, title)))

    def delete(self, conversation_id: int) -> None:
        self._conv(conversation_id)
        del self._convs[conversation_id]
        del self._msgs[conversation_id]
        self.calls.append(("delete", (conversation_id,)))

    def set_system_prompt(self, conversation_id: int, system_prompt: str) -> None:
        self._convs[conversation_id] = replace(self._conv(conversation_id), system_prompt=system_prompt)
        self.calls.append(("set_system_prompt", (conversation_id, system_prompt)))

    def send(
        self,
        conversation_id: int | None,
        text: str,
        settings: GenerationSettings | None = None,
        system_prompt: str | None = None,
    ) -> FakeStream:
        """As the real Chat: None creates the conversation with the message; a message
        longer than the context is refused when the turn starts, and the turn then removes
        what it saved (the message, and a conversation it created)."""
        self.calls.append(("send", (conversation_id, text)))
        if self.fail_send is not None:
            raise self.fail_send
        created = conversation_id is None
        if conversation_id is None:
            prompt = self.configured_system_prompt if system_prompt is None else system_prompt  # as Chat
            conversation_id = self.new_conversation(system_prompt=prompt).id
        conv = self._conv(conversation_id)
        message = self._append(conversation_id, "user", text, None)
        if conv.title == "New conversation":
            self._convs[conversation_id] = replace(self._convs[conversation_id], title=text.strip()[:40])
        stream = self._start(conversation_id)
        tokens = self.count_tokens(text) or 0
        if tokens > self.context_limit:
            stream.refused = (
                f"the message is {tokens:,} tokens but the context holds {self.context_limit:,}; shorten it",
                message.id,
                created,
            )
        return stream

    def _forget(self, cid: int, message_id: int, created: bool) -> None:
        with self._lock:
            if created:
                del self._convs[cid]
                del self._msgs[cid]
            else:
                self._msgs[cid] = [m for m in self._msgs[cid] if m.id != message_id]

    def regenerate(self, conversation_id: int, settings: GenerationSettings | None = None) -> FakeStream:
        self.calls.append(("regenerate", (conversation_id,)))
        msgs = self._msgs[self._conv(conversation_id).id]
        stream = self._start(conversation_id)
        if msgs and msgs[-1].role == "assistant":
            stream.replaces = (len(msgs) - 1, msgs[-1].position, None)
        return stream

    def edit(self, message_id: int, text: str, settings: GenerationSettings | None = None) -> FakeStream:
        self.calls.append(("edit", (message_id, text)))
        for cid, msgs in self._msgs.items():
            for i, m in enumerate(msgs):
                if m.id == message_id:
                    stream = self._start(cid)
                    stream.replaces = (i, m.position, text)
                    return stream
        raise NotFoundError(f"no message {message_id}")

    def _replace(self, cid: int, replaces: tuple[int, int, str | None]) -> None:
        """Apply a regenerate (drop the reply) or an edit (new text, later messages go);
        what goes is kept as an earlier version."""
        i, position, text = replaces
        msgs = self._msgs[cid]
        with self._lock:
            self._versions.setdefault((cid, position), []).append(msgs[i])
            if text is None:
                del msgs[i:]
            else:
                msgs[i] = replace(msgs[i], id=self._next_msg, content=text)
                self._next_msg += 1
                del msgs[i + 1 :]

    def _keep_aside(
        self, cid: int, replaces: tuple[int, int, str | None], text: str, stats: TurnStats
    ) -> None:
        """A stopped regenerate or edit: the partial reply becomes an earlier version."""
        i, position, edited = replaces
        reply_position = position if edited is None else position + 1
        with self._lock:
            kept = MessageView(self._next_msg, cid, reply_position, "assistant", text, FIXED_NOW, stats)
            self._next_msg += 1
            self._versions.setdefault((cid, reply_position), []).append(kept)

    def context_used(self, conversation_id: int) -> int:
        return sum(len(m.content.split()) * 2 for m in self._msgs.get(conversation_id, []))

    def count_tokens(self, text: str) -> int | None:
        return len(text.split()) * 2 if self._ready else None

    @property
    def default_system_prompt(self) -> str:
        return self.builtin_system_prompt if self._ready else ""

    def _find(self, message_id: int) -> tuple[int, int]:
        for cid, msgs in self._msgs.items():
            for i, m in enumerate(msgs):
                if m.id == message_id:
                    return cid, i
        raise NotFoundError(f"no message {message_id}")

    def models(self) -> list[ModelInfo]:
        return list(self.model_list)

    def switch_model(self, name: str, conversation_id: int | None = None) -> None:
        """Like the session: not ready while the new model loads; a failure keeps the old one."""
        self.calls.append(("switch_model", (name, conversation_id)))
        if conversation_id is not None:
            self._conv(conversation_id)
        self._ready = False
        try:
            if self.block_switch:
                self.activity = self.load_activity
                self._switch_gate.wait(timeout=30)
                self.activity = ""
            if self.fail_switch:
                raise ModelError(self.fail_switch)
            self.model_name = name
            if conversation_id is not None:
                with self._lock:
                    self._convs[conversation_id] = replace(self._convs[conversation_id], model=name)
        finally:
            self._ready = not (self.fail_switch and self.switch_loses_model)

    def versions(self, message_id: int) -> list[MessageView]:
        cid, i = self._find(message_id)
        return list(self._versions.get((cid, self._msgs[cid][i].position), []))

    def restore(self, message_id: int, version_id: int) -> None:
        """The version replaces the message (which becomes a version); later messages go."""
        self.calls.append(("restore", (message_id, version_id)))
        cid, i = self._find(message_id)
        msgs = self._msgs[cid]
        kept = self._versions.setdefault((cid, msgs[i].position), [])
        chosen = next((v for v in kept if v.id == version_id), None)
        if chosen is None:
            raise NotFoundError(f"message {message_id} has no version {version_id}")
        kept.remove(chosen)
        kept.append(msgs[i])
        del msgs[i:]
        msgs.append(chosen)

    def export(self, conversation_id: int, fmt: Literal["md", "json"] = "md") -> str:
        conv = self._conv(conversation_id)
        parts = [f"# {conv.title}\n"]
        for m in self._msgs[conversation_id]:
            parts.append(f"## {m.role}\n\n{m.content}\n")
        return "\n".join(parts)

    def close(self) -> None:
        self.closed += 1
        self._load_gate.set()
        self._switch_gate.set()
        self.pause_release.set()


def make_settings(**overrides: object) -> Settings:
    """The shipped defaults (no user file, no environment), with `overrides` by dotted key."""
    settings = load_settings(user_file=Path("/nonexistent/chatkv-test-config.toml"), environ={})
    for key, value in overrides.items():
        settings.set(key, value)
    return settings


def make_app(
    backend: FakeBackend | None = None, conversation_id: int | None = None, **overrides: object
) -> ChatKVApp:
    """The real app over a fake backend, with the fake's fixed clock."""
    from chatkv.ui import create_app

    backend = backend if backend is not None else FakeBackend(conversations=4, ready=True)
    return create_app(backend, make_settings(**overrides), conversation_id, now=lambda: FIXED_NOW)


if TYPE_CHECKING:
    from chatkv.ui.app import ChatKVApp

    def _implements_the_front_ends_contract(backend: FakeBackend) -> ChatBackend:
        return backend  # the type checker fails here when the fake drifts from ChatBackend
