"""The command line, in process (`chatkv.cli.main`) on the tiny model:

- `ask` starts, continues (-c, -C) and resumes conversations from the disk cache, reads
  the prompt from standard input, and prints --json with the reply and its statistics;
- `ls`, `show`, `rm`, `export` (md, json, -o) and `config show` report what is saved;
- `cache stats | gc | verify` (--json) see and trim the chunk store;
- every user error is one line on stderr starting "chatkv: error:", exit code 1, and
  writes nothing to the database; usage errors exit 2;
- what chatkv creates under CHATKV_HOME is private to the user (0600 files, 0700 dirs).
"""

from __future__ import annotations

import io
import json
import os
import stat

import pytest

from chatkv.cli import main
from chatkv.paths import db_path, kv_dir
from chatkv.store import Store

MAX_NEW = 6


# The tiny model, greedy and short replies (conftest's cli_env).
CLI_MAX_NEW_TOKENS, CLI_CHUNK_TOKENS = MAX_NEW, 32
pytestmark = pytest.mark.usefixtures("cli_env")


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def ask_json(capsys, *args: str) -> dict:
    code, out, err = run(capsys, "ask", "--json", *args)
    assert code == 0, err
    return json.loads(out)


def saved() -> list[tuple[int, list[tuple[str, str]]]]:
    """Every conversation and its messages, as stored."""
    if not db_path().exists():
        return []
    with Store(db_path()) as store:
        return [
            (c.id, [(m.role, m.content) for m in store.messages(c.id)])
            for c in store.list_conversations(limit=1000)
        ]


SYSTEM = "You are terse. Caches keep keys and values of attention for every token of the history."


def test_ask_new_continue_and_resume(capsys, monkeypatch):
    first = ask_json(capsys, "--system", SYSTEM, "Summarise the GNU GPL in three bullet points.")
    assert set(first) == {"conversation_id", "message_id", "reply", "stats", "startup"}
    cid = first["conversation_id"]
    s = first["stats"]
    assert s["cache_source"] == "none" and s["cached_tokens"] == 0
    assert s["prompt_tokens"] == s["prefilled_tokens"] > 32
    assert 0 < s["completion_tokens"] <= MAX_NEW and s["codec"] == "fp16"
    assert s["finish_reason"] in ("stop", "length")

    # Plain output: the reply on stdout; -c continues the most recent conversation and,
    # in a new Chat (a new process), the history comes from the chunks on disk.
    code, out, err = run(capsys, "ask", "-c", "How does the Apache license differ?")
    assert code == 0, err
    with Store(db_path()) as store:
        msgs = store.messages(cid)
    assert [m.role for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert out == msgs[3].content + "\n"
    assert msgs[3].stats.cache_source == "disk" and msgs[3].stats.cached_tokens >= 32

    # -C with the prompt on standard input
    monkeypatch.setattr("sys.stdin", io.StringIO("\ufeffTell me a story about the sea.\n"))  # with a BOM
    third = ask_json(capsys, "-C", str(cid), "-")
    assert third["conversation_id"] == cid
    assert third["stats"]["cache_source"] == "disk"
    # everything up to the last reply, which a random model's text may re-tokenize differently
    assert third["stats"]["cached_tokens"] >= msgs[3].stats.prompt_tokens
    conv = dict(saved())[cid]
    assert conv[-2:] == [
        ("user", "Tell me a story about the sea."),
        ("assistant", third["reply"]),
    ]  # no final newline

    # a new conversation without -c/-C
    other = ask_json(capsys, "Hello!")
    assert other["conversation_id"] != cid
    assert [c for c, _ in saved()] == [other["conversation_id"], cid]  # most recent first

    # --stats prints one line of statistics to stderr
    code, out, err = run(capsys, "ask", "-C", str(cid), "--stats", "And the stars?")
    assert code == 0 and f"conversation {cid}:" in err and "prefilled" in err


def test_ls_show_rm_export_and_config(capsys, tmp_path, monkeypatch):
    a = ask_json(capsys, "--system", SYSTEM, "Summarise the GNU GPL.")
    b = ask_json(capsys, "Hello! Tell me about the stars.")

    code, out, err = run(capsys, "ls")
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split() == ["ID", "UPDATED", "MSGS", "TOKENS", "CACHE", "TITLE"]
    assert len(lines) == 2 and lines[0].split()[0] == str(b["conversation_id"])
    assert "Summarise the GNU GPL." in lines[1]
    code, out, err = run(capsys, "ls", "-q", "no such words")
    assert code == 0 and out == "" and "no conversations match 'no such words'" in err
    code, out, _ = run(capsys, "ls", "--json", "-q", "gnu gpl")
    listed = json.loads(out)
    assert [c["id"] for c in listed] == [a["conversation_id"]]
    assert listed[0]["messages"] == 2 and listed[0]["cache"] == "disk" and listed[0]["cache_bytes"] > 0
    assert listed[0]["message_count"] == 2

    code, out, _ = run(capsys, "show", str(a["conversation_id"]))
    assert code == 0 and f"system: {SYSTEM}" in out and a["reply"] in out and "prompt tokens" in out
    code, out, _ = run(capsys, "show", "--json", str(a["conversation_id"]))
    shown = json.loads(out)
    assert shown["system_prompt"] == SYSTEM
    assert [m["role"] for m in shown["messages"]] == ["user", "assistant"] and shown["message_count"] == 2
    assert shown["messages"][1]["content"] == a["reply"]
    assert shown["messages"][1]["stats"]["prompt_tokens"] == a["stats"]["prompt_tokens"]

    code, out, _ = run(capsys, "export", str(a["conversation_id"]))
    assert code == 0 and out.startswith("# Summarise the GNU GPL.") and "## System" in out
    assert "## User\n\nSummarise the GNU GPL.\n" in out and f"## Assistant\n\n{a['reply']}\n" in out
    code, out, _ = run(capsys, "export", "-f", "json", str(a["conversation_id"]))
    exported = json.loads(out)
    assert exported["id"] == a["conversation_id"] and exported["messages"][1]["content"] == a["reply"]
    target = tmp_path / "out.md"
    code, out, err = run(capsys, "export", str(a["conversation_id"]), "-o", str(target))
    assert code == 0 and out == "" and str(target) in err
    assert target.read_text(encoding="utf-8").startswith("# Summarise the GNU GPL.")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    monkeypatch.chdir(tmp_path)
    code, dashed, _ = run(capsys, "export", str(a["conversation_id"]), "-o", "-")  # as for batch
    assert code == 0 and dashed.startswith("# Summarise the GNU GPL.") and not (tmp_path / "-").exists()

    code, out, _ = run(capsys, "config", "show")
    assert code == 0 and "generation.temperature = 0.0" in out and "CHATKV_CACHE_CODEC" in out
    code, out, _ = run(capsys, "config", "show", "--json")
    config = json.loads(out)
    assert config["settings"]["cache.codec"] == "fp16"
    assert config["settings"]["generation.max_new_tokens"] == MAX_NEW
    assert config["data_dir"] == str(db_path().parent)

    code, out, err = run(capsys, "rm", str(a["conversation_id"]))
    assert code == 0 and f"deleted conversation {a['conversation_id']}" in err
    assert [c for c, _ in saved()] == [b["conversation_id"]]


def test_cache_stats_gc_verify(capsys):
    a = ask_json(capsys, "--system", SYSTEM, "Summarise the GNU GPL in three bullet points.")
    code, out, _ = run(capsys, "cache", "stats", "--json")
    stats = json.loads(out)
    assert code == 0 and stats["count"] >= 3 and stats["bytes"] > 0 and stats["partial"] == 1
    assert list(stats["by_codec"]) == ["fp16"]
    code, out, _ = run(capsys, "cache", "stats")
    assert f"{stats['count']} chunks" in out

    with Store(db_path()) as store:
        recs = store.all_chunks()
    bad = kv_dir() / recs[0].path
    bad.write_bytes(bad.read_bytes()[:-10])
    code, out, _ = run(capsys, "cache", "verify", "--dry-run", "--json")
    report = json.loads(out)
    assert code == 1 and report["checked"] == stats["count"] and report["removed"] == 0  # 1: damage found
    assert [b["key"] for b in report["bad"]] == [recs[0].key]
    assert bad.exists()
    code, out, _ = run(capsys, "cache", "verify", "--json")
    assert code == 1 and json.loads(out)["removed"] == 1 and not bad.exists()
    code, out, _ = run(capsys, "cache", "verify")
    assert code == 0 and "0 bad" in out

    (kv_dir() / "ab").mkdir(exist_ok=True)
    leftover = kv_dir() / "ab" / ".tmp-x.part"
    leftover.write_bytes(b"left by a crash")
    os.utime(leftover, (leftover.stat().st_mtime - 3600,) * 2)  # an hour ago
    code, out, _ = run(capsys, "cache", "gc", "--json")
    report = json.loads(out)
    assert code == 0 and report["orphan_files"] == 1 and report["removed"] == 0
    code, out, _ = run(capsys, "cache", "gc", "--json", "--max-bytes", "0")
    report = json.loads(out)
    assert report["removed"] == stats["count"] - 1 and report["budget"] == 0
    code, out, _ = run(capsys, "cache", "stats", "--json")
    assert json.loads(out)["count"] == 0
    # the messages are untouched, and the conversation goes on (prefilled again)
    again = ask_json(capsys, "-C", str(a["conversation_id"]), "And the stars?")
    assert again["stats"]["cache_source"] == "none"
    assert len(dict(saved())[a["conversation_id"]]) == 4


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("chatkv: error: "), err
    return lines[0]


def test_user_errors_are_one_line_exit_1_and_write_nothing(capsys, monkeypatch, tiny_model_dir, tmp_path):
    import sys

    first = ask_json(capsys, "Hello!")
    before = saved()

    def fails(*args: str, stdin: io.TextIOBase | None = None, match: str = "") -> None:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", stdin)
        code, out, err = run(capsys, *args)
        line = one_error_line(err)
        assert code == 1, err
        assert match in line, line
        assert out == ""
        assert saved() == before

    fails("ask", "   ", match="empty")
    fails("ask", "-", stdin=io.StringIO(" \n\t"), match="empty")
    fails("ask", "-C", "999", "hello", match="999")
    fails("ask", "-C", str(first["conversation_id"]), "   ", match="empty")
    fails("show", "999", match="999")
    fails("export", "999", match="999")
    fails("rm", str(first["conversation_id"]), "999", match="999")  # all checked before any goes
    # Standard input that is not UTF-8, as Python opens it under a C.UTF-8 locale
    # (undecodable bytes become surrogates) and under a strict one.
    for errors in ("surrogateescape", "strict"):
        bad = io.TextIOWrapper(io.BytesIO(b"caf\xe9 \xff\xfe hello"), encoding="utf-8", errors=errors)
        fails("ask", "-", stdin=bad, match="standard input")
    # An argument that was not UTF-8 either (any text one, before anything loads): a usage error.
    for argv, named in (
        (["ask", "caf\udce9"], "prompt"),
        (["ask", "-s", "caf\udce9", "hello"], "--system"),
        (["ls", "-q", "\udcff"], "-q"),
        (["ask", "--stop", "ok", "--stop", "\udcff", "hello"], "--stop"),
    ):
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "" and f"{named} is not UTF-8 text" in one_error_line(err), err
        assert saved() == before
    fails("ask", "--model", "/nonexistent/dir", "hello", match="/nonexistent/dir")
    fails("ask", "-C", str(first["conversation_id"]), "--model", "/nonexistent/dir", "hello")
    junk, hollow = tmp_path / "junk.gguf", tmp_path / "hollow.gguf"
    junk.write_text("not a model\n")
    hollow.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(16))  # the magic, nothing in it
    for bad in (junk, hollow):  # were a traceback
        fails("ask", "--model", str(bad), "hello", match=f"{bad} is not a GGUF model chatkv can load")

    monkeypatch.setenv("CHATKV_GENERATION_TEMPERATURE", "hot")
    fails("ask", "hello", match="CHATKV_GENERATION_TEMPERATURE")
    monkeypatch.setenv("CHATKV_GENERATION_TEMPERATURE", "0")
    config = db_path().parent / "config.toml"
    config.write_text('[cache]\ncodec = "int3"\n')
    fails("ask", "hello", match=str(config))
    config.write_text("[cache\ncodec = ")
    fails("ask", "hello", match="not valid TOML")
    config.unlink()

    assert [c for c, _ in saved()] == [first["conversation_id"]]


def test_usage_errors_exit_2(capsys, monkeypatch):
    # One line naming what was wrong and the -h to read (it was argparse's usage block).
    for args in (["ask", "-c", "-C", "1", "hi"], ["show"], ["show", "one"], ["cache"], ["nonsense"]):
        code, out, err = run(capsys, *args)
        assert code == 2, args
        command = "chatkv" if args[0] == "nonsense" else f"chatkv {args[0]}"
        assert one_error_line(err).endswith(f"(see: {command} -h)")
    code, _, err = run(capsys, "ask", "--bogus", "hi")  # the subcommand names it, not the top level
    assert code == 2 and "unrecognized arguments: --bogus (see: chatkv ask -h)" in one_error_line(err)
    code, _, err = run(capsys, "cache", "gc", "--max-bytes", "lots")
    assert code == 2 and one_error_line(err)
    first = ask_json(capsys, "Hello!")
    before = saved()
    code, _, err = run(capsys, "ask", "-C", str(first["conversation_id"]), "--system", "x", "hi")
    assert code == 2 and "--system" in one_error_line(err)
    monkeypatch.setattr("sys.stdin", type("Tty", (io.StringIO,), {"isatty": lambda self: True})())
    code, _, err = run(capsys, "ask")
    assert code == 2 and "no prompt" in one_error_line(err)
    assert saved() == before


def test_everything_under_chatkv_home_is_private(capsys, chatkv_home):
    os.umask(0o022)  # main() tightens it itself
    ask_json(capsys, "--system", SYSTEM, "Summarise the GNU GPL in three bullet points.")
    run(capsys, "ls")
    paths = [chatkv_home, *chatkv_home.rglob("*")]
    assert any(p.suffix == ".safetensors" for p in paths) and db_path() in paths
    for p in paths:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), f"{p} has mode {oct(mode)}"


def test_a_damaged_chunk_is_reported_once(capsys, caplog):
    first = ask_json(capsys, "--system", SYSTEM, "Summarise the GNU GPL in three bullet points.")
    with Store(db_path()) as store:
        rec = store.chunk_chain(store.get_kv_head(first["conversation_id"]).key)[1]
    path = kv_dir() / rec.path
    path.write_bytes(path.read_bytes()[:-10])
    caplog.clear()
    code, out, err = run(capsys, "ask", "-C", str(first["conversation_id"]), "And the stars?")
    assert code == 0
    # What the user sees on stderr: ask's own lines, and chatkv's log records at WARNING
    # and above (main() sends those to stderr too).
    shown = err.splitlines() + [
        r.getMessage() for r in caplog.records if r.levelno >= 30 and r.name.startswith("chatkv")
    ]
    about = [line for line in shown if rec.key[:12] in line]
    assert len(about) == 1, shown
    assert "truncated or corrupt" in about[0] and "recomputed" in about[0]
    code, _, err = run(capsys, "ask", "-C", str(first["conversation_id"]), "And the sea?")
    assert code == 0 and "warning" not in err


def test_an_os_error_is_one_line_and_keeps_what_was_saved(capsys, tmp_path):
    code, out, _ = run(capsys, "ask", "--json", "Hello!")
    assert code == 0
    cid = json.loads(out)["conversation_id"]
    # A missing directory for -o is a usage mistake: said as one, not as a lost-data scare.
    code, out, err = run(capsys, "export", str(cid), "-o", str(tmp_path / "missing-dir" / "chat.md"))
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert "missing-dir does not exist" in line and "nothing was lost" not in line
    assert [len(msgs) for _, msgs in saved()] == [2]


def test_a_continued_conversation_goes_on_with_its_own_model(capsys, tmp_path, tiny_model_dir):
    """`ask -C` without --model continues with the model the conversation was last used with
    (its cache is that model's), a --model continues with that one and records it, and a
    recorded model that is gone gives one line on stderr and the configured model."""
    from tests.test_session import perturbed_copy

    other = str(perturbed_copy(tiny_model_dir, tmp_path / "other-model"))
    first = ask_json(capsys, "--model", other, "Hello! Tell me a story about the sea.")
    cid = first["conversation_id"]
    with Store(db_path()) as store:
        assert store.get_conversation(cid).model == other

    # The environment's model is the tiny one; the conversation goes on with `other`, from its cache.
    again = ask_json(capsys, "-C", str(cid), "And the stars?")
    assert again["stats"]["cache_source"] in ("memory", "disk") and again["stats"]["cached_tokens"] > 0
    with Store(db_path()) as store:
        assert store.get_conversation(cid).model == other

    # An explicit --model wins, and the conversation is now with it (its cache starts anew).
    moved = ask_json(capsys, "-C", str(cid), "--model", str(tiny_model_dir), "And the moon?")
    assert moved["stats"]["cached_tokens"] == 0
    with Store(db_path()) as store:
        assert store.get_conversation(cid).model == str(tiny_model_dir)
        store.set_model(cid, str(tmp_path / "deleted-model"))

    code, out, err = run(capsys, "ask", "--json", "-C", str(cid), "And the sun?")
    assert code == 0, err
    assert "cannot be loaded here" in err and "deleted-model" in err and len(err.strip().splitlines()) == 1
    assert json.loads(out)["stats"]["cached_tokens"] > 0  # the tiny model's cache from the turn before
    with Store(db_path()) as store:
        assert store.get_conversation(cid).model == str(tiny_model_dir)


def test_a_reader_that_goes_away_stops_the_reply_and_what_was_made_is_saved(capsys, monkeypatch):
    """`chatkv ask … | head -c 5`: the pipe closes after the first piece. The reply stops
    there and is saved now (it was left in the journal for the next start), and the exit
    status is a closed pipe's (141), not success."""
    import sys

    class Closing(io.StringIO):
        def write(self, s: str) -> int:
            if self.getvalue():
                raise BrokenPipeError(32, "Broken pipe")
            return super().write(s)

    closing, stdout = Closing(), sys.stdout
    monkeypatch.setattr(sys, "stdout", closing)
    code = main(["ask", "-n", "12", "-t", "0", "Tell me a story about the sea."])
    monkeypatch.setattr(sys, "stdout", stdout)
    assert code == 141
    (messages,) = [m for _, m in saved() if m and m[0] == ("user", "Tell me a story about the sea.")]
    assert [role for role, _ in messages] == ["user", "assistant"]
    assert messages[1][1].startswith(closing.getvalue()) and closing.getvalue()
    assert not list((db_path().parent / "journal").glob("*"))  # nothing left to save later


def test_show_writes_stored_control_characters_out_on_a_terminal(capsys, monkeypatch):
    """A message holding an escape sequence and a bell (pasted, or a model's output) is
    shown as ^[[31m and ^G on a terminal, so it cannot drive it; a pipe gets it as stored."""
    import sys

    from chatkv.fmt import visible

    assert visible("x\x1b[31mRED\x07\tok\n\x9b\x7f", True) == "x^[[31mRED^G\tok\n\\x9b^?"
    first = ask_json(capsys, "-n", "2", "x\x1b[31mRED\x07")
    cid = str(first["conversation_id"])
    code, piped, _ = run(capsys, "show", cid)
    assert code == 0 and "user: x\x1b[31mRED\x07" in piped
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    code, shown, _ = run(capsys, "show", cid)
    assert code == 0 and "user: x^[[31mRED^G" in shown and "\x1b" not in shown
    code, exported, _ = run(capsys, "export", cid)  # and so does export to a terminal
    assert code == 0 and "x^[[31mRED^G" in exported and "\x1b" not in exported
    assert visible("a\u202eb", True) == "a<U+202E>b"  # a bidirectional override too


def test_import_listing_writes_control_characters_out_on_a_terminal(capsys, monkeypatch, tmp_path):
    import json
    import sys

    export = [
        {
            "title": "\x1b]0;PWNED\x07\u202etitle",
            "mapping": {
                "a": {
                    "id": "a",
                    "message": {"id": "a", "author": {"role": "user"}, "content": {"parts": ["hi"]}},
                    "parent": None,
                    "children": [],
                }
            },
            "current_node": "a",
        }
    ]
    path = tmp_path / "conversations.json"
    path.write_text(json.dumps(export))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    code, out, err = run(capsys, "import", "chatgpt", str(path), "--dry-run")
    assert code == 0 and "^[]0;PWNED^G<U+202E>title" in out and "\x1b" not in out, (out, err)


def test_stats_text_says_nothing_cached_and_counts_one_token():
    from chatkv.api import TurnStats
    from chatkv.fmt import stats_text

    one = stats_text(
        TurnStats(prompt_tokens=12, prefilled_tokens=12, completion_tokens=1, finish_reason="length")
    )
    assert "nothing cached" in one and "1 token (length)" in one and "/s" not in one
    many = stats_text(
        TurnStats(
            prompt_tokens=40, cached_tokens=32, cache_source="disk", completion_tokens=5, decode_tps=9.5
        )
    )
    assert "32 cached from disk" in many and "5 tokens at 9.5/s" in many
