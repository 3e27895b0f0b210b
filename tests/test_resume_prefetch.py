"""Resuming at disk speed, on the tiny model: a conversation's chunks are read while the
model loads (chatkv.kv.prefetch), through the same checks as any read; a prefetch made
for another model is thrown away; the reply is what it would have been without one; the
model's first forward is run aside (a warm-up); `ask --json` reports where the time went.
"""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest
import torch

import chatkv.engine.model as chatkv_model
from chatkv.api import GenerationSettings
from chatkv.cli import main
from chatkv.engine.model import load_model, predict_fingerprint
from chatkv.kv import prefetch
from chatkv.paths import kv_dir, models_dir
from chatkv.session import Chat
from chatkv.store import Store
from tests.test_session import fresh_tokens, perturbed_copy

GREEDY = GenerationSettings(max_new_tokens=12, temperature=0.0)
QUESTIONS = ["Summarise the GNU GPL in three bullet points.", "How does the Apache license differ?"]


def saved_conversation(chat: Chat) -> int:
    """A conversation of a few chunks, spilled to disk."""
    conv = chat.new_conversation(system_prompt="You are terse.")
    for q in QUESTIONS:
        "".join(chat.send(conv.id, q, GREEDY))
    chat.flush()
    return conv.id


def expected_reply(chat: Chat, conv_id: int, text: str) -> list[int]:
    """The tokens a prefill from nothing answers `text` with (the message is added, then
    removed)."""
    chat.store.add_message(conv_id, "user", text)
    expected = fresh_tokens(chat, conv_id, GREEDY)
    chat.store.delete_messages_from(conv_id, chat.messages(conv_id)[-1].position)
    return expected


def reply_tokens(turn) -> list[int]:
    return turn.tokens[turn.stats.prompt_tokens :]


def cold_host(tiny_settings, tiny_lm, bucket) -> tuple[Chat, int]:
    """A conversation saved with cache.url at `bucket`, then this host's chunk files gone
    (another host: the index and the bucket, no local copies); a new Chat over it."""
    import shutil

    tiny_settings.set("cache.url", bucket.as_uri())
    first = Chat(tiny_settings, lm=tiny_lm)
    cid = saved_conversation(first)
    first.close()
    shutil.rmtree(kv_dir())
    return Chat(tiny_settings, store=Store(first.store.path), lm=tiny_lm), cid


def first_read_waits_for_the_take(monkeypatch, chat: Chat) -> list:
    """The chat's prefetch is still reading its first chunk when the turn takes it; returns
    the paths the prefetch read."""
    from chatkv.kv import chunks

    real, reads = chunks.read_chunk, []

    def gated(*args, **kwargs):
        reads.append(args[0])
        if len(reads) == 1:
            assert chat.prefetched._enough.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(chunks, "read_chunk", gated)
    return reads


def test_chunks_read_while_loading_are_used_and_the_reply_is_unchanged(chat, tiny_settings, tiny_lm):
    cid = saved_conversation(chat)
    chat.close()

    again = Chat(tiny_settings, store=Store(chat.store.path), lm=tiny_lm)  # a new process
    again.prefetch(cid)
    again.load()
    again.prefetched.wait()  # as a load longer than the reads: all of them done aside
    expected = expected_reply(again, cid, "Tell me a story.")
    turn = again.send(cid, "Tell me a story.", GREEDY)
    "".join(turn)
    pre = again.prefetched
    assert turn.stats.cache_source == "disk"
    assert pre.taken and pre.read_tokens >= turn.stats.cached_tokens > 32
    assert pre.used_tokens == turn.stats.cached_tokens
    assert reply_tokens(turn) == expected
    again.close()


def test_a_prefetch_the_first_turn_does_not_use_is_dropped_with_its_buffers(chat, tiny_settings, tiny_lm):
    cid = saved_conversation(chat)
    chat.close()
    again = Chat(tiny_settings, store=Store(chat.store.path), lm=tiny_lm)  # `chatkv <cid>`, a new process
    again.prefetch(cid)
    again.load()
    pre = again.prefetched
    pre.wait()
    assert pre._result is not None  # the conversation's chunks, decoded and held
    "".join(again.send(None, "Something else entirely.", GREEDY))  # the user starts a new chat first
    assert again.kv.prefetch is None and pre._result is None  # not held to the end of the session
    turn = again.send(cid, "Tell me a story.", GREEDY)
    "".join(turn)
    assert turn.stats.cache_source == "disk"  # read by the attach itself
    again.close()


def test_rm_while_the_model_loads_stops_the_conversations_prefetch_first(chat, tiny_settings, tiny_lm):
    """`chatkv rm` in a process whose prefetch of that conversation still reads (a chat
    opened on it, the model not loaded yet): the reads stop before the chunks go."""
    cid = saved_conversation(chat)
    chat.close()
    again = Chat(tiny_settings, store=Store(chat.store.path), lm=tiny_lm)
    again.prefetch(cid)
    pre = again.prefetched
    again.delete(cid)
    assert pre._cancel.is_set() and not pre._thread.is_alive() and pre._result is None
    assert again.store.all_chunks() == [] and list(kv_dir().rglob("*.safetensors")) == []
    again.close()


def test_the_fingerprint_is_predicted_from_the_last_load_with_the_same_settings(tiny_model_dir):
    name = str(tiny_model_dir)
    assert predict_fingerprint(name, "cpu", "float32") == ""  # never loaded in this data dir
    lm = load_model(name, device="cpu", dtype="float32")
    assert predict_fingerprint(name, "cpu", "float32") == lm.fingerprint
    assert predict_fingerprint(name, "cpu", "bfloat16") == ""  # another dtype: another cache
    assert predict_fingerprint(str(tiny_model_dir / "missing"), "cpu", "float32") == ""


def test_a_prefetch_is_handed_over_only_for_the_model_it_was_read_for(chat, tiny_settings, tiny_lm):
    cid = saved_conversation(chat)
    pre = prefetch.start(chat.store, kv_dir(), cid, tiny_settings, lm=tiny_lm)
    assert pre.take(tiny_lm.fingerprint, torch.bfloat16, tiny_lm.device) is None  # another dtype
    assert pre.take(tiny_lm.fingerprint, tiny_lm.dtype, tiny_lm.device) is None  # once only
    pre = prefetch.start(chat.store, kv_dir(), cid, tiny_settings, lm=tiny_lm)
    assert pre.take("0" * 32, tiny_lm.dtype, tiny_lm.device) is None  # another model
    pre = prefetch.start(chat.store, kv_dir(), cid, tiny_settings, lm=tiny_lm)
    pre.wait()
    got = pre.take(tiny_lm.fingerprint, tiny_lm.dtype, tiny_lm.device)
    assert got is not None and got.tokens == pre.read_tokens > 32


def test_reads_left_when_the_turn_starts_are_read_by_the_attach(chat, tiny_settings, tiny_lm, monkeypatch):
    """The turn does not wait for the prefetch thread to read on alone: taking it stops it
    after the chunk being read, and the attach reads the rest (two at a time), into the same
    buffers; the reply is unchanged."""
    cid = saved_conversation(chat)
    chat.close()
    again = Chat(tiny_settings, store=Store(chat.store.path), lm=tiny_lm)
    calls = first_read_waits_for_the_take(monkeypatch, again)
    again.prefetch(cid)
    again.load()
    expected = expected_reply(again, cid, "Tell me a story.")
    turn = again.send(cid, "Tell me a story.", GREEDY)
    "".join(turn)
    pre = again.prefetched
    assert len(calls) == 1  # the prefetch read one chunk, the attach the others
    assert turn.stats.cache_source == "disk"
    assert 0 < pre.used_tokens == pre.read_tokens < turn.stats.cached_tokens
    assert reply_tokens(turn) == expected
    again.close()


def test_a_prefetch_for_another_model_is_discarded_and_the_cache_recomputed(
    chat, tiny_settings, tiny_lm, tiny_model_dir, tmp_path
):
    cid = saved_conversation(chat)
    chat.close()
    other = perturbed_copy(tiny_model_dir, tmp_path / "other-model")
    # The memo claims the other model loads as the first one: the prefetch reads the saved
    # chunks, which the loaded model (another fingerprint) must not use.
    lm_other = load_model(str(other), device="cpu", dtype="float32")
    memo = models_dir() / "fingerprints.json"
    known = json.loads(memo.read_text())
    known = {k: (tiny_lm.fingerprint if v == lm_other.fingerprint else v) for k, v in known.items()}
    memo.write_text(json.dumps(known))
    assert predict_fingerprint(str(other), "cpu", "float32") == tiny_lm.fingerprint

    tiny_settings.set("model.name", str(other))
    tiny_settings.set("model.dtype", "float32")  # as the chunks were made (auto may pick bfloat16)
    again = Chat(tiny_settings, store=Store(chat.store.path))
    again.prefetch(cid)
    again.load()
    again.prefetched.wait()
    assert again.lm.fingerprint == lm_other.fingerprint != tiny_lm.fingerprint
    expected = expected_reply(again, cid, "Tell me a story.")
    turn = again.send(cid, "Tell me a story.", GREEDY)
    "".join(turn)
    pre = again.prefetched
    assert pre.read_tokens > 32 and pre.used_tokens == 0  # read, then thrown away
    assert turn.stats.cache_source == "none" and turn.stats.cached_tokens == 0
    assert reply_tokens(turn) == expected
    again.close()


def test_a_chunk_damaged_before_the_prefetch_is_judged_by_the_attach_as_before(chat, tiny_settings, tiny_lm):
    cid = saved_conversation(chat)
    chat.close()
    chain = chat.store.chunk_chain(chat.store.get_kv_head(cid).key)
    assert len(chain) >= 3
    bad = chain[1]
    path = kv_dir() / bad.path
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF  # tensor data changes: the checksum no longer matches
    path.write_bytes(bytes(blob))

    again = Chat(tiny_settings, store=Store(chat.store.path), lm=tiny_lm)
    again.prefetch(cid)
    again.load()
    again.prefetched.wait()
    expected = expected_reply(again, cid, "Tell me a story.")
    turn = again.send(cid, "Tell me a story.", GREEDY)
    "".join(turn)
    pre = again.prefetched
    assert pre.read_tokens == chain[0].n_tokens and bad.key[:12] in pre.problem  # stopped there
    assert turn.stats.cache_source == "disk" and turn.stats.cached_tokens == chain[0].n_tokens
    assert any(bad.key[:12] in w for w in turn.warnings)
    assert bad.key not in again.store.get_chunks([bad.key])  # removed, as any read removes it
    assert not path.exists()
    assert reply_tokens(turn) == expected
    again.close()


def test_a_chunk_recoded_after_the_prefetch_read_it_is_read_again(chat, tiny_settings, tiny_lm):
    cid = saved_conversation(chat)
    chat.close()
    again = Chat(tiny_settings, store=Store(chat.store.path), lm=tiny_lm)
    again.prefetch(cid)
    again.load()
    again.prefetched.wait()
    # Another process re-codes chunk 1 (same key, new row) after the prefetch read it.
    head = again.store.get_kv_head(cid).key
    rec = again.store.chunk_chain(head)[1]
    again.store.add_chunk(dataclasses.replace(rec, checksum="f" * 64))
    turn = again.send(cid, "Tell me a story.", GREEDY)
    "".join(turn)
    # The prefetched chunk 0 is used; chunk 1 is read again under its new row (which the
    # file no longer matches: refused and recomputed, exactly as without a prefetch).
    assert again.prefetched.used_tokens == rec.start
    assert turn.stats.cached_tokens == rec.start
    again.close()


def test_a_fresh_model_is_warmed_up_aside_and_the_turn_waits_for_it(tiny_settings, monkeypatch):
    import chatkv.engine.model as model

    started = []
    real = model.warm_up

    def spy(lm, *args, **kwargs):
        thread = real(lm, *args, **kwargs)
        started.append(thread)
        return thread

    monkeypatch.setattr(model, "warm_up", spy)
    chat = Chat(tiny_settings)
    chat.load()
    assert len(started) == 1
    conv = chat.new_conversation()
    "".join(chat.send(conv.id, "Hello!", GREEDY))
    assert not started[0].is_alive() and chat.kv.warm_up is None  # joined before the forward
    chat.close()


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cli_env(monkeypatch, tiny_model_dir):
    monkeypatch.setenv("CHATKV_MODEL_NAME", str(tiny_model_dir))
    monkeypatch.setenv("CHATKV_MODEL_DEVICE", "cpu")
    monkeypatch.setenv("CHATKV_GENERATION_TEMPERATURE", "0")
    monkeypatch.setenv("CHATKV_GENERATION_MAX_NEW_TOKENS", "6")
    monkeypatch.setenv("CHATKV_CACHE_CHUNK_TOKENS", "32")
    monkeypatch.setenv("CHATKV_CACHE_CODEC", "fp16")


def test_ask_json_reports_the_chunk_reads_beside_the_model_load(capsys, cli_env):
    code, out, err = run_cli(capsys, "ask", "--json", QUESTIONS[0] + " " + QUESTIONS[1])
    assert code == 0, err
    first = json.loads(out)
    assert first["startup"]["prefetched_tokens"] == 0 and not first["startup"]["read_overlapped_load"]
    cid = str(first["conversation_id"])
    code, out, err = run_cli(capsys, "ask", "--json", "-C", cid, "Tell me a story.")
    assert code == 0, err
    second = json.loads(out)
    s, st = second["startup"], second["stats"]
    assert st["cache_source"] == "disk"
    assert 0 < s["prefetched_tokens"] <= st["cached_tokens"] and st["cached_tokens"] > 32
    assert s["read_overlapped_load"] is True  # it began before the model had loaded
    assert s["chunk_read_s"] > 0 and s["model_load_s"] > 0
    assert s["process_first_token_s"] >= s["model_load_s"]


def test_ctrl_c_while_the_model_loads_exits_130_and_stops_the_prefetch(capsys, cli_env, monkeypatch):
    code, out, err = run_cli(capsys, "ask", "--json", QUESTIONS[0])
    cid = str(json.loads(out)["conversation_id"])
    import chatkv.engine.model as model

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "load_model", interrupted)
    code, out, err = run_cli(capsys, "ask", "-C", cid, "Tell me a story.")
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    for t in threading.enumerate():
        if t.name == "chatkv-prefetch":
            t.join(timeout=30)
            assert not t.is_alive()


def test_each_turn_tokenizes_only_the_text_it_has_not_seen(tiny_lm, monkeypatch):
    from chatkv.engine.model import chat_ids

    tok = tiny_lm.tokenizer
    seen: list[str] = []
    real = type(tok).encode

    def encode(self, text, *args, **kwargs):
        seen.append(text)
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tok), "encode", encode)
    history = [{"role": "user", "content": f"Question {i}: {QUESTIONS[i % 2]}"} for i in range(6)]
    whole = chat_ids(tok, history)
    seen.clear()
    longer = history + [{"role": "assistant", "content": "A new reply to the last question."}]
    ids = chat_ids(tok, longer)
    assert "A new reply to the last question." in seen  # the new message
    assert not any(m["content"] in seen for m in history)  # not the old ones again
    assert ids[: len(whole) - 3] == whole[: len(whole) - 3]  # (the generation prompt differs)
    seen.clear()
    edited = [dict(history[0], content="An edited first question.")] + longer[1:]
    edited_ids = chat_ids(tok, edited)
    assert edited_ids != ids and "An edited first question." in seen
    # the remembered ids are the tokenizer's own: the same as without the memo
    monkeypatch.setattr("chatkv.engine.model._PART_IDS", type(chatkv_model._PART_IDS)())
    assert chat_ids(tok, longer) == ids and chat_ids(tok, edited) == edited_ids


READ_ONE_CHUNK = """
import sys, torch
from pathlib import Path
from chatkv.kv.chunks import chunk_key, encode_chunk, read_chunk
from chatkv.kv.codecs import get_codec
from chatkv.kv.policy import get_policy
tokens = list(range(8))
key = chunk_key("f" * 32, None, tokens)
layers = [(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)) for _ in range(2)]
blob, _ = encode_chunk(get_codec("int8"), "f" * 32, key, None, 0, tokens, layers, False, sink=4)
path = Path(sys.argv[1])
path.write_bytes(blob)
data = read_chunk(path, get_policy("int8"), "f" * 32, key, torch.float32, torch.device("cpu"))
assert data.tokens == tokens
print(sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules))
"""


def test_reading_a_chunk_does_not_import_torchs_compiler_stack(tmp_path):
    """The first chunk read of a fresh process used to check its tensors' shapes on the meta
    device, whose first use imports torch._dynamo and sympy: seconds on the way to a resumed
    conversation's first token."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", READ_ONE_CHUNK, str(tmp_path / "chunk.safetensors")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_bench_resume_fresh_process_runs_the_cli_and_reports_the_ratios(capsys, tiny_model_dir):
    code, out, err = run_cli(
        capsys,
        "bench",
        "resume",
        "--fresh-process",
        "--json",
        "--context",
        "300",
        "--repeat",
        "1",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--codec",
        "fp16",
    )
    assert code == 0, err
    r = json.loads(out)
    assert r["rounds"] == 1 and r["prompt_tokens"] >= 300
    assert r["reprefill_cached_tokens"] == 0  # the baseline prefilled everything
    # the resume: all but the new question, read during the model's load
    assert r["prompt_tokens"] - 60 < r["cached_tokens"] < r["prompt_tokens"]
    assert r["read_overlapped_load"] is True
    for ratio in ("speedup", "ttft_over_chunk_read_cpu", "process_over_import", "llama_import_over_import"):
        assert r[ratio] > 0
    assert r["llama_import_over_import"] == pytest.approx(
        r["import_llama_s"] / r["import_torch_transformers_s"]
    )
    assert r["speedup"] == pytest.approx(r["reprefill_ttft_s"] / r["resume_ttft_s"])


def test_a_resumed_conversation_is_tokenized_while_the_weights_load(chat, tiny_settings, monkeypatch):
    cid = saved_conversation(chat)
    chat.close()
    history = [m.content for m in chat.messages(cid)]
    encoded: list[str] = []

    def spy(tok):
        real = type(tok).encode

        def encode(self, text, *args, **kwargs):
            encoded.append(text)
            return real(self, text, *args, **kwargs)

        monkeypatch.setattr(type(tok), "encode", encode)

    import chatkv.engine.model as model

    load = model.load_model

    def load_and_spy(*args, on_tokenizer=None, **kwargs):
        def hook(tok):
            spy(tok)
            if on_tokenizer is not None:
                on_tokenizer(tok)

        return load(*args, on_tokenizer=hook, **kwargs)

    monkeypatch.setattr(model, "load_model", load_and_spy)
    tiny_settings.set("model.dtype", "float32")  # as the chunks were made (auto may pick bfloat16)
    again = Chat(tiny_settings, store=Store(chat.store.path))  # loads its own model: a new tokenizer
    again.prefetch(cid)
    again.load()
    assert all(text in encoded for text in history)  # tokenized during the load
    encoded.clear()
    turn = again.send(cid, "Tell me a story.", GREEDY)
    "".join(turn)
    assert "Tell me a story." in encoded and not any(text in encoded for text in history)
    assert turn.stats.cache_source == "disk"
    again.close()


def test_a_cold_host_fetches_the_chunks_from_the_bucket_during_the_load(tiny_settings, tiny_lm, tmp_path):
    """With cache.url, chunks this host has no copy of are fetched during the load by the
    prefetch, whose tiers the KV layer then uses (one client, a failing bucket said once),
    and the reply is what it would have been."""
    again, cid = cold_host(tiny_settings, tiny_lm, tmp_path / "bucket")
    again.prefetch(cid)
    again.load()
    pre = again.prefetched
    assert pre is not None and pre.tiers is not None and again.kv.tiers is pre.tiers
    pre.wait()  # as a load longer than the fetches
    expected = expected_reply(again, cid, "Tell me a story.")
    turn = again.send(cid, "Tell me a story.", GREEDY)
    "".join(turn)
    assert turn.stats.cache_source == "remote" and turn.stats.cached_tokens > 32
    assert pre.used_tokens == turn.stats.cached_tokens  # read during the load, not after
    assert reply_tokens(turn) == expected
    again.close()


def test_a_cold_host_taken_early_fetches_each_chunk_once(tiny_settings, tiny_lm, tmp_path, monkeypatch):
    """The turn takes the prefetch while it still reads: the fetches it started are the
    attach's to wait for, not started again."""
    from chatkv.kv import objects

    again, cid = cold_host(tiny_settings, tiny_lm, tmp_path / "bucket")
    reads = first_read_waits_for_the_take(monkeypatch, again)
    real_fetch, fetched = objects.Tiers._fetch, []

    def counted(self, rec):
        fetched.append(rec.key)
        return real_fetch(self, rec)

    monkeypatch.setattr(objects.Tiers, "_fetch", counted)
    again.prefetch(cid)
    again.load()
    expected = expected_reply(again, cid, "Tell me a story.")
    turn = again.send(cid, "Tell me a story.", GREEDY)
    "".join(turn)
    assert turn.stats.cache_source == "remote" and len(reads) == 1
    assert 0 < again.prefetched.used_tokens < turn.stats.cached_tokens
    assert len(fetched) == len(set(fetched)) > 1  # every chunk fetched, none twice
    assert reply_tokens(turn) == expected
    again.close()


def test_bucket_fetches_an_attach_does_not_wait_for_are_dropped(
    tiny_settings, tiny_lm, tmp_path, monkeypatch
):
    """A prefetch taken early leaves its fetches to the attach; those past what the attach
    reads (here it asks for the first chunk only) are dropped after it, not left running
    with answers a later read would trust."""
    from chatkv.engine.model import chat_ids

    again, cid = cold_host(tiny_settings, tiny_lm, tmp_path / "bucket")
    first_read_waits_for_the_take(monkeypatch, again)
    again.prefetch(cid)
    again.load()
    tokens = chat_ids(tiny_lm.tokenizer, again.render(cid))
    head = again.store.get_kv_head(cid).key
    chain = again.store.chunk_chain(head)
    assert len(chain) >= 3
    got = again.kv.attach(cid, tokens[: chain[0].n_tokens + 1])
    assert got.cached == chain[0].n_tokens
    assert not again.kv.tiers._inflight  # nothing of the prefetch's left behind
    again.close()


def test_a_second_tokenizer_waits_for_the_first_ones_thread(tiny_lm):
    """A lean load that fails after giving its tokenizer gives the fallback load's too: the
    first tokenizing thread ends before the second starts, so none runs unwaited for."""
    import time

    def slow_render():
        time.sleep(0.3)
        return [{"role": "user", "content": "Hello!"}]

    pre = prefetch.Prefetch(None, kv_dir(), 1, "fp16", render=slow_render)  # type: ignore[arg-type]
    pre.tokenize(tiny_lm.tokenizer)
    first = pre._tokenizing
    pre.tokenize(tiny_lm.tokenizer)
    assert first is not None and not first.is_alive() and pre._tokenizing is not first
    pre.tokenized()
