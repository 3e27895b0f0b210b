"""Progress of long work: conversion and loading, prefill in steps, and batch lines, for
the CLI (a rich bar on stderr) and for front ends (Chat.on_progress)."""

from __future__ import annotations

import io

import torch

from chatkv.api import GenerationSettings
from chatkv.cli.jsonl import Progress as BatchProgress
from chatkv.engine.generate import generate
from chatkv.kv import live
from chatkv.progress import CallbackProgress, RichProgress, driver


class Recorder:
    """A Progress that records its events."""

    def __init__(self):
        self.events: list[tuple] = []

    def start(self, label, total=0, unit=""):
        self.events.append(("start", label, total))

    def advance(self, n=1):
        self.events.append(("advance", n))

    def done(self):
        self.events.append(("done",))


def test_prefill_reports_each_step(tiny_lm):
    calls: list[tuple[int, int]] = []
    ids = [5 + i % 300 for i in range(1100)]
    steps = list(
        generate(
            tiny_lm.model,
            ids,
            live.new_cache(tiny_lm.model),
            0,
            GenerationSettings(max_new_tokens=2, temperature=0),
            [],
            10**6,
            on_prefill=lambda done, total: calls.append((done, total)),
        )
    )
    assert calls == [(0, 1100), (512, 1100), (1024, 1100), (1100, 1100)]
    assert steps[-1].finish_reason == "length"


def test_driver_and_callback_translate_events():
    rec2 = Recorder()
    drive = driver(rec2)
    for label, done, total in [
        ("loading m", 0, 0),
        ("loading m", -1, 0),
        ("prefill", 0, 900),
        ("prefill", 512, 900),
    ]:
        drive(label, done, total)
    drive("prefill", 900, 900)
    assert rec2.events == [
        ("start", "loading m", 0),
        ("advance", 0),
        ("done",),
        ("start", "prefill", 900),
        ("advance", 512),
        ("advance", 388),
        ("done",),
    ]
    calls = []
    cb = CallbackProgress(lambda *a: calls.append(a))
    cb.start("loading m")
    cb.done()
    assert calls == [("loading m", 0, 0), ("loading m", -1, 0)]


def test_rich_bar_on_a_terminal_only():
    out = io.StringIO()
    bar = RichProgress(out, enabled=True)
    bar.start("prefill", 1000, "tokens")
    bar.advance(500)
    bar.done()
    assert "prefill" in out.getvalue()
    quiet = io.StringIO()  # not a terminal: nothing at all
    bar = RichProgress(quiet)
    bar.start("prefill", 1000, "tokens")
    bar.advance(500)
    bar.done()
    assert quiet.getvalue() == ""


def test_batch_progress_is_a_rich_bar():
    out = io.StringIO()
    p = BatchProgress(3, enabled=True, stream=out)
    p.update(items=1)
    p.start()
    p.update(items=2, tokens=40)
    p.close()
    assert "3/3" in out.getvalue() and "tok/s" in out.getvalue()
    off = io.StringIO()
    p = BatchProgress(3, enabled=False, stream=off)
    p.start()
    p.update(items=3)
    p.close()
    assert off.getvalue() == ""


def test_chat_reports_loading_and_a_long_prefill(tiny_settings, chatkv_home):
    from chatkv.session import Chat

    events: list[tuple[str, int, int]] = []
    chat = Chat(tiny_settings)
    chat.on_progress = lambda *a: events.append(a)
    try:
        chat.load()
        labels = [e[0] for e in events]
        assert labels and labels[0].startswith("loading") and events[-1][1] == -1
        events.clear()
        long = " ".join(["The quick brown fox jumps over the lazy dog."] * 80)
        list(chat.send(None, long, GenerationSettings(max_new_tokens=2, temperature=0)))
        prefill = [e for e in events if e[0] == "prefill"]
        total = prefill[0][2]
        assert total > 512 and prefill[0][1] == 0 and prefill[-1][1:] == (total, total)
        events.clear()
        list(chat.send(None, "Hello!", GenerationSettings(max_new_tokens=2, temperature=0)))
        assert events == []  # a short prompt shows nothing
    finally:
        chat.close()


def test_gguf_conversion_is_announced_and_the_copy_reused(tiny_model_dir, tiny_lm, monkeypatch, chatkv_home):
    """The first load of a GGUF says it converts and keeps a copy; the next loads that copy."""
    import transformers

    from chatkv.engine import model as model_mod

    loads: list[dict] = []

    real_tok = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", classmethod(lambda cls, p, **kw: _load(p, kw))
    )
    monkeypatch.setattr(
        transformers.AutoTokenizer,
        "from_pretrained",
        classmethod(lambda cls, p, **kw: real_tok(tiny_model_dir)),
    )

    def _load(path, kw):
        loads.append({"path": str(path), **kw})
        return transformers.LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)

    src = model_mod.ModelSource("x.gguf", str(tiny_model_dir), "x.gguf", "gguf:abc")
    rec = Recorder()
    model_mod._load_gguf(src, torch.float32, rec)
    labels = [e[1] for e in rec.events if e[0] == "start"]
    assert labels[0].startswith("converting x.gguf") and labels[1].startswith("keeping a converted copy")
    assert [e[0] for e in rec.events].count("done") == 2
    assert "gguf_file" in loads[0]
    rec = Recorder()
    model_mod._load_gguf(src, torch.float32, rec)
    assert [e[1] for e in rec.events if e[0] == "start"] == ["loading x.gguf"]
    assert "gguf_file" not in loads[-1]
