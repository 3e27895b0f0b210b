"""The app over the real session and store (tiny test model): send, quit, reopen,
resume — and the resumed turn's statistics show the cache came back from disk; switch
the conversation's model from the picker."""

from __future__ import annotations

import asyncio
import time

from chatkv.paths import db_path
from chatkv.session import Chat
from chatkv.store import Store
from chatkv.ui import create_app
from chatkv.ui.chat_screen import ChatScreen
from chatkv.ui.dialogs import ModelPickerScreen
from tests.test_session import perturbed_copy


async def _until(pilot, cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await pilot.pause(0.05)


async def _send(pilot, text: str) -> None:
    screen = pilot.app.screen
    assert isinstance(screen, ChatScreen)
    await _until(pilot, lambda: screen.model_state == "ready")
    screen.prompt.focus()
    screen.prompt.load_text(text)
    await pilot.press("enter")
    await pilot.pause(0.1)
    await _until(pilot, lambda: not screen.generating and screen.pending is None)


def test_send_quit_reopen_resume_from_disk(tiny_settings, tiny_lm):
    async def first() -> int:
        chat = Chat(tiny_settings, lm=tiny_lm)
        app = create_app(chat, tiny_settings)
        async with app.run_test(size=(120, 36)) as pilot:
            await _send(pilot, "Hello! Tell me a story about the sea.")
            conv_id = pilot.app.screen.conversation_id
            await pilot.press("ctrl+q")
        chat.close()  # idempotent: the app closes it on quit
        return conv_id

    conv_id = asyncio.run(first())
    store = Store(db_path())
    msgs = store.messages(conv_id)
    assert [m.role for m in msgs] == ["user", "assistant"] and msgs[1].content
    assert store.get_kv_head(conv_id).tokens > 0  # the spill finished before the app exited

    async def second() -> None:
        chat = Chat(tiny_settings, store=store, lm=tiny_lm)  # a new process: empty live pool
        app = create_app(chat, tiny_settings, conv_id)
        async with app.run_test(size=(120, 36)) as pilot:
            screen = pilot.app.screen
            assert [m.role for m in screen.log_view.messages] == ["user", "assistant"]
            await _send(pilot, "And the stars?")
            await pilot.press("ctrl+q")
        chat.close()

    asyncio.run(second())
    last = store.messages(conv_id)[-1]
    assert last.role == "assistant" and last.stats is not None
    assert last.stats.cache_source == "disk"
    assert last.stats.cached_tokens > msgs[1].stats.prompt_tokens


def test_switch_the_model_from_the_picker(tiny_settings, tiny_lm, tiny_model_dir, tmp_path):
    from chatkv.engine.model import load_model

    other = perturbed_copy(tiny_model_dir, tmp_path / "other-model")
    load_model(str(other), device="cpu", dtype="float32")  # loaded once: `models()` lists it

    async def run() -> tuple[int, list[str]]:
        chat = Chat(tiny_settings, lm=tiny_lm)
        app = create_app(chat, tiny_settings)
        async with app.run_test(size=(120, 36)) as pilot:
            await _send(pilot, "Hello! Tell me a story about the sea.")
            screen = pilot.app.screen
            old_fp = chat.lm.fingerprint
            await pilot.press("ctrl+k")
            await _until(pilot, lambda: isinstance(pilot.app.screen, ModelPickerScreen))
            options = pilot.app.screen.query_one("OptionList")
            ids = [options.get_option_at_index(i).id for i in range(options.option_count)]
            options.highlighted = ids.index(str(other))
            await pilot.press("enter")
            await pilot.pause(0.1)
            await _send(pilot, "And the stars?")  # waits for the switch, then for the reply
            assert chat.lm.fingerprint != old_fp and screen.status.model == str(other)
            conv_id = screen.conversation_id
            notes = [n.message for n in pilot.app._notifications]
            await pilot.press("ctrl+q")
        chat.close()
        return conv_id, notes

    conv_id, notes = asyncio.run(run())
    assert any(n.startswith(f"Switched to {other}; this conversation's cache starts anew") for n in notes)
    store = Store(db_path())
    assert store.get_conversation(conv_id).model == str(other)
    last = store.messages(conv_id)[-1]
    assert last.role == "assistant" and last.stats is not None
    assert last.stats.cache_source == "none" and last.stats.cached_tokens == 0  # the cache started anew


def test_the_app_samples_with_the_models_recommended_settings(tiny_settings, tiny_lm):
    """The app leaves sampling to the session, which uses the model's recommended settings
    where the user set none (as `chatkv ask` does): it once read the [generation] section
    itself, so the embedded model sampled at the shipped temperature 0.7 instead of its
    card's 0.2 and rambled from the first word."""
    from dataclasses import replace

    assert tiny_settings.generation.max_new_tokens != 2

    async def run() -> int:
        chat = Chat(tiny_settings, lm=tiny_lm)
        chat.defaults = replace(chat.defaults, max_new_tokens=2, temperature=0.0)  # "the model's"
        app = create_app(chat, tiny_settings)
        async with app.run_test(size=(120, 36)) as pilot:
            await _send(pilot, "Hello!")
            conv_id = pilot.app.screen.conversation_id
            await pilot.press("ctrl+q")
        chat.close()
        return conv_id

    conv_id = asyncio.run(run())
    last = Store(db_path()).messages(conv_id)[-1]
    assert last.role == "assistant" and last.stats is not None and last.stats.completion_tokens == 2
