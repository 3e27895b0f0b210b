"""The generation loop: sampling, stopping, streaming text, and the in-place cache."""

from __future__ import annotations

import threading

import pytest
import torch

from chatkv.api import GenerationSettings
from chatkv.engine.generate import Sampler, TextStream, generate
from chatkv.engine.model import chat_ids
from chatkv.errors import ModelError
from chatkv.kv import live
from chatkv.kv.growable import GrowableLayer


def run(lm, ids, settings, eos=(), cancel=None, max_positions=10**6):
    steps = list(generate(lm.model, ids, live.new_cache(lm.model), 0, settings, eos, max_positions, cancel))
    return [s.token for s in steps if s.token is not None], steps[-1].finish_reason


def prompt(lm, text="Tell me a story about the sea."):
    return chat_ids(lm.tokenizer, [{"role": "user", "content": text}])


def test_greedy_matches_transformers_generate(tiny_lm):
    ids = list(prompt(tiny_lm))
    ours, reason = run(tiny_lm, ids, GenerationSettings(max_new_tokens=16, temperature=0))
    x = torch.tensor([ids])
    ref = tiny_lm.model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=16, min_new_tokens=16, do_sample=False
    )[0, len(ids) :].tolist()
    assert ours == ref and reason == "length"


def test_chunked_prefill_equals_one_pass(tiny_lm):
    ids = list(range(5, 300))
    whole = live.new_cache(tiny_lm.model)
    from chatkv.engine.generate import prefill

    a = prefill(tiny_lm.model, ids, whole, 0, step=4096)
    pieces = live.new_cache(tiny_lm.model)
    b = prefill(tiny_lm.model, ids, pieces, 0, step=64)
    assert torch.allclose(a, b, atol=1e-4)
    assert live.seq_len(pieces) == len(ids)


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(tiny_lm):
    ids = list(prompt(tiny_lm))
    s = GenerationSettings(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    assert run(tiny_lm, ids, s)[0] == run(tiny_lm, ids, s)[0]
    other = run(
        tiny_lm, ids, GenerationSettings(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0, seed=8)
    )
    greedy = run(tiny_lm, ids, GenerationSettings(max_new_tokens=12, temperature=0))[0]
    assert (
        run(tiny_lm, ids, GenerationSettings(max_new_tokens=12, temperature=1.0, top_k=1, seed=3))[0]
        == greedy
    )
    assert other[0] != run(tiny_lm, ids, s)[0] or other[0] != greedy  # seeds matter somewhere


def test_top_p_keeps_the_smallest_nucleus():
    s = Sampler(GenerationSettings(temperature=1.0, top_k=0, top_p=0.5, seed=0), torch.device("cpu"))
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    assert {int(s(logits)) for _ in range(50)} == {0}


def test_stops_at_eos_and_at_the_context_limit(tiny_lm):
    ids = list(prompt(tiny_lm))
    first, _ = run(tiny_lm, ids, GenerationSettings(max_new_tokens=8, temperature=0))
    toks, reason = run(tiny_lm, ids, GenerationSettings(max_new_tokens=8, temperature=0), eos=[first[2]])
    assert toks == first[:2] and reason == "stop"
    toks, reason = run(
        tiny_lm, ids, GenerationSettings(max_new_tokens=50, temperature=0), max_positions=len(ids) + 3
    )
    assert len(toks) == 3 and reason == "length"


def test_cancel_stops_before_the_next_token(tiny_lm):
    ids = list(prompt(tiny_lm))
    cancel = threading.Event()
    gen = generate(
        tiny_lm.model,
        ids,
        live.new_cache(tiny_lm.model),
        0,
        GenerationSettings(max_new_tokens=50, temperature=0),
        [],
        10**6,
        cancel,
    )
    got = [next(gen).token, next(gen).token]
    cancel.set()
    rest = list(gen)
    assert None not in got and len(rest) == 1 and rest[0].finish_reason == "cancelled"


def test_text_stream_never_splits_characters_and_honours_stop_strings(tiny_lm):
    tok = tiny_lm.tokenizer
    text = "Hello! ümlaut 🙂 and then STOP here"
    ids = tok(text)["input_ids"]
    ts = TextStream(tok, stop=["STOP"])
    out = ""
    for i in ids:
        piece = ts.push(i)
        assert "\ufffd" not in piece
        out += piece
        if ts.stopped:
            break
    out += ts.finish()
    assert out == "Hello! ümlaut 🙂 and then " and ts.stopped
    # a suffix that might start a stop string is held back until it is decided
    ts = TextStream(tok, stop=["ST!"])
    shown = "".join(ts.push(i) for i in tok("abc ST")["input_ids"])
    assert not shown.endswith("ST")
    assert (shown + ts.finish()) == "abc ST"


def test_a_stop_string_is_held_back_whole_when_another_is_tested_first():
    class Chars:  # one character a token
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    ts = TextStream(Chars(), stop=["rX", "User:"])
    shown = "".join(ts.push(ord(c)) for c in "User:")
    assert shown == "" and ts.stopped  # it showed "Use" of the stop string, then saved ""
    assert ts.finish() == "" and ts.text == ""


def test_growable_layer_appends_in_place_without_touching_handed_out_views():
    layer = GrowableLayer()
    k = torch.randn(1, 2, 5, 4)
    first, _ = layer.update(k, k.clone())
    second, _ = layer.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    assert second.data_ptr() == first.data_ptr()  # no copy: same buffer
    assert torch.equal(first, k) and torch.equal(second[..., :5, :], k)
    layer.keys, layer.values = layer.keys[..., :2, :], layer.values[..., :2, :]  # a crop
    third, _ = layer.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    assert torch.equal(second[..., 2:5, :], k[..., 2:5, :])  # the old view kept its values
    assert third.shape[-2] == 3 and torch.equal(third[..., :2, :], k[..., :2, :])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_bitsandbytes_weights_need_cuda(tiny_model_dir):
    from chatkv.engine.model import load_model

    with pytest.raises(ModelError, match="needs a CUDA GPU"):
        load_model(str(tiny_model_dir), device="auto", load_in="4bit")


def test_cancel_during_prefill_stops_between_steps(tiny_lm):
    cancel = threading.Event()
    cancel.set()
    cache = live.new_cache(tiny_lm.model)
    steps = list(
        generate(
            tiny_lm.model,
            list(range(5, 600)),
            cache,
            0,
            GenerationSettings(max_new_tokens=5, temperature=0),
            [],
            10**6,
            cancel,
        )
    )
    assert [s.finish_reason for s in steps] == ["cancelled"] and live.seq_len(cache) == 0


def test_transformers_forward_gets_the_cache_under_the_name_it_takes(tiny_lm):
    """The float32 path runs transformers' forward: the cache goes in under the keyword that
    release takes (newer 5.x warn at every call that `past_key_values` is deprecated; older
    ones would drop an unknown `cache` into **kwargs), and it is filled."""
    import inspect
    import warnings

    from chatkv.engine.generate import cache_arg, decode_one, prefill

    name = next(iter(cache_arg(tiny_lm.model, None)))
    assert name in inspect.signature(type(tiny_lm.model).forward).parameters
    cache = live.new_cache(tiny_lm.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prefill(tiny_lm.model, list(range(5, 40)), cache, 0)
        decode_one(tiny_lm.model, torch.tensor([7]), cache, 35)
    assert live.seq_len(cache) == 36
    assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize(
    "make,expect",
    [
        (lambda p: p.write_text("{}"), "is neither a .gguf file nor a model directory"),
        (lambda p: p.mkdir(), "has no config.json"),
        (lambda p: None, "does not exist"),
    ],
)
def test_a_model_path_that_is_no_model_says_what_it_is(tmp_path, make, expect):
    from chatkv.engine.model import resolve
    from chatkv.errors import ModelError

    path = tmp_path / "input.jsonl"
    make(path)
    with pytest.raises(ModelError, match=expect):
        resolve(str(path))
