"""Quality harness for KV codecs: how much does a stored-and-reloaded cache change the model?

Prefill a prefix once (the exact cache), rebuild a second cache by pushing every layer
through ``codec.encode``/``codec.decode`` chunk by chunk (as the store does), then run the
same continuation teacher-forced on each cache and compare next-token distributions.
New tokens are appended at full precision, as the product does after a resume.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from importlib import resources

import torch
from torch import Tensor
from transformers import DynamicCache

from chatkv.kv.codecs import Codec, nbytes

Layers = list[tuple[Tensor, Tensor]]


@dataclass
class QualityResult:
    """One codec's score against the exact cache (see :func:`measure_quality`)."""

    codec: str
    prefix_tokens: int
    eval_tokens: int
    kl_mean: float
    kl_max: float
    top1_agreement: float
    ppl_exact: float
    ppl_codec: float
    bytes_per_token: float
    fp16_bytes_per_token: float
    ratio_vs_fp16: float


def sample_text() -> str:
    """Bundled public-domain English text (US founding documents, Lincoln), ~2,900 SmolLM2 tokens."""
    return resources.files("chatkv.bench").joinpath("data/sample.txt").read_text(encoding="utf-8")


def cache_layers(cache: DynamicCache) -> Layers:
    """The (keys, values) tensors of every layer of a ``DynamicCache``, each (B, H, T, D)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def roundtrip_layers(layers: Layers, codec: Codec, chunk_tokens: int = 256) -> tuple[Layers, int]:
    """Encode and decode every layer chunk by chunk along T; return the new layers and bytes used."""
    out: Layers = []
    total = 0
    for k, v in layers:
        ks, vs = [], []
        for start in range(0, k.shape[-2], chunk_tokens):
            kc = k[:, :, start : start + chunk_tokens]  # (B, H, t, D)
            vc = v[:, :, start : start + chunk_tokens]
            parts = codec.encode(kc, vc)
            total += nbytes(parts)
            kd, vd = codec.decode(parts, tuple(kc.shape), kc.dtype, kc.device)
            ks.append(kd)
            vs.append(vd)
        out.append((torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)))
    return out, total


@torch.inference_mode()
def prefill(model, prefix_ids: torch.LongTensor) -> Layers:
    """Run the prefix through the model and return its exact per-layer K/V."""
    cache = DynamicCache()
    model(input_ids=prefix_ids, past_key_values=cache, use_cache=True)
    return cache_layers(cache)


@torch.inference_mode()
def continue_logits(model, cont_ids: torch.LongTensor, layers: Layers) -> Tensor:
    """Teacher-force ``cont_ids`` on a fresh cache built from ``layers``; logits (B, T, V) float32."""
    cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in layers])  # update() copies: layers untouched
    out = model(input_ids=cont_ids, past_key_values=cache, use_cache=True)
    return out.logits.float()


def compare_logits(exact: Tensor, approx: Tensor, targets: Tensor) -> dict[str, float]:
    """KL(exact || approx) per position, top-1 agreement, and perplexities of ``targets``.

    ``exact``, ``approx``: (B, T, V) logits for the same positions; ``targets``: (B, T - 1),
    the next tokens scored by positions ``0 .. T-2``.
    """
    lp_e = torch.log_softmax(exact.double(), dim=-1)
    lp_a = torch.log_softmax(approx.double(), dim=-1)
    kl = (lp_e.exp() * (lp_e - lp_a)).sum(dim=-1).clamp_min(0.0)  # (B, T)
    top1 = (exact.argmax(-1) == approx.argmax(-1)).double().mean()
    idx = targets.unsqueeze(-1)
    nll_e = -lp_e[:, :-1].gather(-1, idx).mean()
    nll_a = -lp_a[:, :-1].gather(-1, idx).mean()
    return {
        "kl_mean": kl.mean().item(),
        "kl_max": kl.max().item(),
        "top1": top1.item(),
        "ppl_exact": math.exp(nll_e.item()),
        "ppl_codec": math.exp(nll_a.item()),
    }


def measure_quality(
    model, input_ids: torch.LongTensor, prefix_len: int, codec: Codec, chunk_tokens: int = 256
) -> QualityResult:
    """Score ``codec`` on ``input_ids`` (B, N): prefix ``[:prefix_len]``, evaluate the rest.

    KL and top-1 are taken over every continuation position (each one attends to the
    stored cache); perplexities over continuation tokens 1.. (token 0 is predicted by
    the prefill itself, identical for both caches).
    """
    if not 0 < prefix_len < input_ids.shape[-1] - 1:
        raise ValueError(
            f"prefix_len {prefix_len} must leave >= 2 of {input_ids.shape[-1]} tokens to evaluate"
        )
    input_ids = input_ids.to(model.device)
    prefix, cont = input_ids[:, :prefix_len], input_ids[:, prefix_len:]
    exact_layers = prefill(model, prefix)
    codec_layers, used = roundtrip_layers(exact_layers, codec, chunk_tokens)
    stats = compare_logits(
        continue_logits(model, cont, exact_layers), continue_logits(model, cont, codec_layers), cont[:, 1:]
    )
    n_seq = prefix.shape[0] * prefix_len
    fp16_bpt = sum(k.numel() + v.numel() for k, v in exact_layers) * 2 / n_seq
    bpt = used / n_seq
    return QualityResult(
        codec=codec.name,
        prefix_tokens=prefix_len,
        eval_tokens=cont.shape[-1],
        kl_mean=stats["kl_mean"],
        kl_max=stats["kl_max"],
        top1_agreement=stats["top1"],
        ppl_exact=stats["ppl_exact"],
        ppl_codec=stats["ppl_codec"],
        bytes_per_token=bpt,
        fp16_bytes_per_token=fp16_bpt,
        ratio_vs_fp16=bpt / fp16_bpt,
    )


def measure_speed(codec: Codec, layers: Layers, repeats: int = 5) -> tuple[float, float]:
    """Median milliseconds to encode and to decode all ``layers`` (one chunk's worth of K/V)."""
    enc, dec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        parts = [codec.encode(k, v) for k, v in layers]
        t1 = time.perf_counter()
        for p, (k, _v) in zip(parts, layers, strict=True):
            codec.decode(p, tuple(k.shape), k.dtype, k.device)
        t2 = time.perf_counter()
        enc.append(t1 - t0)
        dec.append(t2 - t1)
    enc.sort()
    dec.sort()
    return enc[len(enc) // 2] * 1e3, dec[len(dec) // 2] * 1e3


def run(args, settings) -> dict:
    """`chatkv bench quality`: score the configured codec (or all with --all) on a text."""
    from dataclasses import asdict
    from pathlib import Path

    from chatkv.bench.common import emit, load, say
    from chatkv.config import CODEC_NAMES
    from chatkv.errors import InputError
    from chatkv.kv.codecs import get_codec

    if args.text:
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read --text {args.text}: {e}") from None
    else:
        text = sample_text()
    lm = load(settings)
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    need = args.prefix + args.eval
    if ids.shape[-1] < need:
        raise InputError(
            f"the text has {ids.shape[-1]} tokens; --prefix {args.prefix} + --eval {args.eval} "
            f"needs {need}: give a longer --text or smaller numbers"
        )
    ids = ids[:, :need]
    names = CODEC_NAMES if args.all else (settings.cache.codec,)
    quiet = args.json
    chunk = prefill(lm.model, ids[:, : settings.cache.chunk_tokens])
    rows = []
    for name in names:
        say(f"measuring {name} on {args.prefix} + {args.eval} tokens ...", quiet)
        codec = get_codec(name)
        r = asdict(measure_quality(lm.model, ids, args.prefix, codec, settings.cache.chunk_tokens))
        r["encode_ms_per_chunk"], r["decode_ms_per_chunk"] = measure_speed(codec, chunk)
        rows.append(r)
    result = {
        "benchmark": "quality",
        "model": settings.model.name,
        "device": lm.description,
        "chunk_tokens": settings.cache.chunk_tokens,
        "results": rows,
    }
    lines = [
        f"quality bench: {lm.description}, {args.prefix}-token prefix, {args.eval} evaluated tokens",
        f"{'codec':<6} {'KL mean':>9} {'KL max':>8} {'top-1':>7} {'ppl exact→codec':>18} "
        f"{'B/token':>8} {'×fp16':>6} {'enc ms':>7} {'dec ms':>7}",
    ]
    for r in rows:
        lines.append(
            f"{r['codec']:<6} {r['kl_mean']:9.5f} {r['kl_max']:8.4f} {r['top1_agreement']:7.1%} "
            f"{r['ppl_exact']:8.3f}→{r['ppl_codec']:<9.3f} {r['bytes_per_token']:8.0f} "
            f"{r['ratio_vs_fp16']:6.3f} {r['encode_ms_per_chunk']:7.1f} {r['decode_ms_per_chunk']:7.1f}"
        )
    emit(result, args.json, lines)
    return result
