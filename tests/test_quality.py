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
