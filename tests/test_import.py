"""`chatkv import llm | chatgpt`: history from simonw/llm's logs.db and a ChatGPT export,
imported once (again is a no-op), with --dry-run, --json and one-line errors."""

from __future__ import annotations

import json
import sqlite3
import zipfile
from pathlib import Path

import pytest

from chatkv.cli import main
from chatkv.paths import db_path
from chatkv.store import Store

T0 = "2024-05-01T12:00:00.000000+00:00"
T1 = "2024-05-01T12:01:00.000000+00:00"


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def llm_db(path: Path) -> Path:
    """A logs.db laid out as llm's migrations leave it (m010 and the columns added since)."""
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE conversations (id TEXT PRIMARY KEY, name TEXT, model TEXT);
        CREATE TABLE responses (
            id TEXT PRIMARY KEY, model TEXT, prompt TEXT, system TEXT, prompt_json TEXT,
            options_json TEXT, response TEXT, response_json TEXT,
            conversation_id TEXT REFERENCES conversations(id), duration_ms INTEGER,
            datetime_utc TEXT, input_tokens INTEGER, output_tokens INTEGER, token_details TEXT,
            schema_id TEXT, resolved_model TEXT);
        """
    )
    db.executemany(
        "INSERT INTO conversations VALUES (?, ?, ?)",
        [("01JA", "Capital cities", "gpt-4o-mini"), ("01JB", "Haiku", "claude-3")],
    )
    db.executemany(
        "INSERT INTO responses (id, model, prompt, system, response, conversation_id, datetime_utc) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            ("r2", "gpt-4o-mini", "And of Italy?", None, "Rome.", "01JA", T1),
            ("r1", "gpt-4o-mini", "Capital of France?", "Be brief.", "Paris.", "01JA", T0),
            ("r3", "claude-3", "A haiku about caches", None, "Keys kept, values saved", "01JB", T0),
            ("r4", "claude-3", "Blob \u00e9".encode(), None, b"kept \xff", "01JB", T1),  # BLOB columns
        ],
    )
    db.commit()
    db.close()
    return path


def node(nid, role, text, parent, children, t=1714564800.0, **meta):
    msg = None
    if role is not None:
        msg = {
            "id": nid,
            "author": {"role": role},
            "content": {"content_type": "text", "parts": [text]},
            "create_time": t,
            "metadata": meta,
        }
    return {"id": nid, "message": msg, "parent": parent, "children": children}


def chatgpt_export(path: Path) -> Path:
    """A conversation with an edited first question (two branches, the second current),
    a hidden system node, and an image part; and a second, plain conversation."""
    mapping = {
        "root": node("root", None, "", None, ["sys"]),
        "sys": node("sys", "system", "", "root", ["u1", "u1b"], is_visually_hidden_from_conversation=True),
        "u1": node("u1", "user", "What is the capitol of France?", "sys", ["a1"]),
        "a1": node("a1", "assistant", "Paris (old branch).", "u1", []),
        "u1b": node("u1b", "user", "What is the capital of France?", "sys", ["a1b"]),
        "a1b": node("a1b", "assistant", "Paris.", "u1b", ["t1"]),
        "t1": node("t1", "tool", "search results", "a1b", ["a2"]),
        "a2": node("a2", "assistant", "It is on the Seine.", "t1", []),
    }
    mapping["u1b"]["message"]["content"]["parts"].append({"content_type": "image_asset_pointer"})
    data = [
        {
            "title": "France",
            "create_time": 1714564800.0,
            "mapping": mapping,
            "current_node": "a2",
            "conversation_id": "c-1",
            "default_model_slug": "gpt-4o",
        },
        {
            "title": "Hello",
            "create_time": 1714564900.0,
            "mapping": {
                "r": node("r", None, "", None, ["u"]),
                "u": node("u", "user", "Hi!", "r", ["a"]),
                "a": node("a", "assistant", "Hello! How can I help?", "u", []),
            },
            "current_node": "a",
            "id": "c-2",
        },
    ]
    path.write_text(json.dumps(data))
    return path


def transcripts() -> dict[str, list[tuple[str, str]]]:
    with Store(db_path()) as store:
        return {
            c.title: [(m.role, m.content) for m in store.messages(c.id)]
            for c in store.list_conversations(limit=100)
        }


def test_import_llm_logs(capsys, tmp_path):
    path = llm_db(tmp_path / "logs.db")
    code, out, err = run(capsys, "import", "llm", str(path), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["imported"], report["messages"], report["skipped"]) == (2, 8, 0)
    got = transcripts()
    assert got["Capital cities"] == [
        ("user", "Capital of France?"),
        ("assistant", "Paris."),
        ("user", "And of Italy?"),
        ("assistant", "Rome."),
    ]
    assert got["Haiku"] == [
        ("user", "A haiku about caches"),
        ("assistant", "Keys kept, values saved"),
        ("user", "Blob \u00e9"),  # text, not b'...'
        ("assistant", "kept \ufffd"),
    ]
    with Store(db_path()) as store:
        conv = next(c for c in store.list_conversations() if c.title == "Capital cities")
        assert (conv.model, conv.system_prompt) == ("gpt-4o-mini", "Be brief.")
        assert conv.created_at.isoformat() == "2024-05-01T12:00:00+00:00"
        assert [h.conversation_id for h in store.search("of Italy")] == [conv.id]  # indexed too
    # Again: nothing new.
    code, out, err = run(capsys, "import", "llm", str(path))
    assert code == 0 and "imported 0 conversations" in err and "2 already imported" in err
    assert len(transcripts()) == 2


def test_import_chatgpt_follows_the_current_branch(capsys, tmp_path):
    path = chatgpt_export(tmp_path / "conversations.json")
    code, out, err = run(capsys, "import", "chatgpt", str(path))
    assert code == 0, err
    assert "imported 2 conversations (4 messages)" in err
    got = transcripts()
    assert got["France"] == [
        ("user", "What is the capital of France?"),
        ("assistant", "Paris.\n\nIt is on the Seine."),
    ]
    assert got["Hello"] == [("user", "Hi!"), ("assistant", "Hello! How can I help?")]
    code, out, err = run(capsys, "import", "chatgpt", str(path), "--json")
    assert json.loads(out)["skipped"] == 2 and len(transcripts()) == 2


def test_chatgpt_zip_and_dry_run(capsys, tmp_path):
    export = chatgpt_export(tmp_path / "conversations.json")
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(export, "conversations.json")
    code, out, err = run(capsys, "import", "chatgpt", str(archive), "--dry-run", "--json")
    report = json.loads(out)
    assert code == 0 and report["dry_run"] and report["imported"] == 2
    assert [c["id"] for c in report["conversations"]] == [None, None]
    assert not db_path().exists() or transcripts() == {}
    code, out, err = run(capsys, "import", "chatgpt", str(archive))
    assert code == 0 and len(transcripts()) == 2


@pytest.mark.parametrize(
    "kind,content,expect",
    [
        ("llm", b"not a database at all, just text" * 10, "not an llm logs database"),
        ("llm", None, "has no responses table"),
        ("chatgpt", b"{not json", "is not valid JSON"),
        ("chatgpt", b'{"title": "x"}', "is not a list of conversations"),
        ("chatgpt", b'[{"title": "x"}]', "conversation 1 is malformed (it has no message mapping)"),
        (
            "chatgpt",
            b'[{"title": "x", "mapping": {"a": {"message": {"author": "user"}, "parent": null}}}]',
            "conversation 1 is malformed",
        ),
        ("chatgpt", b"PK\x03\x04 garbage", "looks like a zip file but is damaged"),
        ("chatgpt", b"[" * 100_000, "nested too deep"),
    ],
)
def test_bad_files_are_one_line_errors(capsys, tmp_path, kind, content, expect):
    path = tmp_path / "input"
    if content is None:
        sqlite3.connect(path).execute("CREATE TABLE other (x)").connection.close()
    else:
        path.write_bytes(content)
    code, out, err = run(capsys, "import", kind, str(path))
    lines = err.strip().splitlines()
    assert code == 1 and out == "" and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("chatkv: error: ") and expect in lines[0], lines[0]
    assert not db_path().exists() or transcripts() == {}


def test_an_llm_database_whose_name_holds_uri_characters_is_read_as_named(capsys, tmp_path):
    odd = tmp_path / "logs #1?mode=rw%20.db"
    sqlite3.connect(odd).execute("CREATE TABLE other (x)").connection.close()
    code, out, err = run(capsys, "import", "llm", str(odd))
    assert code == 1 and "has no responses table" in err  # this file, not "logs " made anew
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("logs")) == [odd.name]


def test_missing_file_is_a_usage_error(capsys, tmp_path):
    code, out, err = run(capsys, "import", "llm", str(tmp_path / "nope.db"))
    assert code == 2 and "does not exist" in err
