"""A fresh process's way to its first token, on the tiny model: the lean decode step is built
aside (the first token comes from a forward), and not at all for a one-token turn."""

from __future__ import annotations

import threading

import pytest

import chatkv.engine.generate  # noqa: F401  # binds the real lean_for before a test patches lean's
import chatkv.engine.lean as lean
from chatkv.engine.model import settle, warm_up
from chatkv.session import Chat


@pytest.fixture
def held_lean_build(monkeypatch):
    """The warm-up's lean build blocks until `release` is set; `began` says it was reached.
    (The decode step's own lean_for, imported by chatkv.engine.generate, is the real one.)"""
    began, release = threading.Event(), threading.Event()
    real = lean.lean_for

    def held(model):
        began.set()
        release.wait(20)  # a bound: a test that waits for this build fails, not hangs
        return real(model)

    monkeypatch.setattr(lean, "lean_for", held)
    yield began, release
    release.set()


def test_the_first_token_does_not_wait_for_the_lean_build(tiny_settings, held_lean_build):
    began, release = held_lean_build
    chat = Chat(tiny_settings)
    chat.load()
    conv = chat.new_conversation()
    pieces = iter(chat.send(conv.id, "Hello!"))
    next(pieces)  # the first token: the warm-up's forward was joined, its lean build was not
    assert began.is_set() and not release.is_set()
    assert [t.name for t in chat.lm.aside] == ["chatkv-warm-up", "chatkv-lean-build"]
    assert chat.lm.aside[1].is_alive()
    release.set()
    list(pieces)  # the decode steps build the lean step themselves if needed
    chat.close()
    settle(chat.lm)
    assert not any(t.is_alive() for t in chat.lm.aside)
    assert isinstance(getattr(chat.lm.model, lean._ATTR, None), lean.LeanLlama)


def test_a_one_token_turn_builds_no_lean_step(tiny_settings):
    tiny_settings.set("generation.max_new_tokens", 1)
    chat = Chat(tiny_settings)
    chat.load()
    conv = chat.new_conversation()
    turn = chat.send(conv.id, "Hello!")
    "".join(turn)
    assert turn.stats.completion_tokens == 1
    chat.close()
    settle(chat.lm)
    assert [t.name for t in chat.lm.aside] == ["chatkv-warm-up"]
    assert getattr(chat.lm.model, lean._ATTR, None) is None  # nothing decoded, nothing built


def test_settle_waits_for_the_build_the_warm_up_starts(tiny_lm, held_lean_build):
    began, release = held_lean_build
    tiny_lm.aside.clear()
    warm_up(tiny_lm, "aside").join()  # the forward only
    began.wait(20)
    assert tiny_lm.aside[1].is_alive()
    release.set()
    settle(tiny_lm)
    assert not tiny_lm.aside[1].is_alive()
    with pytest.raises(ValueError, match="lean must be"):
        warm_up(tiny_lm, "later")
