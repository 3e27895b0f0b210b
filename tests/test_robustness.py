"""The cache's promises when things go wrong, and what a spill costs:

- a chunk that is corrupt, truncated, missing, made by another model or codec, or of
  another format version is detected, never used, reported once, and its tokens are
  prefilled again: the reply is the fresh prefill's, and no message is lost;
- a process killed (SIGKILL) in the middle of writing a chunk leaves a database that
  opens with every completed message, leftovers that `cache verify` / `cache gc` clean,
  and a conversation that goes on;
- two processes continuing two conversations at once both finish and both replies
  are saved (they share chunks of a common prefix, written concurrently);
- the spill after turn 20 of a 4,000-token conversation writes only what the new
  tokens need, and the turn prefills only its new tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from chatkv.api import GenerationSettings
from chatkv.cli import main as cli_main
from chatkv.engine.generate import TextStream, cache_arg, generate
from chatkv.kv import chunks, live, maintenance
from chatkv.kv.chunks import encode_chunk, read_chunk
from chatkv.kv.codecs import get_codec
from chatkv.kv.manager import common_prefix
from chatkv.kv.policy import get_policy
from chatkv.paths import db_path, kv_dir
from chatkv.session import Chat
from chatkv.store import Store

GREEDY = GenerationSettings(max_new_tokens=8, temperature=0.0)
SYSTEM = "You are terse. Caches keep keys and values of attention for every token of the history."
QUESTIONS = [
    "Summarise the GNU GPL in three bullet points.",
    "How does the Apache license differ? It is permissive and has a patent grant.",
]


def fresh_reply(chat: Chat, conv_id: int, text: str) -> str:
    """What a prefill from nothing answers to `text` as the conversation's next message."""
    msg = chat.store.add_message(conv_id, "user", text)
    try:
        ids, _ = chat.fit(chat.render(conv_id), GREEDY.max_new_tokens)
        lm = chat.lm
        steps = generate(lm.model, ids, live.new_cache(lm.model), 0, GREEDY, lm.eos_ids, lm.context_limit)
        tokens = [s.token for s in steps if s.token is not None]
    finally:
        chat.store.delete_messages_from(conv_id, msg.position)
    text = TextStream(lm.tokenizer)  # as the app turns tokens into text
    for t in tokens:
        text.push(t)
    text.finish()
    return text.text


def send(chat: Chat, conv_id: int, text: str):
    turn = chat.send(conv_id, text, GREEDY)
    return turn, "".join(turn)


def new_process_chat(settings, store_path: Path, lm) -> Chat:
    """A Chat with an empty live pool, as a new process would have."""
    chat = Chat(settings, store=Store(store_path), lm=lm)
    chat.load()
    return chat


# -- untrustworthy chunks ------------------------------------------------------------


def rewrite_metadata(path: Path, **changes: str) -> None:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    header["__metadata__"].update(changes)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + blob[8 + n :])


def flip_bytes(path: Path, rec, lm) -> None:
    blob = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    mid = 8 + n + (len(blob) - 8 - n) // 2  # inside the tensor data
    for i in range(mid, mid + 8):
        blob[i] ^= 0x5A
    path.write_bytes(bytes(blob))


def truncate(path: Path, rec, lm) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


def delete(path: Path, rec, lm) -> None:
    path.unlink()


def reencode(path: Path, rec, lm, *, fingerprint: str | None = None, codec: str | None = None) -> None:
    """Put at `path` a self-consistent chunk over the same tokens, written under another
    model fingerprint or another codec (as another configuration would have written it)."""
    data = read_chunk(path, get_policy("int2"), lm.fingerprint, rec.key, lm.dtype, lm.device)  # any codec
    other_codec = get_codec(codec or rec.codec.split(":")[0])
    other_fp = fingerprint or lm.fingerprint
    parent, key = data.parent, rec.key  # another codec: the same key (the codec is not in it)
    if fingerprint:
        parent = data.parent and chunks.chunk_key(other_fp, None, [0])  # another chain
        key = chunks.chunk_key(other_fp, parent, data.tokens)
    blob, _ = encode_chunk(
        other_codec, other_fp, key, parent, data.start, data.tokens, data.layers, data.partial
    )
    written = path.parent / "elsewhere.safetensors"
    written.write_bytes(blob)
    shutil.copyfile(written, path)  # "copied to the expected path"
    written.unlink()


DAMAGES = {
    "flipped-bytes": (flip_bytes, "checksum"),
    "truncated": (truncate, "truncated"),
    "deleted": (delete, "unreadable"),
    "other-fingerprint": (lambda p, r, lm: reencode(p, r, lm, fingerprint="0" * 32), "fingerprint"),
    "other-codec": (lambda p, r, lm: reencode(p, r, lm, codec="int8"), "codec"),
    "other-format": (lambda p, r, lm: rewrite_metadata(p, format="chatkv-kv/0"), "format"),
}


@pytest.mark.parametrize(
    ("case", "which"),
    [(case, 1) for case in DAMAGES] + [("deleted", -1)],
    ids=[f"{case}-middle" for case in DAMAGES] + ["deleted-tail"],
)
def test_untrustworthy_chunk_is_reported_once_and_recomputed(tiny_settings, tiny_lm, case, which):
    damage, reason = DAMAGES[case]
    first = new_process_chat(tiny_settings, db_path(), tiny_lm)
    conv = first.new_conversation(system_prompt=SYSTEM)
    first.store.add_message(conv.id, "user", QUESTIONS[0])
    first.store.add_message(
        conv.id, "assistant", "It is a copyleft license: share alike, source, no extra limits."
    )
    last, _ = send(first, conv.id, QUESTIONS[1])
    first.close()  # waits for the spill
    path = first.store.path

    head = first.store.get_kv_head(conv.id)
    chain = first.store.chunk_chain(head.key)
    assert len(chain) >= 4 and chain[0].parent is None and chain[-1].partial  # full chunks and a tail
    # the chain covers the turn, but for the last generated token (never run through the model)
    assert sum(r.n_tokens for r in chain) == head.tokens == len(last.tokens) - 1
    bad = chain[which]
    damage(kv_dir() / bad.path, bad, tiny_lm)
    messages_before = [(m.role, m.content) for m in first.messages(conv.id)]

    # A new process resumes the conversation: the damaged chunk is detected and not used.
    again = new_process_chat(tiny_settings, path, tiny_lm)
    expected = fresh_reply(again, conv.id, "Tell me a story.")
    turn, reply = send(again, conv.id, "Tell me a story.")
    assert reply == expected
    assert len(turn.warnings) == 1 and reason in turn.warnings[0], turn.warnings
    assert bad.key[:12] in turn.warnings[0]
    assert turn.stats.cached_tokens == bad.start  # everything before it, nothing from it on
    assert turn.stats.cache_source == ("disk" if bad.start else "none")
    assert turn.stats.prefilled_tokens == turn.stats.prompt_tokens - bad.start
    msgs = [(m.role, m.content) for m in again.messages(conv.id)]
    assert msgs == messages_before + [("user", "Tell me a story."), ("assistant", reply)]
    again.close()

    # The recomputed chunk was written again: the next resume reports nothing and uses it.
    third = new_process_chat(tiny_settings, path, tiny_lm)
    turn3, _ = send(third, conv.id, "And the stars?")
    assert turn3.warnings == []
    ids, _ = third.fit(third.render(conv.id)[:-1], GREEDY.max_new_tokens)
    assert turn3.stats.cache_source == "disk"
    assert turn3.stats.cached_tokens == common_prefix(turn.tokens, ids) > bad.start + bad.n_tokens
    assert len(third.messages(conv.id)) == len(messages_before) + 4
    third.close()  # its spill (which replaces the partial tail) is done
    assert maintenance.verify(third.store, kv_dir(), fix=False).bad == []


# -- SIGKILL in the middle of a spill --------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, threading
    from chatkv.config import load_settings
    from chatkv.session import Chat

    settings = load_settings()
    for key, value in json.loads(sys.argv[1]).items():
        settings.set(key, value)
    printed = threading.Event()
    real_replace = os.replace
    renames = 0

    def replace(src, dst):
        # The second chunk's temp file is written and fsynced; die before renaming it.
        global renames
        if str(dst).endswith(".safetensors"):
            renames += 1
            if renames == 2:
                printed.wait(30)
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)

    os.replace = replace
    chat = Chat(settings)
    chat.load()
    conv = chat.new_conversation(system_prompt=sys.argv[2])
    turn = chat.send(conv.id, sys.argv[3])
    reply = "".join(turn)
    print(json.dumps({"conversation": conv.id, "reply": reply, "tokens": len(turn.tokens)}), flush=True)
    printed.set()
    chat.close()  # waits for the spill, which kills the process
    sys.exit(3)
    """
)


def child_env(tiny_model_dir) -> dict[str, str]:
    env = dict(os.environ)  # CHATKV_HOME is the test's
    env.update(
        CHATKV_MODEL_NAME=str(tiny_model_dir),
        CHATKV_MODEL_DEVICE="cpu",
        CHATKV_MODEL_DTYPE="float32",
        CHATKV_GENERATION_TEMPERATURE="0",
        CHATKV_GENERATION_MAX_NEW_TOKENS=str(GREEDY.max_new_tokens),
        CHATKV_CACHE_CHUNK_TOKENS="32",
        CHATKV_CACHE_CODEC="fp16",
        TRANSFORMERS_VERBOSITY="error",
    )
    return env


def test_sigkill_during_a_spill_loses_nothing_and_is_cleaned_up(
    tiny_model_dir, tiny_settings, tiny_lm, capsys
):
    settings = {"generation.max_new_tokens": GREEDY.max_new_tokens}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(settings), SYSTEM, QUESTIONS[0]],
        env=child_env(tiny_model_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    done = json.loads(proc.stdout.strip().splitlines()[-1])
    assert done["tokens"] > 64  # the turn covers several chunks: one was written, one was not

    # The database opens and holds every completed message.
    store = Store(db_path())
    msgs = store.messages(done["conversation"])
    assert [(m.role, m.content) for m in msgs] == [("user", QUESTIONS[0]), ("assistant", done["reply"])]
    assert msgs[1].stats is not None and msgs[1].stats.completion_tokens > 0
    kv = kv_dir()
    leftovers = [p for p in kv.rglob(".tmp-*")]
    assert len(leftovers) == 1  # the killed write's temp file
    assert len(store.all_chunks()) == 1  # only the first chunk was renamed and indexed

    # verify finds the indexed chunk sound; gc removes the leftover temp file once it is
    # old enough not to be a running spill's.
    for p in leftovers:
        os.utime(p, (p.stat().st_mtime - 3600, p.stat().st_mtime - 3600))
    capsys.readouterr()
    old_umask = os.umask(0o022)
    try:
        assert cli_main(["cache", "verify", "--json"]) == 0
        verified = json.loads(capsys.readouterr().out)
        assert verified["checked"] == 1 and verified["bad"] == []
        assert cli_main(["cache", "gc", "--json"]) == 0
        collected = json.loads(capsys.readouterr().out)
    finally:
        os.umask(old_umask)
    assert collected["orphan_files"] == 1 and collected["missing_files"] == 0
    assert not list(kv.rglob(".tmp-*"))
    assert sorted(p.relative_to(kv).as_posix() for p in kv.rglob("*.safetensors")) == [
        r.path for r in store.all_chunks()
    ]

    # The conversation goes on, from the chunk that was completed.
    chat = new_process_chat(tiny_settings, store.path, tiny_lm)
    expected = fresh_reply(chat, done["conversation"], "And the stars?")
    turn, reply = send(chat, done["conversation"], "And the stars?")
    assert reply == expected and turn.warnings == []
    assert turn.stats.cache_source == "disk" and turn.stats.cached_tokens == 32
    chat.close()
    assert len(chat.messages(done["conversation"])) == 4
    assert maintenance.verify(chat.store, kv, fix=False).bad == []


# -- two processes at once -------------------------------------------------------------


def test_two_processes_continue_two_conversations_at_once(tiny_model_dir, tiny_settings, tiny_lm):
    store = Store(db_path())
    convs = []
    for i, q in enumerate(QUESTIONS):
        # The same system prompt: both processes write the same first chunks at once.
        conv = store.create_conversation(model=str(tiny_model_dir), system_prompt=SYSTEM)
        store.add_message(conv.id, "user", q)
        store.add_message(conv.id, "assistant", f"Answer number {i}.")
        convs.append(conv.id)
    prompts = ["Tell me a story about the sea.", "Tell me about the stars."]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "chatkv", "ask", "-C", str(cid), "--json", prompt],
            env=child_env(tiny_model_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cid, prompt in zip(convs, prompts, strict=True)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    chat = new_process_chat(tiny_settings, store.path, tiny_lm)
    for cid, prompt, (out, _) in zip(convs, prompts, results, strict=True):
        answer = json.loads(out)
        assert answer["conversation_id"] == cid
        msgs = store.messages(cid)
        assert [m.role for m in msgs] == ["user", "assistant", "user", "assistant"]
        assert (
            msgs[2].content == prompt
            and msgs[3].content == answer["reply"]
            and msgs[3].id == answer["message_id"]
        )
        # greedy: each reply is what this process would answer from scratch
        chat.store.delete_messages_from(cid, 2)
        assert fresh_reply(chat, cid, prompt) == answer["reply"]
    assert maintenance.verify(store, kv_dir(), fix=False).bad == []
    assert all(store.get_kv_head(cid).key for cid in convs)
    chat.close()


# -- spill cost ------------------------------------------------------------------------


def test_spill_after_turn_20_of_a_4000_token_conversation_writes_only_the_new_tokens(
    tiny_settings, tiny_lm, monkeypatch
):
    chat = new_process_chat(tiny_settings, db_path(), tiny_lm)
    c = chat.kv.chunk_tokens
    conv = chat.new_conversation(system_prompt=SYSTEM)
    user = (
        "How does the Apache license differ? It is permissive and has a patent grant. " * 3
        + "Hello! How can I help you today?"
    )
    reply = "Caches keep keys and values of attention for every token of the history. " * 4
    for _ in range(18):
        chat.store.add_message(conv.id, "user", user)
        chat.store.add_message(conv.id, "assistant", reply)
    t19, _ = send(chat, conv.id, "Hello! How can I help you today?")  # prefills and spills the history
    chat.kv.flush()
    assert 3700 <= len(t19.tokens) <= 4000, len(t19.tokens)
    history_bytes = chat.store.chunk_stats()["bytes"]

    writes: list[int] = []
    real_write = chunks.write_atomic

    def counting_write(path, blob):
        writes.append(len(blob))
        real_write(path, blob)

    monkeypatch.setattr("chatkv.kv.manager.write_atomic", counting_write)
    before = chat.kv.bytes_written
    t20, _ = send(chat, conv.id, "Tell me a story about the sea and the stars.")
    chat.kv.flush()
    spilled = chat.kv.bytes_written - before
    assert spilled == sum(writes) > 0

    ids20, _ = chat.fit(chat.render(conv.id)[:-1], GREEDY.max_new_tokens)
    reused = common_prefix(t19.tokens, ids20)
    # Turn 20 prefilled only what turn 19 had not covered (its own message, and at most
    # the end of the last reply where it re-tokenizes differently).
    assert t20.stats.cache_source == "memory"
    assert t20.stats.cached_tokens == reused
    assert t20.stats.prefilled_tokens == len(ids20) - reused < 60

    # What the disk format costs per token and per file, from the codec and the format.
    one = encode_probe(tiny_lm, chat, 1)
    per_token = (encode_probe(tiny_lm, chat, c + 1) - one) / c
    per_file = one - per_token + 256  # header size varies a little with the offsets' digits
    new_tokens = len(t20.tokens) - common_prefix(t19.tokens, t20.tokens)
    # the tail chunk is rewritten by design: at most c - 1 old tokens again
    assert spilled <= (new_tokens + c) * per_token + len(writes) * per_file
    assert len(writes) <= (new_tokens + c) // c + 1
    assert spilled * 10 < history_bytes
    chat.close()


def encode_probe(lm, chat: Chat, n: int) -> int:
    """Bytes of a chunk file holding `n` tokens of this model's cache."""
    cache = live.new_cache(lm.model)
    with torch.no_grad():
        lm.model(torch.tensor([[1] * n], device=lm.device), **cache_arg(lm.model, cache), use_cache=True)
    blob, _ = encode_chunk(
        chat.kv.policy.codec_for(0),
        lm.fingerprint,
        "0" * 64,
        "1" * 64,
        4000,
        [1] * n,
        live.layers_of(cache),
        True,
    )
    return len(blob)
