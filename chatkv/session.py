"""The session: where a turn is prepared, run and saved, and the only place where
transcript, cache and engine meet.

`Chat` implements `chatkv.api.ChatBackend` for the CLI, the TUI and batch. A turn reads
in two places: `Chat.send` (or `regenerate`, `edit`) saves the user's message and makes a
`chatkv.turn.Turn`, whose iteration renders the conversation (`render`, `fit`), attaches the
longest cached prefix (`prepare`), runs the engine and saves the reply (`journal.apply`),
then keeps and spills the cache. Batch prepares and saves its lines through the same
`prepare`, `prepare_prefix`, `hold` and `save_exchange`.

The rest of the front ends' contract is in two parts of `Chat`: chatkv.conversations
(listing, reading, naming, deleting, versions, export) and chatkv.housekeeping (models and
switching them, search, import, the chunk store's upkeep).

The transcript is the source of truth: a cache can always be rebuilt by prefill,
a message cannot be rebuilt at all, so messages are saved before and after
generation and a cache problem never costs one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING

from chatkv import journal, lease
from chatkv.api import ChatBackend, GenerationSettings, MessageView, TurnStats
from chatkv.config import Settings
from chatkv.conversations import Conversations
from chatkv.conversations import message_dict as message_dict  # re-exported: `chatkv show --json`
from chatkv.engine.defaults import generation_defaults
from chatkv.errors import InputError
from chatkv.housekeeping import Housekeeping
from chatkv.kv import prefetch as kv_prefetch
from chatkv.paths import kv_dir
from chatkv.store import Store
from chatkv.store.common import new_turn_id
from chatkv.store.db import database_target
from chatkv.turn import Replace, Turn

if TYPE_CHECKING:
    from chatkv.engine.model import LoadedModel
    from chatkv.kv.chunks import Layers
    from chatkv.kv.live import Cache
    from chatkv.kv.manager import Attached, KVManager
    from chatkv.kv.prefetch import Prefetch

log = logging.getLogger(__name__)


class Chat(Conversations, Housekeeping):
    """The session layer over a store, a model (loaded on demand) and the KV layer."""

    def __init__(self, settings: Settings, store: Store | None = None, lm: LoadedModel | None = None):
        """`lm`: an already loaded model (tests and benchmarks share one); else loaded by `load()`."""
        self.settings = settings
        self.store = store or Store(database_target(settings))  # [store] url, else the data dir's SQLite
        self.model_name = settings.model.name
        self._preloaded = lm
        self.lm: LoadedModel | None = None
        self.kv: KVManager | None = None
        self._load_lock = threading.Lock()
        # The model's recommended sampling where the user set none (chatkv.engine.defaults).
        self.defaults = generation_defaults(settings)
        # What the backend is doing, for a front end to show while it waits; "" when idle.
        self.activity = ""
        # Told (label, done, total) while the model converts or loads (total 0: unknown) and
        # while a long prompt prefills (tokens); done is -1 or total at the end. Called from
        # the thread doing the work. chatkv.progress has adapters for it.
        self.on_progress: Callable[[str, int, int], None] | None = None
        self.prefetched: Prefetch | None = None  # see `prefetch`; kept for its timings
        journal.replay(self.store)  # replies an earlier run streamed but could not save

    # -- model ---------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.lm is not None

    @property
    def device(self) -> str:
        return self.lm.description if self.lm else "loading"

    @property
    def context_limit(self) -> int:
        return self.lm.context_limit if self.lm else (self.settings.model.context or 0)

    def progress(self, label: str, done: int, total: int) -> None:
        """Long work reports here: `activity` says it ("prefill 1,024 / 4,096"), and
        `on_progress`, when a front end set it, is told (label, done, total)."""
        finished = done < 0 or (total > 0 and done >= total)
        self.activity = "" if finished else (f"{label} {done:,} / {total:,}" if total else label)
        if self.on_progress is not None:
            self.on_progress(label, done, total)

    def loaded(self) -> tuple[LoadedModel, KVManager]:
        """The model and the KV layer, loading them first if needed."""
        self.load()
        assert self.lm is not None and self.kv is not None
        return self.lm, self.kv

    def prefetch(self, conversation_id: int) -> None:
        """Before `load`: read (and tokenize) the conversation while the model loads (kv.prefetch)."""
        if self.lm is None:
            render = lambda: self.render(conversation_id)  # noqa: E731
            self.prefetched = kv_prefetch.start(
                self.store, kv_dir(), conversation_id, self.settings, self._preloaded, render
            )

    def load(self, warm: bool = True, lean_only: bool = True) -> None:
        """Load the model and the KV layer (blocking; idempotent; thread-safe). `warm`: warm it up aside
        (engine.model.warm_up) while a user types. lean_only: as load_model's (batch: False)."""
        with self._load_lock:
            if self.lm is not None:
                return
            pre = self.prefetched
            if pre is not None:  # not two threads importing transformers at once
                pre.imported.wait()
            from chatkv.engine.model import load_model, warm_up
            from chatkv.kv.manager import KVManager
            from chatkv.kv.objects import tiers_for
            from chatkv.progress import CallbackProgress

            m, c = self.settings.model, self.settings.cache
            lm = self._preloaded or load_model(
                m.name,
                **{k: getattr(m, k) for k in ("device", "dtype", "load_in", "context")},
                progress=CallbackProgress(self.progress),
                on_tokenizer=pre.tokenize if pre is not None else None,
                lean_only=lean_only,
            )
            self.kv = KVManager(
                self.store,
                kv_dir(),
                lm,
                codec=c.codec,
                chunk_tokens=c.chunk_tokens,
                live_bytes=c.live_bytes,
                disk_bytes=c.disk_bytes,
                tiers=(pre.opened_tiers() if pre is not None else None) or tiers_for(kv_dir(), c),
            )
            self.kv.prefetch = pre
            lean = "aside" if self.defaults.max_new_tokens > 1 else "none"  # first tokens need no decode step
            self.kv.warm_up = warm_up(lm, lean) if self._preloaded is None and warm else None
            self.lm = lm
            self.activity = ""

    # -- turns ---------------------------------------------------------------

    def send(
        self,
        conversation_id: int | None,
        text: str,
        settings: GenerationSettings | None = None,
        system_prompt: str | None = None,
    ) -> Turn:
        """Append a user message and return the turn that answers it.

        `conversation_id` None starts a new conversation (with `system_prompt`, else the
        configured one) together with the message, so nothing is created for a message that
        is refused. The message is saved before this returns; if the turn then produces
        nothing, it is removed again (and a new conversation with it) and the front end gives
        the text back. Raises InputError, NotFoundError, BusyError.
        """
        if not text.strip():
            raise InputError("the message is empty; type something to send")
        if conversation_id is None:
            prompt = self.settings.chat.system_prompt if system_prompt is None else system_prompt
            conv, msg = self.store.start_conversation(
                text, model=self.model_name, system_prompt=prompt, settings=asdict(self.defaults)
            )
            held = lease.acquire(conv.id, engine=self.store.engine)
            return Turn(
                self, conv.id, settings or self.defaults, held, new_user_message=msg, new_conversation=True
            )
        self.store.get_conversation(conversation_id)  # raises NotFoundError before anything is written
        held = self.hold(conversation_id)
        try:
            msg = self.store.add_message(conversation_id, "user", text)
        except BaseException:
            held.release()
            raise
        return Turn(self, conversation_id, settings or self.defaults, held, new_user_message=msg)

    def prepare(
        self, conversation_id: int | None, ids: list[int], dropped: int = 0, whole: bool = False
    ) -> tuple[Attached, TurnStats]:
        """Prepare a turn over the prompt `ids` (rendered and fitted by `render` and `fit`):
        attach the longest cached prefix — the conversation's live cache, else the chunk
        store — and start the turn's statistics (prompt, cached and prefilled tokens, where
        the cache came from, messages left out). The cache covers at most len-1 tokens, so
        that prefilling the rest gives the next-token logits; `whole` lets it cover all of
        `ids` (batch's shared prefix, which its lines continue each on its own)."""
        _, kv = self.loaded()
        att = kv.attach(conversation_id, ids, whole=whole)
        stats = TurnStats(
            prompt_tokens=len(ids),
            cached_tokens=att.cached,
            prefilled_tokens=len(ids) - att.cached,
            cache_source=att.source,
            cache_load_s=att.load_s,
            dropped_messages=dropped,
            codec=kv.policy.name,
        )
        return att, stats

    def prepare_prefix(self, tokens: list[int], spill: bool = True) -> tuple[TurnStats, Layers, int]:
        """Prepare a prefix that several turns continue each on their own (batch's shared
        prefix; it belongs to no conversation): attach what is cached of it, prefill the rest
        and (with `spill`) spill it, so the next run attaches it from disk. Returns its
        statistics (cached tokens, from where), its cache, per layer (keys, values) each
        (1, H, len(tokens), D), and how many of its first positions came from lossy chunks."""
        from chatkv.engine.generate import prefill
        from chatkv.kv import live

        lm, kv = self.loaded()
        att, stats = self.prepare(None, tokens, whole=True)
        if att.cached < len(tokens):
            prefill(lm.model, tokens[att.cached :], att.cache, att.cached)
            if spill:
                kv.spill(None, tokens, att.cache)
        return stats, live.layers_of(att.cache), kv.inexact(att.cache)

    def hold(self, conversation_id: int) -> lease.Lease:
        """Take the conversation for one turn (no other turn, in this process or another, runs
        in it until the lease is released), saving first any reply that a dead turn left in
        its journal. Raises BusyError."""
        held = lease.acquire(conversation_id, engine=self.store.engine)
        try:
            journal.replay(self.store, conversation_id)
            if journal.pending(conversation_id):  # a turn now would come before that reply
                raise lease.BusyError(journal.PENDING.format(conversation_id))
        except BaseException:
            held.release()
            raise
        return held

    def save_exchange(
        self,
        conversation_id: int | None,
        messages: list[dict[str, str]],
        reply: str,
        stats: TurnStats,
        tokens: list[int],
        cache: Cache | None,
        inexact: int = 0,
        shared: list[int] | None = None,
    ) -> int:
        """Save a turn that batch decoded itself: `messages` (a continued conversation's new
        question, or every message of a new conversation, its system prompt first) and the
        reply, in one transaction; then keep its cache for spilling. A continued conversation
        must be held (`hold`). Returns the conversation id."""
        turn_id = new_turn_id()
        if conversation_id is None:
            system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
            rest = [(m["role"], m["content"]) for m in messages[1 if system else 0 :]]
            conv, _ = self.store.save_new_conversation(
                rest,
                reply,
                stats,
                turn_id,
                model=self.model_name,
                system_prompt=system,
                settings=asdict(self.defaults),
            )
            conversation_id = conv.id
        else:
            pairs = [(m["role"], m["content"]) for m in messages]
            self.store.finish_turn(conversation_id, reply, stats, turn_id, add=pairs, model=self.model_name)
        try:  # saved: a failure now costs a prefill, never a record saying the save failed
            if self.kv is not None and shared:  # the prefix batch spilled on its own: this one's too
                self.kv.claim(conversation_id, shared)
            if self.kv is not None and cache is not None:
                self.kv.spill(conversation_id, tokens, cache, inexact)  # inexact: see KVManager.spill
        except Exception as e:
            log.warning("conversation %d is saved, but not its cache: %s", conversation_id, e)
        return conversation_id

    def regenerate(self, conversation_id: int, settings: GenerationSettings | None = None) -> Turn:
        """Generate the last reply again. The old reply becomes an earlier version only when the
        new one is saved; a stopped or failed regeneration leaves the conversation as it was."""

        def change(msgs: list[MessageView]) -> Replace:
            if not msgs or not any(m.role == "user" for m in msgs):
                raise InputError("there is no reply to regenerate yet; send a message first")
            last = msgs[-1]
            old = [last.id] if last.role == "assistant" else []
            end = last.position if old else last.position + 1
            return Replace(last.position if old else None, set_aside=old, reply_position=end)

        return self._replacing(conversation_id, settings, change)

    def edit(self, message_id: int, text: str, settings: GenerationSettings | None = None) -> Turn:
        """Replace a user message and reply again. The old message and everything after it
        become earlier versions when the new reply is saved (`later_messages` says how many
        follow it, for the front end to warn about); a stopped or failed turn changes nothing."""
        if not text.strip():
            raise InputError("the edited message is empty; type something or cancel the edit")
        msg = self.store.get_message(message_id)
        if msg.role != "user":
            raise InputError(f"message {message_id} is an assistant reply; only your own can be edited")
        at = msg.position
        return self._replacing(
            msg.conversation_id,
            settings,
            lambda msgs: Replace(at + 1, message_id, text, [m.id for m in msgs if m.position >= at], at + 1),
        )

    def _replacing(
        self, cid: int, settings: GenerationSettings | None, change: Callable[[list[MessageView]], Replace]
    ) -> Turn:
        """A turn that replaces part of the conversation, `change(its messages)`, read once the
        conversation is held: holding saves a reply a failed save left in its journal, and that
        reply is then the one replaced (read before, it was replied to again: two in a row)."""
        held = self.hold(cid)
        try:
            return Turn(self, cid, settings or self.defaults, held, replace=change(self.store.messages(cid)))
        except BaseException:
            held.release()
            raise

    def render(self, conversation_id: int, replace: Replace | None = None) -> list[dict[str, str]]:
        """The conversation as chat-template messages, with a pending `replace` applied."""
        conv = self.store.get_conversation(conversation_id)
        out = [{"role": "system", "content": conv.system_prompt}] if conv.system_prompt else []
        for m in self.store.messages(conversation_id):
            if replace is not None and replace.position is not None and m.position >= replace.position:
                break
            content = m.content
            if replace is not None and m.id == replace.message_id and replace.text is not None:
                content = replace.text
            out.append({"role": m.role, "content": content})
        return out

    def tokenize(self, messages: list[dict[str, str]]) -> list[int]:
        from chatkv.engine.model import chat_ids

        return chat_ids(self.loaded()[0].tokenizer, messages)

    def fit(self, messages: list[dict[str, str]], max_new_tokens: int) -> tuple[list[int], int]:
        """Token ids of the prompt, dropping the oldest turns after the system prompt
        while prompt plus room for the reply would overflow the context.

        Room kept for the reply: max_new_tokens, but at most a quarter of the context.
        Returns (ids, number of messages dropped). Raises InputError when even the
        last message alone does not fit.
        """
        limit = self.loaded()[0].context_limit
        room = min(max_new_tokens, limit // 4)
        ids = self.tokenize(messages)
        dropped = 0
        head = 1 if messages and messages[0]["role"] == "system" else 0
        while len(ids) + room > limit and len(messages) - head > 1:
            # drop the oldest message after the system prompt (and a reply left leading)
            messages = messages[:head] + messages[head + 1 :]
            dropped += 1
            while len(messages) - head > 1 and messages[head]["role"] == "assistant":
                messages = messages[:head] + messages[head + 1 :]
                dropped += 1
            ids = self.tokenize(messages)
        if len(ids) >= limit:
            around = "the system prompt and the chat template" if head else "the chat template"
            raise InputError(
                f"the message takes {len(ids):,} tokens with {around}, "
                f"but the model's context holds {limit:,}; "
                "shorten it (or raise model.context if the model allows more)"
            )
        return ids, dropped

    def context_used(self, conversation_id: int) -> int:
        lm = self.lm  # read once, and never wait for a load here (the UI thread calls this)
        if lm is None:
            conv = self.store.get_conversation(conversation_id)
            if conv.token_count:
                return conv.token_count
            return sum(len(m["content"]) for m in self.render(conversation_id)) // 4
        from chatkv.engine.model import chat_ids

        return len(chat_ids(lm.tokenizer, self.render(conversation_id)))

    # -- shutdown --------------------------------------------------------------

    def flush(self) -> None:
        """Wait until every queued spill is on disk."""
        if self.kv is not None:
            self.kv.flush()

    def close(self) -> None:
        if self.prefetched is not None:
            self.prefetched.cancel()
        if self.kv is not None:
            self.kv.close()


if TYPE_CHECKING:

    def _implements_the_front_ends_contract(chat: Chat) -> ChatBackend:
        return chat  # the type checker fails here when Chat drifts from chatkv.api.ChatBackend
