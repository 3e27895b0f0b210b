"""The schema's history: every earlier head upgrades with its rows intact, and the
ORM models agree with what the migrations build."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from chatkv.errors import ChatKVError
from chatkv.store import Store
from chatkv.store import db as store_db
from chatkv.store.models import Base
from chatkv.store.search import include_object

CREATED = "2024-05-01 12:00:00.000000"


@contextmanager
def _sqlite(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection that commits and closes."""
    db = sqlite3.connect(path)
    try:
        with db:
            yield db
    finally:
        db.close()


def _revisions() -> list[str]:
    """All revisions, oldest first."""
    script = ScriptDirectory.from_config(store_db.alembic_config())
    return [s.revision for s in reversed(list(script.walk_revisions()))]


def _seed_0001(db: sqlite3.Connection) -> None:
    db.execute(
        "INSERT INTO conversations (id, title, model, system_prompt, settings, created_at, updated_at) "
        "VALUES (7, 'old chat', 'm', 'be brief', '{\"temperature\": 0.2}', ?, ?)",
        (CREATED, CREATED),
    )
    db.executemany(
        "INSERT INTO messages (conversation_id, position, role, content, created_at, prompt_tokens, "
        "completion_tokens, finish_reason) VALUES (7, ?, ?, ?, ?, ?, ?, ?)",
        [
            (0, "user", "hello", CREATED, None, None, None),
            (1, "assistant", "hi there", CREATED, 12, 3, "stop"),
        ],
    )


def _check_0001(store: Store) -> None:
    _check_transcript(store)
    conv = store.get_conversation(7)
    assert conv.token_count == 0 and conv.cache_state == "none"


def _check_transcript(store: Store) -> None:
    conv = store.get_conversation(7)
    assert (conv.title, conv.model, conv.system_prompt) == ("old chat", "m", "be brief")
    assert conv.created_at == datetime.fromisoformat(CREATED + "+00:00")
    assert store.conversation_settings(7) == {"temperature": 0.2}
    msgs = store.messages(7)
    assert [(m.position, m.role, m.content) for m in msgs] == [
        (0, "user", "hello"),
        (1, "assistant", "hi there"),
    ]
    assert msgs[0].stats is None
    assert msgs[1].stats is not None and msgs[1].stats.prompt_tokens == 12
    assert msgs[1].stats.completion_tokens == 3 and msgs[1].stats.finish_reason == "stop"


def _seed_0002(db: sqlite3.Connection) -> None:
    _seed_0001(db)
    db.execute(
        "INSERT INTO kv_chunks (key, parent, fingerprint, codec, start, n_tokens, partial, path, nbytes, "
        "checksum, created_at, last_used_at) VALUES (?, NULL, 'fp', 'int8', 0, 9, 1, ?, 123, 'c', ?, ?)",
        ("ab" * 32, "ab/ab/" + "ab" * 32 + ".safetensors", CREATED, CREATED),
    )
    db.execute("UPDATE conversations SET kv_head = ?, kv_tokens = 9, kv_fingerprint = 'fp'", ("ab" * 32,))


def _check_0002(store: Store) -> None:
    _check_transcript(store)
    conv = store.get_conversation(7)
    assert (conv.token_count, conv.cache_state, conv.cache_bytes) == (9, "disk", 123)
    # 0003: replies kept under their turn id, versions and chunk references start empty.
    assert store.versions(store.messages(7)[1].id) == []
    assert store.private_chunks(7) == []


def _seed_0003(db: sqlite3.Connection) -> None:
    _seed_0002(db)
    db.execute("UPDATE messages SET turn_id = 't1' WHERE position = 1")
    db.execute(
        "INSERT INTO message_versions (conversation_id, position, role, content, stats, turn_id, group_id, "
        "created_at, archived_at) VALUES (7, 1, 'assistant', 'an older reply', NULL, 't0', 'g', ?, ?)",
        (CREATED, CREATED),
    )
    db.execute("INSERT INTO conversation_chunks (conversation_id, key) VALUES (7, ?)", ("ab" * 32,))


def _check_0003(store: Store) -> None:
    _check_transcript(store)
    reply = store.messages(7)[1]
    assert [v.content for v in store.versions(reply.id)] == ["an older reply"]
    assert store.private_chunks(7) == ["ab" * 32]
    # 0004: messages and titles written before the index existed are found through it.
    assert store.has_fts()
    hits = store.search("hi ther")
    assert [(h.conversation_id, h.message_id, h.snippet) for h in hits] == [(7, reply.id, "[hi ther]e")]
    assert [c.id for c in store.list_conversations("OLD CHAT")] == [7]


def _seed_0004(db: sqlite3.Connection) -> None:
    _seed_0003(db)
    # A second conversation that never spilled a cache: it gets no kv_heads row.
    db.execute(
        "INSERT INTO conversations (id, title, model, system_prompt, settings, created_at, updated_at) "
        "VALUES (9, 'no cache yet', 'm', '', '{}', ?, ?)",
        (CREATED, CREATED),
    )
    # The newest conversation deleted: its id (12) is never to be handed out again.
    db.execute(
        "INSERT INTO conversations (id, title, model, system_prompt, settings, created_at, updated_at) "
        "VALUES (12, 'deleted', 'm', '', '{}', ?, ?)",
        (CREATED, CREATED),
    )
    db.execute("DELETE FROM conversations WHERE id = 12")


def _check_0004(store: Store) -> None:
    _check_0003(store)
    # 0005: each conversation's pointer into the chunk index moved to kv_heads, unchanged.
    head = store.get_kv_head(7)
    assert (head.key, head.tokens, head.fingerprint) == ("ab" * 32, 9, "fp")
    assert store.chunk_is_head("ab" * 32)
    conv = store.get_conversation(7)
    assert (conv.token_count, conv.cache_state, conv.cache_bytes) == (9, "disk", 123)
    empty = store.get_kv_head(9)
    assert (empty.key, empty.tokens, empty.fingerprint) == (None, 0, None)
    assert store.get_conversation(9).token_count == 0
    # The rebuilt conversations table kept its full-text triggers and its AUTOINCREMENT.
    store.rename(9, "renamed after the upgrade")
    assert [c.id for c in store.list_conversations("RENAMED after")] == [9]
    store.delete_conversation(9)
    assert store.create_conversation(title="later").id > 12  # not a deleted one's id again
    store.delete_conversation(7)  # its kv head goes with it
    assert not store.chunk_is_head("ab" * 32)


def _seed_0005(db: sqlite3.Connection) -> None:
    _seed_0001(db)
    db.execute("UPDATE messages SET turn_id = 't1' WHERE position = 1")
    db.execute(  # a regenerate's earlier reply
        "INSERT INTO message_versions (conversation_id, position, role, content, stats, turn_id, group_id, "
        "created_at, archived_at) VALUES (7, 1, 'assistant', 'an older reply', NULL, 't0', 'g', ?, ?)",
        (CREATED, CREATED),
    )
    # An edit's branch set aside before 0006: the old question and its reply, one group.
    db.executemany(
        "INSERT INTO message_versions (conversation_id, position, role, content, stats, turn_id, group_id, "
        "created_at, archived_at) VALUES (7, ?, ?, ?, NULL, ?, 'e', ?, ?)",
        [
            (0, "user", "the question before", None, CREATED, CREATED),
            (1, "assistant", "its answer", "t2", CREATED, CREATED),
        ],
    )


def _check_0005(store: Store) -> None:
    # 0006: a reply's versions are those whose group starts at its position (the edit's
    # answer is not offered as a version of the reply to the edited question).
    user, reply = store.messages(7)
    assert [v.content for v in store.versions(reply.id)] == ["an older reply"]
    assert [v.content for v in store.versions(user.id)] == ["the question before"]
    store.restore(user.id, store.versions(user.id)[0].id)
    assert [(m.role, m.content) for m in store.messages(7)] == [
        ("user", "the question before"),
        ("assistant", "its answer"),
    ]
    (back,) = store.versions(store.messages(7)[0].id)
    assert back.content == "hello"
    assert store.versions(store.messages(7)[1].id) == []  # "an older reply" answered "hello"
    store.restore(store.messages(7)[0].id, back.id)
    assert [v.content for v in store.versions(store.messages(7)[1].id)] == ["an older reply"]
    _check_transcript(store)


# For each earlier head: rows to write at that revision, and how to check them after
# the upgrade to head. A new migration must add an entry for the head it supersedes.
SEEDS: dict[str, tuple[Callable[[sqlite3.Connection], None], Callable[[Store], None]]] = {
    "0001": (_seed_0001, _check_0001),
    "0002": (_seed_0002, _check_0002),
    "0003": (_seed_0003, _check_0003),
    "0004": (_seed_0004, _check_0004),
    "0005": (_seed_0005, _check_0005),
}


def test_schema_head_constant_matches_migrations() -> None:
    script = ScriptDirectory.from_config(store_db.alembic_config())
    assert script.get_heads() == [store_db.SCHEMA_HEAD]


def test_every_earlier_revision_has_a_seed() -> None:
    assert set(_revisions()[:-1]) == set(SEEDS)


def test_upgrade_empty_database_to_head(tmp_path: Path) -> None:
    path = tmp_path / "chatkv.db"
    Store(path).close()
    with _sqlite(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(store_db.SCHEMA_HEAD,)]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"conversations", "messages", "kv_chunks", "alembic_version"} <= tables


@pytest.mark.parametrize("revision", _revisions()[:-1])
def test_rows_survive_upgrade_from(revision: str, tmp_path: Path) -> None:
    path = tmp_path / "chatkv.db"
    store_db.upgrade(path, revision)
    seed, check = SEEDS[revision]
    with _sqlite(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchone() == (revision,)
        seed(db)
    with Store(path) as store:
        check(store)
        # The upgraded database still works as a whole.
        conv = store.create_conversation(title="new")
        store.add_message(conv.id, "user", "after the upgrade")
        assert len(store.list_conversations()) == 2


def test_models_and_migrations_agree(tmp_path: Path) -> None:
    path = tmp_path / "chatkv.db"
    store_db.upgrade(path)
    engine = store_db.make_engine(path)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn,
                opts={
                    "compare_type": True,
                    "compare_server_default": True,
                    "include_object": include_object,  # the FTS5 tables have no ORM model
                },
            )
            assert compare_metadata(ctx, Base.metadata) == []
    finally:
        engine.dispose()


def test_opening_twice_does_not_rerun_migrations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "chatkv.db"
    Store(path).close()
    calls: list[str] = []
    monkeypatch.setattr(command, "upgrade", lambda cfg, rev, **kw: calls.append(rev))
    with Store(path) as store:
        store.create_conversation()
    assert calls == []


def test_database_from_newer_chatkv_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "chatkv.db"
    Store(path).close()
    with _sqlite(path) as db:
        db.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(ChatKVError, match="newer") as info:
        Store(path)
    assert str(path) in str(info.value)


def _downgrade(path: Path, revision: str) -> None:
    """Run the migrations down to `revision`, as chatkv.store.db.upgrade runs them up
    (one transaction, foreign keys off while tables are rebuilt)."""
    engine = store_db.make_engine(path, foreign_keys=False, pooled=False)
    try:
        with engine.connect() as conn, conn.begin():
            command.downgrade(store_db.alembic_config(conn), revision)
    finally:
        engine.dispose()


def test_kv_heads_downgrade_puts_the_pointers_back_into_conversations(tmp_path: Path) -> None:
    path = tmp_path / "chatkv.db"
    with Store(path) as store:
        cached = store.create_conversation(title="cached")
        store.add_message(cached.id, "user", "hello")
        store.set_kv_head(cached.id, "cd" * 32, 42, "fp")
        plain = store.create_conversation(title="plain")
    _downgrade(path, "0004")
    with _sqlite(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0004",)]
        rows = db.execute("SELECT id, kv_head, kv_tokens, kv_fingerprint FROM conversations ORDER BY id")
        assert rows.fetchall() == [(cached.id, "cd" * 32, 42, "fp"), (plain.id, None, 0, None)]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "kv_heads" not in tables
        assert db.execute("SELECT content FROM messages").fetchall() == [("hello",)]
        triggers = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
        assert {"conversations_fts_ai", "conversations_fts_ad", "conversations_fts_au"} <= triggers
    with Store(path) as store:  # and up again, as at the next start
        head = store.get_kv_head(cached.id)
        assert (head.key, head.tokens, head.fingerprint) == ("cd" * 32, 42, "fp")
        assert [c.id for c in store.list_conversations("plai")] == [plain.id]


def test_versions_downgrade_keeps_every_version(tmp_path: Path) -> None:
    path = tmp_path / "chatkv.db"
    with Store(path) as store:
        conv = store.create_conversation(title="t")
        store.add_message(conv.id, "user", "hello")
    with _sqlite(path) as db:
        db.execute(
            "INSERT INTO message_versions (conversation_id, position, role, content, group_id, created_at, "
            "archived_at, hidden_by) VALUES (?, 1, 'assistant', 'hidden one', 'g', ?, ?, 'h')",
            (conv.id, CREATED, CREATED),
        )
    with _sqlite(path) as db:  # the newest version deleted: its id is never to be handed out again
        db.execute(
            "INSERT INTO message_versions (id, conversation_id, position, role, content, group_id, "
            "created_at, archived_at) VALUES (99, ?, 1, 'assistant', 'deleted', 'd', ?, ?)",
            (conv.id, CREATED, CREATED),
        )
        db.execute("DELETE FROM message_versions WHERE id = 99")
    _downgrade(path, "0005")
    with _sqlite(path) as db:
        columns = [r[1] for r in db.execute("PRAGMA table_info(message_versions)")]
        assert "hidden_by" not in columns
        assert db.execute("SELECT content FROM message_versions").fetchall() == [("hidden one",)]
        assert db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'message_versions'").fetchone() == (
            99,
        )
    with Store(path) as store:  # and up again: listed, as every version kept before 0006
        store.add_message(conv.id, "assistant", "hi")
        assert [v.content for v in store.versions(store.messages(conv.id)[1].id)] == ["hidden one"]
