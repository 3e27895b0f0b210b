"""The cache's core promise, through the session layer on the tiny model:
a reused or reloaded fp16 cache gives exactly the tokens of a fresh prefill, and a
cache that cannot be trusted is dropped and recomputed without losing a message."""

from __future__ import annotations

import shutil

import pytest

from chatkv.api import GenerationSettings
from chatkv.engine.generate import generate
from chatkv.errors import InputError, ModelError, NotFoundError
from chatkv.kv import live
from chatkv.kv.manager import common_prefix
from chatkv.session import Chat
from chatkv.store import Store

GREEDY = GenerationSettings(max_new_tokens=12, temperature=0.0)


def fresh_tokens(chat: Chat, conv_id: int, settings: GenerationSettings = GREEDY) -> list[int]:
    """What a prefill from nothing gives for the conversation's next reply."""
    ids, _ = chat.fit(chat.render(conv_id), settings.max_new_tokens)
    lm = chat.lm
    steps = generate(lm.model, ids, live.new_cache(lm.model), 0, settings, lm.eos_ids, lm.context_limit)
    return [s.token for s in steps if s.token is not None]


def send(chat: Chat, conv_id: int, text: str):
    turn = chat.send(conv_id, text, GREEDY)
    reply = "".join(turn)
    return turn, reply


def decode(chat: Chat, tokens: list[int]) -> str:
    return chat.lm.tokenizer.decode(tokens, skip_special_tokens=True)


def test_second_turn_reuses_memory_and_matches_fresh_prefill(chat):
    conv = chat.new_conversation(system_prompt="You are terse.")
    t1, r1 = send(chat, conv.id, "Hello! Tell me a story about the sea.")
    assert t1.stats.cache_source == "none" and t1.stats.cached_tokens == 0
    covered = t1.stats.prompt_tokens + t1.stats.completion_tokens

    # What a fresh prefill would answer to the next message:
    chat.store.add_message(conv.id, "user", "And the stars?")
    expected = decode(chat, fresh_tokens(chat, conv.id))
    chat.store.delete_messages_from(conv.id, chat.messages(conv.id)[-1].position)

    t2, r2 = send(chat, conv.id, "And the stars?")
    assert t2.stats.cache_source == "memory"
    # Everything the cache held that the new prompt starts with is reused. (A random
    # model's reply may not re-tokenize to the same ids, so the prefix can end inside it;
    # the real-model test checks that only the new message is prefilled.)
    ids2, _ = chat.fit(chat.render(conv.id), GREEDY.max_new_tokens)
    assert len(t1.tokens) == covered
    assert t2.stats.cached_tokens == common_prefix(t1.tokens, ids2)
    assert t2.stats.cached_tokens > t1.stats.prompt_tokens
    assert r2 == expected


def test_resume_from_disk_in_a_fresh_chat_is_exact_for_fp16(chat, tiny_settings, tiny_lm):
    conv = chat.new_conversation()
    for q in ["Summarise the GNU GPL in three bullet points.", "How does the Apache license differ?"]:
        last, _ = send(chat, conv.id, q)
    chat.close()  # waits for the spill

    again = Chat(tiny_settings, store=Store(chat.store.path), lm=tiny_lm)  # empty live pool: a new process
    again.load()
    again.store.add_message(conv.id, "user", "Tell me a story.")
    expected = decode(again, fresh_tokens(again, conv.id))
    again.store.delete_messages_from(conv.id, again.messages(conv.id)[-1].position)

    turn, reply = send(again, conv.id, "Tell me a story.")
    assert turn.stats.cache_source == "disk"
    ids, _ = again.fit(again.render(conv.id)[:-1], GREEDY.max_new_tokens)
    assert turn.stats.cached_tokens == common_prefix(last.tokens, ids) > last.stats.prompt_tokens
    assert reply == expected
    again.close()


def test_edit_and_regenerate_reuse_the_unchanged_prefix(chat):
    conv = chat.new_conversation()
    send(chat, conv.id, "The quick brown fox jumps over the lazy dog.")
    t2, _ = send(chat, conv.id, "Hello! How can I help you today?")
    first_user_len = t2.stats.prompt_tokens

    regen = chat.regenerate(conv.id, GREEDY)
    again = "".join(regen)
    assert regen.stats.cache_source == "memory"
    assert regen.stats.prefilled_tokens == 1  # the whole prompt but the last token comes from cache
    assert again == t2.message.content  # greedy: the same reply
    assert [m.role for m in chat.messages(conv.id)] == ["user", "assistant", "user", "assistant"]

    second_user = chat.messages(conv.id)[2]
    edit = chat.edit(second_user.id, "Tell me about caches.", GREEDY)
    "".join(edit)
    assert edit.stats.cache_source == "memory"
    assert 0 < edit.stats.cached_tokens < first_user_len
    msgs = chat.messages(conv.id)
    assert [m.content for m in msgs if m.role == "user"] == [
        "The quick brown fox jumps over the lazy dog.",
        "Tell me about caches.",
    ]


def test_cancel_keeps_the_partial_reply(chat):
    conv = chat.new_conversation()
    turn = chat.send(
        conv.id, "Tell me a story about the sea.", GenerationSettings(max_new_tokens=50, temperature=0.0)
    )
    pieces = []
    for piece in turn:
        pieces.append(piece)
        if len(pieces) == 3:
            turn.cancel()
    assert turn.stats.finish_reason == "cancelled"
    assert turn.message.content == "".join(pieces)
    assert 3 <= turn.stats.completion_tokens < 50
    assert chat.messages(conv.id)[-1].role == "assistant"


def test_stats_are_saved_with_the_reply(chat):
    conv = chat.new_conversation()
    turn, _ = send(chat, conv.id, "Hello!")
    saved = chat.messages(conv.id)[-1].stats
    assert saved.prompt_tokens == turn.stats.prompt_tokens > 0
    assert saved.completion_tokens == turn.stats.completion_tokens > 0
    assert saved.ttft_s > 0 and saved.cache_source == "none" and saved.codec == "fp16"


def test_overflowing_history_drops_oldest_turns_and_reports_it(chat, tiny_settings, tiny_lm):
    tiny_lm_small = type(tiny_lm)(**{**tiny_lm.__dict__, "context_limit": 160})
    small = Chat(tiny_settings, store=chat.store, lm=tiny_lm_small)
    small.load()
    conv = small.new_conversation()
    for _ in range(6):
        small.store.add_message(conv.id, "user", "Caches keep keys and values of attention for every token.")
        small.store.add_message(conv.id, "assistant", "Hello! How can I help you today?")
    turn, _ = send(small, conv.id, "And the stars?")
    assert turn.stats.dropped_messages > 0
    assert turn.stats.prompt_tokens + min(GREEDY.max_new_tokens, 40) <= 160
    assert len(small.messages(conv.id)) == 14  # nothing deleted from the transcript
    with pytest.raises(InputError, match="context holds 160"):
        list(small.send(conv.id, "The quick brown fox. " * 60, GREEDY))
    # the rejected message is not left behind
    assert small.messages(conv.id)[-1].role == "assistant"


def test_bad_input_is_rejected_before_anything_is_written(chat):
    conv = chat.new_conversation()
    with pytest.raises(InputError):
        chat.send(conv.id, "   ")
    with pytest.raises(NotFoundError):
        chat.send(9999, "hello")
    assert chat.messages(conv.id) == []


def test_a_failed_regeneration_or_edit_leaves_the_conversation_as_it_was(chat, monkeypatch):
    conv = chat.new_conversation()
    send(chat, conv.id, "The quick brown fox jumps over the lazy dog.")
    send(chat, conv.id, "Hello! How can I help you today?")
    before = [(m.role, m.content) for m in chat.messages(conv.id)]

    import chatkv.engine.generate as engine_generate

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")
        yield  # a generator, like the real one

    monkeypatch.setattr(engine_generate, "generate", broken)
    with pytest.raises(RuntimeError):
        list(chat.regenerate(conv.id, GREEDY))
    with pytest.raises(RuntimeError):
        list(chat.edit(chat.messages(conv.id)[0].id, "Tell me about caches.", GREEDY))
    assert [(m.role, m.content) for m in chat.messages(conv.id)] == before


def test_stopping_before_the_first_token_saves_no_empty_reply(chat):
    conv = chat.new_conversation()
    send(chat, conv.id, "Hello!")
    before = [(m.role, m.content) for m in chat.messages(conv.id)]
    turn = chat.regenerate(conv.id, GREEDY)
    turn.cancel()
    assert list(turn) == [] and turn.message is None
    assert [(m.role, m.content) for m in chat.messages(conv.id)] == before


def test_ctrl_c_mid_reply_keeps_the_partial_reply_and_propagates(chat):
    conv = chat.new_conversation()
    turn = chat.send(conv.id, "Tell me a story.", GenerationSettings(max_new_tokens=40, temperature=0))
    it = iter(turn)
    got = next(it) + next(it)
    with pytest.raises(KeyboardInterrupt):
        it.throw(KeyboardInterrupt)
    last = chat.messages(conv.id)[-1]
    assert last.role == "assistant" and last.content.startswith(got)
    assert last.stats.finish_reason == "cancelled"


def test_a_conversation_shorter_than_one_chunk_resumes_from_disk(chat, tiny_settings, tiny_lm):
    tiny_settings.set("cache.chunk_tokens", 1024)  # every conversation here is a partial chunk
    short = Chat(tiny_settings, store=chat.store, lm=tiny_lm)
    short.load()
    conv = short.new_conversation()
    first, _ = send(short, conv.id, "Hello!")
    short.close()
    again = Chat(tiny_settings, store=Store(chat.store.path), lm=tiny_lm)
    again.load()
    turn, _ = send(again, conv.id, "And the stars?")
    assert turn.stats.cache_source == "disk" and turn.stats.cached_tokens >= first.stats.prompt_tokens
    again.close()


def perturbed_copy(model_dir, to):
    """A second model: a copy of the tiny one with one weight changed (so another fingerprint)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, to)
    weights = load_file(to / "model.safetensors")
    name = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[name] = weights[name] + 0.5
    save_file(weights, to / "model.safetensors", metadata={"format": "pt"})
    return to


def test_switch_model_starts_the_cache_anew_and_a_failed_one_keeps_the_model(chat, tiny_model_dir, tmp_path):
    other = perturbed_copy(tiny_model_dir, tmp_path / "other-model")
    conv = chat.new_conversation()
    send(chat, conv.id, "Hello! Tell me a story about the sea.")
    old_fp = chat.lm.fingerprint
    with pytest.raises(NotFoundError):
        chat.switch_model(str(other), conv.id + 1)
    assert chat.lm.fingerprint == old_fp  # nothing changed for a conversation that is not there

    chat.switch_model(str(other), conv.id)
    new_fp = chat.lm.fingerprint
    assert new_fp != old_fp
    assert chat.model_name == chat.settings.model.name == str(other)
    assert chat.get_conversation(conv.id).model == str(other)
    # The old model's cache never attaches: the history is recomputed by the new model.
    t2, r2 = send(chat, conv.id, "And the stars?")
    assert t2.stats.cache_source == "none" and t2.stats.cached_tokens == 0
    assert t2.message is not None and t2.message.content == r2

    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match="does not exist"):
        chat.switch_model(str(missing), conv.id)
    assert chat.ready and chat.lm.fingerprint == new_fp
    assert chat.model_name == chat.settings.model.name == str(other)
    assert chat.get_conversation(conv.id).model == str(other)
    # The model loaded back finds the new model's chunks (flushed when the switch closed them).
    t3, _ = send(chat, conv.id, "Which one is brighter?")
    assert t3.stats.cache_source == "disk" and t3.stats.cached_tokens > 0


def test_new_conversation_with_history_writes_it_in_order(chat):
    history = [
        {"role": "user", "content": "first question\nwith a second line"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
    ]
    conv = chat.new_conversation(system_prompt="be brief", history=history)
    assert conv.title == "first question"  # from the first user message, as a sent one would
    assert [(m.role, m.content) for m in chat.messages(conv.id)] == [
        (h["role"], h["content"]) for h in history
    ]
    assert chat.render(conv.id)[0] == {"role": "system", "content": "be brief"}
    with pytest.raises(ValueError, match="role"):
        chat.new_conversation(history=[{"role": "tool", "content": "x"}])
    assert [c.id for c in chat.list_conversations()] == [conv.id]  # nothing half-written


def test_bench_resume_writes_its_history_through_the_session_and_resumes_from_disk(tiny_settings):
    from types import SimpleNamespace

    from chatkv.bench import resume

    args = SimpleNamespace(history_tokens=120, repeat=1, json=True)
    result = resume.run(args, tiny_settings)
    assert result["cache_source"] == "disk"
    assert 120 <= result["cached_tokens"] < result["prompt_tokens"]
    assert result["disk_bytes"] > 0
