"""Nothing lost, nothing leaked (issue 7, items 1-8), through the session on the tiny model:

- a reply whose save fails, or whose process is killed while it streams, is saved from
  its journal at the next start, exactly once;
- a stopped regenerate or edit changes nothing, and what it streamed is kept as an
  earlier version; a finished one keeps the old reply as an earlier version, restorable;
  the replacement is one transaction;
- a failed turn removes its own message by id, never another writer's;
- one turn at a time per conversation, across processes;
- damage to the chunk index never hides the transcript;
- a failed first message leaves no conversation behind;
- user text is never tokenized into control tokens;
- `rm` removes every chunk only that conversation used, and its text from the database file.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from sqlalchemy.exc import OperationalError

from chatkv import journal, lease
from chatkv.api import GenerationSettings
from chatkv.cli import main as cli_main
from chatkv.engine.model import chat_ids
from chatkv.errors import ChatKVError, InputError, NotFoundError
from chatkv.kv.chunks import relpath
from chatkv.paths import db_path, kv_dir
from chatkv.session import Chat
from chatkv.store import Store
from chatkv.store.db import describe_db_error

GREEDY = GenerationSettings(max_new_tokens=12, temperature=0.0)
LONG = GenerationSettings(max_new_tokens=40, temperature=0.0)


def send(chat: Chat, conv_id: int | None, text: str, settings: GenerationSettings = GREEDY):
    turn = chat.send(conv_id, text, settings)
    return turn, "".join(turn)


def transcript(chat: Chat, conv_id: int) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in chat.messages(conv_id)]


def reopen(settings, chat: Chat, lm) -> Chat:
    """A new Chat on the same database, as a new process would open it."""
    again = Chat(settings, store=Store(chat.store.path), lm=lm)
    again.load()
    return again


# -- 1. a reply survives its own save failing ---------------------------------------------


def locked(*args, **kwargs):
    raise OperationalError("INSERT INTO messages ...", {}, sqlite3.OperationalError("database is locked"))


def test_a_reply_whose_save_fails_is_kept_in_the_journal_and_saved_at_the_next_start(
    chat, tiny_settings, tiny_lm, monkeypatch
):
    conv = chat.new_conversation()
    chat.store.set_model(conv.id, "an-earlier-model")  # the reply's model is saved with it
    turn = chat.send(conv.id, "Tell me a story about the sea.", LONG)
    shown = []
    with monkeypatch.context() as m, pytest.raises(ChatKVError) as info:
        m.setattr(chat.store, "finish_turn", locked)
        for piece in turn:
            shown.append(piece)
    message = str(info.value)
    assert "locked by another chatkv process" in message and "\n" not in message
    kept = list(journal.journal_dir().glob("*.jsonl"))
    assert len(kept) == 1 and str(kept[0]) in message
    assert kept[0].stat().st_mode & 0o077 == 0
    assert transcript(chat, conv.id) == [("user", "Tell me a story about the sea.")]

    backup = kept[0].read_bytes()
    again = reopen(tiny_settings, chat, tiny_lm)  # the next start replays the journal
    assert transcript(again, conv.id) == [
        ("user", "Tell me a story about the sea."),
        ("assistant", "".join(shown)),
    ]
    saved = again.messages(conv.id)[-1].stats
    assert saved.finish_reason == turn.stats.finish_reason and saved.completion_tokens > 0
    assert again.get_conversation(conv.id).model == chat.model_name
    assert not list(journal.journal_dir().glob("*.jsonl"))
    # A journal replayed twice (a crash between the save and the delete) saves once.
    kept[0].write_bytes(backup)
    assert journal.replay(again.store) == 1
    assert len(again.messages(conv.id)) == 2
    again.close()


def test_a_cache_that_cannot_be_kept_costs_a_prefill_not_the_reply(chat, monkeypatch):
    conv = chat.new_conversation()
    send(chat, conv.id, "Hello!")

    def fails(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(chat.kv, "keep_live", fails)
    turn, reply = send(chat, conv.id, "And the stars?")  # no error: the reply is saved
    assert turn.message is not None and transcript(chat, conv.id)[-1] == ("assistant", reply)


def test_no_turn_comes_before_a_reply_whose_save_still_fails(chat, monkeypatch):
    """The next turn saves a journaled reply first; when that save fails again, the turn is
    refused rather than its message put before the earlier reply."""
    conv = chat.new_conversation()
    with monkeypatch.context() as m:
        m.setattr(chat.store, "finish_turn", locked)
        with pytest.raises(ChatKVError):
            send(chat, conv.id, "Hello!")
        with pytest.raises(lease.BusyError, match="could not be saved yet"):
            chat.send(conv.id, "And the stars?", GREEDY)
    assert transcript(chat, conv.id) == [("user", "Hello!")]  # nothing after it meanwhile
    send(chat, conv.id, "And the stars?")
    assert [r for r, _ in transcript(chat, conv.id)] == ["user", "assistant", "user", "assistant"]


def test_the_next_turn_in_the_same_process_saves_a_reply_left_unsaved_first(chat, monkeypatch):
    conv = chat.new_conversation()
    with monkeypatch.context() as m, pytest.raises(ChatKVError):
        m.setattr(chat.store, "finish_turn", locked)
        send(chat, conv.id, "Hello!")
    _, reply = send(chat, conv.id, "And the stars?")
    roles = [r for r, _ in transcript(chat, conv.id)]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert transcript(chat, conv.id)[-1] == ("assistant", reply)


@pytest.mark.parametrize("how", ["regenerate", "edit"])
def test_a_regenerate_or_edit_after_a_failed_save_replaces_the_journaled_reply(chat, monkeypatch, how):
    """The failed save's reply is in the journal; the regenerate (or edit) saves it first and
    then replaces it: never two replies in a row."""
    conv = chat.new_conversation()
    with monkeypatch.context() as m, pytest.raises(ChatKVError):
        m.setattr(chat.store, "finish_turn", locked)
        send(chat, conv.id, "Hello!")
    assert [r for r, _ in transcript(chat, conv.id)] == ["user"]
    if how == "regenerate":
        turn = chat.regenerate(conv.id, GREEDY)
    else:
        turn = chat.edit(chat.messages(conv.id)[0].id, "Hello again!", GREEDY)
    reply = "".join(turn)
    assert [r for r, _ in transcript(chat, conv.id)] == ["user", "assistant"]
    assert transcript(chat, conv.id)[-1] == ("assistant", reply)


KILLED = textwrap.dedent(
    """
    import json, os, signal, sys
    from chatkv.api import GenerationSettings
    from chatkv.config import load_settings
    from chatkv.session import Chat

    settings = load_settings()
    chat = Chat(settings)
    turn = chat.send(None, sys.argv[1], GenerationSettings(max_new_tokens=40, temperature=0))
    shown = ""
    for piece in turn:
        shown += piece
        if len(shown) >= 12:
            print(json.dumps({"conversation": turn.conversation_id, "shown": shown}), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_process_killed_while_streaming_loses_nothing_it_showed(tiny_model_dir, tiny_settings, tiny_lm):
    env = _child_env(tiny_model_dir)
    proc = subprocess.run(
        [sys.executable, "-c", KILLED, "Tell me a story about the sea and the stars."],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    chat = Chat(tiny_settings, lm=tiny_lm)  # the next start
    msgs = chat.messages(seen["conversation"])
    assert [m.role for m in msgs] == ["user", "assistant"]
    assert msgs[1].content.startswith(seen["shown"]) and msgs[1].stats.finish_reason == "cancelled"
    # its statistics are those of the reply it streamed (they said 0 tokens, first token 0 ms)
    assert msgs[1].stats.completion_tokens >= 2 and msgs[1].stats.ttft_s > 0
    chat.close()


TERMINATED = textwrap.dedent(
    """
    import os, signal, sys

    class Out:  # standard output that gets SIGTERM once the reply has begun
        def __init__(self, real):
            self.real, self.written = real, 0
        def write(self, text):
            self.real.write(text)
            self.written += len(text)
            if self.written >= 8 and not getattr(self, "sent", False):
                self.sent = True
                os.kill(os.getpid(), signal.SIGTERM)
            return len(text)
        def flush(self):
            self.real.flush()
        def isatty(self):
            return False

    sys.stdout = Out(sys.stdout)
    sys.argv = ["chatkv", "ask", "-n", "200", "--temperature", "0", sys.argv[1]]
    from chatkv.cli import main
    main()
    """
)


def test_a_reply_cut_short_saves_what_was_shown_not_text_held_back_for_a_stop_string(chat):
    conv = chat.new_conversation()
    prompt = "Tell me a story about the sea."
    _, full = send(chat, conv.id, prompt, LONG)
    assert len(full) > 6
    # a stop string that begins with the reply's 3rd and 4th characters and never completes:
    # those two are held back once written, until decided
    stop = GenerationSettings(max_new_tokens=40, temperature=0.0, stop=[full[2:4] + "\x00"])
    other = chat.new_conversation()
    it = iter(chat.send(other.id, prompt, stop))
    shown = ""
    while len(shown) < 2:
        shown += next(it)
    it.close()  # the consumer goes away (a closed pipe, a front end stopping)
    saved = chat.messages(other.id)[-1]
    assert saved.role == "assistant" and saved.content == shown


def test_ctrl_c_while_the_cache_is_read_takes_the_message_back(chat, monkeypatch):
    conv = chat.new_conversation()
    send(chat, conv.id, "Hello!")
    before = transcript(chat, conv.id)

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # as Ctrl-C while chunks are read or fetched

    real = chat.prepare
    monkeypatch.setattr(chat, "prepare", interrupted)
    turn = chat.send(conv.id, "Tell me a story about the sea.", GREEDY)
    with pytest.raises(KeyboardInterrupt):
        "".join(turn)
    assert turn.forgotten and turn.message is None
    assert transcript(chat, conv.id) == before  # as `ask` then says: the message was not saved
    monkeypatch.setattr(chat, "prepare", real)
    send(chat, conv.id, "Tell me a story about the sea.")  # and the conversation is not held


def test_sigterm_stops_ask_as_ctrl_c_does_saving_the_reply_at_once(tiny_model_dir, tiny_settings, tiny_lm):
    proc = subprocess.run(
        [sys.executable, "-c", TERMINATED, "Tell me a story about the sea and the stars."],
        env=_child_env(tiny_model_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 143, proc.stderr
    assert "Traceback" not in proc.stderr and "partial reply is saved" in proc.stderr, proc.stderr
    assert not list(journal.journal_dir().glob("*.jsonl"))  # saved by this run, not the next
    chat = Chat(tiny_settings, lm=tiny_lm)
    (conv,) = chat.list_conversations()
    msgs = chat.messages(conv.id)
    assert [m.role for m in msgs] == ["user", "assistant"] and msgs[1].stats.finish_reason == "cancelled"
    assert proc.stdout.startswith(msgs[1].content)
    chat.close()


def _child_env(tiny_model_dir) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.update(
        CHATKV_MODEL_NAME=str(tiny_model_dir),
        CHATKV_MODEL_DEVICE="cpu",
        CHATKV_MODEL_DTYPE="float32",
        CHATKV_CACHE_CHUNK_TOKENS="32",
        CHATKV_CACHE_CODEC="fp16",
        TRANSFORMERS_VERBOSITY="error",
        OMP_NUM_THREADS="1",
    )
    return env


# -- 2. regenerate and edit keep what was there ----------------------------------------


def stop_after(turn, pieces: int) -> str:
    got = []
    for piece in turn:
        got.append(piece)
        if len(got) == pieces:
            turn.cancel()
    return "".join(got)


def test_a_stopped_regenerate_keeps_the_reply_and_the_partial_one_as_a_version(chat):
    conv = chat.new_conversation()
    send(chat, conv.id, "Tell me a story about the sea.", LONG)
    before = transcript(chat, conv.id)
    regen = chat.regenerate(conv.id, GenerationSettings(max_new_tokens=40, temperature=0.9, seed=3))
    partial = stop_after(regen, 2)
    assert regen.stats.finish_reason == "cancelled" and regen.kept_aside and regen.message is None
    assert transcript(chat, conv.id) == before
    versions = chat.versions(chat.messages(conv.id)[-1].id)
    assert [(v.role, v.content) for v in versions] == [("assistant", partial)]


def test_a_stopped_edit_changes_nothing_and_keeps_the_edit_as_a_version(chat):
    conv = chat.new_conversation()
    send(chat, conv.id, "The quick brown fox jumps over the lazy dog.")
    send(chat, conv.id, "Hello! How can I help you today?", LONG)
    before = transcript(chat, conv.id)
    first = chat.messages(conv.id)[0]
    assert chat.later_messages(first.id) == 3
    partial = stop_after(chat.edit(first.id, "Tell me about caches.", LONG), 2)
    assert transcript(chat, conv.id) == before
    assert [(v.role, v.content) for v in chat.versions(first.id)] == [("user", "Tell me about caches.")]
    # the partial reply answered the edited question: it is not a version of the reply to
    # the original one, and comes back with the edit it belongs to
    assert chat.versions(chat.messages(conv.id)[1].id) == []
    chat.restore(first.id, chat.versions(first.id)[0].id)
    assert transcript(chat, conv.id)[:2] == [("user", "Tell me about caches."), ("assistant", partial)]


def test_a_finished_regenerate_keeps_the_old_reply_which_can_be_restored(chat):
    conv = chat.new_conversation()
    _, old = send(chat, conv.id, "Tell me a story about the sea.")
    new = "".join(chat.regenerate(conv.id, GenerationSettings(max_new_tokens=12, temperature=1.0, seed=7)))
    current = chat.messages(conv.id)[-1]
    assert current.content == new
    versions = chat.versions(current.id)
    assert [v.content for v in versions] == [old]
    chat.restore(current.id, versions[0].id)
    assert transcript(chat, conv.id)[-1] == ("assistant", old)
    assert [v.content for v in chat.versions(chat.messages(conv.id)[-1].id)] == [new]


def test_a_finished_edit_sets_the_old_branch_aside_as_one_group(chat):
    conv = chat.new_conversation()
    send(chat, conv.id, "The quick brown fox jumps over the lazy dog.")
    send(chat, conv.id, "Hello! How can I help you today?")
    old = transcript(chat, conv.id)
    first = chat.messages(conv.id)[0]
    "".join(chat.edit(first.id, "Tell me about caches.", GREEDY))
    now = chat.messages(conv.id)
    assert [m.content for m in now][0] == "Tell me about caches." and len(now) == 2
    chat.restore(now[0].id, chat.versions(now[0].id)[0].id)
    assert transcript(chat, conv.id) == old  # the whole old branch comes back


def test_a_replys_versions_are_answers_to_the_question_it_answers(chat):
    conv = chat.new_conversation()
    _, r1 = send(chat, conv.id, "The quick brown fox jumps over the lazy dog.")
    again = GenerationSettings(max_new_tokens=8, temperature=1.0, seed=7)
    r2 = "".join(chat.regenerate(conv.id, again))
    q1 = chat.messages(conv.id)[0]
    "".join(chat.edit(q1.id, "Tell me about caches.", GREEDY))  # Q2, its reply r3
    r3 = chat.messages(conv.id)[1].content
    assert chat.versions(chat.messages(conv.id)[1].id) == []  # r1 and r2 answered Q1
    r4 = "".join(chat.regenerate(conv.id, GenerationSettings(max_new_tokens=8, temperature=1.0, seed=9)))
    assert [v.content for v in chat.versions(chat.messages(conv.id)[1].id)] == [r3]
    # Q1 comes back with the reply it had (r2), whose earlier version is r1 again
    q2 = chat.messages(conv.id)[0]
    (old,) = chat.versions(q2.id)
    assert old.content == q1.content
    chat.restore(q2.id, old.id)
    assert transcript(chat, conv.id) == [("user", q1.content), ("assistant", r2)]
    assert [v.content for v in chat.versions(chat.messages(conv.id)[1].id)] == [r1]
    # and back to Q2: its reply r4 with r3 as its version; Q2's own branch is not offered
    # as a version of the reply
    q1_now = chat.messages(conv.id)[0]
    chat.restore(q1_now.id, chat.versions(q1_now.id)[0].id)
    assert transcript(chat, conv.id) == [("user", "Tell me about caches."), ("assistant", r4)]
    reply = chat.messages(conv.id)[1]
    assert [v.content for v in chat.versions(reply.id)] == [r3]
    with pytest.raises(NotFoundError, match="is not an earlier version"):  # another branch's
        chat.restore(reply.id, _hidden_version_id(chat, conv.id))


def _hidden_version_id(chat, conversation_id: int) -> int:
    from sqlalchemy import select

    from chatkv.store.models import MessageVersion

    with chat.store._reader() as s:
        return s.scalar(
            select(MessageVersion.id).where(
                MessageVersion.conversation_id == conversation_id, MessageVersion.hidden_by.is_not(None)
            )
        )


def test_the_replacement_is_one_transaction(chat, monkeypatch):
    conv = chat.new_conversation()
    send(chat, conv.id, "The quick brown fox jumps over the lazy dog.")
    send(chat, conv.id, "Hello! How can I help you today?")
    before = transcript(chat, conv.id)
    import chatkv.store.repo as repo

    real = repo._version_of
    calls = []

    def fails_on_the_second(m, group, now):
        calls.append(m.id)
        if len(calls) == 2:
            raise OperationalError("INSERT", {}, sqlite3.OperationalError("disk I/O error"))
        return real(m, group, now)

    monkeypatch.setattr(repo, "_version_of", fails_on_the_second)
    with pytest.raises(ChatKVError, match="could not be saved"):
        "".join(chat.edit(chat.messages(conv.id)[0].id, "Tell me about caches.", GREEDY))
    assert transcript(chat, conv.id) == before


# -- 3. a failed turn removes only its own message ----------------------------------------


def test_a_failed_turn_deletes_its_own_message_and_nothing_another_writer_added(chat, monkeypatch):
    conv = chat.new_conversation()
    send(chat, conv.id, "Hello!")
    real_fit = chat.fit

    def other_writer_then_fail(*args, **kwargs):
        chat.store.add_message(conv.id, "assistant", "written by another process")
        raise InputError("too long")

    monkeypatch.setattr(chat, "fit", other_writer_then_fail)
    with pytest.raises(InputError):
        send(chat, conv.id, "And the stars?")
    monkeypatch.setattr(chat, "fit", real_fit)
    assert transcript(chat, conv.id)[-1] == ("assistant", "written by another process")
    assert ("user", "And the stars?") not in transcript(chat, conv.id)


# -- 4. one turn at a time per conversation -----------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from chatkv import lease
    held = lease.acquire(int(sys.argv[1]))
    print("held", flush=True)
    time.sleep(60)
    """
)


def test_a_conversation_busy_in_another_process_is_refused_in_one_line(chat, monkeypatch):
    conv = chat.new_conversation()
    monkeypatch.setattr(lease, "WAIT_S", 0.3)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(conv.id)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lease.BusyError, match=f"conversation {conv.id} is busy"):
            chat.send(conv.id, "Hello!", GREEDY)
        assert chat.messages(conv.id) == []  # nothing was written
    finally:
        holder.kill()
        holder.wait()
    send(chat, conv.id, "Hello!")  # the kernel dropped the dead holder's lock
    assert [r for r, _ in transcript(chat, conv.id)] == ["user", "assistant"]


def test_two_turns_on_one_conversation_in_one_process_do_not_interleave(chat, monkeypatch):
    conv = chat.new_conversation()
    monkeypatch.setattr(lease, "WAIT_S", 0.1)
    first = chat.send(conv.id, "Hello!", GREEDY)
    with pytest.raises(lease.BusyError):
        chat.send(conv.id, "And the stars?", GREEDY)
    "".join(first)
    send(chat, conv.id, "And the stars?")  # released when the first finished
    assert [r for r, _ in transcript(chat, conv.id)] == ["user", "assistant", "user", "assistant"]


def test_four_ask_processes_on_one_conversation_never_interleave(tiny_model_dir, chat):
    conv = chat.new_conversation()
    env = _child_env(tiny_model_dir)
    env["CHATKV_GENERATION_MAX_NEW_TOKENS"] = "6"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "chatkv", "ask", "-C", str(conv.id), "-t", "0", f"Question {i}?"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    outcomes = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
    for code, err in outcomes:
        # each either answered, or said in one line that the conversation was busy
        assert code == 0 or (code == 1 and "is busy" in err and err.count("\n") == 1), err
    msgs = chat.messages(conv.id)
    assert [m.role for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
    assert sum(code == 0 for code, _ in outcomes) == len(msgs) // 2 >= 1


# -- 5. damage to the chunk index never hides the transcript -------------------------------


def test_a_damaged_chunk_index_leaves_every_conversation_readable(chat, capsys):
    conv = chat.new_conversation()
    send(chat, conv.id, "Summarise the GNU GPL in three bullet points.", LONG)
    chat.close()
    path = chat.store.path
    chat.store.close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'kv_chunks'").fetchone()[0]
    with open(path, "r+b") as f:  # overwrite the index table's root page
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * page_size)
    with Store(path) as store:
        assert store.get_conversation(conv.id).message_count == 2
        assert [c.id for c in store.list_conversations()] == [conv.id]
        assert len(store.messages(conv.id)) == 2
    capsys.readouterr()
    assert cli_main(["ls"]) == 0 and str(conv.id) in capsys.readouterr().out
    assert cli_main(["show", str(conv.id)]) == 0
    assert "Summarise the GNU GPL" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        ("SQLITE_FULL", "database or disk is full", "is full"),
        ("SQLITE_READONLY_DIRECTORY", "attempt to write a readonly database", "read-only"),
        ("SQLITE_BUSY", "database is locked", "locked by another chatkv process"),
        ("SQLITE_CORRUPT", "database disk image is malformed", "move it aside"),
        ("SQLITE_NOTADB", "file is not a database", "move it aside"),
    ],
)
def test_database_errors_say_what_happened_and_only_damage_says_move_it_aside(name, text, says):
    err = sqlite3.OperationalError(text)
    err.sqlite_errorname = name
    line = describe_db_error(OperationalError("SELECT", {}, err))
    assert says in line and "\n" not in line and "[SQL" not in line
    assert ("move it aside" in line) == (name in ("SQLITE_CORRUPT", "SQLITE_NOTADB"))


# -- 6. nothing is created for a refused first message ------------------------------------


def test_a_failed_first_message_leaves_no_conversation(chat, tiny_settings, tiny_lm):
    small = Chat(
        tiny_settings, store=chat.store, lm=type(tiny_lm)(**{**tiny_lm.__dict__, "context_limit": 64})
    )
    small.load()
    with pytest.raises(InputError, match="context holds 64"):
        send(small, None, "The quick brown fox. " * 60)
    assert small.list_conversations() == []
    turn, reply = send(small, None, "Hello!")
    assert [c.id for c in small.list_conversations()] == [turn.conversation_id]
    assert small.get_conversation(turn.conversation_id).title == "Hello!"


# -- 7. only the template makes control tokens ---------------------------------------------


def test_user_text_never_becomes_control_tokens(tiny_lm):
    tok = tiny_lm.tokenizer
    plain = chat_ids(tok, [{"role": "system", "content": "ab"}, {"role": "user", "content": "ab"}])
    specials = set(tok.get_added_vocab()) | set(tok.all_special_tokens)
    assert {"<|im_start|>", "<|im_end|>"} <= specials
    for s in specials:
        sid = tok.convert_tokens_to_ids(s)
        for role in ("system", "user"):
            msgs = [{"role": "system", "content": "ab"}, {"role": "user", "content": "ab"}]
            msgs[0 if role == "system" else 1]["content"] = f"a{s}b"
            ids = chat_ids(tok, msgs)
            assert ids.count(sid) == plain.count(sid), (s, role)
            assert tok.decode(ids).count(s) == plain.count(sid) + 1  # the text itself is kept
    # ordinary text tokenizes exactly as the template would tokenize it
    msgs = [{"role": "user", "content": "Hello! How can I help you today?"}]
    templated = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    templated = templated["input_ids"] if hasattr(templated, "keys") else templated
    assert chat_ids(tok, msgs) == list(templated)


# -- 8. rm leaves nothing of the conversation on disk ---------------------------------------


def test_rm_removes_every_chunk_only_that_conversation_used_and_its_text(chat, tiny_settings, tiny_lm):
    shared = "You are terse. Caches keep keys and values of attention for every token of the history."
    keep = chat.new_conversation(system_prompt=shared)
    send(chat, keep.id, "Hello! How can I help you today?")
    gone = chat.new_conversation(system_prompt=shared)
    secret = "Zebrafish quokka marmalade 31337"
    send(chat, gone.id, secret, LONG)
    # an edit leaves a branch whose chunks only this conversation ever used
    "".join(chat.edit(chat.messages(gone.id)[0].id, "The quick brown fox jumps over the lazy dog.", LONG))
    chat.kv.flush()
    mine = set(chat.store.private_chunks(gone.id))
    shared_keys = {k for k in chat.store.get_chunks(list(mine | set(_all_keys(chat)))) if k not in mine}
    assert mine and shared_keys  # some chunks are its own, some shared with `keep`

    assert cli_main(["rm", str(gone.id)]) == 0
    kv = kv_dir()
    for key in mine:
        assert not (kv / relpath(key)).exists()
    assert chat.store.get_chunks(list(mine)) == {}
    for key in shared_keys:
        assert (kv / relpath(key)).exists()
    # No chunk file left holds the secret's tokens, and the database file does not hold its text.
    secret_ids = chat_ids(tiny_lm.tokenizer, [{"role": "user", "content": secret}], False)[3:-2]
    from safetensors import safe_open

    for f in kv.rglob("*.safetensors"):
        with safe_open(f, "pt") as st:
            toks = st.get_tensor("tokens").tolist()
        assert not _contains(toks, secret_ids), f
    # nor the write-ahead log, while this process still has the database open (rm emptied it)
    for f in db_path().parent.glob("chatkv.db*"):
        assert b"quokka" not in f.read_bytes(), f
    chat.store.close()
    with sqlite3.connect(db_path()) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for f in db_path().parent.glob("chatkv.db*"):
        assert b"quokka" not in f.read_bytes(), f
    # the other conversation resumes from its chunks
    again = reopen(tiny_settings, chat, tiny_lm)
    turn, _ = send(again, keep.id, "And the stars?")
    assert turn.stats.cache_source in ("disk", "memory") and turn.stats.cached_tokens > 0
    again.close()


def _all_keys(chat: Chat) -> list[str]:
    return [r.key for r in chat.store.all_chunks()]


def _contains(seq: list[int], sub: list[int]) -> bool:
    n = len(sub)
    return any(seq[i : i + n] == sub for i in range(len(seq) - n + 1))


def test_rm_of_a_conversation_in_use_elsewhere_is_refused(chat, monkeypatch):
    conv = chat.new_conversation()
    monkeypatch.setattr(lease, "WAIT_S", 0.1)
    turn = chat.send(conv.id, "Hello!", GREEDY)
    with pytest.raises(lease.BusyError):
        chat.delete(conv.id)
    "".join(turn)
    chat.delete(conv.id)
    assert chat.list_conversations() == []


def test_rm_cut_short_leaves_the_conversation_to_rm_again_not_its_tokens_on_disk(
    chat, monkeypatch, tiny_settings
):
    """rm takes the conversation's own chunks before its row: killed in between, what is
    left is the conversation (rm it again), never chunk files nothing leads rm to."""
    conv = chat.new_conversation()
    send(chat, conv.id, "Tell me about the quokka, " * 6)
    chat.kv.flush()
    own = chat.store.private_chunks(conv.id)
    assert own
    real = chat.store.delete_conversation

    def killed(conversation_id):
        raise KeyboardInterrupt  # as a kill between the two steps would leave it

    monkeypatch.setattr(chat.store, "delete_conversation", killed)
    with pytest.raises(KeyboardInterrupt):
        chat.delete(conv.id)
    kv = chat.kv.kv_dir
    assert chat.get_conversation(conv.id) and not any((kv / relpath(k)).exists() for k in own)
    assert not set(own) & set(_all_keys(chat))
    monkeypatch.setattr(chat.store, "delete_conversation", real)
    turn, _ = send(chat, conv.id, "And the stars?")  # still usable: its prefix is computed again
    assert turn.stats.cache_source in ("none", "memory")
    chat.delete(conv.id)
    assert chat.list_conversations() == []


def test_rm_takes_the_chunks_a_spill_of_another_process_wrote_while_it_ran(chat, tiny_lm, monkeypatch):
    """Another process's turn ended (its lease released) and its spill still runs: what it
    records and writes after rm collected the conversation's chunks goes too."""
    import torch

    from chatkv.engine.generate import cache_arg
    from chatkv.kv import live
    from chatkv.kv.manager import KVManager

    conv = chat.new_conversation()
    send(chat, conv.id, "Tell me about the quokka, " * 6)
    chat.kv.flush()
    other = KVManager(chat.store, kv_dir(), tiny_lm, codec="fp16", chunk_tokens=chat.kv.chunk_tokens)
    tokens = list(range(5, 5 + 2 * chat.kv.chunk_tokens + 7))
    cache = live.new_cache(tiny_lm.model)
    with torch.no_grad():
        tiny_lm.model(torch.tensor([tokens]), **cache_arg(tiny_lm.model, cache), use_cache=True)
    real = chat.store.delete_conversation

    def spilled_meanwhile(conversation_id):
        other.spill(conversation_id, tokens, cache)  # between rm's removal and its delete
        other.flush()
        assert set(other.keys_of(tokens)) <= set(_all_keys(chat))
        return real(conversation_id)

    monkeypatch.setattr(chat.store, "delete_conversation", spilled_meanwhile)
    chat.delete(conv.id)
    assert _all_keys(chat) == [] and list(kv_dir().rglob("*.safetensors")) == []
    # and a spill that records after the delete writes nothing
    other.spill(conv.id, tokens, cache)
    other.flush()
    assert _all_keys(chat) == [] and list(kv_dir().rglob("*.safetensors")) == []
    other.close()


def test_ctrl_c_inside_a_decode_step_keeps_the_reply_and_a_whole_cache(
    chat, tiny_settings, tiny_lm, monkeypatch
):
    """Ctrl-C lands inside a decode step: the first layers have appended the new token, the
    last has not. The reply is saved, and so is the cache of every position all layers hold
    (it was lost: "Sizes of tensors must match" when spilled); resumed from disk, the
    conversation goes on as a fresh prefill of its transcript would."""
    from chatkv.engine.generate import generate
    from chatkv.kv import appending, live

    layers = tiny_lm.model.config.num_hidden_layers
    real, one_token = appending.Appending.update, {"n": 0}

    def update(self, k, v, *a, **kw):
        if k.shape[-2] == 1:
            one_token["n"] += 1
            if one_token["n"] == 3 * layers + layers:  # the last layer of the fourth step
                raise KeyboardInterrupt
        return real(self, k, v, *a, **kw)

    conv = chat.new_conversation()
    monkeypatch.setattr(appending.Appending, "update", update)
    turn = chat.send(conv.id, "Tell me a story about the sea.", LONG)
    pieces = []
    with pytest.raises(KeyboardInterrupt):
        for piece in turn:
            pieces.append(piece)
    monkeypatch.setattr(appending.Appending, "update", real)
    chat.kv.flush()
    saved = transcript(chat, conv.id)
    assert saved[-1][0] == "assistant" and saved[-1][1] == "".join(pieces) != ""
    head = chat.store.get_kv_head(conv.id)
    assert head.tokens == len(turn.tokens) - 1  # every position but the torn one
    again = reopen(tiny_settings, chat, tiny_lm)
    ids, _ = again.fit(again.render(conv.id) + [{"role": "user", "content": "Go on."}], 12)
    fresh = generate(tiny_lm.model, ids, live.new_cache(tiny_lm.model), 0, GREEDY, tiny_lm.eos_ids, 10**6)
    next_turn, _ = send(again, conv.id, "Go on.")
    assert next_turn.stats.cache_source == "disk" and next_turn.stats.cached_tokens > len(turn.tokens) // 2
    assert [m.content for m in again.messages(conv.id)][-1] == tiny_lm.tokenizer.decode(
        [s.token for s in fresh if s.token is not None], skip_special_tokens=True
    )
    again.close()
