"""The app over the real session and store (tiny test model): send, quit, reopen,
resume — and the resumed turn's statistics show the cache came back from disk."""

from __future__ import annotations

import asyncio
import time

from chatkv.paths import db_path
from chatkv.session import Chat
from chatkv.store import Store
from chatkv.ui import create_app
from chatkv.ui.chat_screen import ChatScreen


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
