"""Quality harness on a tiny random Llama: exact for fp16, small positive KL for int4."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chatkv.bench.quality import measure_quality, roundtrip_layers, sample_text
from chatkv.kv.codecs import get_codec

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(1))


def test_fp16_is_exact(tiny_llama, ids):
    r = measure_quality(tiny_llama, ids, 200, get_codec("fp16"), chunk_tokens=64)
    assert r.codec == "fp16"
    assert (r.prefix_tokens, r.eval_tokens) == (200, 100)
    assert r.kl_mean == 0.0 and r.kl_max == 0.0
    assert r.top1_agreement == 1.0
    assert r.ppl_exact == r.ppl_codec
    assert r.fp16_bytes_per_token == LAYERS * 2 * KV_HEADS * HEAD_DIM * 2
    assert r.ratio_vs_fp16 == pytest.approx(2.0)  # float32 model: stored as float32


def test_int4_small_positive_kl(tiny_llama, ids):
    r = measure_quality(tiny_llama, ids, 200, get_codec("int4"), chunk_tokens=64)
    assert 0.0 < r.kl_mean <= r.kl_max
    assert r.kl_mean < 0.05
    assert 0.8 <= r.top1_agreement <= 1.0
    assert r.ppl_codec == pytest.approx(r.ppl_exact, rel=0.05)
    assert 0.2 < r.ratio_vs_fp16 < 0.45  # group overhead is larger with head_dim 16 and 64-token chunks
    assert r.bytes_per_token == pytest.approx(r.ratio_vs_fp16 * r.fp16_bytes_per_token)


def test_kl_grows_as_bits_shrink(tiny_llama, ids):
    kls = [
        measure_quality(tiny_llama, ids, 200, get_codec(n), chunk_tokens=64).kl_mean
        for n in ("int8", "int4", "int2")
    ]
    assert 0.0 < kls[0] < kls[1] < kls[2]


def test_roundtrip_layers_chunks_partial_tail():
    k = torch.randn(1, 2, 150, 16)
    v = torch.randn(1, 2, 150, 16)
    (kd, vd), *_ = roundtrip_layers([(k, v)], get_codec("fp16"), chunk_tokens=64)[0]
    assert torch.equal(kd, k) and torch.equal(vd, v)
    layers, used = roundtrip_layers([(k, v)], get_codec("int8"), chunk_tokens=64)
    assert layers[0][0].shape == k.shape
    assert used > 0


def test_bad_prefix_len(tiny_llama, ids):
    with pytest.raises(ValueError):
        measure_quality(tiny_llama, ids, 299, get_codec("fp16"))


def test_sample_text_is_long_english():
    text = sample_text()
    assert "We hold these truths to be self-evident" in text
    assert len(text.split()) > 2000


def test_a_policy_stores_short_prefixes_exactly_and_long_ones_by_age(tiny_llama, ids):
    """At a prefix shorter than a chunk a policy is exact (the tail is lossless) where the
    bare codec is not; at a longer one it is lossy, but its first tokens and tail are exact."""
    from chatkv.bench.quality import fidelity
    from chatkv.kv.policy import get_policy

    schemes = {"codec int8": (get_codec("int8"), None), "policy tiered": (get_policy("tiered"), None)}
    rows = {
        (r["scheme"], r["prefix_tokens"]): r
        for r in fidelity(tiny_llama, ids, [40, 200], schemes, 64, 32, 16)
    }
    short = rows["policy tiered", 40]
    assert short["kl_mean"] == 0.0 and short["top1_agreement"] == 1.0 and short["greedy_agree_tokens"] == 16
    assert short["ratio_vs_fp16"] == pytest.approx(2.0)  # float32 stored as is
    assert rows["codec int8", 40]["kl_mean"] > 0.0
    assert 0.0 < rows["policy tiered", 200]["kl_mean"] < rows["codec int8", 200]["kl_mean"] * 10
    # 3 full int8 chunks (sink exact) and an 8-token exact tail cost more than bare int8
    assert rows["codec int8", 200]["ratio_vs_fp16"] < rows["policy tiered", 200]["ratio_vs_fp16"] < 1.0


def test_roundtrip_keeps_sink_tokens_and_tail_exact():
    from chatkv.kv.policy import get_policy

    g = torch.Generator().manual_seed(3)
    layers = [
        (torch.randn(1, 2, 150, 16, generator=g), torch.randn(1, 2, 150, 16, generator=g)) for _ in range(2)
    ]
    policy = get_policy("int4")
    stored, used = roundtrip_layers(layers, policy, chunk_tokens=64)
    for (k, v), (k2, v2) in zip(layers, stored, strict=True):
        assert torch.equal(k[..., : policy.sink, :], k2[..., : policy.sink, :])
        assert torch.equal(v[..., 128:, :], v2[..., 128:, :])  # the 22-token tail
        assert not torch.equal(k[..., policy.sink : 128, :], k2[..., policy.sink : 128, :])
    recoded, _ = roundtrip_layers(layers, policy, chunk_tokens=64, recoded_from="int8")
    assert not torch.equal(recoded[0][0], stored[0][0])  # int4 of int8's reload differs from int4 of exact


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_prompt_twice_counts_identical_greedy_replies(tiny_model_dir, dtype):
    """Through the engine's prefill and decode: the prompt whole, against all but its last
    token stored and reloaded, then that token prefilled (bit-equal in bfloat16 too)."""
    from chatkv.bench.quality import SHORT_PROMPTS, same_prompt_twice
    from chatkv.engine.model import load_model
    from chatkv.kv.policy import get_policy

    lm = load_model(str(tiny_model_dir), device="cpu", dtype=dtype)
    schemes = {"fp16": get_codec("fp16"), "tiered": get_policy("tiered"), "int2": get_codec("int2")}
    got = same_prompt_twice(lm, SHORT_PROMPTS[:6], schemes, 256, 8)
    assert got["fp16"] == got["tiered"] == 1.0
    assert got["int2"] < 1.0  # a lossy prefix does change replies: the check can fail


def test_bitsandbytes_codecs_register_exactly_when_it_is_installed():
    """bnb8 and NF4 register only where bitsandbytes is installed (the `cuda` extra); where
    they do, they round-trip within their bounds."""
    import importlib.util

    from chatkv.kv.codecs import CODECS, nbytes

    if importlib.util.find_spec("bitsandbytes") is None:
        assert "bnb8" not in CODECS and "nf4" not in CODECS
        return

    k = torch.randn(2, 2, 64, 64, generator=torch.Generator().manual_seed(4))
    v = torch.randn(2, 2, 64, 64, generator=torch.Generator().manual_seed(5))
    for name, bits, tol in (("bnb8", 8, 0.05), ("nf4", 4, 0.6)):
        codec = CODECS[name]
        parts = codec.encode(k, v)
        k2, v2 = codec.decode(parts, tuple(k.shape), torch.float32, "cpu")
        assert codec.bits == bits and not codec.lossless
        assert 0 < (k - k2).abs().max() < tol and 0 < (v - v2).abs().max() < tol
        assert nbytes(parts) < k.numel() * 2 * (bits / 8 + 0.1)


def test_the_floors_stand_beside_the_codecs(tiny_llama, ids):
    """The bf16-rounded exact cache and the prefix prefilled in steps are measured like a
    codec (a noise floor for top-1): bf16 changes the model a little, at 2 bytes a value;
    the stepped prefill is as exact as one forward, at the native 4 bytes; neither takes part
    in same-prompt-twice, which needs a codec."""
    from chatkv.bench.quality import FLOOR_BF16, FLOOR_STEPS, fidelity, prefill, prefill_in_steps

    one, stepped = prefill(tiny_llama, ids[:, :250]), prefill_in_steps(tiny_llama, ids[:, :250], 100)
    assert all(
        torch.allclose(a, b, atol=1e-5)
        for p, q in zip(one, stepped, strict=True)
        for a, b in zip(p, q, strict=True)
    )
    schemes = {FLOOR_BF16: (None, None), FLOOR_STEPS: (None, None), "codec int2": (get_codec("int2"), None)}
    rows = {
        (r["scheme"], r["prefix_tokens"]): r for r in fidelity(tiny_llama, ids, [40, 250], schemes, 64, 16, 4)
    }
    assert len(rows) == 6
    for n in (40, 250):
        bf16, steps, int2 = rows[FLOOR_BF16, n], rows[FLOOR_STEPS, n], rows["codec int2", n]
        assert 0.0 < bf16["kl_mean"] < int2["kl_mean"]
        assert steps["kl_mean"] < 1e-6 and steps["top1_agreement"] == 1.0
        assert bf16["ratio_vs_fp16"] == 1.0 and steps["ratio_vs_fp16"] == 2.0  # float32 model


def test_explore_measures_the_frontier_codecs_beside_the_registered_ones(tiny_llama, ids):
    """--explore adds int4 / int2 variants that are not registered (more key bits, smaller
    key groups): each is stored chunk by chunk like a registered codec, and more bits cost
    more bytes and give less KL."""
    from chatkv.bench.quality import fidelity, frontier_codecs, schemes_to_measure
    from chatkv.kv.codecs import CODECS

    rows = schemes_to_measure(explore=True)
    variants = {c.name: c for c in frontier_codecs()}
    assert {f"codec {name}" for name in variants} <= set(rows)
    assert not set(variants) & set(CODECS)
    schemes = {f"codec {n}": (variants[n], None) for n in ("k3 v2", "k6 v5")}
    schemes["codec int4"] = (get_codec("int4"), None)
    got = {r["scheme"]: r for r in fidelity(tiny_llama, ids, [200], schemes, 64, 16, 4)}
    low, mid, high = got["codec k3 v2"], got["codec int4"], got["codec k6 v5"]
    assert low["ratio_vs_fp16"] < mid["ratio_vs_fp16"] < high["ratio_vs_fp16"]
    assert low["kl_mean"] > mid["kl_mean"] > high["kl_mean"] > 0
