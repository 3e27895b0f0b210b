"""Batched decoding gives each row what single-sequence decoding gives it."""

from __future__ import annotations

import pytest
import torch

from chatkv.api import GenerationSettings
from chatkv.engine.batch import BatchDecoder, BatchRow, prefix_attention
from chatkv.engine.generate import generate, prefill
from chatkv.kv import live

SYSTEM = "Caches keep keys and values of attention for every token of the history. " * 3
QUESTIONS = [
    "Hello!",
    "Summarise the GNU GPL in three bullet points.",
    "How does the Apache license differ?",
    "Tell me a story about the sea and the stars.",
    "0123456789",
    "The quick brown fox.",
]


def _ids(lm, question: str, system: str = SYSTEM) -> list[int]:
    msgs = [{"role": "system", "content": system}] if system else []
    out = lm.tokenizer.apply_chat_template(
        msgs + [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _single(lm, ids, settings, cache=None, cached=0) -> tuple[list[int], str]:
    cache = cache if cache is not None else live.new_cache(lm.model)
    toks, reason = [], None
    for step in generate(lm.model, ids, cache, cached, settings, lm.eos_ids, lm.context_limit):
        if step.token is None:
            reason = step.finish_reason
        else:
            toks.append(step.token)
    return toks, reason


def _batched(lm, rows, prefix=None):
    toks = [[] for _ in rows]
    ends = [None] * len(rows)
    for step in BatchDecoder(lm.model, rows, prefix, lm.eos_ids, lm.context_limit):
        if step.token is None:
            ends[step.row] = step
        else:
            toks[step.row].append(step.token)
    return toks, ends


def _common(seqs):
    n = min(len(s) for s in seqs)
    i = 0
    while i < n and all(s[i] == seqs[0][i] for s in seqs):
        i += 1
    return i


@pytest.mark.parametrize("prefix", [True, False])
def test_a_decode_steps_flash_attention_equals_the_rows_attention(prefix):
    from chatkv.engine.batch import attend_rows, attend_step, prepare_prefix

    torch.manual_seed(0)
    B, Hq, Hkv, S, P, D = 4, 6, 2, 9, 13, 8
    q = torch.randn(B, Hq, 1, D)
    k, v = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    kp, vp = torch.randn(1, Hkv, P, D), torch.randn(1, Hkv, P, D)
    valid = torch.arange(S)[None, :] >= torch.tensor([0, 2, 5, 8])[:, None]  # (B, S): left padding
    bias = torch.zeros(B, S).masked_fill(~valid, float("-inf"))[:, None, None]
    kpt, vpc = prepare_prefix([(kp, vp)])[0] if prefix else (None, None)
    want = attend_rows(q, k, v, valid[:, None, None], 0.3, kpt, vpc)  # (B, 1, Hq, D)
    got = attend_step(q, k, v, bias, 0.3, kp if prefix else None, vp if prefix else None)
    assert got.shape == want.shape == (B, 1, Hq, D)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prefix_attention_matches_sdpa():
    """Scores over [prefix ; padded rows] equal SDPA over each row's concatenated keys."""
    torch.manual_seed(0)
    B, Hq, Hkv, L, S, P, D = 3, 6, 2, 4, 7, 5, 8
    q = torch.randn(B, Hq, L, D)
    k, v = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    kp, vp = torch.randn(1, Hkv, P, D), torch.randn(1, Hkv, P, D)
    pads = [0, 2, 3]
    mask = torch.ones(B, 1, L, S, dtype=torch.bool)
    for b, n in enumerate(pads):
        mask[b, :, :, :n] = False
    mask &= torch.ones(L, S, dtype=torch.bool).tril(S - L)  # causal: query t sees keys <= S-L+t

    class Layer:
        layer_idx = 0

    out, _ = prefix_attention(Layer(), q, k, v, mask, scaling=D**-0.5, chatkv_prefix=[(kp, vp)])
    for b, n in enumerate(pads):
        kk = torch.cat([kp[0], k[b, :, n:]], dim=-2).repeat_interleave(Hq // Hkv, 0)  # (Hq, P+S-n, D)
        vv = torch.cat([vp[0], v[b, :, n:]], dim=-2).repeat_interleave(Hq // Hkv, 0)
        m = torch.cat([torch.ones(L, P, dtype=torch.bool), mask[b, 0, :, n:]], dim=-1)
        ref = torch.nn.functional.scaled_dot_product_attention(q[b], kk, vv, attn_mask=m)  # (Hq, L, D)
        torch.testing.assert_close(out[b], ref.transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_shared_prefix_rows_equal_single(tiny_lm):
    lm = tiny_lm
    settings = [GenerationSettings(max_new_tokens=n, temperature=0) for n in (12, 5, 12, 20, 1, 12)]
    prompts = [_ids(lm, q) for q in QUESTIONS]
    p = min(_common(prompts), min(map(len, prompts)) - 1)
    assert p > 20
    cache = live.new_cache(lm.model)
    prefill(lm.model, prompts[0][:p], cache, 0)
    rows = [BatchRow(ids, s, None, p) for ids, s in zip(prompts, settings, strict=True)]
    got, ends = _batched(lm, rows, live.layers_of(cache))
    for ids, s, toks, end in zip(prompts, settings, got, ends, strict=True):
        want, reason = _single(lm, ids, s)
        assert toks == want
        assert end.finish_reason == reason


def test_rows_with_own_caches_of_different_lengths_equal_single(tiny_lm):
    """No shared prefix: rows bring caches of different lengths (a saved conversation's),
    or none, and are left-padded into one batch."""
    lm = tiny_lm
    s = GenerationSettings(max_new_tokens=12, temperature=0)
    prompts = [
        _ids(lm, q, system=sys_)
        for q, sys_ in zip(QUESTIONS, ["", "Be brief.", SYSTEM, "", "x", ""], strict=True)
    ]
    rows = []
    for i, ids in enumerate(prompts):
        n = [0, 3, len(ids) - 1, 7, 0, len(ids) // 2][i]
        cache = None
        if n:
            cache = live.new_cache(lm.model)
            prefill(lm.model, ids[:n], cache, 0)
        rows.append(BatchRow(ids, s, cache, n))
    got, _ = _batched(lm, rows)
    for ids, toks in zip(prompts, got, strict=True):
        assert toks == _single(lm, ids, s)[0]


def test_stop_and_kept_cache_match_single(tiny_lm):
    """A row stopped by the consumer ends before the token is fed; the kept cache covers
    what a single run's cache covers, with the same values."""
    lm = tiny_lm
    s = GenerationSettings(max_new_tokens=10, temperature=0)
    prompts = [_ids(lm, q) for q in QUESTIONS[:3]]
    rows = [BatchRow(ids, s, keep_cache=True) for ids in prompts]
    dec = BatchDecoder(lm.model, rows, None, lm.eos_ids, lm.context_limit)
    toks, ends = [[] for _ in rows], {}
    for step in dec:
        if step.token is not None:
            toks[step.row].append(step.token)
            if step.row == 1 and len(toks[1]) == 3:
                dec.stop(1)
        else:
            ends[step.row] = step
    assert len(toks[1]) == 3 and ends[1].finish_reason == "stop"
    for i, ids in enumerate(prompts):
        single = live.new_cache(lm.model)
        want = []
        for step in generate(lm.model, ids, single, 0, s, lm.eos_ids, lm.context_limit):
            if step.token is not None:
                want.append(step.token)
            if len(want) == 3 and i == 1:
                break
        assert toks[i] == want
        assert live.seq_len(ends[i].cache) == live.seq_len(single)
        for (k1, v1), (k2, v2) in zip(live.layers_of(ends[i].cache), live.layers_of(single), strict=True):
            torch.testing.assert_close(k1, k2, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(v1, v2, rtol=1e-4, atol=1e-4)


def test_seeded_sampling_matches_single(tiny_lm):
    lm = tiny_lm
    s = GenerationSettings(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    prompts = [_ids(lm, q) for q in QUESTIONS[:4]]
    got, _ = _batched(lm, [BatchRow(ids, s) for ids in prompts])
    for ids, toks in zip(prompts, got, strict=True):
        assert toks == _single(lm, ids, s)[0]


def test_context_limit_ends_row_with_length(tiny_lm):
    lm = tiny_lm
    ids = _ids(lm, "Hello!")
    s = GenerationSettings(max_new_tokens=50, temperature=0)
    got, ends = [], None
    for step in BatchDecoder(lm.model, [BatchRow(ids, s)], None, lm.eos_ids, max_positions=len(ids) + 3):
        if step.token is None:
            ends = step
        else:
            got.append(step.token)
    want, reason = [], None
    for step in generate(lm.model, ids, live.new_cache(lm.model), 0, s, lm.eos_ids, len(ids) + 3):
        if step.token is None:
            reason = step.finish_reason
        else:
            want.append(step.token)
    assert got == want and ends.finish_reason == reason


def test_rejects_row_without_tokens_to_prefill(tiny_lm):
    ids = _ids(tiny_lm, "Hello!")
    with pytest.raises(ValueError, match="cached"):
        BatchDecoder(tiny_lm.model, [BatchRow(ids, GenerationSettings(), None, len(ids))], None, [], 1024)


@pytest.mark.parametrize("flash", [True, False])  # attend_step (CPU), attend_rows (elsewhere)
def test_batched_decode_steps_take_the_lean_step_and_match_the_forward(tiny_lm, monkeypatch, flash):
    """Decode steps of a batch go through LeanLlama.step_rows (with this module's attention
    for the padding masks and the shared prefix); with the lean step off, through the
    forward: the same tokens either way, and the same as each row alone."""
    from chatkv.engine import batch, lean

    monkeypatch.setattr(batch, "flash_step", lambda device: flash)

    lm = tiny_lm
    calls = []
    real = lean.LeanLlama.step_rows
    monkeypatch.setattr(lean.LeanLlama, "step_rows", lambda self, *a: calls.append(1) or real(self, *a))
    settings = GenerationSettings(max_new_tokens=10, temperature=0)
    prompts = [_ids(lm, q) for q in QUESTIONS[:4]]
    p = min(_common(prompts), min(map(len, prompts)) - 1)
    cache = live.new_cache(lm.model)
    prefill(lm.model, prompts[0][:p], cache, 0)
    whole = live.new_cache(lm.model)
    prefill(lm.model, prompts[2][: p + 5], whole, 0)
    own = [(k[..., p:, :], v[..., p:, :]) for k, v in live.layers_of(whole)]  # row 2's own 5 positions

    def run():
        rows = [BatchRow(ids, settings, None, p) for ids in prompts]
        rows[2] = BatchRow(prompts[2], settings, live.cache_from_layers(lm.model, own), p + 5)
        return _batched(lm, rows, live.layers_of(cache))[0]

    leaned = run()
    assert len(calls) >= 9  # every decode step after the first token
    lean.set_enabled(lm.model, False)
    try:
        calls.clear()
        forward = run()
    finally:
        lean.set_enabled(lm.model, True)
    assert calls == [] and leaned == forward
    assert leaned == [_single(lm, ids, settings)[0] for ids in prompts]
