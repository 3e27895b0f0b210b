"""Full-text search (migration 0004): the FTS5 index kept in sync by triggers,
Store.search with the match in context, list_conversations through the index, the
substring fallback, and `chatkv ls -q`."""

from __future__ import annotations

import json
import sqlite3

from chatkv.cli import main
from chatkv.store import Store


def _fill(store: Store) -> tuple[int, int, int]:
    a = store.create_conversation(title="Trip to Zürich")
    store.add_message(a.id, "user", "Where should I eat?")
    b = store.create_conversation(title="geography")
    store.add_message(b.id, "user", "What is the capital of France?")
    msg = store.add_message(b.id, "assistant", "The capital of France is Paris, a city on the Seine.")
    c = store.create_conversation(title="unrelated")
    store.add_message(c.id, "user", "Tell me about the stars.")
    return a.id, b.id, msg.id


def test_search_shows_the_match_in_context(store):
    a, b, msg = _fill(store)
    assert store.has_fts()
    hits = store.search("PARIS")
    assert [(h.conversation_id, h.message_id, h.role) for h in hits] == [(b, msg, "assistant")]
    assert "[Paris]" in hits[0].snippet and "France" in hits[0].snippet
    title = store.search("zürich", mark=("<", ">"))
    assert [(h.conversation_id, h.message_id, h.role, h.snippet) for h in title] == [
        (a, None, "title", "Trip to <Zürich>")
    ]
    assert {h.conversation_id for h in store.search("capital of france")} == {b}
    assert store.search("capital", conversation_ids=[a]) == []
    assert store.search("nowhere at all") == []


def test_index_follows_inserts_renames_and_deletes(store):
    a, b, msg = _fill(store)
    store.rename(a, "Weekend in Bern")
    assert store.search("Zürich") == [] and [h.conversation_id for h in store.search("bern")] == [a]
    store.delete_message(msg)
    assert store.search("Paris") == []
    store.delete_conversation(b)  # its messages go by cascade, and out of the index too
    assert store.search("capital") == [] and store.list_conversations("capital") == []
    with sqlite3.connect(store.path) as db:  # the index holds no row for what was deleted
        (n,) = db.execute(
            "SELECT count(*) FROM messages_fts WHERE messages_fts MATCH '\"capital\"'"
        ).fetchone()
    assert n == 0


def test_list_conversations_uses_the_index_with_the_same_answers_as_the_scan(store, monkeypatch):
    a, b, _ = _fill(store)
    queries = ["trip", "ZÜRICH", "capital of", "city on the", "stars", "e", "?", "nothing here", '"quoted"']
    with_fts = {q: [c.id for c in store.list_conversations(q)] for q in queries}
    monkeypatch.setattr(store, "_fts", False)  # a SQLite without FTS5
    scanned = {q: [c.id for c in store.list_conversations(q)] for q in queries}
    assert with_fts == scanned
    assert with_fts["capital of"] == [b] and with_fts["trip"] == [a]
    hits = store.search("capital")  # the fallback also gives snippets
    assert hits and "[capital]" in hits[0].snippet


def test_short_queries_scan(store, monkeypatch):
    a, b, _ = _fill(store)
    calls = []
    real = store._scan
    monkeypatch.setattr(store, "_scan", lambda *args: calls.append(args) or real(*args))
    assert {h.conversation_id for h in store.search("?")} == {a, b}
    assert calls  # two characters or fewer: no trigram to look up
    calls.clear()
    store.search("Paris")
    assert calls == []


def test_ls_q_shows_the_match_in_context(capsys, chatkv_home):
    from chatkv.paths import db_path

    with Store(db_path()) as store:
        _, b, _ = _fill(store)
    capsys.readouterr()
    assert main(["ls", "-q", "paris"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[0] == str(b) and "geography" in out[1]
    assert out[2].strip().startswith("assistant: ") and "[Paris]" in out[2]
    assert main(["ls", "--json", "-q", "paris"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["id"] == b and "[Paris]" in row["match"]
