"""The session's conversations and messages for the front ends: listing, reading, naming,
deleting, earlier versions and export. What a turn does is in chatkv.session and chatkv.turn;
this is the rest of `chatkv.api.ChatBackend` over the transcript (a part of `Chat`, as
ChunkIndex and Finding are parts of the Store)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import exc

from chatkv import journal, lease
from chatkv.api import ConversationSummary, GenerationSettings, MessageView
from chatkv.config import Settings
from chatkv.errors import InputError
from chatkv.paths import kv_dir
from chatkv.store import Store

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from chatkv.kv.manager import KVManager
    from chatkv.kv.objects import ObjectStore


class Conversations:
    """Conversations and messages, through the session's store (a part of chatkv.session.Chat)."""

    settings: Settings
    store: Store
    kv: KVManager | None
    model_name: str
    defaults: GenerationSettings

    def hold(self, conversation_id: int) -> lease.Lease:
        raise NotImplementedError  # chatkv.session.Chat.hold: the lease a turn holds

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
        self,
        system_prompt: str | None = None,
        title: str | None = None,
        history: list[dict[str, str]] | None = None,
    ) -> ConversationSummary:
        """A new conversation (with `system_prompt`, else the configured one), holding the
        messages of `history` ({"role", "content"} each) when given: a benchmark's long
        conversation, written in one transaction."""
        prompt = self.settings.chat.system_prompt if system_prompt is None else system_prompt
        return self.store.create_conversation(
            title=title or "",
            model=self.model_name,
            system_prompt=prompt,
            settings=asdict(self.defaults),
            messages=[(m["role"], m["content"]) for m in history or []],
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
        remote = self._chunk_remote()  # before anything goes: a cache.url it cannot use is a ConfigError
        with lease.acquire(conversation_id, engine=self.store.engine) as held:
            if self.kv is not None:  # held: a turn of this process that ended meanwhile queued its spill
                self.kv.flush()  # a spill still queued for it would write its chunks again
            pre = getattr(self, "prefetched", None)  # read ahead while the model loads (Chat.prefetch)
            if pre is not None and pre.conversation_id == conversation_id:
                pre.cancel()
                pre.wait()  # its bucket fetches must not bring back local copies rm removes
                pre.release_fetches()
            try:
                keys = self.store.private_chunks(conversation_id)
            except exc.DatabaseError:  # a damaged chunk index: the files go by `cache gc`
                keys = []
            # Its chunks first: killed in between, the conversation is still there to rm again
            # (its cache recomputed if it is continued), where the other order would leave token
            # files that nothing leads rm to.
            if keys:
                self._remove_chunks(conversation_id, keys, remote)
            # A spill of another process (its turn ended, its lease released) may have
            # recorded and written chunks since: those the delete reads with it go too. One
            # that records later finds the conversation gone and removes its own.
            late = self._written_since(self.store.delete_conversation(conversation_id), keys)
            if late:
                self._remove_chunks(conversation_id, late, remote)
            if self.kv is not None:
                self.kv.pool.drop(conversation_id)
                self.kv.drop_prefetch(conversation_id)
            journal.discard(conversation_id)
            held.release(forget=True)

    def _written_since(self, private: list[str], removed: list[str]) -> list[str]:
        """Of the chunks the conversation held when it was deleted, those not removed
        already, or written again (a row or a file) after they were."""
        from chatkv.kv.chunks import KEY_RE, chunk_path

        private = [k for k in private if KEY_RE.fullmatch(k)]  # a damaged index's rows: no path
        gone = set(removed)
        rows = self.store.get_chunks([k for k in private if k in gone]) if gone else {}
        return [k for k in private if k not in gone or k in rows or chunk_path(kv_dir(), k).exists()]

    def _chunk_remote(self) -> ObjectStore | None:
        """The object store of cache.url (the loaded KV layer's, when there is one); None
        without cache.url."""
        from chatkv.kv.objects import open_objects

        c, kv = self.settings.cache, self.kv
        if not c.url:
            return None
        return kv.tiers.remote if kv is not None and kv.tiers is not None else open_objects(c.url, c.shared)

    def _remove_chunks(self, conversation_id: int, keys: list[str], remote: ObjectStore | None) -> None:
        """The chunks only a deleted conversation used: rows, local files and, with cache.url,
        the bucket's objects. A bucket that cannot be reached leaves the objects (listed for
        `chatkv cache gc` to take later) and says so in one warning line: the conversation
        itself is deleted all the same."""
        from chatkv.errors import CacheError
        from chatkv.kv.maintenance import remove_keys

        try:
            remove_keys(self.store, kv_dir(), keys, remote)
        except CacheError as e:
            log.warning("conversation %d is deleted, but %s", conversation_id, e)

    def set_system_prompt(self, conversation_id: int, system_prompt: str) -> None:
        self.store.set_system_prompt(conversation_id, system_prompt)

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


def message_dict(m: MessageView) -> dict[str, Any]:
    """A message as JSON (`chatkv show --json`, export)."""
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
