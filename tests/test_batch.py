"""`chatkv batch`: JSONL in, one answer per line out; shared prefixes from the chunk store."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from chatkv.errors import ChatKVError

SYSTEM = "You answer questions about licenses and caches. Keys and values of attention are kept. " * 2
QUESTIONS = [
    "Hello!",
    "Summarise the GNU GPL in three bullet points.",
    "How does the Apache license differ?",
    "Tell me a story about the sea and the stars.",
    "0123456789",
    "The quick brown fox.",
    "How can I help you today?",
]


@pytest.fixture
def cli(tiny_lm, tiny_model_dir, monkeypatch):
    """Run `chatkv batch ARGS` on the tiny model; returns (exit code, stderr text)."""
    import chatkv.engine.model
    from chatkv.cli import batch

    monkeypatch.setattr(chatkv.engine.model, "load_model", lambda *a, **k: tiny_lm)
    monkeypatch.setenv("CHATKV_CACHE_CHUNK_TOKENS", "32")
    monkeypatch.setenv("CHATKV_GENERATION_MAX_NEW_TOKENS", "12")

    def run(*argv: str) -> int:
        common = argparse.ArgumentParser(add_help=False)
        common.add_argument("--debug", action="store_true")
        parser = argparse.ArgumentParser()
        batch.register(parser.add_subparsers(), common)
        args = parser.parse_args(
            [
                "batch",
                *argv,
                "--model",
                str(tiny_model_dir),
                "--device",
                "cpu",
                "--temperature",
                "0",
                "--codec",
                "fp16",
                "--quiet",
            ]
        )
        try:
            return args.func(args)
        except ChatKVError as e:  # as chatkv.cli.main translates it
            return e.exit_code

    return run


def _write(path, lines) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def _records(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _store():
    from chatkv.paths import db_path
    from chatkv.store import Store

    return Store(db_path())


def test_batched_replies_equal_ask(cli, chat, tmp_path):
    """Every line gets the reply a single `ask` gets (greedy), first and second run."""
    lines = [{"id": f"q{i}", "prompt": q, "system": SYSTEM} for i, q in enumerate(QUESTIONS)]
    lines += [{"id": "alone", "prompt": "Hello!"}, {"id": "short", "prompt": "Hello!", "max_new_tokens": 3}]
    src, out = _write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    assert cli(src, "-o", str(out), "--batch-size", "3") == 0
    first = {r["id"]: r for r in _records(out)}
    assert set(first) == {x["id"] for x in lines}
    for line in lines:
        conv = chat.new_conversation(system_prompt=line.get("system", ""))
        settings = (
            chat.defaults
            if "max_new_tokens" not in line
            else type(chat.defaults)(**{**chat.defaults.__dict__, "max_new_tokens": line["max_new_tokens"]})
        )
        turn = chat.send(conv.id, line["prompt"], settings)
        reply = "".join(turn)
        rec = first[line["id"]]
        assert rec["reply"] == reply, line["id"]
        assert rec["finish_reason"] == turn.stats.finish_reason
        assert rec["usage"]["completion_tokens"] == turn.stats.completion_tokens
        assert rec["usage"]["prompt_tokens"] == turn.stats.prompt_tokens
    # Second run: the shared system prompt is attached from disk, replies unchanged.
    out2 = tmp_path / "out2.jsonl"
    assert cli(src, "-o", str(out2)) == 0
    second = {r["id"]: r for r in _records(out2)}
    for i in range(len(QUESTIONS)):
        assert second[f"q{i}"]["reply"] == first[f"q{i}"]["reply"]
        assert second[f"q{i}"]["usage"]["cached_tokens"] > 32
        assert second[f"q{i}"]["cache_source"] == "disk"


def test_broken_lines_get_error_records_and_the_rest_is_served(cli, tmp_path):
    long = " ".join(f"word{i} fox dog sea star" for i in range(600))
    src = _write(
        tmp_path / "in.jsonl",
        [
            {"id": 1, "prompt": "Hello!"},
            "{not json",
            {"id": 3, "system": "x"},
            {"id": 4, "prompt": "Hi", "conversation": 999},
            {"id": 5, "prompt": long},
            {"id": 6, "prompt": "Hello!", "temperature": "hot"},
            {"id": 1, "prompt": "duplicate"},
            "[1, 2]",
            {"id": 9, "prompt": "The quick brown fox."},
        ],
    )
    out = tmp_path / "out.jsonl"
    assert cli(src, "-o", str(out)) == 1
    recs = _records(out)
    assert len(recs) == 9
    errors = {r["line"]: r["error"] for r in recs if "error" in r}
    assert set(errors) == {2, 3, 4, 5, 6, 7, 8}
    assert "not JSON" in errors[2]
    assert "prompt" in errors[3]
    assert "999" in errors[4]
    assert "context" in errors[5]
    assert "temperature" in errors[6]
    assert "duplicate" in errors[7]
    assert sorted(r["id"] for r in recs if "reply" in r) == [1, 9]


def test_resume_answers_each_id_exactly_once(cli, tmp_path, monkeypatch):
    from chatkv import batch

    lines = [{"id": i, "prompt": q, "system": SYSTEM} for i, q in enumerate(QUESTIONS)] + ["oops"]
    src, out = _write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    real = batch.Runner._reply
    calls = {"n": 0}

    def interrupting(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(batch.Runner, "_reply", interrupting)
    assert cli(src, "-o", str(out), "--batch-size", "2") == 130
    partial = _records(out)
    assert sum("reply" in r for r in partial) == 3
    monkeypatch.setattr(batch.Runner, "_reply", real)
    assert cli(src, "-o", str(out)) == 1  # the bad line is still bad
    recs = _records(out)
    ids = [r["id"] for r in recs if "reply" in r]
    assert sorted(ids) == list(range(len(QUESTIONS)))
    assert sum("error" in r for r in recs) == 1  # the earlier error record was replaced
    # --overwrite starts over; a complete output with --resume serves nothing new.
    assert cli(src, "-o", str(out), "--overwrite") == 1
    assert len(_records(out)) == len(lines)


def test_save_and_continuation_write_expected_messages(cli, chat, tmp_path):
    conv = chat.new_conversation(system_prompt=SYSTEM)
    turn = chat.send(conv.id, "Hello!")
    "".join(turn)
    chat.kv.flush()
    before = len(chat.messages(conv.id))
    src = _write(
        tmp_path / "in.jsonl",
        [
            {"id": "new", "prompt": "The quick brown fox.", "system": "Be brief."},
            {
                "id": "chat",
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "How are you?"},
                ],
            },
            {"id": "cont", "prompt": "Tell me a story.", "conversation": conv.id},
            {"id": "cont2", "prompt": "And another.", "conversation": conv.id},
        ],
    )
    out = tmp_path / "out.jsonl"
    # Without --save only the continued conversation is written to.
    assert cli(src, "-o", str(out)) == 0
    recs = {r["id"]: r for r in _records(out)}
    store = _store()
    assert len(store.list_conversations()) == 1
    msgs = store.messages(conv.id)
    assert [m.role for m in msgs[before:]] == ["user", "assistant", "user", "assistant"]
    assert [m.content for m in msgs[before:]] == [
        "Tell me a story.",
        recs["cont"]["reply"],
        "And another.",
        recs["cont2"]["reply"],
    ]
    assert recs["cont"]["usage"]["cached_tokens"] > 0  # the conversation's cache came from disk
    assert msgs[before + 1].stats.completion_tokens == recs["cont"]["usage"]["completion_tokens"]
    # --save: every line becomes (or extends) a conversation.
    assert cli(src, "-o", str(out), "--overwrite", "--save") == 0
    recs = {r["id"]: r for r in _records(out)}
    new = store.get_conversation(recs["new"]["conversation_id"])
    assert new.system_prompt == "Be brief."
    assert [(m.role, m.content) for m in store.messages(new.id)] == [
        ("user", "The quick brown fox."),
        ("assistant", recs["new"]["reply"]),
    ]
    assert [m.role for m in store.messages(recs["chat"]["conversation_id"])] == [
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert len(store.messages(conv.id)) == before + 8
    assert store.get_kv_head(new.id).tokens > 0  # its cache was spilled for the next turn
    # --no-save: nothing is written, not even to the continued conversation.
    n_convs = len(store.list_conversations())
    assert cli(src, "-o", str(out), "--overwrite", "--no-save") == 0
    assert len(store.list_conversations()) == n_convs
    assert len(store.messages(conv.id)) == before + 8


def test_stdin_and_usage_errors(cli, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"id": "a", "prompt": "Hello!"}) + "\n"))
    assert cli("-") == 0
    rec = json.loads(capsys.readouterr().out.strip())
    assert rec["id"] == "a" and rec["reply"] is not None and rec["finish_reason"] in ("stop", "length")
    assert cli(str(tmp_path / "missing.jsonl")) == 2
    src = _write(tmp_path / "in.jsonl", [{"prompt": "Hello!"}])
    assert cli(src, "-o", src) == 2


def test_stop_strings_and_per_line_settings(cli, chat, tmp_path):
    src = _write(
        tmp_path / "in.jsonl",
        [
            {"id": 1, "prompt": "Hello!", "max_new_tokens": 2},
            {"id": 2, "prompt": "Hello!", "max_new_tokens": 20},
        ],
    )
    out = tmp_path / "out.jsonl"
    assert cli(src, "-o", str(out)) == 0
    recs = {r["id"]: r for r in _records(out)}
    assert recs[1]["usage"]["completion_tokens"] <= 2
    full = recs[2]["reply"]
    if len(full) > 3:  # stop at a piece of the longer reply
        stop = full[2:4]
        line = {"id": 1, "prompt": "Hello!", "max_new_tokens": 20, "stop": [stop]}
        src = _write(tmp_path / "in2.jsonl", [line])
        assert cli(src, "-o", str(out), "--overwrite") == 0
        rec = _records(out)[0]
        assert rec["reply"] == full[: full.find(stop)]
        assert rec["finish_reason"] == "stop"
