"""One conversation's turn: the only place where transcript, cache and engine meet.

`Chat` implements `chatkv.api.ChatBackend` for the CLI, the TUI and batch.
The transcript is the source of truth: a cache can always be rebuilt by prefill,
a message cannot be rebuilt at all, so messages are saved before and after
generation and a cache problem never costs one.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import exc

from chatkv import journal, lease
from chatkv.api import (
    ChatBackend,
    ConversationSummary,
    GenerationSettings,
    MessageView,
    ModelInfo,
    TurnStats,
)
from chatkv.config import Settings
from chatkv.engine.defaults import generation_defaults
from chatkv.errors import InputError
from chatkv.paths import db_path, kv_dir
from chatkv.store import Store
from chatkv.store.common import new_turn_id
from chatkv.turn import Replace, Turn

if TYPE_CHECKING:
    from transformers import DynamicCache

    from chatkv.engine.model import LoadedModel
    from chatkv.imports import ImportReport
    from chatkv.kv.maintenance import GcReport, RebuildReport, VerifyReport
    from chatkv.kv.manager import Attached, KVManager
    from chatkv.kv.prefetch import Prefetch
    from chatkv.store.search import SearchHit

log = logging.getLogger(__name__)


class Chat:
    """The session layer over a store, a model (loaded on demand) and the KV layer."""

    def __init__(self, settings: Settings, store: Store | None = None, lm: LoadedModel | None = None):
        """`lm`: an already loaded model (tests and benchmarks share one); else loaded by `load()`."""
        self.settings = settings
        self.store = store or Store(db_path())
        self.model_name = settings.model.name
        self._preloaded = lm
        self.lm: LoadedModel | None = None
        self.kv: KVManager | None = None
        self._load_lock = threading.Lock()
        # The model's recommended sampling where the user set none (chatkv.engine.defaults).
        self.defaults = generation_defaults(settings)
        # What the backend is doing, for a front end to show while it waits (a plain str,
        # read from the UI thread); "" when idle.
        self.activity = ""
        # Told (label, done, total) while the model converts or loads (total 0: unknown) and
        # while a long prompt prefills (tokens); done is -1 or total at the end. Called from
        # the thread doing the work. chatkv.progress has adapters for it.
        self.on_progress: Callable[[str, int, int], None] | None = None
        # A conversation's chunks being read while the model loads (`prefetch`), handed to
        # the KV layer by `load`; kept after for its timings.
        self.prefetched: Prefetch | None = None
        self._warm_up: threading.Thread | None = None  # the first forward, run by `load`
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
        """Start reading the conversation's saved KV cache in the background, so that it is
        in memory when the model has loaded (chatkv.kv.prefetch). Call before `load`; does
        nothing once a model is loaded. Its next turn checks and uses what was read."""
        if self.lm is not None:
            return
        from chatkv.kv.prefetch import start

        m = self.settings.model
        old, self.prefetched = self.prefetched, None
        if old is not None:
            old.cancel()
        self.prefetched = start(
            self.store,
            kv_dir(),
            conversation_id,
            self.settings.cache.codec,
            model=(m.name, m.device, m.dtype, m.load_in),
            lm=self._preloaded,
        )

    def load(self) -> None:
        """Load the model and the KV layer (blocking; idempotent; thread-safe)."""
        with self._load_lock:
            if self.lm is not None:
                return
            if self.prefetched is not None:  # not two threads importing transformers at once
                self.prefetched.imported.wait()
            from chatkv.engine.model import load_model
            from chatkv.kv.manager import KVManager
            from chatkv.progress import CallbackProgress

            m, c = self.settings.model, self.settings.cache
            progress = CallbackProgress(self.progress)
            aside: list[threading.Thread] = []
            lm = self._preloaded or load_model(
                m.name,
                device=m.device,
                dtype=m.dtype,
                load_in=m.load_in,
                context=m.context,
                progress=progress,
                on_tokenizer=lambda tok: aside.extend(self._pretokenize(tok)),
            )
            for thread in aside:
                thread.join()  # done with the tokenizer before anyone else uses it
            self.kv = KVManager(
                self.store,
                kv_dir(),
                lm,
                codec=c.codec,
                chunk_tokens=c.chunk_tokens,
                live_bytes=c.live_bytes,
                disk_bytes=c.disk_bytes,
            )
            if self.prefetched is not None and not self.prefetched.taken:
                self.kv.prefetch = self.prefetched
            if self._preloaded is None:  # a fresh model: its first forward runs now, aside
                from chatkv.engine.model import warm_up

                self._warm_up = warm_up(lm)
            self.lm = lm
            self.activity = ""

    def _pretokenize(self, tokenizer: Any) -> list[threading.Thread]:
        """While the weights load: tokenize the prefetched conversation's history in a
        thread, so that its turn finds the ids remembered (chatkv.engine.model.chat_ids)."""
        pre = self.prefetched
        if pre is None:
            return []
        from chatkv.engine.model import chat_ids

        def run() -> None:
            try:
                chat_ids(tokenizer, self.render(pre.conversation_id))
            except Exception as e:  # only a head start: the turn tokenizes what is missing
                log.debug("could not tokenize conversation %s ahead: %s", pre.conversation_id, e)

        thread = threading.Thread(target=run, name="chatkv-pretokenize", daemon=True)
        thread.start()
        return [thread]

    # -- conversations -------------------------------------------------------

    def list_conversations(self, query: str = "", limit: int = 200) -> list[ConversationSummary]:
        convs = self.store.list_conversations(query=query, limit=limit)
        return [self._mark_live(c) for c in convs]

    def latest_conversation(self) -> ConversationSummary | None:
        """The most recently updated conversation (None when there is none)."""
        found = self.list_conversations(limit=1)
        return found[0] if found else None

    def get_conversation(self, conversation_id: int) -> ConversationSummary:
        return self._mark_live(self.store.get_conversation(conversation_id))

    def _mark_live(self, conv: ConversationSummary) -> ConversationSummary:
        kv = self.kv  # read once: a model switch may drop it meanwhile
        if kv is not None and conv.id in kv.pool:
            return replace(
                conv, cache_state="live", token_count=kv.pool.peek_tokens(conv.id) or conv.token_count
            )
        return conv

    def messages(self, conversation_id: int) -> list[MessageView]:
        return self.store.messages(conversation_id)

    def new_conversation(
        self, system_prompt: str | None = None, title: str | None = None
    ) -> ConversationSummary:
        prompt = self.settings.chat.system_prompt if system_prompt is None else system_prompt
        return self.store.create_conversation(
            title=title or "", model=self.model_name, system_prompt=prompt, settings=asdict(self.defaults)
        )

    def rename(self, conversation_id: int, title: str) -> None:
        if not title.strip():
            raise InputError("a conversation title cannot be empty")
        self.store.rename(conversation_id, title.strip())

    def delete(self, conversation_id: int) -> None:
        """Delete the conversation, its earlier versions, its journals, and every cache chunk
        that only it used (chunk files hold token ids, which decode back to its text).
        Chunks shared with other conversations stay. Raises NotFoundError, BusyError."""
        self.store.get_conversation(conversation_id)
        if self.kv is not None:
            self.kv.flush()  # a spill still queued for it would write its chunks again
        with lease.acquire(conversation_id) as held:
            try:
                keys = self.store.private_chunks(conversation_id)
            except exc.DatabaseError:  # a damaged chunk index: the files go by `cache gc`
                keys = []
            self.store.delete_conversation(conversation_id)
            if self.kv is not None:
                self.kv.pool.drop(conversation_id)
            journal.discard(conversation_id)
            if keys:
                from chatkv.kv.maintenance import remove_keys

                remove_keys(self.store, kv_dir(), keys)
            held.release(forget=True)

    def models(self) -> list[ModelInfo]:
        """The models usable offline, with their KV chunks on disk (chatkv.catalog)."""
        from chatkv.catalog import list_models

        return list_models(self.store.chunk_stats())

    def set_system_prompt(self, conversation_id: int, system_prompt: str) -> None:
        self.store.set_system_prompt(conversation_id, system_prompt)

    def search(
        self,
        query: str,
        limit: int = 100,
        mark: tuple[str, str] = ("[", "]"),
        conversation_ids: list[int] | None = None,
    ) -> list[SearchHit]:
        """Messages and titles matching `query`, each with the match in context."""
        return self.store.search(query, limit=limit, mark=mark, conversation_ids=conversation_ids)

    def import_from(self, kind: str, path: str, dry_run: bool = False) -> ImportReport:
        """Bring in conversations from another tool ("llm", "chatgpt"); those imported before
        are skipped (chatkv.imports)."""
        from chatkv.imports import import_all

        return import_all(self.store, kind, path, dry_run=dry_run)

    # -- the chunk store, for `chatkv cache` (none of it needs the model) -------

    def cache_stats(self) -> dict[str, Any]:
        """Chunks and bytes by codec and model (named where chatkv has seen it load), what
        cannot attach, and leftover temp files."""
        from chatkv.engine import seen
        from chatkv.kv.maintenance import reachable_stats, temp_files

        stats = self.store.chunk_stats() | reachable_stats(self.store)
        stats["temp_files"], stats["temp_bytes"] = temp_files(kv_dir())
        names = seen.names_by_fingerprint()
        for fp, entry in (stats.get("by_fingerprint") or {}).items():
            entry["model"] = names.get(fp)
        return stats | {"kv_dir": str(kv_dir())}

    def cache_gc(self, max_bytes: int) -> GcReport:
        """Drop index rows without files and old orphan files, then evict down to `max_bytes`."""
        from chatkv.kv.maintenance import gc

        return gc(self.store, kv_dir(), max_bytes)

    def cache_verify(self, fix: bool = True) -> VerifyReport:
        """Read every chunk and check it; with `fix`, remove the bad ones."""
        from chatkv.kv.maintenance import verify

        return verify(self.store, kv_dir(), fix=fix)

    def cache_rebuild(self) -> RebuildReport:
        """Rebuild the chunk index from the chunk files' own metadata."""
        from chatkv.kv.maintenance import rebuild

        return rebuild(self.store, kv_dir())

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
            held = lease.acquire(conv.id)
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
        warm, self._warm_up = self._warm_up, None
        if warm is not None:
            warm.join()  # the turn's forward comes next: not two at once on the same cores
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

    def keep_prefix(self, tokens: list[int], cache: DynamicCache) -> None:
        """Spill a cache that belongs to no conversation (batch's shared prefix): the next run
        attaches it from disk."""
        _, kv = self.loaded()
        kv.spill(None, tokens, cache)

    def hold(self, conversation_id: int) -> lease.Lease:
        """Take the conversation for one turn (no other turn, in this process or another, runs
        in it until the lease is released), saving first any reply that a dead turn left in
        its journal. Raises BusyError."""
        held = lease.acquire(conversation_id)
        try:
            journal.replay(self.store, conversation_id)
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
        cache: DynamicCache | None,
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
            self.store.finish_turn(conversation_id, reply, stats, turn_id, add=pairs)
        if cache is not None and self.kv is not None:
            self.kv.spill(conversation_id, tokens, cache)
        return conversation_id

    def regenerate(self, conversation_id: int, settings: GenerationSettings | None = None) -> Turn:
        """Generate the last reply again. The old reply becomes an earlier version only when the
        new one is saved; a stopped or failed regeneration leaves the conversation as it was."""
        msgs = self.store.messages(conversation_id)
        if not msgs or not any(m.role == "user" for m in msgs):
            raise InputError("there is no reply to regenerate yet; send a message first")
        last = msgs[-1]
        old = [last.id] if last.role == "assistant" else []
        change = Replace(
            last.position if old else None,
            set_aside=old,
            reply_position=last.position if old else last.position + 1,
        )
        return Turn(
            self, conversation_id, settings or self.defaults, self.hold(conversation_id), replace=change
        )

    def edit(self, message_id: int, text: str, settings: GenerationSettings | None = None) -> Turn:
        """Replace a user message and reply again. The old message and everything after it
        become earlier versions when the new reply is saved (`later_messages` says how many
        follow it, for the front end to warn about); a stopped or failed turn changes nothing."""
        if not text.strip():
            raise InputError("the edited message is empty; type something or cancel the edit")
        msg = self.store.get_message(message_id)
        if msg.role != "user":
            raise InputError(
                f"message {message_id} is an assistant reply; only your own messages can be edited"
            )
        after = [m.id for m in self.store.messages(msg.conversation_id) if m.position >= msg.position]
        change = Replace(msg.position + 1, message_id, text, set_aside=after, reply_position=msg.position + 1)
        held = self.hold(msg.conversation_id)
        return Turn(self, msg.conversation_id, settings or self.defaults, held, replace=change)

    def later_messages(self, message_id: int) -> int:
        """How many messages follow this one (an edit sets them aside)."""
        msg = self.store.get_message(message_id)
        return sum(1 for m in self.store.messages(msg.conversation_id) if m.position > msg.position)

    def versions(self, message_id: int) -> list[MessageView]:
        """Earlier versions of a message, oldest first (ids are version ids for `restore`)."""
        return self.store.versions(message_id)

    def restore(self, message_id: int, version_id: int) -> None:
        """Make an earlier version current again (what it replaced becomes a version in turn)."""
        msg = self.store.get_message(message_id)
        with self.hold(msg.conversation_id):
            self.store.restore(message_id, version_id)

    def count_tokens(self, text: str) -> int | None:
        """Tokens `text` adds as a user message; None while the model is not loaded."""
        lm = self.lm  # read once: a model switch may drop it meanwhile
        if lm is None:
            return None
        from chatkv.engine.model import chat_ids

        return len(chat_ids(lm.tokenizer, [{"role": "user", "content": text}], False))

    @property
    def default_system_prompt(self) -> str:
        """The system prompt the model's template uses when a conversation has none ("" if
        none, or before the model is loaded)."""
        lm = self.lm
        if lm is None:
            return ""
        from chatkv.engine.model import template_default_system_prompt

        return template_default_system_prompt(lm.tokenizer)

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
            raise InputError(
                f"the message is {len(ids):,} tokens but the model's context holds {limit:,}; "
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

    # -- export and shutdown ---------------------------------------------------

    def export(self, conversation_id: int, fmt: Literal["md", "json"] = "md") -> str:
        conv = self.store.get_conversation(conversation_id)
        msgs = self.store.messages(conversation_id)
        if fmt == "json":
            return json.dumps(
                {
                    "id": conv.id,
                    "title": conv.title,
                    "model": conv.model,
                    "system_prompt": conv.system_prompt,
                    "created_at": conv.created_at.isoformat(),
                    "updated_at": conv.updated_at.isoformat(),
                    "messages": [message_dict(m) for m in msgs],
                },
                indent=2,
                ensure_ascii=False,
            )
        if fmt != "md":
            raise InputError(f"unknown export format {fmt!r}; use md or json")
        lines = [f"# {conv.title or 'Untitled conversation'}", ""]
        lines += [f"*{conv.model} · {conv.created_at:%Y-%m-%d %H:%M} UTC*", ""]
        if conv.system_prompt:
            lines += ["## System", "", conv.system_prompt, ""]
        for m in msgs:
            lines += [f"## {m.role.capitalize()}", "", m.content, ""]
        return "\n".join(lines)

    def flush(self) -> None:
        """Wait until every queued spill is on disk."""
        if self.kv is not None:
            self.kv.flush()

    def close(self) -> None:
        if self.prefetched is not None:
            self.prefetched.cancel()
        if self.kv is not None:
            self.kv.close()

    def switch_model(self, name: str, conversation_id: int | None = None) -> None:
        """Use model `name` from now on (blocking: it is loaded before this returns) and, given
        `conversation_id`, record it as that conversation's model.

        The conversation's cache starts anew by itself: chunk keys and kv heads carry the
        model's fingerprint, so the old model's chunks never attach to the new one. Raises
        ModelError when `name` cannot be loaded, after loading the previous model again;
        ConfigError for a name model.name refuses (nothing changes then). Must not run while
        a turn does (the front ends refuse to)."""
        if conversation_id is not None:
            self.store.get_conversation(conversation_id)  # NotFoundError before anything changes
        previous = self.model_name

        def use(model: str) -> None:
            # First, so a name the config refuses changes nothing.
            self.settings.set("model.name", model, source="the model picker")
            if self.kv is not None:
                self.kv.close()  # flushes the spills still queued, made with the old model
            # Dropped before the next one loads, so two models never share the memory.
            self.kv = self.lm = self._preloaded = None
            self.model_name = model
            self.defaults = generation_defaults(self.settings)  # the new model's sampling

        if name != previous or self.lm is None:
            # The teardown holds the load lock so no load() interleaves with it; the load takes
            # the lock itself in load() (a plain Lock: it cannot be held across that call).
            with self._load_lock:
                use(name)
            try:
                self.load()
            except Exception:
                with self._load_lock:
                    use(previous)
                try:
                    self.load()
                except Exception as e:  # the previous one fails too: the switch's error is the news
                    log.warning("could not load %s again after a failed switch: %s", previous, e)
                raise
        if conversation_id is not None:
            self.store.set_model(conversation_id, name)


def message_dict(m: MessageView) -> dict[str, Any]:
    d: dict[str, Any] = {
        "id": m.id,
        "position": m.position,
        "role": m.role,
        "content": m.content,
        "created_at": m.created_at.isoformat(),
    }
    if m.stats is not None:
        d["stats"] = m.stats.to_dict()
    return d


if TYPE_CHECKING:

    def _implements_the_front_ends_contract(chat: Chat) -> ChatBackend:
        return chat  # the type checker fails here when Chat drifts from chatkv.api.ChatBackend
