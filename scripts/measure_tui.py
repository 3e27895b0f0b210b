# ruff: noqa: E402, E501  (CHATKV_HOME must be set before chatkv is imported; report lines are long)
"""Real-model TUI numbers (issue 3): launch -> interactive, Enter -> first token on a
resumed ~4k-token conversation (chunks on disk) vs the same with the chunk store
emptied, and keystroke -> screen update while a reply streams. Headless, 120x36.

    .venv/bin/python scripts/measure_tui.py      # about two minutes on 2 cores

Works in a scratch CHATKV_HOME (the converted model is copied from $CHATKV_SOURCE_HOME
if given, else converted once there).
"""

import asyncio
import os
import shutil
import statistics
import tempfile
import time

home = tempfile.mkdtemp(prefix="chatkv-tui-")
source = os.environ.get("CHATKV_SOURCE_HOME")
if source and os.path.isdir(os.path.join(source, "models")):
    shutil.copytree(os.path.join(source, "models"), os.path.join(home, "models"))
os.environ["CHATKV_HOME"] = home
from textual import events

from chatkv.api import GenerationSettings
from chatkv.bench.common import history_messages
from chatkv.config import load_settings
from chatkv.kv.maintenance import gc
from chatkv.paths import db_path, kv_dir
from chatkv.session import Chat
from chatkv.store import Store
from chatkv.ui import create_app

settings = load_settings()
settings.set("generation.temperature", 0.0)
settings.set("generation.max_new_tokens", 64)
setup = Chat(settings)
setup.load()
lm = setup.lm
conv = setup.new_conversation()
for m in history_messages(lm.tokenizer, 4000):
    setup.store.add_message(conv.id, m["role"], m["content"])
list(setup.send(conv.id, "Summarise.", GenerationSettings(max_new_tokens=1, temperature=0)))
setup.close()


async def session(label, empty_store=False, keys=False):
    if empty_store:
        gc(Store(db_path()), kv_dir(), 0)
    chat = Chat(settings, store=Store(db_path()), lm=lm)  # as a new process: nothing live
    marks = {}
    real_send = chat.send

    def send(*a, **k):
        marks["send"] = time.perf_counter()
        turn = real_send(*a, **k)
        real_iter = turn._run

        def run():
            for i, piece in enumerate(real_iter()):
                if i == 0:
                    marks["piece"] = time.perf_counter()
                yield piece

        turn._run = run
        return turn

    chat.send = send
    app = create_app(chat, settings, conv.id)
    t0 = time.perf_counter()
    async with app.run_test(size=(120, 36)) as pilot:
        screen = app.screen
        while not screen.log_view.messages:
            await asyncio.sleep(0.005)
        launch = time.perf_counter() - t0
        while screen.model_state != "ready":
            await asyncio.sleep(0.01)
        screen.prompt.load_text("What was the second point?")
        n_before = len(screen.log_view.messages)
        t1 = time.perf_counter()
        await pilot.press("enter")
        while not (len(screen.log_view.messages) > n_before + 1 and screen.log_view.messages[-1].content):
            await asyncio.sleep(0.002)
        first = time.perf_counter() - t1
        print(
            f"  Enter->backend.send {(marks['send'] - t1) * 1000:.0f} ms, ->first piece yielded {(marks['piece'] - t1) * 1000:.0f} ms"
        )
        delays = []
        if keys:
            displays = []
            original = app._display

            def display(s, u):
                displays.append(time.perf_counter())
                return original(s, u)

            app._display = display
            prompt = screen.prompt
            for i in range(40):
                if not screen.generating:
                    break
                ch = "abcdefghij"[i % 10]
                expected = len(prompt.text) + 1
                tk = time.perf_counter()
                app.post_message(events.Key(ch, ch))
                while len(prompt.text) < expected:
                    await asyncio.sleep(0.0005)
                while not displays or displays[-1] <= tk:
                    await asyncio.sleep(0.0005)
                delays.append((displays[-1] - tk) * 1000)
                await asyncio.sleep(0.05)
        while screen.generating:
            await asyncio.sleep(0.05)
        stats = chat.messages(conv.id)[-1].stats
        await pilot.press("ctrl+q")
    chat.close()
    print(
        f"{label}: launch->interactive {launch * 1000:.0f} ms; Enter->first token on screen {first * 1000:.0f} ms "
        f"(turn ttft {stats.ttft_s * 1000:.0f} ms, {stats.cached_tokens}/{stats.prompt_tokens} cached from {stats.cache_source})"
    )
    if delays:
        print(
            f"  {len(delays)} keys while streaming: key->screen max {max(delays):.0f} ms, median {statistics.median(delays):.0f} ms"
        )


asyncio.run(session("resume from disk", keys=True))
asyncio.run(session("chunk store emptied (re-prefill)", empty_store=True))
shutil.rmtree(home, ignore_errors=True)
