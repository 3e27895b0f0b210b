"""The KV chunk index: where each chunk file is and what it holds (kv_chunks), which chunks
each conversation made (conversation_chunks), and which chunk its cache ends in (kv_heads).
The kv layer's only way into the database (chatkv.kv.manager and chatkv.kv.maintenance use
nothing else of the Store); of the transcript's tables it reads only conversation ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from sqlalchemy import (
    Integer,
    cast,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.orm import Session, aliased

from chatkv.errors import NotFoundError
from chatkv.store.common import (
    _IN_BATCH,
    ChunkRecord,
    KVHead,
    StoreBase,
    _batches,
    _chunk_record,
    _conversation_missing,
)
from chatkv.store.models import (
    Conversation,
    ConversationChunk,
    KVChunk,
    KVHeadRow,
    utcnow,
)

# What a chunk written again under its key (re-coded, or by another process) changes in its
# row. `partial` too: the same tokens are a tail at one chunk size and a full chunk at
# another (cache.chunk_tokens differs between processes); the row says what the file does.
UPDATED_ON_REWRITE = ("codec", "path", "nbytes", "checksum", "partial", "last_used_at")


class ChunkIndex(StoreBase):
    """The chunk-index part of the Store."""

    def set_kv_head(
        self, conversation_id: int, key: str | None, tokens: int, fingerprint: str | None
    ) -> None:
        """Record the newest chunk spilled for the conversation and the tokens its chain covers
        (the kv_heads table: the conversation's own row is not touched, so a background spill
        is not activity). Raises NotFoundError."""
        with self._writer.begin() as s:
            self._require_conversation(s, conversation_id)
            row = s.get(KVHeadRow, conversation_id)
            if row is None:
                row = KVHeadRow(conversation_id=conversation_id)
                s.add(row)
            row.key, row.tokens, row.fingerprint = key, tokens, fingerprint

    def get_kv_head(self, conversation_id: int) -> KVHead:
        """The conversation's kv head: its newest chunk, the tokens the chain covers and the
        model fingerprint (None, 0, None before anything was spilled). Raises NotFoundError."""
        with self._reader() as s:
            self._require_conversation(s, conversation_id)
            row = s.get(KVHeadRow, conversation_id)
            if row is None:
                return KVHead(key=None, tokens=0, fingerprint=None)
            return KVHead(key=row.key, tokens=row.tokens, fingerprint=row.fingerprint)

    def chunk_is_head(self, key: str) -> bool:
        """Whether any conversation's kv head is this chunk (so it must not be dropped as superseded)."""
        with self._reader() as s:
            return (
                s.scalar(select(KVHeadRow.conversation_id).where(KVHeadRow.key == key).limit(1)) is not None
            )

    @staticmethod
    def _require_conversation(s: Session, conversation_id: int) -> None:
        """Raise NotFoundError unless the conversation exists (its id is all the chunk index
        reads of the conversations table)."""
        if s.scalar(select(Conversation.id).where(Conversation.id == conversation_id)) is None:
            raise _conversation_missing(conversation_id)

    # -- which chunks each conversation made -------------------------------------

    def add_conversation_chunks(self, conversation_id: int, keys: Sequence[str]) -> bool:
        """Record that these chunks hold (a prefix of) the conversation's tokens. False: the
        conversation is gone (deleted while its spill was queued), nothing recorded."""
        if not keys:
            return True
        with self._writer.begin() as s:
            try:
                self._require_conversation(s, conversation_id)
            except NotFoundError:
                return False
            for batch in _batches(keys):
                stmt = self._insert(ConversationChunk).values(
                    [{"conversation_id": conversation_id, "key": k} for k in batch]
                )
                s.execute(stmt.on_conflict_do_nothing())
        return True

    def private_chunks(self, conversation_id: int) -> list[str]:
        """Keys of the chunks made for this conversation that no other conversation uses."""
        with self._reader() as s:
            return private_keys(s, conversation_id)

    def unreferenced_chunks(self, keys: Sequence[str]) -> list[str]:
        """Those of `keys` that no conversation records as its own."""
        used: set[str] = set()
        with self._reader() as s:
            for batch in _batches(keys):
                used.update(s.scalars(select(ConversationChunk.key).where(ConversationChunk.key.in_(batch))))
        return [k for k in dict.fromkeys(keys) if k not in used]

    # -- chunk index -----------------------------------------------------------

    def add_chunk(self, rec: ChunkRecord) -> None:
        """Index a chunk file. A key already indexed (the same content written again, or
        re-coded as it aged) keeps its row and takes the new codec, path, nbytes, checksum,
        partial and last_used_at."""
        now = utcnow()
        values = asdict(rec)
        values["created_at"] = rec.created_at or now
        values["last_used_at"] = rec.last_used_at or now
        stmt = self._insert(KVChunk).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[KVChunk.key],
            set_={c: stmt.excluded[c] for c in UPDATED_ON_REWRITE},
        )
        with self._writer.begin() as s:
            s.execute(stmt)

    def get_chunks(self, keys: Sequence[str]) -> dict[str, ChunkRecord]:
        """The indexed chunks among `keys`, by key (missing keys are absent)."""
        found: dict[str, ChunkRecord] = {}
        with self._reader() as s:
            for batch in _batches(keys):
                for c in s.scalars(select(KVChunk).where(KVChunk.key.in_(batch))):
                    found[c.key] = _chunk_record(c)
        return found

    def find_partials(
        self, parent: str | None, fingerprint: str, codec: str, start: int
    ) -> list[ChunkRecord]:
        """Partial chunks that continue `parent` (None: chunks at the start), newest first."""
        parent_is = KVChunk.parent.is_(None) if parent is None else KVChunk.parent == parent
        stmt = (
            select(KVChunk)
            .where(parent_is, KVChunk.partial.is_(True))
            .where(KVChunk.fingerprint == fingerprint, KVChunk.codec == codec, KVChunk.start == start)
            .order_by(KVChunk.created_at.desc(), KVChunk.key)
        )
        with self._reader() as s:
            return [_chunk_record(c) for c in s.scalars(stmt)]

    def touch_chunks(self, keys: Sequence[str]) -> None:
        """Mark chunks as just used (eviction goes by last use)."""
        now = utcnow()
        with self._writer.begin() as s:
            for batch in _batches(keys):
                s.execute(update(KVChunk).where(KVChunk.key.in_(batch)).values(last_used_at=now))

    def delete_chunks(self, keys: Sequence[str]) -> int:
        """Remove chunks from the index (not their files); return how many rows went."""
        deleted = 0
        with self._writer.begin() as s:
            for batch in _batches(keys):
                deleted += s.execute(delete(KVChunk).where(KVChunk.key.in_(batch))).rowcount
        return deleted

    def delete_chunks_if(self, recs: Sequence[ChunkRecord]) -> set[str]:
        """Remove chunks' rows only where a row still has the record's checksum and size
        (compare and delete): a row a concurrent spill has just rewritten stays.
        Returns the keys whose rows went."""
        gone: set[str] = set()
        with self._writer.begin() as s:
            for rec in recs:
                stmt = (
                    delete(KVChunk)
                    .where(KVChunk.key == rec.key)
                    .where(KVChunk.checksum == rec.checksum, KVChunk.nbytes == rec.nbytes)
                )
                if s.execute(stmt).rowcount:
                    gone.add(rec.key)
        return gone

    def replace_chunk_index(self, recs: Sequence[ChunkRecord]) -> None:
        """Drop the chunk index (whatever state its table is in), recreate it from the ORM
        model and fill it with `recs`, in one transaction (`chatkv cache rebuild`)."""
        with self._writer.begin() as s:
            conn = s.connection()
            conn.exec_driver_sql("DROP TABLE IF EXISTS kv_chunks")
            KVChunk.__table__.create(conn)
            now = utcnow()
            rows = [
                asdict(r) | {"created_at": r.created_at or now, "last_used_at": r.last_used_at or now}
                for r in recs
            ]
            for i in range(0, len(rows), _IN_BATCH // 16):  # 12 columns a row: under 999 parameters
                s.execute(
                    self._insert(KVChunk).values(rows[i : i + _IN_BATCH // 16]).on_conflict_do_nothing()
                )

    def chunk_chain(self, head_key: str) -> list[ChunkRecord]:
        """The chunk `head_key` and its ancestors, root first.

        Stops at the first ancestor missing from the index, so the result starts at
        position 0 (chain[0].parent is None) only when the whole chain is indexed.
        Empty when `head_key` itself is not indexed.
        """
        chain = (
            select(KVChunk.key, KVChunk.parent).where(KVChunk.key == head_key).cte("chain", recursive=True)
        )
        up = aliased(KVChunk)
        chain = chain.union(select(up.key, up.parent).select_from(chain).join(up, up.key == chain.c.parent))
        with self._reader() as s:
            rows = {c.key: c for c in s.scalars(select(KVChunk).where(KVChunk.key.in_(select(chain.c.key))))}
        out: list[ChunkRecord] = []
        key: str | None = head_key
        while key is not None and key in rows:
            out.append(_chunk_record(rows.pop(key)))  # pop: a cycle cannot loop forever
            key = out[-1].parent
        out.reverse()
        return out

    def chunk_stats(self) -> dict[str, Any]:
        """Totals of the index: {"count", "bytes", "partial", "by_codec": {codec: {"count", "bytes"}},
        "by_fingerprint": {fingerprint: {"count", "bytes"}}}."""
        stmt = select(
            KVChunk.codec,
            KVChunk.fingerprint,
            func.count(),
            func.coalesce(func.sum(KVChunk.nbytes), 0),
            func.coalesce(func.sum(cast(KVChunk.partial, Integer)), 0),  # PostgreSQL has no sum(boolean)
        ).group_by(KVChunk.codec, KVChunk.fingerprint)
        stats: dict[str, Any] = {"count": 0, "bytes": 0, "partial": 0, "by_codec": {}, "by_fingerprint": {}}
        with self._reader() as s:
            rows = s.execute(stmt).all()
        for codec, fingerprint, count, nbytes, partial in rows:
            stats["count"] += count
            stats["bytes"] += nbytes
            stats["partial"] += partial
            # the codec column holds "name:params-digest" (kv/codecs.py Codec.tag); totals go by name
            for group, name in (("by_codec", codec.split(":")[0]), ("by_fingerprint", fingerprint)):
                entry = stats[group].setdefault(name, {"count": 0, "bytes": 0})
                entry["count"] += count
                entry["bytes"] += nbytes
        return stats

    def chunks_by_last_use(self) -> list[ChunkRecord]:
        """All indexed chunks, least recently used first (the eviction order)."""
        with self._reader() as s:
            rows = s.scalars(select(KVChunk).order_by(KVChunk.last_used_at, KVChunk.key))
            return [_chunk_record(c) for c in rows]

    def all_chunks(self) -> list[ChunkRecord]:
        """All indexed chunks, oldest first."""
        with self._reader() as s:
            rows = s.scalars(select(KVChunk).order_by(KVChunk.created_at, KVChunk.key))
            return [_chunk_record(c) for c in rows]


# What the kv layer imports from the store: this module's names, nothing else.
__all__ = ["ChunkIndex", "ChunkRecord", "KVHead"]


def private_keys(s: Session, conversation_id: int) -> list[str]:
    """Keys of the chunks recorded for the conversation that no other conversation records."""
    other = aliased(ConversationChunk)
    shared = (
        select(other.key)
        .where(other.key == ConversationChunk.key, other.conversation_id != conversation_id)
        .exists()
    )
    where = (ConversationChunk.conversation_id == conversation_id, ~shared)
    return list(s.scalars(select(ConversationChunk.key).where(*where)))
