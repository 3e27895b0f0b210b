"""The contract between the front ends (CLI, TUI, batch) and the session layer.

Plain data and protocols only: importing this module never imports torch, so the
TUI and its tests can run against a fake backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

CacheSource = Literal["memory", "disk", "remote", "none"]  # remote: chunks from cache.url
FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass
class GenerationSettings:
    """Sampling and stopping for one reply. temperature 0 means greedy."""

    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    seed: int = -1
    stop: list[str] = field(default_factory=list)

    @classmethod
    def from_settings(cls, settings: Any) -> GenerationSettings:
        """The [generation] section of chatkv.config.Settings."""
        g = settings.generation
        return cls(
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            top_p=g.top_p,
            top_k=g.top_k,
            seed=g.seed,
            stop=list(g.stop),
        )


@dataclass
class TurnStats:
    """What one assistant turn cost and where its cache came from."""

    prompt_tokens: int = 0  # tokens of the rendered conversation before the reply
    cached_tokens: int = 0  # of those, taken from a cache
    prefilled_tokens: int = 0  # of those, run through the model
    completion_tokens: int = 0
    cache_source: CacheSource = "none"
    cache_load_s: float = 0.0  # time to attach the cached prefix (disk read + dequantize)
    ttft_s: float = 0.0  # from the start of the turn to the first token
    decode_tps: float = 0.0  # tokens per second after the first
    finish_reason: FinishReason = "stop"
    dropped_messages: int = 0  # oldest turns left out to fit the context
    codec: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MessageView:
    id: int
    conversation_id: int
    position: int
    role: Literal["system", "user", "assistant"]
    content: str
    created_at: datetime
    stats: TurnStats | None = None  # assistant messages only


@dataclass
class ConversationSummary:
    id: int
    title: str
    model: str
    system_prompt: str
    created_at: datetime
    updated_at: datetime
    message_count: int = 0
    token_count: int = 0  # tokens covered by its newest cache (0 if unknown)
    cache_state: Literal["live", "disk", "none"] = "none"
    cache_bytes: int = 0  # bytes of its chunks on disk


@dataclass
class ModelInfo:
    """A model chatkv can use offline (`chatkv models`, the TUI's model picker)."""

    name: str  # what --model / model.name takes
    kind: Literal["embedded", "gguf", "dir", "hub", "converted"]
    path: str  # its weights ("" when not installed)
    available: bool  # usable now (installed, files still there)
    size_bytes: int = 0  # its weights on disk
    converted_bytes: int = 0  # the converted safetensors copy of a GGUF, when kept
    chunk_count: int = 0  # KV chunks on disk made with it
    chunk_bytes: int = 0
    fingerprints: list[str] = field(default_factory=list)
    last_loaded: str = ""  # ISO time, "" when never loaded
    note: str = ""  # e.g. how to install it


class TurnStream(Protocol):
    """One assistant reply being generated. Iterate it for text pieces as they come.

    After iteration ends, `message` holds the saved assistant message (with stats),
    also when the turn was cancelled (the partial reply is kept). `cancel()` may be
    called from any thread; generation stops before the next token.
    """

    message: MessageView | None
    # A regenerate or edit that was stopped (or failed) changes nothing: `message` is None
    # and what it streamed is kept as an earlier version of the reply it would replace.
    kept_aside: bool
    conversation_id: int  # set before iteration starts (also for a conversation `send` created)

    def __iter__(self) -> Iterator[str]: ...

    def cancel(self) -> None: ...


class ChatBackend(Protocol):
    """What a front end needs. `chatkv.session.Chat` implements it."""

    model_name: str

    @property
    def device(self) -> str:
        """e.g. "cpu float32", "cuda bfloat16"; "loading" before the model is loaded."""
        ...

    @property
    def context_limit(self) -> int:
        """The model's context in tokens (the configured one, or 0, before it is loaded)."""
        ...

    def load(self) -> None:
        """Load the model (blocking; call from a worker thread). Idempotent."""

    @property
    def ready(self) -> bool: ...

    def list_conversations(self, query: str = "", limit: int = 200) -> list[ConversationSummary]: ...

    def get_conversation(self, conversation_id: int) -> ConversationSummary: ...

    def messages(self, conversation_id: int) -> list[MessageView]: ...

    def new_conversation(
        self, system_prompt: str | None = None, title: str | None = None
    ) -> ConversationSummary: ...

    def rename(self, conversation_id: int, title: str) -> None: ...

    def delete(self, conversation_id: int) -> None: ...

    def set_system_prompt(self, conversation_id: int, system_prompt: str) -> None: ...

    def send(
        self,
        conversation_id: int | None,
        text: str,
        settings: GenerationSettings | None = None,
        system_prompt: str | None = None,
    ) -> TurnStream:
        """Append a user message and start the reply. The user message is saved before
        this returns, so it survives any failure of generation.

        `conversation_id=None` creates the conversation (with `system_prompt`, titled from
        `text`) together with the message; a refused message creates nothing. The stream's
        `conversation_id` is set before iteration starts."""

    def regenerate(self, conversation_id: int, settings: GenerationSettings | None = None) -> TurnStream:
        """Drop the last assistant reply and generate it again (the prefix comes from cache)."""

    def edit(self, message_id: int, text: str, settings: GenerationSettings | None = None) -> TurnStream:
        """Replace a user message, drop everything after it, and reply again."""

    def models(self) -> list[ModelInfo]:
        """The models that can be used offline, with their cache chunks on disk."""

    def switch_model(self, name: str, conversation_id: int | None = None) -> None:
        """Load model `name` (a `models()` name) in place of the current one (blocking; call from
        a worker thread) and record it as the conversation's model. The conversation's cache
        starts anew (chunks are keyed by the model's fingerprint). Raises ModelError, keeping
        the previous model, when `name` cannot be loaded."""

    def context_used(self, conversation_id: int) -> int:
        """Tokens the conversation currently occupies (estimate before the model loads)."""

    def count_tokens(self, text: str) -> int | None:
        """Tokens `text` would add as a user message; None while the model is not loaded."""

    @property
    def default_system_prompt(self) -> str:
        """The model's built-in system prompt, used when a conversation's own is "" ("" before load)."""
        ...

    @property
    def activity(self) -> str:
        """What the backend is doing right now, for the UI to show while it waits, e.g.
        "converting weights 40%", "prefilling 1,024 / 4,096 tokens"; "" when idle or unknown.
        Read from the UI thread while `load()` or a turn runs in a worker: keep it a plain str."""
        ...

    def versions(self, message_id: int) -> list[MessageView]:
        """Earlier versions of a message replaced by regenerate or edit, oldest first."""
        ...

    def restore(self, message_id: int, version_id: int) -> None:
        """Make an earlier version current again."""

    def export(self, conversation_id: int, fmt: Literal["md", "json"] = "md") -> str: ...

    def close(self) -> None:
        """Stop background work (spills) and flush; safe to call twice."""
