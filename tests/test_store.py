"""chatkv.store.Store: conversations, messages, the chunk index, and concurrent use."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from servers import new_database

import chatkv
from chatkv.api import TurnStats
from chatkv.errors import ChatKVError, NotFoundError
from chatkv.store import ChunkRecord, Store

REPO = Path(chatkv.__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    """A new store on each backend: the SQLite file (the default) and PostgreSQL (a fresh
    database on the session's server, tests/servers.py)."""
    monkeypatch.setenv("CHATKV_HOME", str(tmp_path))
    if request.param == "sqlite":
        s = Store(tmp_path / "chatkv.db")
    else:
        s = Store(new_database(request.getfixturevalue("pg_server"), migrated=True))
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    monkeypatch.setenv("CHATKV_HOME", str(tmp_path))
    s = Store(tmp_path / "chatkv.db")
    yield s
    s.close()


def _rows(store: Store, sql: str) -> list[tuple]:
    """Rows of a raw query on either backend."""
    with store._engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(sql)]


def _chunk(
    key: str,
    parent: str | None,
    start: int,
    *,
    partial: bool = False,
    nbytes: int = 100,
    fingerprint: str = "fp1",
    codec: str = "int8",
    **kw: object,
) -> ChunkRecord:
    return ChunkRecord(
        key=key,
        parent=parent,
        fingerprint=fingerprint,
        codec=codec,
        start=start,
        n_tokens=10 if partial else 256,
        partial=partial,
        path=f"{fingerprint}/{key}.safetensors",
        nbytes=nbytes,
        checksum=f"sum-{key}",
        **kw,
    )


# -- opening -----------------------------------------------------------------------


def test_database_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "chatkv.db"
    Store(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_database_is_in_wal_mode(sqlite_store: Store) -> None:
    with sqlite3.connect(sqlite_store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_corrupt_database_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "chatkv.db"
    path.write_bytes(b"this is not a sqlite database, just some bytes " * 100)
    with pytest.raises(ChatKVError) as info:
        Store(path)
    assert str(path) in str(info.value)


# -- conversations -----------------------------------------------------------------


def test_create_and_get_conversation(store: Store) -> None:
    conv = store.create_conversation(title="t", model="m", system_prompt="sys", settings={"temperature": 0.1})
    got = store.get_conversation(conv.id)
    assert got == conv
    assert (got.title, got.model, got.system_prompt) == ("t", "m", "sys")
    assert got.created_at.tzinfo is not None and got.created_at.utcoffset() == timedelta(0)
    assert abs(got.created_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert (got.message_count, got.token_count, got.cache_state, got.cache_bytes) == (0, 0, "none", 0)
    assert store.conversation_settings(conv.id) == {"temperature": 0.1}
    assert store.conversation_settings(store.create_conversation().id) == {}


def test_settings_must_be_json(store: Store) -> None:
    with pytest.raises(ValueError, match="JSON"):
        store.create_conversation(settings={"x": object()})


def test_rename_system_prompt_and_settings(store: Store) -> None:
    conv = store.create_conversation(title="a")
    store.rename(conv.id, "b")
    store.set_system_prompt(conv.id, "be terse")
    store.set_conversation_settings(conv.id, {"top_k": 5})
    got = store.get_conversation(conv.id)
    assert (got.title, got.system_prompt) == ("b", "be terse")
    assert got.updated_at > conv.updated_at
    assert store.conversation_settings(conv.id) == {"top_k": 5}


def test_list_is_most_recently_updated_first(store: Store) -> None:
    assert store.latest_conversation() is None
    a = store.create_conversation(title="a")
    b = store.create_conversation(title="b")
    assert [c.id for c in store.list_conversations()] == [b.id, a.id]
    store.add_message(a.id, "user", "bump")
    assert [c.id for c in store.list_conversations()] == [a.id, b.id]
    assert store.latest_conversation().id == a.id
    assert store.list_conversations()[0].message_count == 1
    assert [c.id for c in store.list_conversations(limit=1)] == [a.id]
    with pytest.raises(ValueError):
        store.list_conversations(limit=0)


def test_search_title_and_content_case_insensitive(store: Store) -> None:
    by_title = store.create_conversation(title="Trip to Zürich")
    by_content = store.create_conversation(title="other")
    store.add_message(by_content.id, "user", "How do I plan a TRIP?")
    store.add_message(by_content.id, "assistant", "ÄRGER is German for trouble; 100%_sure")
    store.create_conversation(title="unrelated")

    assert {c.id for c in store.list_conversations("trip")} == {by_title.id, by_content.id}
    assert [c.id for c in store.list_conversations("ZÜRICH")] == [by_title.id]
    assert [c.id for c in store.list_conversations("ärger")] == [by_content.id]
    # LIKE wildcards are plain characters in a query.
    assert [c.id for c in store.list_conversations("0%_s")] == [by_content.id]
    assert store.list_conversations("%") == [store.get_conversation(by_content.id)]
    assert store.list_conversations("nowhere") == []


def test_delete_conversation_cascades_to_messages(store: Store) -> None:
    conv = store.create_conversation()
    keep = store.create_conversation()
    msg = store.add_message(conv.id, "user", "bye")
    store.add_message(keep.id, "user", "stay")
    store.delete_conversation(conv.id)
    with pytest.raises(NotFoundError):
        store.get_conversation(conv.id)
    with pytest.raises(NotFoundError):
        store.get_message(msg.id)
    assert _rows(store, "SELECT conversation_id FROM messages") == [(keep.id,)]
    # A deleted id is never reused.
    assert store.create_conversation().id > conv.id


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.get_conversation(12),
        lambda s: s.rename(12, "x"),
        lambda s: s.set_system_prompt(12, "x"),
        lambda s: s.delete_conversation(12),
        lambda s: s.conversation_settings(12),
        lambda s: s.set_kv_head(12, None, 0, None),
        lambda s: s.get_kv_head(12),
        lambda s: s.add_message(12, "user", "x"),
        lambda s: s.messages(12),
        lambda s: s.delete_messages_from(12, 0),
    ],
)
def test_unknown_conversation_is_not_found(store: Store, call) -> None:
    with pytest.raises(NotFoundError, match=r"conversation 12 not found; `chatkv ls`"):
        call(store)


@pytest.mark.parametrize("call", [lambda s: s.get_message(99), lambda s: s.update_message(99, "x")])
def test_unknown_message_is_not_found(store: Store, call) -> None:
    with pytest.raises(NotFoundError, match="message 99 not found"):
        call(store)


# -- messages ----------------------------------------------------------------------


def test_messages_positions_title_and_stats(store: Store) -> None:
    conv = store.create_conversation()
    first = store.add_message(conv.id, "user", "\n  " + "x" * 70 + "\nsecond line")
    assert store.get_conversation(conv.id).title == "x" * 60
    stats = TurnStats(
        prompt_tokens=40,
        cached_tokens=30,
        prefilled_tokens=10,
        completion_tokens=5,
        cache_source="disk",
        cache_load_s=0.01,
        ttft_s=0.2,
        decode_tps=25.0,
        finish_reason="length",
        dropped_messages=1,
        codec="int8",
    )
    reply = store.add_message(conv.id, "assistant", "answer", stats)
    store.add_message(conv.id, "user", "another question")

    msgs = store.messages(conv.id)
    assert [(m.position, m.role) for m in msgs] == [(0, "user"), (1, "assistant"), (2, "user")]
    assert msgs[0] == first and msgs[1] == reply
    assert msgs[1].stats == stats and msgs[0].stats is None
    assert msgs[1].created_at.tzinfo is not None
    assert store.get_message(reply.id) == reply
    # Only the first user message names the conversation.
    assert store.get_conversation(conv.id).title == "x" * 60


def test_title_given_is_kept(store: Store) -> None:
    conv = store.create_conversation(title="mine")
    store.add_message(conv.id, "system", "ignored")
    store.add_message(conv.id, "user", "not a title")
    assert store.get_conversation(conv.id).title == "mine"


def test_bad_role_is_refused(store: Store) -> None:
    conv = store.create_conversation()
    with pytest.raises(ValueError, match="role"):
        store.add_message(conv.id, "tool", "x")


def test_update_message(store: Store) -> None:
    conv = store.create_conversation()
    msg = store.add_message(
        conv.id, "assistant", "partial", TurnStats(completion_tokens=1, finish_reason="cancelled")
    )
    updated = store.update_message(msg.id, "partial and more")
    assert updated.content == "partial and more"
    assert updated.stats == TurnStats(completion_tokens=1, finish_reason="cancelled")  # None keeps stats
    final = store.update_message(msg.id, "done", TurnStats(completion_tokens=9))
    assert store.get_message(msg.id) == final and final.stats.completion_tokens == 9


def test_delete_messages_from(store: Store) -> None:
    conv = store.create_conversation()
    for i in range(5):
        store.add_message(conv.id, "user" if i % 2 == 0 else "assistant", f"m{i}")
    assert store.delete_messages_from(conv.id, 3) == 2
    assert [m.content for m in store.messages(conv.id)] == ["m0", "m1", "m2"]
    assert store.add_message(conv.id, "assistant", "again").position == 3
    assert store.delete_messages_from(conv.id, 10) == 0
    assert store.get_conversation(conv.id).message_count == 4


def test_text_with_a_nul_character_is_saved_on_every_backend(store: Store) -> None:
    """A model can write NUL (a byte token); PostgreSQL text cannot hold it: it is stored
    as U+FFFD there (the save failed, and so did every replay of the reply's journal)."""
    conv = store.create_conversation(title="a\x00b", system_prompt="s\x00")
    store.add_message(conv.id, "user", "q\x00")
    store.finish_turn(conv.id, "reply \x00 end", TurnStats(completion_tokens=3), "t-nul")
    nul = "\x00" if store.engine.dialect.name == "sqlite" else "\ufffd"
    assert [m.content for m in store.messages(conv.id)] == [f"q{nul}", f"reply {nul} end"]
    got = store.get_conversation(conv.id)
    assert (got.title, got.system_prompt) == (f"a{nul}b", f"s{nul}")


def test_an_edit_hides_the_versions_after_it_until_restored(store: Store) -> None:
    conv = store.create_conversation()
    stats = TurnStats(completion_tokens=1)
    q1 = store.add_message(conv.id, "user", "first question")
    r1 = store.finish_turn(conv.id, "answer one", stats, "t1")
    r2 = store.finish_turn(conv.id, "answer two", stats, "t2", set_aside=[r1.id])  # a regenerate
    assert [v.content for v in store.versions(r2.id)] == ["answer one"]
    r3 = store.finish_turn(
        conv.id, "answer three", stats, "t3", set_aside=[q1.id, r2.id], edit=(q1.id, "edited")
    )
    assert store.versions(r3.id) == []  # both answered the first question
    q2 = store.messages(conv.id)[0]
    (old,) = store.versions(q2.id)
    store.restore(q2.id, old.id)
    assert [m.content for m in store.messages(conv.id)] == ["first question", "answer two"]
    assert [v.content for v in store.versions(store.messages(conv.id)[1].id)] == ["answer one"]


def test_concurrent_threads_get_distinct_positions(store: Store) -> None:
    conv = store.create_conversation()

    def write(tag: str) -> None:
        for i in range(10):
            store.add_message(conv.id, "user", f"{tag}{i}")

    threads = [threading.Thread(target=write, args=(t,)) for t in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    msgs = store.messages(conv.id)
    assert [m.position for m in msgs] == list(range(40))
    assert {m.content for m in msgs} == {f"{t}{i}" for t in "abcd" for i in range(10)}


# Opens the store only once the parent says go, so that both processes create and
# migrate the new database and then write, at the same time.
_WRITER = """
import sys, time
from pathlib import Path
from chatkv.store import Store
path, go, tag, n = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.002)
store = Store(path)
conv = store.create_conversation(title=tag)
for i in range(n):
    store.add_message(conv.id, "user", f"{tag} {i}")
print(conv.id, flush=True)
"""


def test_opening_a_database_another_connection_is_writing_waits_for_it(tmp_path: Path) -> None:
    """Switching a new database to WAL while another connection writes it gets "locked" at
    once from SQLite (no busy timeout): two processes opening a new data directory together
    failed that way. The switch is retried within the busy timeout."""
    import sqlite3
    import threading

    path = tmp_path / "chatkv.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE held (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO held VALUES (1)")
    release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    release.start()
    try:
        with Store(path) as store:
            assert store.list_conversations() == []
    finally:
        release.join()
        other.close()
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    check.close()


def test_two_processes_write_at_once(tmp_path: Path) -> None:
    path, go, n = tmp_path / "chatkv.db", tmp_path / "go", 40
    env = {
        **os.environ,
        "CHATKV_HOME": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    procs = {
        tag: subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(go), tag, str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for tag in ("p1", "p2")
    }
    for p in procs.values():
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    ids = {}
    for tag, p in procs.items():
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        ids[tag] = int(out.strip())
    with Store(path) as store:
        for tag, conv_id in ids.items():
            msgs = store.messages(conv_id)
            assert [m.content for m in msgs] == [f"{tag} {i}" for i in range(n)]
            assert [m.position for m in msgs] == list(range(n))


# -- chunk index -------------------------------------------------------------------


def test_add_and_get_chunks(store: Store) -> None:
    rec = _chunk("a", None, 0)
    store.add_chunk(rec)
    got = store.get_chunks(["a", "missing"])
    assert list(got) == ["a"]
    a = got["a"]
    assert (a.key, a.parent, a.start, a.n_tokens, a.partial, a.path, a.nbytes, a.checksum) == (
        "a",
        None,
        0,
        256,
        False,
        "fp1/a.safetensors",
        100,
        "sum-a",
    )
    assert a.created_at is not None and a.created_at.tzinfo is not None
    assert store.get_chunks([]) == {}


def test_add_chunk_twice_updates_file_fields(store: Store) -> None:
    old = datetime(2024, 1, 1, tzinfo=UTC)
    store.add_chunk(_chunk("a", None, 0, created_at=old, last_used_at=old))
    store.add_chunk(_chunk("a", None, 0, nbytes=222, partial=True))  # a tail at another chunk size
    again = store.get_chunks(["a"])["a"]
    assert again.nbytes == 222 and again.created_at == old and again.last_used_at > old
    assert again.partial
    assert store.chunk_stats()["count"] == 1


def test_get_chunks_many_keys(store: Store) -> None:
    keys = [f"k{i:04d}" for i in range(2000)]
    for k in keys[::100]:
        store.add_chunk(_chunk(k, None, 0))
    assert sorted(store.get_chunks(keys)) == keys[::100]


def test_find_partials(store: Store) -> None:
    store.add_chunk(_chunk("root", None, 0))
    store.add_chunk(_chunk("p1", "root", 256, partial=True))
    store.add_chunk(_chunk("p0", None, 0, partial=True))
    store.add_chunk(_chunk("full", "root", 256))
    store.add_chunk(_chunk("other-codec", "root", 256, partial=True, codec="int4"))
    store.add_chunk(_chunk("other-fp", "root", 256, partial=True, fingerprint="fp2"))
    assert [c.key for c in store.find_partials("root", "fp1", "int8", 256)] == ["p1"]
    assert [c.key for c in store.find_partials(None, "fp1", "int8", 0)] == ["p0"]
    assert store.find_partials("root", "fp1", "int8", 0) == []


def test_touch_delete_and_last_use_order(store: Store) -> None:
    base = datetime(2024, 1, 1, tzinfo=UTC)
    for i, k in enumerate("abc"):
        store.add_chunk(_chunk(k, None, 0, last_used_at=base + timedelta(days=i)))
    assert [c.key for c in store.chunks_by_last_use()] == ["a", "b", "c"]
    store.touch_chunks(["a"])
    assert [c.key for c in store.chunks_by_last_use()] == ["b", "c", "a"]
    assert store.delete_chunks(["b", "nope"]) == 1
    assert sorted(c.key for c in store.all_chunks()) == ["a", "c"]


def test_chunk_chain_and_conversation_cache(store: Store) -> None:
    store.add_chunk(_chunk("c0", None, 0, nbytes=100))
    store.add_chunk(_chunk("c1", "c0", 256, nbytes=200))
    store.add_chunk(_chunk("c2", "c1", 512, partial=True, nbytes=40))
    store.add_chunk(_chunk("x1", "c0", 256, nbytes=1000))  # a fork: not on c2's chain
    assert [c.key for c in store.chunk_chain("c2")] == ["c0", "c1", "c2"]
    assert [c.key for c in store.chunk_chain("c0")] == ["c0"]
    assert store.chunk_chain("missing") == []

    conv = store.create_conversation()
    other = store.create_conversation()
    store.set_kv_head(conv.id, "c2", 522, "fp1")
    store.set_kv_head(other.id, "gone", 256, "fp1")
    head = store.get_kv_head(conv.id)
    assert (head.key, head.tokens, head.fingerprint) == ("c2", 522, "fp1")
    got = {c.id: c for c in store.list_conversations()}
    assert (got[conv.id].cache_state, got[conv.id].cache_bytes, got[conv.id].token_count) == (
        "disk",
        340,
        522,
    )
    assert (got[other.id].cache_state, got[other.id].cache_bytes) == ("none", 0)
    assert store.get_conversation(conv.id).cache_bytes == 340

    # An evicted middle chunk: the chain stops there, and the head still counts as on disk.
    store.delete_chunks(["c1"])
    assert [c.key for c in store.chunk_chain("c2")] == ["c2"]
    assert store.get_conversation(conv.id).cache_bytes == 40


def test_chunk_stats(store: Store) -> None:
    store.add_chunk(_chunk("a", None, 0, nbytes=100))
    store.add_chunk(_chunk("b", "a", 256, nbytes=50, partial=True))
    store.add_chunk(_chunk("c", None, 0, nbytes=7, codec="int4", fingerprint="fp2"))
    assert store.chunk_stats() == {
        "count": 3,
        "bytes": 157,
        "partial": 1,
        "by_codec": {"int8": {"count": 2, "bytes": 150}, "int4": {"count": 1, "bytes": 7}},
        "by_fingerprint": {"fp1": {"count": 2, "bytes": 150}, "fp2": {"count": 1, "bytes": 7}},
    }
