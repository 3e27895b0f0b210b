"""Pilot tests of the chat app over the in-memory FakeBackend (no model, no torch)."""

from __future__ import annotations

import asyncio
import errno
import functools
import html
import inspect
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from textual import events
from textual.widgets import Input, Markdown, OptionList, TextArea
from textual.widgets._markdown import MarkdownFence

from chatkv.errors import ModelError
from chatkv.ui.chat_screen import ChatScreen
from chatkv.ui.dialogs import ConfirmScreen, HelpScreen, ModelPickerScreen, TextPromptScreen
from chatkv.ui.widgets import ChatMessage, relative_time, turn_summary
from tests.ui.fake_backend import FIXED_NOW, FakeBackend, make_app

SIZE = (120, 36)


async def wait_for(pilot, condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Let the app run until `condition()` holds; fail after `timeout` seconds (generous: a
    loaded 2-core machine can be slow, and a passing condition returns at once)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await pilot.pause(0.02)
    await pilot.pause()


def chat(app) -> ChatScreen:
    assert isinstance(app.screen, ChatScreen)
    return app.screen


def roles_and_text(app) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in chat(app).log_view.messages]


def notes(app) -> list[str]:
    return [f"{n.title}: {n.message}" for n in app._notifications]


async def send(pilot, text: str) -> None:
    prompt = chat(pilot.app).prompt
    prompt.focus()
    prompt.load_text(text)
    await pilot.press("enter")


async def finished(pilot, backend: FakeBackend, n: int = 1) -> None:
    await wait_for(pilot, lambda: backend.streams_finished >= n and not chat(pilot.app).generating)


# -- launch and loading -----------------------------------------------------------------


async def test_list_and_messages_show_while_model_loads():
    backend = FakeBackend(conversations=4)
    backend.block_load = True
    app = make_app(backend, conversation_id=2)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            screen = chat(app)
            assert screen.sidebar.option_list.option_count == 4
            # most recent first
            assert [c.id for c in screen.sidebar.conversations] == [1, 2, 3, 4]
            assert [r for r, _ in roles_and_text(app)] == ["user", "assistant"]
            assert screen.status.model_state == "loading"
            assert "loading fake-135M" in str(screen.status.status_text())
            backend.release_load()
            await wait_for(pilot, lambda: screen.status.model_state == "ready")
    finally:
        backend.release_load()


async def test_message_typed_while_loading_is_sent_once_ready():
    backend = FakeBackend(conversations=1, replies=["Ready now."])
    backend.block_load = True
    app = make_app(backend)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, "queued question")
            await pilot.pause()
            assert not any(c[0] == "send" for c in backend.calls)
            assert len(backend.list_conversations()) == 1  # a draft: nothing saved yet
            pending = chat(app).log_view.messages[-1]
            assert pending.has_class("-pending") and pending.content == "queued question"
            assert "waiting for the model to load" in str(pending.query_one(".stats").render())
            assert chat(app).prompt.text == ""
            backend.release_load()
            await finished(pilot, backend)
            # the draft's first message creates the conversation
            assert ("send", (None, "queued question")) in backend.calls
            assert chat(app).conversation_id == 2
            assert roles_and_text(app) == [("user", "queued question"), ("assistant", "Ready now.")]
            assert not pending.has_class("-pending")
    finally:
        backend.release_load()


async def test_text_unsent_at_quit_is_back_in_the_input_of_its_conversation_next_launch(chatkv_home):
    backend = FakeBackend(conversations=1)
    backend.block_load = True
    app = make_app(backend)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, "queued question")  # waits for the model to load
            chat(app).prompt.insert("and a second thought")
            await pilot.press("ctrl+n")
            await pilot.pause()
            assert any("A message waits for the model to load; take it back (Esc)" in n for n in notes(app))
            await pilot.press("ctrl+l")
            options = chat(app).sidebar.option_list
            assert options.highlighted == 0
            await pilot.press("enter")  # refused: the highlight goes back to what is open (a draft)
            await pilot.pause()
            assert chat(app).conversation_id is None and options.highlighted is None
            await app.action_quit()  # before the model is ready
    finally:
        backend.release_load()
    assert not any(c[0] == "send" for c in backend.calls)
    # relaunched on the saved conversation and quit from it, the input empty: the draft's
    # text stays for the draft
    app = make_app(FakeBackend(conversations=1, ready=True), conversation_id=1)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert chat(app).prompt.text == ""
        await app.action_quit()
    app = make_app(FakeBackend(conversations=1, ready=True), conversation_id=1)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert chat(app).prompt.text == "queued question\nand a second thought"
        assert any("back in the input" in n for n in notes(app))
        chat(app).prompt.clear()
        await chat(app).open_conversation(1)
        chat(app).prompt.insert("half a question")
        await app.action_quit()
    app = make_app(FakeBackend(conversations=1, ready=True), conversation_id=1)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert chat(app).prompt.text == "half a question"
    app = make_app(FakeBackend(conversations=1, ready=True), conversation_id=1)
    async with app.run_test(size=SIZE) as pilot:  # given back once, not at every launch
        await pilot.pause()
        assert chat(app).prompt.text == ""
        # another chatkv window quits meanwhile, keeping its draft's text: this one's quit
        # keeps it too
        other = make_app(FakeBackend(conversations=1, ready=True))
        async with other.run_test(size=SIZE) as other_pilot:
            await other_pilot.press("ctrl+n")
            await other_pilot.pause()
            chat(other).prompt.insert("the other window's draft")
            await other.action_quit()
        chat(app).prompt.insert("this window's")
        await app.action_quit()
    state = json.loads((chatkv_home / "ui-state.json").read_text())
    assert state["unsent"] == {"draft": "the other window's draft", "1": "this window's"}


async def test_model_load_failure_notifies_and_restores_text():
    backend = FakeBackend(conversations=1)
    backend.block_load = True
    backend.fail_load = "model 'nope' not found; check model.name in the config"
    app = make_app(backend, conversation_id=1)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, "will it load?")
            backend.release_load()
            await wait_for(pilot, lambda: chat(app).status.model_state == "failed")
            assert any("model 'nope' not found" in n for n in notes(app))
            assert chat(app).prompt.text == "will it load?"
            await pilot.pause()
            assert "Stop" not in [key.description for key in app.screen.query("FooterKey")]
            assert [r for r, _ in roles_and_text(app)] == ["user", "assistant"]  # saved ones kept
            # sending again retries the load
            backend.fail_load = None
            await pilot.press("enter")
            await finished(pilot, backend)
            assert roles_and_text(app)[-2] == ("user", "will it load?")
    finally:
        backend.release_load()


# -- sending and streaming ----------------------------------------------------------------


async def test_send_streams_markdown_reply_with_stats():
    reply = "Here you go:\n\n```python\nprint('hi')\n```\n\nDone."
    backend = FakeBackend(conversations=2, replies=[reply], ready=True)
    app = make_app(backend, conversation_id=1)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "show code")
        await finished(pilot, backend)
        last = chat(app).log_view.messages[-1]
        assert last.role == "assistant" and last.content == reply
        # Markdown lays out asynchronously: on a loaded machine the fence can come a moment later
        await wait_for(pilot, lambda: bool(last.query(MarkdownFence)))
        assert last.query(MarkdownFence), "code block rendered as a fence"
        assert last.message is not None and last.message.stats is not None
        status = str(chat(app).status.status_text())
        assert "reused 3,812 tokens from memory" in status or "resumed 3,812 tokens from disk" in status
        # the whole line is on the message; the status bar keeps what fits one line at 120 columns
        line = str(last.query_one(".stats").render())
        assert "48.5 tok/s" in line and "first token 61 ms" in line and "3,812 tokens" in line
        assert len(status) <= SIZE[0] - 2
        # the user message got its saved id, so it can be edited later
        assert chat(app).log_view.messages[-2].message is not None


async def test_a_reply_ending_while_a_piece_is_being_shown_is_shown_whole(monkeypatch):
    """The turn can end while the periodic flush is still laying out a piece (a slow
    Markdown append on a loaded machine): ending the flush must not cancel that piece."""
    reply = "First part, then\n\n```python\nprint('the rest')\n```\n\nDone."
    backend = FakeBackend(replies=[reply], ready=True, piece_delay=0.02)
    original = ChatMessage.append

    async def slow(self, text):
        await asyncio.sleep(0.3)  # the turn ends meanwhile
        await original(self, text)

    monkeypatch.setattr(ChatMessage, "append", slow)
    app = make_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "show code")
        await finished(pilot, backend)
        last = chat(app).log_view.messages[-1]
        await wait_for(pilot, lambda: last.content == reply)
        await wait_for(pilot, lambda: bool(last.query(MarkdownFence)))
        assert last.query_one(Markdown).source == reply


async def test_streaming_is_batched_not_per_piece(monkeypatch):
    reply = " ".join(f"w{i}" for i in range(400))
    backend = FakeBackend(replies=[reply], ready=True)
    appends: list[str] = []
    original = ChatMessage.append

    async def counting(self, text):
        appends.append(text)
        await original(self, text)

    monkeypatch.setattr(ChatMessage, "append", counting)
    app = make_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "go")
        await finished(pilot, backend)
        assert "".join(appends) == reply
        assert len(appends) < 40, f"{len(appends)} UI updates for 400 pieces"


async def test_newline_key_and_paste_make_multiline_message():
    backend = FakeBackend(ready=True)
    app = make_app(backend, **{"ui.keys.newline": "ctrl+j"})
    async with app.run_test(size=SIZE) as pilot:
        prompt = chat(app).prompt
        prompt.focus()
        await pilot.press("a", "ctrl+j", "b")
        assert prompt.text == "a\nb"
        long = "\n".join(f"line {i} " + "x" * 60 for i in range(200))
        app.post_message(events.Paste(long))  # as the driver delivers a bracketed paste
        await pilot.pause()
        assert prompt.text == "a\nb" + long
        await pilot.press("enter")
        await finished(pilot, backend)
        assert ("send", (None, "a\nb" + long)) in backend.calls
        assert backend.messages(1)[0].content == "a\nb" + long


async def test_stop_keeps_partial_reply():
    backend = FakeBackend(replies=["one two three four five six seven"], ready=True)
    backend.pause_after = 3
    app = make_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "count")
        await wait_for(pilot, lambda: backend.paused.is_set())
        await wait_for(pilot, lambda: chat(app).log_view.messages[-1].content == "one two three")
        await pilot.press("escape")
        await finished(pilot, backend)
        saved = backend.streams[-1].message
        assert saved is not None and saved.stats.finish_reason == "cancelled"
        assert saved.content == "one two three"
        last = chat(app).log_view.messages[-1]
        assert last.content == "one two three" and "stopped" in str(last.query_one(".stats").render())


async def test_a_stopped_regenerate_shows_the_previous_reply_and_keeps_the_partial_one():
    backend = FakeBackend(replies=["first reply here", "one two three four five six seven"], ready=True)
    app = make_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "count")
        await finished(pilot, backend)
        backend.pause_after = 3
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: backend.paused.is_set())
        await pilot.press("escape")
        await finished(pilot, backend, 2)
        await wait_for(pilot, lambda: roles_and_text(app)[-1] == ("assistant", "first reply here"))
        assert backend.streams[-1].kept_aside and backend.streams[-1].message is None
        assert any("previous reply is kept" in n for n in notes(app))
        (kept,) = backend.versions(backend.messages(1)[-1].id)
        assert kept.content == "one two three"


async def test_generation_failure_notifies_restores_text_and_keeps_saved():
    backend = FakeBackend(conversations=1, replies=["a b c d e"], ready=True)
    backend.fail_generation_after = 2
    app = make_app(backend, conversation_id=1)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "please fail")
        await finished(pilot, backend)
        assert any("generation failed: out of memory" in n for n in notes(app))
        # what the backend saved is what the screen shows: history, the user message, the partial reply
        assert [t for _, t in roles_and_text(app)] == [m.content for m in backend.messages(1)]
        assert roles_and_text(app)[2] == ("user", "please fail")
        # saved, so not back in the input too (sent again, it would be there twice): the way on is said
        assert chat(app).prompt.text == ""
        assert any("Your message is saved; ctrl+g generates its reply again" in n for n in notes(app))


async def test_a_failed_edit_gives_the_edited_text_back():
    backend = FakeBackend(replies=["r1 r1 r1", "r2 r2 r2"], ready=True)
    app = make_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "first")
        await finished(pilot, backend)
        backend.fail_generation_after = 1
        chat(app).log_view.messages[0].focus()
        await pilot.press("ctrl+e")
        await pilot.pause()
        app.screen.query_one(TextArea).load_text("first, carefully edited")
        await pilot.press("ctrl+s")
        await finished(pilot, backend, 2)
        assert any("generation failed" in n for n in notes(app))
        assert [m.content for m in backend.messages(1) if m.role == "user"] == ["first"]  # nothing changed
        assert chat(app).prompt.text == "first, carefully edited"


async def test_send_failure_with_unexpected_error_is_reported_briefly():
    backend = FakeBackend(ready=True)
    backend.fail_send = RuntimeError("disk I/O error")
    app = make_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hello")
        await wait_for(pilot, lambda: not chat(app).generating)
        assert any("RuntimeError: disk I/O error" in n for n in notes(app))
        assert chat(app).prompt.text == "hello"


# -- actions --------------------------------------------------------------------------------


async def test_new_conversation_is_a_draft_until_its_first_message():
    backend = FakeBackend(conversations=2, ready=True)
    app = make_app(backend, conversation_id=1)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+n")
        await pilot.pause()
        await pilot.press("ctrl+n")  # on an empty draft: nothing new
        await pilot.pause()
        assert chat(app).conversation_id is None
        assert roles_and_text(app) == []
        assert chat(app).prompt.has_focus
        # nothing is saved for a draft: no "(untitled)" entries pile up in the list
        assert chat(app).sidebar.option_list.option_count == 2 and len(backend.list_conversations()) == 2
        await send(pilot, "first words")
        await finished(pilot, backend)
        assert chat(app).conversation_id == 3
        assert backend.get_conversation(3).title == "first words"
        assert chat(app).sidebar.option_list.option_count == 3


async def test_refused_first_message_creates_nothing():
    backend = FakeBackend(conversations=1, ready=True)
    backend.context_limit = 10
    app = make_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "far too many words for this very small context window")
        await wait_for(pilot, lambda: not chat(app).generating)
        assert any("context holds 10" in n for n in notes(app))
        assert not any("Could not" in n or "not found" in n for n in notes(app))
        # the turn removed the conversation it had created: the screen is a draft again
        assert chat(app).conversation_id is None and roles_and_text(app) == []
        assert len(backend.list_conversations()) == 1 and chat(app).sidebar.option_list.option_count == 1
        assert chat(app).prompt.text.startswith("far too many words")
        backend.context_limit = 8192
        await pilot.press("enter")
        await finished(pilot, backend, 2)
        assert backend.get_conversation(chat(app).conversation_id).title.startswith("far too many words")
        assert len(backend.list_conversations()) == 2


async def test_open_conversation_from_list_and_filter():
    backend = FakeBackend(conversations=4, ready=True)
    app = make_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        options = chat(app).sidebar.option_list
        options.focus()
        await pilot.pause()
        options.highlighted = 3
        await pilot.press("enter")
        await pilot.pause()
        assert chat(app).conversation_id == 4
        assert roles_and_text(app)[0] == ("user", "Tell me about trip to lisbon.")
        # at 120 columns the status bar takes its compact form rather than wrap
        assert "◆ 4.8k cached 52.7MiB" in str(chat(app).status.status_text())
        # typing on the list filters it
        options.focus()
        await pilot.press(*"lisbon")
        await pilot.pause()
        assert chat(app).sidebar.filter_input.value == "lisbon"
        assert [c.title for c in chat(app).sidebar.conversations] == ["Trip to Lisbon"]
        # resumed from disk: the next turn says so
        await send(pilot, "more")
        await finished(pilot, backend)
        assert "resumed 3,812 tokens from disk in 48 ms" in str(chat(app).status.status_text())


async def test_rename():
    backend = FakeBackend(conversations=2, ready=True)
    app = make_app(backend, conversation_id=2)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert isinstance(app.screen, TextPromptScreen)
        field = app.screen.query_one(Input)
        field.value = "Bread notes"
        await pilot.press("enter")
        await pilot.pause()
        assert ("rename", (2, "Bread notes")) in backend.calls
        assert chat(app).sub_title == "Bread notes"
        assert "Bread notes" in [c.title for c in chat(app).sidebar.conversations]


async def test_delete_asks_first():
    backend = FakeBackend(conversations=2, ready=True)
    app = make_app(backend, conversation_id=1)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+d")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert not any(c[0] == "delete" for c in backend.calls)
        await pilot.press("ctrl+d")
        await pilot.pause()
        await pilot.click("#yes")
        await pilot.pause()
        assert ("delete", (1,)) in backend.calls
        assert chat(app).conversation_id is None
        assert [c.id for c in chat(app).sidebar.conversations] == [2]


async def test_regenerate_last_reply():
    backend = FakeBackend(replies=["first answer", "second answer"], ready=True)
    app = make_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "q")
        await finished(pilot, backend)
        await pilot.press("ctrl+g")
        await finished(pilot, backend, 2)
        assert ("regenerate", (1,)) in backend.calls
        assert roles_and_text(app) == [("user", "q"), ("assistant", "second answer")]
        assert [m.content for m in backend.messages(1)] == ["q", "second answer"]


async def test_edit_earlier_message_and_continue():
    backend = FakeBackend(replies=["r1", "r2", "r3"], ready=True)
    app = make_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "first")
        await finished(pilot, backend)
        await send(pilot, "second")
        await finished(pilot, backend, 2)
        first_user = chat(app).log_view.messages[0]
        first_user.focus()
        await pilot.press("ctrl+e")
        await pilot.pause()
        assert isinstance(app.screen, TextPromptScreen)
        area = app.screen.query_one(TextArea)
        assert area.text == "first"
        area.load_text("first, edited")
        await pilot.press("ctrl+s")
        await finished(pilot, backend, 3)
        assert ("edit", (first_user.message.id, "first, edited")) in backend.calls
        assert roles_and_text(app) == [("user", "first, edited"), ("assistant", "r3")]


async def test_edit_system_prompt():
    backend = FakeBackend(conversations=1, ready=True)
    app = make_app(backend, conversation_id=1)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+s")
        await pilot.pause()
        area = app.screen.query_one(TextArea)
        assert area.text == "You are a helpful assistant."
        area.load_text("Answer in French.")
        await pilot.click("#save")
        await pilot.pause()
        assert ("set_system_prompt", (1, "Answer in French.")) in backend.calls
        assert backend.get_conversation(1).system_prompt == "Answer in French."


async def test_copy_message(monkeypatch):
    backend = FakeBackend(conversations=1, ready=True)
    app = make_app(backend, conversation_id=1)
    copied: list[str] = []
    monkeypatch.setattr(app, "copy_to_clipboard", copied.append)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+y")  # nothing focused: the last reply
        assert copied == [backend.messages(1)[-1].content]
        chat(app).log_view.messages[0].focus()
        await pilot.press("ctrl+y")
        assert copied[-1] == "Tell me about rust lifetimes explained."
        assert any("Copied" in n for n in notes(app))


async def test_export_markdown_into_the_export_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exports = tmp_path / "exports" / "chatkv"
    backend = FakeBackend(conversations=1, ready=True)
    app = make_app(backend, conversation_id=1, **{"ui.export_dir": str(exports)})
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+o")
        await pilot.press("ctrl+o")
        await pilot.pause()
    first, second = exports / "rust-lifetimes-explained.md", exports / "rust-lifetimes-explained-2.md"
    assert first.read_text() == backend.export(1, "md") and second.exists()
    assert list(tmp_path.glob("*.md")) == []  # never into the current directory
    assert exports.stat().st_mode & 0o777 == 0o700 and first.stat().st_mode & 0o777 == 0o600
    assert any(str(first) in n for n in notes(app))  # the notification says the full path


async def test_export_default_directory_is_in_the_data_dir(chatkv_home):
    backend = FakeBackend(conversations=1, ready=True)
    app = make_app(backend, conversation_id=1)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+o")
        await pilot.pause()
    assert (chatkv_home / "exports" / "rust-lifetimes-explained.md").exists()


async def test_export_disk_full_is_reported(tmp_path, monkeypatch):
    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("chatkv.ui.export.write_private", full)
    backend = FakeBackend(conversations=1, ready=True)
    app = make_app(backend, conversation_id=1)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+o")
        await pilot.pause()
        assert any("No space left on device" in n for n in notes(app))
        assert len(roles_and_text(app)) == 2


async def test_switch_theme_is_remembered_and_unknown_theme_falls_back(chatkv_home):
    app = make_app(**{"ui.theme": "gruvbox"})
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
    app = make_app(**{"ui.theme": "nord"})  # nothing chosen in the app: the config's theme applies
    async with app.run_test(size=SIZE) as pilot:
        assert app.theme == "nord"
        await pilot.press("ctrl+t")
        await pilot.pause()
        chosen = app.theme
        assert chosen != "nord"
    state = chatkv_home / "ui-state.json"
    assert state.stat().st_mode & 0o777 == 0o600
    app = make_app(**{"ui.theme": "nord"})  # relaunch: the chosen theme, not the config's
    async with app.run_test(size=SIZE):
        assert app.theme == chosen
    state.unlink()
    app = make_app(**{"ui.theme": "no-such-theme"})
    async with app.run_test(size=SIZE):
        assert app.theme == "textual-dark"
    state.write_text("not json")  # a damaged state file never stops the app
    app = make_app()
    async with app.run_test(size=SIZE):
        assert app.theme == "textual-dark"


async def test_help_screen_lists_actions_with_current_keys():
    app = make_app(**{"ui.keys.export": "ctrl+x"})
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        text = html.unescape(app.export_screenshot()).replace("\xa0", " ")
        # the help's own row (the footer no longer lists every action)
        assert "Export the conversation" in text and "ctrl+x" in text
        await pilot.press("escape")
        assert isinstance(app.screen, ChatScreen)


async def test_key_bindings_come_from_config():
    backend = FakeBackend(conversations=1, ready=True)
    app = make_app(backend, conversation_id=1, **{"ui.keys.new": "ctrl+b,f5"})
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert chat(app).conversation_id == 1
        await pilot.press("ctrl+b")
        await pilot.pause()
        assert chat(app).conversation_id is None
        await chat(app).open_conversation(1)
        await pilot.press("f5")
        await pilot.pause()
        assert chat(app).conversation_id is None


async def test_actions_are_in_the_command_palette():
    backend = FakeBackend(conversations=1, ready=True)
    app = make_app(backend, conversation_id=1)
    async with app.run_test(size=SIZE) as pilot:
        commands = {c.title: c for c in app.get_system_commands(app.screen)}
        for title in [
            "Start a new conversation",
            "Rename the open conversation",
            "Export the conversation to a Markdown file in the export directory",
            "Stop the reply being generated, keeping what it wrote",
            "Switch to the next theme",
            "Edit the conversation's system prompt",
        ]:
            assert title in commands, title
        await commands["Start a new conversation"].callback()
        await pilot.pause()
        assert chat(app).conversation_id is None


async def test_quit_while_streaming_saves_partial_reply_and_closes():
    backend = FakeBackend(replies=["alpha beta gamma delta"], ready=True)
    backend.pause_after = 2
    app = make_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "long one")
        await wait_for(pilot, lambda: backend.paused.is_set())
        await pilot.press("ctrl+q")
        await pilot.pause(0.1)
    assert backend.streams_finished == 1
    saved = backend.messages(1)[-1]
    assert saved.content == "alpha beta" and saved.stats.finish_reason == "cancelled"
    assert backend.closed >= 1


async def test_busy_while_generating_blocks_switching():
    backend = FakeBackend(conversations=2, replies=["x y z"], ready=True)
    backend.pause_after = 1
    app = make_app(backend, conversation_id=1)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hold")
        await wait_for(pilot, lambda: backend.paused.is_set())
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert chat(app).conversation_id == 1
        assert any("stop it (Esc)" in n for n in notes(app))
        backend.pause_release.set()
        await finished(pilot, backend)


# -- the first ten minutes: keyboard, focus, small screens, what the app is doing ----------------


async def test_relaunch_opens_the_last_conversation():
    backend = FakeBackend(conversations=3, ready=True)
    async with make_app(backend, conversation_id=2).run_test(size=SIZE) as pilot:
        await pilot.pause()
    app = make_app(backend)  # no id: what was open last time
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert chat(app).conversation_id == 2 and len(roles_and_text(app)) == 2
        assert chat(app).sidebar.option_list.highlighted == 1
    backend.delete(2)
    app = make_app(backend)  # deleted since: a draft, no error
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert chat(app).conversation_id is None and not notes(app)


async def test_switch_conversations_by_keyboard_alone():
    backend = FakeBackend(conversations=4, ready=True)
    app = make_app(backend, conversation_id=1)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert chat(app).prompt.has_focus
        heading = chat(app).sidebar.query_one(".heading")
        assert not heading.has_class("-focused")
        await pilot.press("ctrl+l")  # the list, with the open conversation highlighted
        options = chat(app).sidebar.option_list
        assert options.has_focus and options.highlighted == 0
        assert heading.has_class("-focused")  # where the focus is shows
        await pilot.press("down", "enter")
        await pilot.pause()
        assert chat(app).conversation_id == 2 and chat(app).prompt.has_focus
        await pilot.pause()
        assert not heading.has_class("-focused")
        prompts = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
        assert [p.startswith("▸ ") for p in prompts] == [False, True, False, False]  # the open one
        await pilot.press("ctrl+down")
        await pilot.pause()
        assert chat(app).conversation_id == 3
        await pilot.press("ctrl+up", "ctrl+up")
        await pilot.pause()
        assert chat(app).conversation_id == 1
        await pilot.press("ctrl+up")  # already the first: it says so
        await pilot.pause()
        assert chat(app).conversation_id == 1 and any("No more conversations" in n for n in notes(app))
        chat(app).sidebar.filter_input.value = "zzz no such words"
        await wait_for(pilot, lambda: not chat(app).sidebar.conversations)
        await pilot.press("ctrl+down")  # nothing matches: it says the filter is why
        await pilot.pause()
        assert any("No conversation matches the filter" in n for n in notes(app))
        chat(app).sidebar.filter_input.value = ""
        await wait_for(pilot, lambda: len(chat(app).sidebar.conversations) == 4)
        # Down from the filter box goes to the list
        chat(app).sidebar.filter_input.focus()
        await pilot.press("down")
        assert options.has_focus


async def test_list_from_a_draft_highlights_the_first_so_enter_opens_it():
    backend = FakeBackend(conversations=2, ready=True)
    app = make_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert chat(app).conversation_id is None
        await pilot.press("tab", "tab", "tab")  # filter box, then the list
        await pilot.pause()
        if not chat(app).sidebar.option_list.has_focus:
            await pilot.press("ctrl+l")
        assert chat(app).sidebar.option_list.highlighted == 0
        await pilot.press("enter")
        await pilot.pause()
        assert chat(app).conversation_id == 1


async def test_command_palette_opens_a_conversation():
    from chatkv.ui.commands import ConversationCommands

    backend = FakeBackend(conversations=4, ready=True)
    app = make_app(backend, conversation_id=1)
    async with app.run_test(size=SIZE) as pilot:
        provider = ConversationCommands(app.screen)
        hits = [hit async for hit in provider.search("lisbon")]
        assert [hit.text for hit in hits] == ["Open: Trip to Lisbon"]
        await hits[0].command()
        await pilot.pause()
        assert chat(app).conversation_id == 4


async def test_after_an_edit_the_input_has_focus():
    backend = FakeBackend(replies=["r1", "r2"], ready=True)
    app = make_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "first")
        await finished(pilot, backend)
        await pilot.press("ctrl+e")
        await pilot.pause()
        area = app.screen.query_one(TextArea)
        assert area.cursor_location == (0, len("first"))  # the cursor starts at the end
        await pilot.press("!", "ctrl+s")
        await finished(pilot, backend, 2)
        assert ("edit", (1, "first!")) in backend.calls
        await pilot.press("x")  # the next keystroke lands in the input
        assert chat(app).prompt.has_focus and chat(app).prompt.text == "x"


async def test_dialogs_say_their_keys_and_show_their_own_footer():
    backend = FakeBackend(conversations=1, ready=True)
    app = make_app(backend, conversation_id=1)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+s")
        await pilot.pause()
        hints = " ".join(str(w.render()) for w in app.screen.query(".hint"))
        assert "Ctrl+S saves" in hints and "Esc cancels" in hints
        footer_keys = {b.action for _, b, _, _ in app.screen.active_bindings.values()}
        assert "save" in footer_keys and "new_conversation" not in footer_keys
        await pilot.press("escape")
        await pilot.press("ctrl+d")
        await pilot.pause()
        hints = " ".join(str(w.render()) for w in app.screen.query(".hint"))
        assert "y delete" in hints and "Esc cancel" in hints
        await pilot.press("n")
        await pilot.pause()
        assert not any(c[0] == "delete" for c in backend.calls) and chat(app).prompt.has_focus


async def test_keys_with_nothing_to_act_on_say_so(monkeypatch):
    backend = FakeBackend(conversations=1, ready=True)
    app = make_app(backend)
    copied: list[str] = []
    monkeypatch.setattr(app, "copy_to_clipboard", copied.append)
    async with app.run_test(size=SIZE) as pilot:
        for key in ["ctrl+g", "ctrl+e", "ctrl+y", "alt+y", "alt+v", "ctrl+o", "ctrl+r", "ctrl+d"]:
            before = len(app._notifications)
            await pilot.press(key)
            await pilot.pause()
            assert len(app._notifications) == before + 1, key
            assert isinstance(app.screen, ChatScreen), key
        assert copied == [] and len(backend.calls) == 1  # only the seeded conversation


async def test_sidebar_follows_the_terminal_width_and_f2_toggles_it():
    backend = FakeBackend(conversations=3, ready=True)
    for size, width in [((120, 40), 34), ((80, 24), 24)]:
        app = make_app(backend, conversation_id=1)
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            assert chat(app).sidebar.display and chat(app).sidebar.outer_size.width == width
    app = make_app(backend, conversation_id=1)
    async with app.run_test(size=(60, 15)) as pilot:
        await pilot.pause()
        assert not chat(app).sidebar.display
        assert chat(app).log_view.outer_size.width == 60  # the whole width for the chat
        await pilot.press("f2")
        await pilot.pause()
        assert chat(app).sidebar.display
        await pilot.press("f2")
        await pilot.pause()
        assert not chat(app).sidebar.display
        await pilot.press("ctrl+l")  # jumping to the list shows it
        await pilot.pause()
        assert chat(app).sidebar.display and chat(app).sidebar.option_list.has_focus


async def test_messages_left_out_of_the_prompt_are_marked():
    backend = FakeBackend(conversations=1, ready=True)
    backend.dropped_messages = 2
    app = make_app(backend, conversation_id=1)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "one more")
        await finished(pilot, backend)
        widgets = chat(app).log_view.messages
        assert [w.has_class("-dropped") for w in widgets] == [True, True, False, False]
        assert ChatMessage.DROPPED_NOTE in str(widgets[0].query_one(".note").render())
        assert widgets[0].query_one(".note").display
        assert "2 old messages left out" in str(chat(app).status.status_text())
        # and when the conversation is opened again
        await chat(app).open_conversation(1)
        assert [w.has_class("-dropped") for w in chat(app).log_view.messages] == [True, True, False, False]


def test_context_never_shows_more_than_the_context():
    from chatkv.ui.widgets import context_text

    assert str(context_text(9006, 8192, None, False)) == "ctx full 8,192"
    assert str(context_text(133, 0, None, False)) == "ctx ~133"  # limit unknown while loading
    assert str(context_text(100, 1000, 12, False)) == "ctx 100 / 1,000 · msg 12 of 900 left"
    assert str(context_text(100, 0, 12, True)) == "ctx ~100 · msg ~12"


async def test_message_being_typed_is_counted_against_what_is_left():
    backend = FakeBackend(conversations=1)
    backend.block_load = True
    app = make_app(backend, conversation_id=1)
    try:
        async with app.run_test(size=SIZE) as pilot:
            chat(app).prompt.focus()
            await pilot.press(*"hello world")
            await pilot.pause()
            assert "msg ~3" in str(chat(app).status.status_text())  # an estimate before the model loads
            backend.release_load()
            await wait_for(pilot, lambda: chat(app).model_state == "ready")
            used = backend.context_used(1)
            assert f"msg 4 of {8192 - used:,} left" in str(chat(app).status.status_text())
    finally:
        backend.release_load()


async def test_loading_and_the_first_token_say_what_they_wait_for():
    backend = FakeBackend(conversations=1)
    backend.block_load = True
    backend.load_activity = "converting weights 40%"
    app = make_app(backend, conversation_id=1)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: "converting weights 40%" in str(chat(app).status.status_text()))
            backend.release_load()
            await wait_for(pilot, lambda: chat(app).model_state == "ready")
            backend.pause_after = 0  # hold the turn before its first token
            await send(pilot, "hi")
            reply = chat(app).log_view.messages[-1]
            await wait_for(pilot, lambda: "warming up the model" in str(reply.query_one(".stats").render()))
            backend.activity = "prefilling 1,024 / 4,096 tokens"
            await wait_for(
                pilot, lambda: "prefilling 1,024 / 4,096" in str(reply.query_one(".stats").render())
            )
            assert "waiting for the first token" in str(reply.query_one(".stats").render())
            backend.activity = ""
            backend.pause_release.set()
            await finished(pilot, backend)
            assert "waiting" not in str(reply.query_one(".stats").render())
    finally:
        backend.release_load()


async def test_copy_code_block(monkeypatch):
    reply = "Two blocks:\n\n```sh\nls -l\n```\n\nand\n\n```python\nprint(1)\nprint(2)\n```\n"
    backend = FakeBackend(conversations=1, replies=[reply], ready=True)
    app = make_app(backend, conversation_id=1)
    copied: list[str] = []
    monkeypatch.setattr(app, "copy_to_clipboard", copied.append)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "code please")
        await finished(pilot, backend)
        await pilot.press("alt+y")  # the last block of the last reply
        assert copied == ["print(1)\nprint(2)\n"]
        chat(app).log_view.messages[1].focus()  # the seeded reply: its own block
        await pilot.press("alt+y")
        assert copied[-1] == "print('hello')\n"


async def test_page_keys_scroll_the_conversation_from_the_input():
    reply = "\n\n".join(f"paragraph {i}" for i in range(60))
    backend = FakeBackend(replies=[reply], ready=True)
    app = make_app(backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "long")
        await finished(pilot, backend)
        await pilot.pause()
        log = chat(app).log_view
        await wait_for(pilot, lambda: log.max_scroll_y > 20 and log.scroll_y == log.max_scroll_y)
        bottom = log.scroll_y
        assert chat(app).prompt.has_focus
        await pilot.press("pageup")
        await wait_for(pilot, lambda: log.scroll_y < bottom)
        await pilot.press("pagedown")
        await wait_for(pilot, lambda: log.scroll_y == bottom)


async def test_system_prompt_dialog_shows_the_model_default_and_a_draft_keeps_its_prompt():
    backend = FakeBackend(ready=True)
    backend.builtin_system_prompt = "You are SmolLM, a helpful assistant."
    app = make_app(backend, **{"chat.system_prompt": ""})
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+s")
        await pilot.pause()
        note = str(app.screen.query_one("#note").render())
        assert "You are SmolLM, a helpful assistant." in note
        app.screen.query_one(TextArea).load_text("Answer in French.")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert backend.list_conversations() == []  # still a draft
        await send(pilot, "bonjour")
        await finished(pilot, backend)
        assert backend.get_conversation(1).system_prompt == "Answer in French."


async def test_a_system_prompt_cleared_in_a_draft_stays_cleared():
    backend = FakeBackend(ready=True)
    backend.configured_system_prompt = "Be terse."
    app = make_app(backend, **{"chat.system_prompt": "Be terse."})
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.screen.query_one(TextArea).text == "Be terse."
        app.screen.query_one(TextArea).load_text("")
        await pilot.press("ctrl+s")
        await pilot.pause()
        await send(pilot, "hello")
        await finished(pilot, backend)
        assert backend.get_conversation(1).system_prompt == ""  # not the configured one


async def test_long_titles_are_cut_with_an_ellipsis_to_the_sidebar():
    backend = FakeBackend(conversations=1, ready=True)
    backend.rename(1, "A very long conversation title that cannot possibly fit in the sidebar")
    for size in [(120, 40), (80, 24)]:
        app = make_app(backend, conversation_id=1)
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            sidebar = chat(app).sidebar
            title = str(sidebar.option_list.get_option_at_index(0).prompt).split("\n")[0]
            assert title.endswith("…")
            assert len(title) < sidebar.option_list.scrollable_content_region.width


async def test_regenerated_replies_are_kept_and_one_can_be_restored():
    from chatkv.ui.dialogs import VersionsScreen

    backend = FakeBackend(replies=["first answer", "second answer", "third answer"], ready=True)
    app = make_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "q")
        await finished(pilot, backend)
        await pilot.press("alt+v")  # nothing regenerated yet: it says so
        await pilot.pause()
        assert any("no earlier versions" in n for n in notes(app))
        await pilot.press("ctrl+g")
        await finished(pilot, backend, 2)
        await pilot.press("ctrl+g")
        await finished(pilot, backend, 3)
        assert roles_and_text(app)[-1] == ("assistant", "third answer")
        await pilot.press("alt+v")
        await pilot.pause()
        assert isinstance(app.screen, VersionsScreen)
        listed = app.screen.query_one(OptionList)
        assert [str(listed.get_option_at_index(i).prompt) for i in range(2)] == [
            "2. second answer",
            "1. first answer",
        ]
        await pilot.press("down", "enter")  # the first answer
        await pilot.pause()
        assert roles_and_text(app) == [("user", "q"), ("assistant", "first answer")]
        assert [m.content for m in backend.messages(1)] == ["q", "first answer"]
        assert chat(app).prompt.has_focus


# -- helpers and invariants -------------------------------------------------------------------


def test_relative_time_and_turn_summary():
    from datetime import timedelta

    from chatkv.api import TurnStats

    assert relative_time(FIXED_NOW - timedelta(seconds=5), FIXED_NOW) == "now"
    assert relative_time(FIXED_NOW - timedelta(hours=3), FIXED_NOW) == "3h"
    assert relative_time(FIXED_NOW - timedelta(days=90), FIXED_NOW) == "Mar 03"
    assert relative_time(FIXED_NOW - timedelta(days=400), FIXED_NOW) == "2024-04"
    stats = TurnStats(cached_tokens=3812, cache_source="disk", cache_load_s=0.048, ttft_s=0.2, decode_tps=40)
    assert turn_summary(stats).startswith("resumed 3,812 tokens from disk in 48 ms")
    assert "no cache" in turn_summary(TurnStats())


def test_model_error_is_a_chatkv_error():
    from chatkv.ui.chat_screen import error_text

    assert error_text(ModelError("weights missing; run chatkv pull")) == "weights missing; run chatkv pull"
    assert error_text(ValueError("bad")) == "Something went wrong: ValueError: bad"


def test_running_the_app_never_imports_torch():
    # A fresh interpreter: this test process may have imported torch through other test modules.
    code = (
        "import asyncio, sys\n"
        "from tests.ui.fake_backend import FakeBackend, make_app\n"
        "async def main():\n"
        "    b = FakeBackend(conversations=2)\n"
        "    app = make_app(b, conversation_id=1)\n"
        "    async with app.run_test() as pilot:\n"
        "        await pilot.pause(0.2)\n"
        "        await pilot.press(*'hi', 'enter')\n"
        "        await pilot.pause(0.3)\n"
        "    assert b.streams_finished == 1, b.calls\n"
        "asyncio.run(main())\n"
        "print('torch' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


# -- switching the model (issue 11) ---------------------------------------------------------


def picker(app) -> ModelPickerScreen:
    assert isinstance(app.screen, ModelPickerScreen)
    return app.screen


async def test_model_picker_lists_the_models_and_switches_the_open_conversation():
    backend = FakeBackend(conversations=2, replies=["From the new model."], ready=True)
    backend.block_switch = True
    app = make_app(backend, conversation_id=2)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("ctrl+k")
            await pilot.pause()
            options = picker(app).query_one(OptionList)
            assert options.option_count == 3
            assert options.highlighted == 0  # the current model
            first, gone, local = (options.get_option_at_index(i) for i in range(3))
            assert "fake-135M" in str(first.prompt) and "current" in str(first.prompt)
            assert "12 chunks on disk" in str(first.prompt)
            assert gone.disabled and "unavailable\n    the file is gone; import it again" in str(gone.prompt)
            assert "no chunks on disk" in str(gone.prompt)
            assert not local.disabled and "3 chunks on disk (5.2 MiB) · ready" in str(local.prompt)
            await pilot.press("down", "enter")  # the unavailable one is skipped
            await pilot.pause()
            assert isinstance(app.screen, ChatScreen)
            assert ("switch_model", ("/models/qwen2.5-0.5b-instruct", 2)) in backend.calls
            # loading as at launch; the input stays usable and a message waits for the load
            screen = chat(app)
            assert "loading /models/qwen2.5-0.5b-instruct" in str(screen.status.status_text())
            await send(pilot, "who are you now?")
            await pilot.pause()
            assert not any(c[0] == "send" for c in backend.calls)
            assert screen.log_view.messages[-1].has_class("-pending")
            backend.release_switch()
            await finished(pilot, backend)
            assert backend.get_conversation(2).model == "/models/qwen2.5-0.5b-instruct"
            assert any(
                "Switched to /models/qwen2.5-0.5b-instruct; this conversation's cache starts anew "
                "(the new model recomputes its history on the next turn)" in n
                for n in notes(app)
            )
            assert screen.status.model == "/models/qwen2.5-0.5b-instruct"
            assert screen.status.model_state == "ready"
            assert ("send", (2, "who are you now?")) in backend.calls
            assert roles_and_text(app)[-1] == ("assistant", "From the new model.")
    finally:
        backend.release_switch()


async def test_opening_a_conversation_made_with_another_model_says_so():
    backend = FakeBackend(conversations=2, ready=True)
    backend._convs[1] = replace(backend._convs[1], model="/models/tinyllama.Q4_K_M.gguf")
    app = make_app(backend, conversation_id=2)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert not any("This conversation was with" in n for n in notes(app))  # same model
        await chat(app).open_conversation(1)
        await pilot.pause()
        assert any(
            "This conversation was with /models/tinyllama.Q4_K_M.gguf; replies now come from fake-135M "
            "(Ctrl+K switches models)" in n
            for n in notes(app)
        )


async def test_model_picker_from_the_palette_and_esc_cancels():
    backend = FakeBackend(conversations=1, ready=True)
    app = make_app(backend, conversation_id=1, **{"ui.keys.model": "f9"})
    async with app.run_test(size=SIZE) as pilot:
        commands = {c.title: c for c in app.get_system_commands(app.screen)}
        await commands["Switch model…"].callback()
        await pilot.pause()
        picker(app)
        await pilot.press("escape")
        await pilot.pause()
        assert chat(app).prompt.has_focus
        await pilot.press("f9")  # the configured key
        await pilot.pause()
        picker(app)
        await pilot.press("enter")  # the current one, highlighted
        await pilot.pause()
        assert any("Already using fake-135M." in n for n in notes(app))
        await pilot.press("ctrl+k")  # no longer bound
        await pilot.pause()
        assert isinstance(app.screen, ChatScreen)
        assert not any(c[0] == "switch_model" for c in backend.calls)
        assert backend.model_name == "fake-135M"


async def test_a_failed_model_switch_keeps_the_previous_model_and_gives_the_message_back():
    backend = FakeBackend(conversations=1, ready=True)
    backend.block_switch = True
    backend.fail_switch = "model path /models/qwen2.5-0.5b-instruct has no config.json"
    app = make_app(backend, conversation_id=1)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("ctrl+k")
            await pilot.pause()
            await pilot.press("down", "enter")
            await pilot.pause()
            await send(pilot, "still there?")
            backend.release_switch()
            screen = chat(app)
            await wait_for(pilot, lambda: screen.status.model_state == "ready")
            assert ("switch_model", ("/models/qwen2.5-0.5b-instruct", 1)) in backend.calls
            assert any(
                "Could not switch to /models/qwen2.5-0.5b-instruct: model path" in n
                and "still using fake-135M" in n
                for n in notes(app)
            )
            assert screen.status.model == "fake-135M" and backend.get_conversation(1).model == "fake-135M"
            assert screen.prompt.text == "still there?"  # meant for the new model: given back
            assert not any(c[0] == "send" for c in backend.calls)
            assert [r for r, _ in roles_and_text(app)] == ["user", "assistant"]
    finally:
        backend.release_switch()


async def test_a_failed_switch_that_loses_the_previous_model_too_is_a_failed_load():
    backend = FakeBackend(conversations=1, replies=["Back again."], ready=True)
    backend.fail_switch = "out of memory loading /models/qwen2.5-0.5b-instruct"
    backend.switch_loses_model = True
    app = make_app(backend, conversation_id=1)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+k")
        await pilot.pause()
        await pilot.press("down", "enter")
        screen = chat(app)
        await wait_for(pilot, lambda: screen.status.model_state == "failed")
        assert [n for n in notes(app) if "Could not switch" in n] == [
            "Model: Could not switch to /models/qwen2.5-0.5b-instruct: out of memory loading "
            "/models/qwen2.5-0.5b-instruct; fake-135M could not be loaded again either (sending retries it)"
        ]
        assert "fake-135M failed to load" in str(screen.status.status_text())
        await send(pilot, "retry")  # sending loads the model again, as after a failed launch
        await finished(pilot, backend)
        assert ("load", ()) in backend.calls
        assert roles_and_text(app)[-1] == ("assistant", "Back again.")


async def test_model_switch_is_refused_while_a_reply_streams():
    backend = FakeBackend(conversations=1, replies=["x y z"], ready=True)
    backend.pause_after = 1
    app = make_app(backend, conversation_id=1)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hold")
        await wait_for(pilot, lambda: backend.paused.is_set())
        await pilot.press("ctrl+k")
        await pilot.pause()
        assert isinstance(app.screen, ChatScreen)
        assert any("A reply is being generated; stop it (Esc) to switch models." in n for n in notes(app))
        backend.pause_release.set()
        await finished(pilot, backend)
        assert not any(c[0] == "switch_model" for c in backend.calls)


async def test_a_conversation_removed_by_another_process_is_reported_not_a_crash():
    backend = FakeBackend(conversations=2, ready=True)
    app = make_app(backend, conversation_id=1)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        backend.delete(1)  # `chatkv rm 1` in another terminal
        for key in ("ctrl+r", "ctrl+d", "ctrl+s"):
            await pilot.press(key)
            await pilot.pause()
            assert app.screen is chat(app)  # no dialog for what is not there, and no crash
        assert sum("no conversation 1" in n for n in notes(app)) == 3
        assert chat(app).sidebar.option_list.option_count == 1


def _run_in_event_loop(fn):
    """Run an async test in a fresh event loop (no async pytest plugin needed)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


for _name, _fn in list(globals().items()):
    if _name.startswith("test_") and inspect.iscoroutinefunction(_fn):
        globals()[_name] = _run_in_event_loop(_fn)
