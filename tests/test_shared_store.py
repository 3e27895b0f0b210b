"""Conversations on PostgreSQL ([store] url): the schema upgrade guarded for hosts opening a
new database at once, writers from several processes never losing or duplicating a message,
the same schema as the ORM's, and one-line errors that never show the password. The store's
everyday behaviour runs on both backends in test_store.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from servers import new_database

import chatkv
from chatkv.api import TurnStats
from chatkv.cli import main
from chatkv.config import load_settings
from chatkv.errors import ChatKVError, ConfigError
from chatkv.store import Store
from chatkv.store import db as store_db
from chatkv.store.models import Base
from chatkv.store.search import include_object

REPO = Path(chatkv.__file__).resolve().parents[1]

# One "host": opens the store when told to (so that both create and migrate the new
# database at the same moment), then, once the parent has made the conversation, appends
# messages to it from two threads and saves one reply whose turn id every host shares.
_HOST = """
import sys, threading, time
from pathlib import Path
from chatkv.api import TurnStats
from chatkv.store import Store
url, go, tag, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.002)
store = Store(url)
print("open", flush=True)
conv_id = int(sys.stdin.readline())
def write(t):
    for i in range(n):
        store.add_message(conv_id, "user", f"{tag}-{t}-{i}")
threads = [threading.Thread(target=write, args=(t,)) for t in range(2)]
for t in threads: t.start()
for t in threads: t.join()
store.finish_turn(conv_id, "the one reply", TurnStats(), turn_id="shared-turn")
print("done", flush=True)
"""


def test_hosts_opening_a_new_database_at_once_write_without_loss_or_duplicates(
    pg_server, tmp_path: Path
) -> None:
    url, go, n = new_database(pg_server), tmp_path / "go", 15
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    hosts = {
        tag: subprocess.Popen(
            [sys.executable, "-c", _HOST, url, str(go), tag, str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for tag in ("h1", "h2")
    }
    for p in hosts.values():
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    for p in hosts.values():
        line = p.stdout.readline().strip()
        assert line == "open", p.stderr.read()
    with Store(url) as store:
        conv = store.create_conversation(title="shared")
        for p in hosts.values():
            p.stdin.write(f"{conv.id}\n")
            p.stdin.flush()
        for p in hosts.values():
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        msgs = store.messages(conv.id)
    assert [m.position for m in msgs] == list(range(len(msgs)))
    users = [m.content for m in msgs if m.role == "user"]
    expected = {f"{tag}-{t}-{i}" for tag in hosts for t in range(2) for i in range(n)}
    assert sorted(users) == sorted(expected)  # each exactly once
    for tag in hosts:  # each writer's messages keep their order
        for t in range(2):
            mine = [u for u in users if u.startswith(f"{tag}-{t}-")]
            assert mine == [f"{tag}-{t}-{i}" for i in range(n)]
    assert [m.content for m in msgs if m.role == "assistant"] == ["the one reply"]


def test_models_and_migrations_agree_on_postgresql(pg_server) -> None:
    url = new_database(pg_server)
    Store(url).close()
    engine = store_db.make_server_engine(url, pooled=False)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "include_object": include_object}
            )
            assert compare_metadata(ctx, Base.metadata) == []
            assert store_db.current_revision(conn) == store_db.SCHEMA_HEAD
    finally:
        engine.dispose()


def test_search_on_postgresql_folds_case_beyond_ascii(pg_server) -> None:
    with Store(new_database(pg_server)) as store:
        conv, _ = store.start_conversation("Where is ZÜRICH's 100% best café?")
        other, _ = store.start_conversation("nothing here")
        assert [c.id for c in store.list_conversations("zürich")] == [conv.id]
        # LIKE's wildcards in the query are plain text.
        assert [c.id for c in store.list_conversations("100%")] == [conv.id]
        assert [c.id for c in store.list_conversations("_")] == []
        hits = store.search("CAFÉ")
        assert [(h.conversation_id, h.snippet) for h in hits if h.role == "user"] == [
            (conv.id, "Where is ZÜRICH's 100% best [café]?")
        ]
        assert store.import_conversation("llm:1", "t", "m", "", [("user", "hi", None)]) is not None
        assert store.import_conversation("llm:1", "t", "m", "", [("user", "hi", None)]) is None
        assert store.imported_sources() == {"llm:1"}
        assert other.id != conv.id


def test_unreachable_database_is_one_line_without_the_password(monkeypatch, capsys) -> None:
    # Port 9 on loopback: nothing listens, the connection is refused at once.
    url = "postgresql://alice:s3cr3t-pw@127.0.0.1:9/chatkv"
    with pytest.raises(ChatKVError) as info:
        Store(url)
    message = str(info.value)
    assert "s3cr3t-pw" not in message and "\n" not in message
    assert "cannot reach the database server" in message and "alice:***@127.0.0.1:9/chatkv" in message

    monkeypatch.setenv("CHATKV_STORE_URL", url)
    assert main(["ls"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "s3cr3t-pw" not in err and "cannot reach" in err


def test_server_going_away_is_one_line() -> None:
    from servers import pg_data_dir, start_postgres

    data = pg_data_dir()
    server = start_postgres(data)
    try:
        url = new_database(server)
        store = Store(url)
        conv = store.create_conversation()
    finally:
        server.cleanup()  # the server stops under an open store
    with pytest.raises(Exception) as info:
        store.add_message(conv.id, "user", "lost?")
    line = store_db.describe_db_error(info.value, url)
    assert "\n" not in line and line.startswith("cannot reach the database server")
    store.close()
    shutil.rmtree(data, ignore_errors=True)


def test_store_url_setting(monkeypatch) -> None:
    monkeypatch.setenv("CHATKV_STORE_URL", "postgresql://bob@db.internal/chatkv")
    settings = load_settings()
    assert store_db.database_target(settings) == "postgresql://bob@db.internal/chatkv"
    monkeypatch.setenv("CHATKV_STORE_URL", "")
    assert store_db.database_target(load_settings()) == store_db.db_path()
    monkeypatch.setenv("CHATKV_STORE_URL", "mysql://x@y/z")
    with pytest.raises(ConfigError, match="store.url"):
        load_settings()
    with pytest.raises(ConfigError, match="unsupported"):
        Store("postgresql+asyncpg://x@y/z")


def test_finish_turn_replayed_on_another_host_saves_once(pg_server) -> None:
    url = new_database(pg_server)
    with Store(url) as a, Store(url) as b:
        conv, _ = a.start_conversation("hi")
        first = a.finish_turn(conv.id, "reply", TurnStats(), turn_id="t1")
        again = b.finish_turn(conv.id, "reply", TurnStats(), turn_id="t1")
        assert again.id == first.id
        assert [m.content for m in b.messages(conv.id)] == ["hi", "reply"]


def test_database_stopping_mid_turn_loses_nothing_the_user_saw(tiny_settings, tiny_lm) -> None:
    """The server stops while a reply streams: the turn fails in one line naming where the
    reply is kept, and the next start (server back) saves it."""
    from servers import pg_data_dir, start_postgres

    from chatkv import journal
    from chatkv.api import GenerationSettings
    from chatkv.session import Chat

    data = pg_data_dir()
    server = start_postgres(data)
    url = new_database(server)
    chat = Chat(tiny_settings, store=Store(url), lm=tiny_lm)
    chat.load()
    conv = chat.new_conversation()
    turn = chat.send(conv.id, "Tell me a story about the sea.", GenerationSettings(max_new_tokens=24))
    shown = []
    try:
        with pytest.raises(ChatKVError) as info:
            for piece in turn:
                shown.append(piece)
                if len(shown) == 1:
                    server.cleanup()  # the server stops under the turn
        message = str(info.value)
        assert "\n" not in message and "cannot reach the database server" in message
        kept = list(journal.journal_dir().glob("*.jsonl"))
        assert len(kept) == 1 and str(kept[0]) in message
        chat.close()
    finally:
        server = start_postgres(data)  # back, on the same socket
    try:
        again = Chat(tiny_settings, store=Store(url), lm=tiny_lm)  # the next start replays the journal
        assert [(m.role, m.content) for m in again.messages(conv.id)] == [
            ("user", "Tell me a story about the sea."),
            ("assistant", "".join(shown)),
        ]
        again.close()
    finally:
        server.cleanup()
        shutil.rmtree(data, ignore_errors=True)


def test_each_database_user_has_a_namespace_of_its_own(pg_server) -> None:
    import uuid

    import sqlalchemy as sa

    url = new_database(pg_server)
    role = "bob" + uuid.uuid4().hex[:8]
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:  # the test server trusts local connections: no password
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        conn.exec_driver_sql(f"GRANT CREATE ON DATABASE {sa.engine.make_url(url).database} TO {role}")
    bob_url = sa.engine.make_url(url).set(username=role).render_as_string(hide_password=False)
    with Store(url) as mine, Store(bob_url) as bobs:
        mine.start_conversation("my question")
        bobs.start_conversation("bob's question")
        assert [c.title for c in mine.list_conversations()] == ["my question"]
        assert [c.title for c in bobs.list_conversations()] == ["bob's question"]
        assert [c.title for c in bobs.list_conversations("question")] == ["bob's question"]
    with admin.connect() as conn:
        schemas = {r[0] for r in conn.exec_driver_sql("SELECT nspname FROM pg_namespace")}
    admin.dispose()
    assert {"chatkv_postgres", f"chatkv_{role}"} <= schemas


# Another host's turn in a conversation: holds its lease (its own data dir) until killed.
_HOLDER = """
import sys
from chatkv.config import load_settings
from chatkv.session import Chat
held = Chat(load_settings()).hold(int(sys.argv[2]))  # what a turn takes first
print("held", flush=True)
sys.stdin.read()
"""


def test_one_turn_at_a_time_across_hosts(pg_server, tiny_model_dir, tmp_path: Path) -> None:
    """On PostgreSQL the lease is the server's: a second host's `ask -C` in a conversation
    another host is answering in gets the busy line, and the lease of a killed holder is
    free again (the server drops it with the connection)."""
    from chatkv import lease

    url = new_database(pg_server)
    with Store(url) as store:
        conv, _ = store.start_conversation("hello")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1",
            "CHATKV_STORE_URL": url,
            "CHATKV_MODEL_NAME": str(tiny_model_dir),
            "CHATKV_MODEL_DEVICE": "cpu",
            "CHATKV_GENERATION_MAX_NEW_TOKENS": "2",
        }
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, url, str(conv.id)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**env, "CHATKV_HOME": str(tmp_path / "host-a")},
        )
        try:
            assert holder.stdout.readline().strip() == "held"
            other = subprocess.run(
                [sys.executable, "-m", "chatkv", "ask", "-C", str(conv.id), "me too?"],
                env={**env, "CHATKV_HOME": str(tmp_path / "host-b")},
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert other.returncode == 1, other.stderr
            assert other.stderr.count("\n") == 1 and f"conversation {conv.id} is busy" in other.stderr
            assert [m.content for m in store.messages(conv.id)] == ["hello"]  # nothing of the refused turn
        finally:
            holder.kill()
            holder.wait()
        with lease.acquire(conv.id, wait_s=30, engine=store.engine) as held:
            assert held.held
        # Released: a later lease of this process takes it again at once.
        lease.acquire(conv.id, wait_s=0, engine=store.engine).release()


def test_a_bad_url_setting_never_repeats_its_password() -> None:
    from chatkv.config import validate

    with pytest.raises(ConfigError) as e:
        validate("store.url", "postgres://alice:s3cret@db.internal/chatkv", "CHATKV_STORE_URL")
    assert "s3cret" not in str(e.value) and "alice:***@db.internal" in str(e.value)


def test_benches_never_reach_the_users_shared_store(monkeypatch) -> None:
    """A bench's scratch home hides CHATKV_STORE_URL and CHATKV_CACHE_URL from the CLI processes
    it starts (their `cache gc --max-bytes 0` would empty the user's bucket), then restores them."""
    from chatkv.bench.common import scratch_home

    monkeypatch.setenv("CHATKV_STORE_URL", "postgresql://alice@db.internal/chatkv")
    monkeypatch.setenv("CHATKV_CACHE_URL", "s3://team-kv/chatkv")
    with scratch_home():
        assert "CHATKV_STORE_URL" not in os.environ and "CHATKV_CACHE_URL" not in os.environ
    assert os.environ["CHATKV_CACHE_URL"] == "s3://team-kv/chatkv"
