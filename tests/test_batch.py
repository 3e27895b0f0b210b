"""`chatkv batch`: JSONL in, one answer per line out; shared prefixes from the chunk store."""

from __future__ import annotations

import io
import json
import os

import pytest

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
    from chatkv.cli import main

    monkeypatch.setattr(chatkv.engine.model, "load_model", lambda *a, **k: tiny_lm)
    monkeypatch.setenv("CHATKV_CACHE_CHUNK_TOKENS", "32")
    monkeypatch.setenv("CHATKV_GENERATION_MAX_NEW_TOKENS", "12")

    umask = os.umask(0o022)  # main() tightens it; put the test's back afterwards
    os.umask(umask)

    def run(*argv: str) -> int:
        return main(
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

    yield run
    os.umask(umask)


def _write(path, lines) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def _records(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _store():
    from chatkv.paths import db_path
    from chatkv.store import Store

    return Store(db_path())


@pytest.mark.parametrize("alone", [False, True], ids=["batched-prefill", "long-lines-prefilled-alone"])
def test_batched_replies_equal_ask(cli, chat, tmp_path, monkeypatch, alone):
    """Every line gets the reply a single `ask` gets (greedy), first and second run; also
    when the lines without a shared prefix are long enough to be prefilled on their own."""
    from chatkv import batch

    if alone:
        from chatkv.engine import generate

        monkeypatch.setattr(batch, "LONG_PREFILL", 4)
        real_own, real_prefill, inside, seen = batch.Runner._own, generate.prefill, [], []

        def own(self, items):
            inside.append(True)
            try:
                return real_own(self, items)
            finally:
                inside.pop()

        def prefill(model, ids, *a, **k):
            if inside:
                seen.append(len(ids))
            return real_prefill(model, ids, *a, **k)

        monkeypatch.setattr(batch.Runner, "_own", own)
        monkeypatch.setattr(generate, "prefill", prefill)
    lines = [{"id": f"q{i}", "prompt": q, "system": SYSTEM} for i, q in enumerate(QUESTIONS)]
    lines += [{"id": "alone", "prompt": "Hello!"}, {"id": "short", "prompt": "Hello!", "max_new_tokens": 3}]
    src, out = _write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    assert cli(src, "-o", str(out), "--batch-size", "3") == 0
    # in input order, though the shared-prefix group is decoded before the other lines
    assert [(r["id"], r["line"]) for r in _records(out)] == [(x["id"], n) for n, x in enumerate(lines, 1)]
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
    if alone:
        assert seen and second["alone"]["reply"] == first["alone"]["reply"]


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


def _ctrl_c_at_reply(monkeypatch, n: int):
    """Ctrl-C as the run's `n`th reply is recorded; returns the real Runner._reply."""
    from chatkv import batch

    real, calls = batch.Runner._reply, {"n": 0}

    def interrupting(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(batch.Runner, "_reply", interrupting)
    return real


def test_resume_answers_each_id_exactly_once(cli, tmp_path, monkeypatch):
    from chatkv import batch

    lines = [{"id": i, "prompt": q, "system": SYSTEM} for i, q in enumerate(QUESTIONS)] + ["oops"]
    src, out = _write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    real = _ctrl_c_at_reply(monkeypatch, 4)
    assert cli(src, "-o", str(out), "--batch-size", "2") == 130
    partial = _records(out)
    assert sum("reply" in r for r in partial) == 3
    monkeypatch.setattr(batch.Runner, "_reply", real)
    assert cli(src, "-o", str(out)) == 1  # the bad line is still bad
    recs = _records(out)
    ids = [r["id"] for r in recs if "reply" in r]
    assert ids == list(range(len(QUESTIONS)))  # each once, and in input order again after the resume
    assert [r["line"] for r in recs] == list(range(1, len(lines) + 1))
    assert sum("error" in r for r in recs) == 1  # the earlier error record was replaced
    # --overwrite starts over; a complete output with --resume serves nothing new.
    assert cli(src, "-o", str(out), "--overwrite") == 1
    assert len(_records(out)) == len(lines)
    # the input reordered, a line added: the answers kept carry their lines in this input
    moved = [{"id": "new", "prompt": "Hello!"}, *reversed(lines[:-1])]
    _write(tmp_path / "in.jsonl", moved)
    assert cli(src, "-o", str(out)) == 0
    recs = _records(out)
    assert [(r["line"], r["id"]) for r in recs] == [(n, m["id"]) for n, m in enumerate(moved, 1)]


def test_a_long_line_that_fails_its_prefill_fails_alone(cli, tmp_path, monkeypatch):
    from chatkv import batch
    from chatkv.engine import generate

    monkeypatch.setattr(batch, "LONG_PREFILL", 4)
    real = generate.prefill

    def prefill(model, ids, *a, **k):
        if len(ids) > 40:
            raise RuntimeError("out of memory")
        return real(model, ids, *a, **k)

    monkeypatch.setattr(generate, "prefill", prefill)
    lines = [
        {"id": "a", "prompt": "Hello!"},
        {"id": "long", "prompt": "Hello! " * 20},
        {"id": "b", "prompt": "Hi"},
    ]
    src, out = _write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    assert cli(src, "-o", str(out), "--batch-size", "3") == 1
    recs = {r["id"]: r for r in _records(out)}
    assert "out of memory" in recs["long"]["error"]
    assert recs["a"]["reply"] is not None and recs["b"]["reply"] is not None  # its batch went on


def test_an_interrupted_resumed_run_leaves_the_output_in_input_order(cli, tmp_path, monkeypatch):

    lines = [{"id": i, "prompt": q} for i, q in enumerate(QUESTIONS)]
    src, out = _write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    assert cli(src, "-o", str(out)) == 0
    last = [t for t in out.read_text().splitlines() if json.loads(t)["line"] == len(lines)]
    out.write_text(last[0] + "\n")  # an earlier run that answered only the last line
    _ctrl_c_at_reply(monkeypatch, 2)
    assert cli(src, "-o", str(out), "--batch-size", "1") == 130  # one more answer, then Ctrl-C
    got = [r["line"] for r in _records(out)]
    assert len(got) == 2 and got == sorted(got)  # the earlier answer stayed first before


def test_a_resumed_run_answers_again_the_lines_that_changed_and_says_what_it_skipped(cli, tmp_path, capsys):
    lines = [{"prompt": q} for q in QUESTIONS[:4]]  # ids are the line numbers
    src, out = _write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    assert cli(src, "-o", str(out)) == 0
    first = _records(out)
    capsys.readouterr()
    # line 2 now asks something else; a line is inserted before the last one (ids move); a
    # duplicate id is an error record on a resumed run too
    lines = [lines[0], {"prompt": "What is a cache?"}, lines[2], {"prompt": "Why is the sky blue?"}, lines[3]]
    _write(tmp_path / "in.jsonl", [*lines, {"id": 1, "prompt": "Hello again."}])
    assert cli(src, "-o", str(out)) == 1
    err = capsys.readouterr().err
    assert "2 line(s) already answered" in err and "2 changed since answered there" in err
    recs = _records(out)
    assert [r["id"] for r in recs] == [1, 2, 3, 4, 5, 1] and "duplicate id 1;" in recs[-1]["error"]
    assert recs[0] == first[0] and recs[2] == first[2]  # unchanged: kept as they were
    assert recs[1]["reply"] and recs[1] != first[1] and recs[3] != first[3]
    assert len({r["input_digest"] for r in recs[:5]}) == 5
    assert recs[4]["input_digest"] == first[3]["input_digest"]  # the same line under another id


@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe binary", b"my precious notes\nline two\n", b'{"id": 1, "line": 1, "reply": "x"}\nnotes\n'],
    ids=["binary", "text", "records-then-text"],
)
def test_an_output_file_that_is_not_a_batch_output_is_never_replaced(cli, tmp_path, capsys, content):
    src, out = _write(tmp_path / "in.jsonl", [{"prompt": "Hello!"}]), tmp_path / "out.jsonl"
    out.write_bytes(content)
    assert cli(src, "-o", str(out)) == 2
    assert "is not an output of chatkv batch" in capsys.readouterr().err and out.read_bytes() == content
    assert cli(src, "-o", str(out), "--overwrite") == 0 and "reply" in _records(out)[0]


def test_resuming_with_another_input_is_refused_not_mixed(cli, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert cli(_write(tmp_path / "a.jsonl", [{"id": "a", "prompt": "Hello!"}]), "-o", str(out)) == 0
    before = out.read_bytes()
    assert cli(_write(tmp_path / "b.jsonl", [{"prompt": "Hi there."}]), "-o", str(out)) == 2
    err = capsys.readouterr().err
    assert "answers to 1 id(s) that are not in" in err and '"a"' in err and out.read_bytes() == before


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


def test_no_save_writes_no_shared_prefix_to_the_chunk_store(cli, tmp_path):
    lines = [{"id": i, "prompt": q, "system": SYSTEM} for i, q in enumerate(QUESTIONS[:3])]
    src, out = _write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    assert cli(src, "-o", str(out), "--no-save") == 0
    assert _store().all_chunks() == []
    assert cli(src, "-o", str(out), "--overwrite") == 0  # without it the prefix is spilled for the next run
    assert _store().all_chunks()


def test_rm_of_every_conversation_a_batch_saved_leaves_none_of_its_shared_prefix(cli, tmp_path):
    """The shared prefix is spilled on its own: its unfinished tail chunk is in no line's
    chain, and was left on disk after every conversation was deleted."""
    from chatkv.cli import main
    from chatkv.paths import kv_dir

    lines = [{"id": i, "prompt": q, "system": SYSTEM} for i, q in enumerate(QUESTIONS[:3])]
    src, out = _write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    assert cli(src, "-o", str(out), "--save") == 0
    store = _store()
    ids = sorted({r["conversation_id"] for r in _records(out)})
    assert len(ids) == 3 and store.all_chunks()
    assert main(["rm", *map(str, ids)]) == 0
    assert store.all_chunks() == []
    assert list(kv_dir().rglob("*.safetensors")) == []


def test_stdin_and_usage_errors(cli, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        "sys.stdin", io.StringIO("\ufeff" + json.dumps({"id": "a", "prompt": "Hello!"}) + "\n")
    )
    assert cli("-") == 0  # a byte-order mark before the first line is no part of it
    rec = json.loads(capsys.readouterr().out.strip())
    assert rec["id"] == "a" and rec["reply"] is not None and rec["finish_reason"] in ("stop", "length")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "b", "prompt": "Hello!"}).encode() + b"\n")
    assert cli(str(bom)) == 0
    assert json.loads(capsys.readouterr().out.strip())["id"] == "b"
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


def test_every_bad_line_is_its_own_record_with_its_id_in_input_order(cli, tmp_path):
    """Issue 7.13 and 11.10: no line aborts the batch; error records keep their ids."""
    deep = "[" * 100_000 + "]" * 100_000
    nested = json.dumps({"id": "n", "prompt": "x", "stop": [[[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]]})
    src = _write(
        tmp_path / "in.jsonl",
        [
            {"id": "a", "prompt": "Hello!"},
            deep,
            {"id": "b", "prompt": "Hello!", "seed": 10**30},
            {"id": "c", "prompt": "Hello!", "conversation": 10**30},
            {"id": "d", "prompt": "Hello!", "max_tokens": 5},
            '{"id": "e", "prompt": "Hello!", "temperature": NaN}',
            {"id": "f", "prompt": "Hello!", "temperature": "hot"},
            '{"id": "g", "prompt": "\\ud800 lone"}',
            nested,
            {"id": {"x": 1}, "prompt": "Hello!"},
            {"id": "h", "prompt": "Hi", "conversation": 999},
            {"id": "z", "prompt": "The quick brown fox."},
            {"id": 14, "prompt": "Hello!"},
            {"prompt": "no id: its line number, 14, is line 13's id"},
            {"id": "k", "prompt": "Hello!", "top_k": True},
            {"id": None, "prompt": "Hello!"},
            {"id": None, "prompt": "Hello!"},
        ],
    )
    out = tmp_path / "out.jsonl"
    assert cli(src, "-o", str(out)) == 1
    recs = _records(out)
    assert [r["line"] for r in recs] == list(range(1, 18))
    assert "no id, and its line number 14 is line 13's id" in recs[13]["error"]
    assert "top_k in line 15: true (allowed" in recs[14]["error"]  # as JSON writes it, not True
    assert "reply" in recs[15] and "duplicate id null; line 16 has it" in recs[16]["error"]
    got = {r["line"]: (r["id"], r.get("error", "")) for r in recs}
    assert got[1][0] == "a" and "reply" in recs[0]
    assert got[2][0] is None and "nested" in got[2][1]
    assert got[3][0] == "b" and "seed" in got[3][1]
    assert got[4][0] == "c" and "conversation" in got[4][1]
    assert got[5][0] == "d" and "'max_tokens' (did you mean 'max_new_tokens'?)" in got[5][1]
    assert "prompt, system" in got[5][1]  # names the known fields
    assert got[6][0] is None and "NaN" in got[6][1]
    assert got[7][0] == "f" and "temperature" in got[7][1]
    assert got[8][0] == "g" and "surrogate" in got[8][1]
    assert got[9][0] == "n" and "nested" in got[9][1]
    assert got[10][0] is None and '"id"' in got[10][1]
    assert got[11][0] == "h" and "999" in got[11][1]
    assert got[12][0] == "z" and "reply" in recs[11]


def test_an_error_while_generating_or_saving_a_line_is_that_lines_record(cli, tmp_path, monkeypatch):
    import sqlite3

    import chatkv.store.repo as repo
    from chatkv.engine import generate

    real_init, real_new = generate.TextStream.__init__, repo._new_message

    def text_stream(self, tok, stop=()):
        if "BOOM" in stop:
            raise RuntimeError("CUDA out of memory\nmore detail")
        real_init(self, tok, stop)

    def new_message(conversation_id, position, role, content, *a, **k):  # every message written
        if content == "Tell me a story about the sea.":
            raise sqlite3.OperationalError("database or disk is full")
        return real_new(conversation_id, position, role, content, *a, **k)

    monkeypatch.setattr(generate.TextStream, "__init__", text_stream)
    monkeypatch.setattr(repo, "_new_message", new_message)
    src = _write(
        tmp_path / "in.jsonl",
        [
            {"id": 1, "prompt": "Hello!"},
            {"id": 2, "prompt": "How does the Apache license differ?", "stop": ["BOOM"]},
            {"id": 3, "prompt": "Tell me a story about the sea."},
            {"id": 4, "prompt": "The quick brown fox."},
        ],
    )
    out = tmp_path / "out.jsonl"
    assert cli(src, "-o", str(out), "--batch-size", "1", "--save") == 1
    recs = _records(out)
    assert [r["id"] for r in recs] == [1, 2, 3, 4]
    assert "reply" in recs[0] and "reply" in recs[3]
    assert recs[1]["error"] == "generating failed: RuntimeError: CUDA out of memory"
    assert recs[2]["error"].startswith("saving the reply failed: the disk holding the database is full")
    assert recs[2]["reply"] and "reply" not in recs[1]  # generated, not saved: the record keeps it
    monkeypatch.setattr(repo, "_new_message", real_new)
    monkeypatch.setattr(generate.TextStream, "__init__", real_init)
    assert cli(src, "-o", str(out), "--batch-size", "1", "--save") == 0  # error records are tried again
    again = _records(out)
    assert [("reply" in r, "error" in r) for r in again] == [(True, False)] * 4
    assert again[2]["reply"] == recs[2]["reply"] and again[0] == recs[0]


def test_a_line_that_is_not_utf8_fails_alone(cli, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        b'{"id": 1, "prompt": "Hello!"}\n{"id": 2, "prompt": "caf\xe9"}\n{"id": 3, "prompt": "Hi"}\n'
    )
    out = tmp_path / "out.jsonl"
    assert cli(str(src), "-o", str(out)) == 1
    recs = _records(out)
    assert [r["line"] for r in recs] == [1, 2, 3] and "reply" in recs[0] and "reply" in recs[2]
    assert recs[1]["id"] is None and "not UTF-8" in recs[1]["error"]


HOLDER = (
    "import sys, time\n"
    "from chatkv import lease\n"
    "held = lease.acquire(int(sys.argv[1]))\n"
    "print('held', flush=True)\n"
    "time.sleep(60)\n"
)


def test_a_line_continuing_a_conversation_busy_elsewhere_fails_alone(cli, chat, tmp_path, monkeypatch):
    """One turn at a time per conversation, batch included: a line whose conversation is
    being answered by another process gets a one-line error record; the others are served."""
    import subprocess
    import sys

    from chatkv import lease

    monkeypatch.setattr(lease, "WAIT_S", 0.2)
    conv = chat.new_conversation()
    other = chat.new_conversation()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(conv.id)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lines = [
            {"id": "busy", "prompt": "Hello!", "conversation": conv.id},
            {"id": "free", "prompt": "Hello!", "conversation": other.id},
        ]
        src, out = _write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
        assert cli(src, "-o", str(out)) == 1
    finally:
        holder.kill()
        holder.wait()
    busy, free = _records(out)
    assert busy["id"] == "busy" and f"conversation {conv.id} is busy" in busy["error"]
    assert "\n" not in busy["error"]
    assert free["id"] == "free" and "reply" in free
    assert _store().messages(conv.id) == []
    assert [m.role for m in _store().messages(other.id)] == ["user", "assistant"]


def test_a_saved_line_is_written_with_its_reply_in_one_transaction(cli, tmp_path, monkeypatch):
    """--save: a line becomes a conversation holding its messages and reply, or nothing."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    import chatkv.store.repo as repo

    real = repo._new_message

    def full_disk_on_the_reply(conversation_id, position, role, content, now, *rest):
        if role == "assistant":
            raise OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))
        return real(conversation_id, position, role, content, now, *rest)

    monkeypatch.setattr(repo, "_new_message", full_disk_on_the_reply)
    lines = [
        {
            "id": "a",
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Tell me a story."},
            ],
        }
    ]
    src, out = _write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    assert cli(src, "-o", str(out), "--save") == 1
    assert "is full" in _records(out)[0]["error"]
    assert _store().list_conversations() == []
    monkeypatch.setattr(repo, "_new_message", real)
    assert cli(src, "-o", str(out), "--save", "--overwrite") == 0
    (conv,) = _store().list_conversations()
    assert [m.role for m in _store().messages(conv.id)] == ["user", "assistant", "user", "assistant"]
    assert conv.title == "Hi"


def test_a_line_continuing_a_conversation_with_another_model_says_how_to_continue_it(cli, chat, tmp_path):
    """Without --model, a line whose conversation was with another model fails with the fix
    (`ask -C` would load that model; a batch has one) and writes nothing to it; with --model,
    the conversation goes on with the batch's model, which is recorded, as `ask -C --model`."""
    from chatkv.cli import main

    conv = chat.new_conversation()
    "".join(chat.send(conv.id, "Hello!"))
    chat.kv.flush()
    with _store() as store:
        store.set_model(conv.id, "/models/the-other-model")
        before = [m.content for m in store.messages(conv.id)]
    lines = [
        {"id": "cont", "prompt": "And then?", "conversation": conv.id},
        {"id": "new", "prompt": "Hello!"},
    ]
    src, out = _write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    flags = ["--device", "cpu", "--temperature", "0", "--codec", "fp16", "--quiet"]
    assert main(["batch", src, "-o", str(out), *flags]) == 1
    cont, new = _records(out)
    assert "the-other-model" in cont["error"] and "--model /models/the-other-model" in cont["error"]
    assert "\n" not in cont["error"] and "reply" in new
    with _store() as store:
        assert [m.content for m in store.messages(conv.id)] == before
        assert store.get_conversation(conv.id).model == "/models/the-other-model"

    assert cli(src, "-o", str(out), "--overwrite") == 0  # --model: it goes on with the batch's model
    cont, _ = _records(out)
    with _store() as store:
        assert [m.content for m in store.messages(conv.id)] == [*before, "And then?", cont["reply"]]
        assert store.get_conversation(conv.id).model != "/models/the-other-model"


def test_a_line_continuing_a_conversation_passes_on_which_positions_came_from_lossy_chunks(
    cli, tiny_model_dir, tmp_path, monkeypatch
):
    """Chunks re-coded as they age must be coded from exact values, never from a lossy
    chunk's decoded ones: a batch row's cache is a new object, so the row says how many of
    its positions were read from lossy chunks (it said none)."""
    from chatkv.cli import main
    from chatkv.kv.manager import KVManager

    def batch(*argv: str) -> int:
        return main(["batch", *argv, "--model", str(tiny_model_dir), "--device", "cpu", "-t", "0"])

    long = "Tell me everything about the sea, the stars and the licenses of free software. " * 3
    out = tmp_path / "out.jsonl"
    assert (
        batch(_write(tmp_path / "a.jsonl", [{"prompt": long}]), "-o", str(out), "--save", "--codec", "int8")
        == 0
    )
    cid = _records(out)[0]["conversation_id"]
    real, seen = KVManager.spill, []

    def spill(self, conv_id, tokens, cache, inexact=0):
        seen.append((conv_id, max(self.inexact(cache), inexact)))
        return real(self, conv_id, tokens, cache, inexact)

    monkeypatch.setattr(KVManager, "spill", spill)
    src = _write(tmp_path / "b.jsonl", [{"prompt": "Go on.", "conversation": cid}])
    assert batch(src, "-o", str(tmp_path / "b-out.jsonl"), "--codec", "int8") == 0
    rec = _records(tmp_path / "b-out.jsonl")[0]
    assert rec["cache_source"] == "disk" and rec["usage"]["cached_tokens"] >= 32
    assert [n for c, n in seen if c == cid] and all(n >= 32 for c, n in seen if c == cid)
