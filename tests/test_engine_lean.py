"""The lean decode step (engine/lean.py): the same function as transformers' forward on
the models it takes, and a fallback to that forward, with one log line, on the others."""

from __future__ import annotations

import logging

import pytest
import torch

from chatkv.api import GenerationSettings
from chatkv.engine import lean
from chatkv.engine.generate import cache_arg, generate, prefill
from chatkv.kv import live


def fresh_model(tiny_model_dir, dtype=torch.float32, attn="sdpa"):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype, attn_implementation=attn).eval()


def forward_step(model, token, cache, pos):
    """One token through transformers' forward, as decode_one does for other models."""
    p = torch.tensor([pos])
    with torch.inference_mode():
        out = model(
            input_ids=token.view(1, 1),
            **cache_arg(model, cache),
            use_cache=True,
            cache_position=p,
            position_ids=p[None],
        )
    return out.logits[:, -1]


def forward_prefill(model, ids, step=512):
    """A cache of `ids` through transformers' forward, as prefill does for other models."""
    cache = live.new_cache(model)
    with torch.inference_mode():
        for i in range(0, len(ids), step):
            p = torch.arange(i, min(i + step, len(ids)))
            out = model(
                input_ids=torch.tensor([ids[i : i + step]]),
                **cache_arg(model, cache),
                use_cache=True,
                cache_position=p,
                position_ids=p[None],
                logits_to_keep=1,
            )
    return cache, out.logits[:, -1]


def test_the_lean_step_computes_what_the_forward_computes(tiny_model_dir):
    model = fresh_model(tiny_model_dir)
    ids = list(range(5, 70))
    a, b = live.new_cache(model), live.new_cache(model)
    prefill(model, ids, a, 0)
    prefill(model, ids, b, 0)
    step = lean.lean_for(model)
    assert step is not None
    token = torch.tensor([17])
    for pos in range(len(ids), len(ids) + 5):
        ref = forward_step(model, token, a, pos)
        got = step.step(token, b, pos)
        assert got.shape == ref.shape == (1, model.config.vocab_size)
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
        for (ka, va), (kb, vb) in zip(live.layers_of(a), live.layers_of(b), strict=True):
            assert (
                ka.shape[-2] == pos + 1
                and torch.allclose(ka, kb, atol=1e-5)
                and torch.allclose(va, vb, atol=1e-5)
            )
        token = ref.argmax(-1)


def test_fused_weights_are_views_so_the_forward_sees_the_same_numbers(tiny_model_dir):
    model = fresh_model(tiny_model_dir)
    x = torch.tensor([list(range(5, 40))])
    with torch.inference_mode():
        before = model(input_ids=x).logits
    params = sum(p.numel() for p in model.parameters())
    step = lean.lean_for(model)
    assert step is not None
    attn = model.model.layers[0].self_attn
    fused = step.layers[0].qkv.w
    assert attn.k_proj.weight.data_ptr() == fused[attn.q_proj.weight.shape[0] :].data_ptr()
    assert sum(p.numel() for p in model.parameters()) == params
    with torch.inference_mode():
        assert torch.equal(model(input_ids=x).logits, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_through_the_lean_step_match_transformers_generate(tiny_model_dir, dtype):
    model = fresh_model(tiny_model_dir, dtype)
    ids = list(range(5, 60))
    steps = generate(
        model, ids, live.new_cache(model), 0, GenerationSettings(max_new_tokens=16, temperature=0), [], 10**6
    )
    ours = [s.token for s in steps if s.token is not None]
    assert lean.lean_for(model) is not None
    x = torch.tensor([ids])
    ref = model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=16, min_new_tokens=16, do_sample=False
    )[0, len(ids) :].tolist()
    assert ours == ref


def test_a_model_the_lean_step_does_not_cover_decodes_through_the_forward(tiny_model_dir, caplog):
    model = fresh_model(tiny_model_dir, attn="eager")
    assert "eager" in (lean.why_not(model) or "")
    settings = GenerationSettings(max_new_tokens=6, temperature=0)
    with caplog.at_level(logging.INFO, logger="chatkv.engine.lean"):
        for _ in range(2):
            toks = [
                s.token for s in generate(model, [5, 6, 7], live.new_cache(model), 0, settings, [], 10**6)
            ]
    assert len([t for t in toks if t is not None]) == 6
    said = [r.getMessage() for r in caplog.records if r.name == "chatkv.engine.lean"]
    assert len(said) == 1 and "eager" in said[0]  # once per model, not per token
    assert lean.lean_for(model) is None and model.model.layers[0].self_attn.q_proj.weight.is_contiguous()


def snapped_to_4_bits(model):
    """The model with every projection's groups of 32 inputs on a 16-level grid, as the
    weights of a Q4_1 GGUF are once dequantized."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                n, k = p.shape
                g = p.float().view(n, k // 32, 32)
                low = g.amin(-1, keepdim=True)
                step = (g.amax(-1, keepdim=True) - low) / 15
                p.copy_((((g - low) / step).round() * step + low).view(n, k))
    return model


def test_weights_on_a_4_bit_grid_decode_as_int4_and_compute_the_same(tiny_model_dir):
    grid = snapped_to_4_bits(fresh_model(tiny_model_dir)).to(torch.bfloat16)
    step = lean.lean_for(grid)
    assert step is not None
    projections = [p for layer in step.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    assert all(p.int4 is not None for p in projections)
    plain = lean.lean_for(fresh_model(tiny_model_dir, torch.bfloat16))
    assert plain is not None and all(p.int4 is None for p in (plain.layers[0].qkv, plain.layers[0].down))

    ids = list(range(5, 60))
    # Both caches from transformers' forward: this compares the decode steps alone (the
    # lean prefill rounds differently in its last bits, which moves this comparison by
    # as much as the two steps differ).
    (a, _), (b, _) = forward_prefill(grid, ids), forward_prefill(grid, ids)
    token = torch.tensor([17])
    for pos in range(len(ids), len(ids) + 4):
        ref = forward_step(grid, token, a, pos).float()
        got = step.step(token, b, pos).float()
        # Both are the grid's weights in bfloat16 arithmetic; they differ by rounding only
        # (test_int4_errs_from_the_grid_by_the_order_of_bfloat16_rounding).
        assert (got - ref).abs().max() <= 0.03 * ref.abs().max()
        assert int(got.argmax()) == int(ref.argmax())
        token = ref.argmax(-1)


def test_int4_errs_from_the_grid_by_the_order_of_bfloat16_rounding():
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    g = w.view(96, 4, 32)
    low = g.amin(-1, keepdim=True)
    step = (g.amax(-1, keepdim=True) - low) / 15
    w = (((g - low) / step).round() * step + low).view(96, 128)  # on the grid, float32
    x = torch.randn(1, 1, 128).bfloat16()
    exact = x.float() @ w.T  # (1, 1, 96)
    proj = lean._Linear(w.bfloat16())
    assert proj.int4 is not None
    int4_err = (proj(x).float() - exact).abs().max()
    dense_err = (torch.nn.functional.linear(x, w.bfloat16()).float() - exact).abs().max()
    # The kernel's scales and zeros are bfloat16 too: a few roundings per group instead of
    # one per weight: measured 2.4x the dense bfloat16 error here.
    assert int4_err <= 3 * dense_err
    off_grid = lean._Linear(torch.randn(96, 128).bfloat16())  # weights that int4 would round
    assert off_grid.int4 is None


def test_a_lean_step_that_cannot_be_built_falls_back_with_one_log_line(tiny_model_dir, caplog, monkeypatch):
    model = fresh_model(tiny_model_dir)

    def broken(*args, **kwargs):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(lean, "_fuse", broken)
    with caplog.at_level(logging.INFO, logger="chatkv.engine.lean"):
        steps = list(
            generate(
                model,
                [5, 6, 7],
                live.new_cache(model),
                0,
                GenerationSettings(max_new_tokens=4, temperature=0),
                [],
                10**6,
            )
        )
    assert [s.finish_reason for s in steps][-1] == "length" and len(steps) == 5
    said = [r.getMessage() for r in caplog.records if r.name == "chatkv.engine.lean"]
    assert len(said) == 1 and "no such kernel" in said[0]


def test_the_warm_up_builds_the_lean_step_off_the_first_token(tiny_model_dir):
    """Fusing the weights (and packing a Q4 model's to int4) is done by the warm-up thread,
    which a turn joins before its first forward, not by the first decoded token."""
    from chatkv.engine.model import load_model, warm_up

    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    assert getattr(lm.model, lean._ATTR, None) is None
    warm_up(lm).join()
    assert isinstance(getattr(lm.model, lean._ATTR, None), lean.LeanLlama)


def rel_err(got, ref):
    return float((got.float() - ref.float()).norm() / ref.float().norm())


def lean_prefill(model, ids, step):
    """A cache of `ids` through LeanLlama.prefill in pieces of `step` tokens."""
    cache, lean_step = live.new_cache(model), lean.lean_for(model)
    for i in range(0, len(ids), step):
        logits = lean_step.prefill(torch.tensor([ids[i : i + step]]), cache, i)
    return cache, logits


@pytest.mark.parametrize("step", [512, 9])  # one piece (is_causal), and pieces after a cached prefix (mask)
def test_the_lean_prefill_computes_what_the_forward_computes(tiny_model_dir, step):
    model = fresh_model(tiny_model_dir)
    ids = [(7 * i) % 300 + 5 for i in range(70)]
    ref, ref_logits = forward_prefill(model, ids)
    got, logits = lean_prefill(model, ids, step)
    assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    for (kr, vr), (kg, vg) in zip(live.layers_of(ref), live.layers_of(got), strict=True):
        assert kg.shape == kr.shape == (1, 2, len(ids), 16)
        assert torch.allclose(kg, kr, atol=1e-5) and torch.allclose(vg, vr, atol=1e-5)


@pytest.mark.parametrize("products32", [False, True])
def test_a_bfloat16_prompt_gets_the_same_bits_however_its_prefill_is_split(tiny_model_dir, products32):
    """A prompt computed in one piece, or after a cached prefix of any length in pieces of
    any size, gives the same cache and next-token logits bit for bit: asked twice, its
    prefix from disk the second time, it gets the same greedy reply in bfloat16 too (issue
    8). Before, a one-token piece, a piece ending inside a vector of keys and the split of
    attention at the cached prefix each rounded some rows differently."""
    model = fresh_model(tiny_model_dir, torch.bfloat16)
    step = lean.lean_for(model)
    step.wide, step.products32 = products32, products32  # float32 products as some CPUs take them
    ids = [(7 * i) % 300 + 5 for i in range(300)]  # past two blocks of queries

    def split(cached: int, piece: int):
        cache = live.new_cache(model)
        if cached:
            prefill(model, ids[:cached], cache, 0, step=512)
        return prefill(model, ids[cached:], cache, cached, step=piece), live.layers_of(cache)

    ref_logits, ref = split(0, 512)
    for cached, piece in [(1, 512), (15, 7), (16, 1), (127, 40), (128, 512), (129, 3), (250, 17), (299, 512)]:
        logits, got = split(cached, piece)
        assert torch.equal(logits, ref_logits), (cached, piece)
        for (kr, vr), (kg, vg) in zip(ref, got, strict=True):
            assert torch.equal(kg, kr) and torch.equal(vg, vr), (cached, piece)


@pytest.mark.parametrize("products32", [True, False])
def test_the_bfloat16_prefill_is_as_close_to_float32_as_the_forward_is(
    tiny_model_dir, monkeypatch, products32
):
    """The lean prefill's attention (and float32 products, where they are faster) over the
    same bfloat16 numbers: the cache differs from the bfloat16 forward's by rounding only,
    as far from the float32 cache as that one is."""
    exact = fresh_model(tiny_model_dir)
    model = fresh_model(tiny_model_dir, torch.bfloat16)
    step = lean.lean_for(model)
    step.wide = True  # whatever this CPU has
    step.products32 = products32  # whatever float32_products_pay measures here
    ids = [(7 * i) % 300 + 5 for i in range(70)]
    ref32, logits32 = forward_prefill(exact, ids, step=16)
    ref16, logits16 = forward_prefill(model, ids, step=16)
    got, logits = lean_prefill(model, ids, 16)
    assert rel_err(logits, logits32) <= 1.5 * rel_err(logits16, logits32) + 1e-3
    assert int(logits.argmax()) == int(logits32.argmax())
    for (k32, v32), (kr, vr), (kg, vg) in zip(
        live.layers_of(ref32), live.layers_of(ref16), live.layers_of(got), strict=True
    ):
        assert kg.dtype == torch.bfloat16
        assert rel_err(kg, k32) <= 1.5 * rel_err(kr, k32) + 1e-3
        assert rel_err(vg, v32) <= 1.5 * rel_err(vr, v32) + 1e-3


def test_prefill_takes_the_lean_path_in_bfloat16_and_the_forward_in_float32(tiny_model_dir, monkeypatch):
    """On the CPU every bfloat16 piece builds the lean step and takes it (a prompt's bits
    must not depend on how it is split); float32 never does. On other devices a short piece
    takes it only once it is built (it is transformers' forward bit for bit there)."""
    calls = []
    real = lean.LeanLlama.prefill
    monkeypatch.setattr(lean.LeanLlama, "prefill", lambda self, *a: calls.append(1) or real(self, *a))
    n = lean.WIDE_MIN_TOKENS
    for dtype, step, lean_pieces in (
        (torch.bfloat16, n, 2),
        (torch.bfloat16, 10, -(-2 * n // 10)),
        (torch.float32, n, 0),
    ):
        calls.clear()
        model = fresh_model(tiny_model_dir, dtype)
        logits = prefill(model, list(range(5, 5 + 2 * n)), live.new_cache(model), 0, step=step)
        assert logits.shape == (1, model.config.vocab_size) and len(calls) == lean_pieces
        assert (getattr(model, lean._ATTR, None) is not None) == (lean_pieces > 0)

    class Elsewhere:  # a model on another device: what prefill_step_for reads of it
        dtype = torch.bfloat16
        device = torch.device("meta")

    assert lean.prefill_step_for(Elsewhere(), n - 1) is None  # not built: the forward
    assert getattr(Elsewhere, lean._ATTR, None) is None


def test_the_lean_prefill_extends_a_plain_dynamic_cache_as_the_warm_up_passes_one(tiny_model_dir):
    from transformers import DynamicCache

    model = fresh_model(tiny_model_dir, torch.bfloat16)
    assert lean.lean_for(model) is not None  # built: short pieces take it too
    ids = list(range(5, 30))
    plain, growable = DynamicCache(config=model.config), live.new_cache(model)
    a = prefill(model, ids, plain, 0, step=10)
    b = prefill(model, ids, growable, 0, step=10)
    assert torch.equal(a, b)
    for (ka, va), (kb, vb) in zip(live.layers_of(plain), live.layers_of(growable), strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.mark.parametrize("block", [4, 128])
@pytest.mark.parametrize(("start", "t"), [(0, 7), (11, 7), (0, 140), (130, 1), (5, 300)])
def test_a_pieces_attention_is_causal_attention_over_the_prefix_and_itself(start, t, block, monkeypatch):
    monkeypatch.setattr(lean, "BLOCK", block)
    torch.manual_seed(0)
    hq, hkv, d = 6, 2, 16
    q = torch.randn(1, hq, t, d).to(torch.bfloat16)
    keys = torch.randn(1, hkv, start + t, d).to(torch.bfloat16)
    values = torch.randn(1, hkv, start + t, d).to(torch.bfloat16)
    pos = torch.arange(start, start + t)
    mask = pos[:, None] >= torch.arange(start + t)  # (T, start + T)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(),
        keys.float().repeat_interleave(3, 1),
        values.float().repeat_interleave(3, 1),
        attn_mask=mask,
        scale=0.2,
    )
    got = lean._attend_fixed(q, keys, values, start, 0.2)
    assert got.shape == want.shape == (1, hq, t, d) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.02, atol=0.02)  # bfloat16 rounding


def test_a_querys_attention_has_the_same_bits_in_any_piece():
    """_attend_fixed: the rows of pieces cut anywhere (one row, inside a vector of keys,
    across blocks) are bit-equal to the same rows computed in one piece."""
    torch.manual_seed(1)
    hq, hkv, d, n = 9, 3, 64, 400
    q = torch.randn(1, hq, n, d).to(torch.bfloat16)
    keys = torch.randn(1, hkv, n, d).to(torch.bfloat16)
    values = torch.randn(1, hkv, n, d).to(torch.bfloat16)
    whole = lean._attend_fixed(q, keys, values, 0, 0.125)
    for a, b in [
        (0, 1),
        (1, 2),
        (5, 21),
        (127, 129),
        (130, 131),
        (200, 237),
        (255, 400),
        (399, 400),
        (17, 300),
    ]:
        part = lean._attend_fixed(q[:, :, a:b], keys[:, :, :b], values[:, :, :b], a, 0.125)
        assert torch.equal(part, whole[:, :, a:b]), (a, b)


def test_wide_products_only_on_a_cpu_without_amx(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert not lean.wide_pays(torch.device("cpu"))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert lean.wide_pays(torch.device("cpu")) and not lean.wide_pays(torch.device("cuda"))


def test_prefill_products_run_in_float32_only_where_that_is_clearly_faster(monkeypatch, chatkv_home):
    """No CPU flag tells an AVX512-BF16 Xeon (bfloat16 products at half float32's rate)
    from an AVX512-BF16 EPYC (at twice it): the first wide piece times both, once, and the
    answer is remembered for the CPU, so that every process computes a prefill alike."""
    from chatkv.paths import models_dir

    assert all(t > 0 for t in lean._time_products())  # the real timing runs
    timed = []
    for b16, f32, want in [(1.0, 0.5, True), (1.0, 0.9, False), (0.5, 1.0, False)]:
        (models_dir() / lean.PRODUCTS_MEMO).unlink(missing_ok=True)  # a CPU never timed
        monkeypatch.setattr(lean, "_products", {})
        monkeypatch.setattr(lean, "_time_products", lambda b=b16, f=f32: timed.append(1) or (b, f))
        assert lean.float32_products_pay(torch.device("cpu")) is want
        assert lean.float32_products_pay(torch.device("cpu")) is want  # remembered: timed once
        monkeypatch.setattr(lean, "_products", {})  # the next process
        monkeypatch.setattr(lean, "_time_products", lambda: (_ for _ in ()).throw(AssertionError("timed")))
        assert lean.float32_products_pay(torch.device("cpu")) is want
    assert len(timed) == 3
    assert not lean.float32_products_pay(torch.device("cuda"))


def test_int4_projections_take_several_rows_at_once():
    torch.manual_seed(1)
    w = torch.randn(64, 96).view(64, 3, 32)
    low = w.amin(-1, keepdim=True)
    step = (w.amax(-1, keepdim=True) - low) / 15
    proj = lean._Linear(((((w - low) / step).round() * step + low).view(64, 96)).bfloat16())
    assert proj.int4 is not None
    x = torch.randn(5, 1, 96).bfloat16()  # one token of 5 rows
    rows = proj(x)
    assert rows.shape == (5, 1, 64)
    assert all(torch.equal(rows[i : i + 1], proj(x[i : i + 1])) for i in range(5))


def test_a_weight_the_int4_packer_refuses_decodes_dense():
    """A weight on a 4-bit grid whose shape torch's int4 packer refuses (24 rows: not a
    multiple of 16) is kept dense for decoding, with a log line, not a failed turn."""
    torch.manual_seed(0)
    q = torch.randint(0, 16, (24, 2, 32)).float()
    q[..., 0], q[..., 1] = 0, 15  # each group of 32 spans the whole grid
    w = (q / 64 - torch.randint(0, 8, (24, 2, 1)) / 64).view(24, 64).to(torch.bfloat16)
    assert lean._int4_form(w[:16]) is not None  # on the grid: only the shape is refused
    linear = lean._Linear(w)
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    assert torch.equal(linear(x), torch.nn.functional.linear(x, w))
    assert linear.int4 is None
