"""`chatkv bench decode`: tokens per second of chatkv's decode loop versus
transformers' `generate`, same model, same prompt, same number of greedy tokens."""

from __future__ import annotations

import statistics
import time

from chatkv.api import GenerationSettings
from chatkv.bench.common import emit, load, say


def run(args, settings) -> dict:
    import torch

    from chatkv.engine.generate import generate
    from chatkv.engine.model import chat_ids
    from chatkv.kv import live

    quiet = getattr(args, "json", False)
    lm = load(settings)
    ids = chat_ids(
        lm.tokenizer, [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
    )
    n = args.tokens
    gs = GenerationSettings(max_new_tokens=n, temperature=0.0)

    def ours() -> float:
        t0 = time.perf_counter()
        # no EOS: both loops produce exactly n tokens
        got = sum(
            1
            for s in generate(lm.model, ids, live.new_cache(lm.model), 0, gs, [], 10**9)
            if s.token is not None
        )
        assert got == n
        return n / (time.perf_counter() - t0)

    def theirs() -> float:
        x = torch.tensor([ids], device=lm.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = lm.model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=lm.tokenizer.pad_token_id or 0,
            )
        assert out.shape[1] - x.shape[1] == n
        return n / (time.perf_counter() - t0)

    say(f"decoding {n} tokens, {args.repeat} runs each ...", quiet)
    ours(), theirs()  # warm-up
    a, b = [], []
    for _ in range(args.repeat):
        a.append(ours())
        b.append(theirs())
    result = {
        "benchmark": "decode",
        "model": settings.model.name,
        "device": lm.description,
        "tokens": n,
        "prompt_tokens": len(ids),
        "chatkv_tps": statistics.median(a),
        "generate_tps": statistics.median(b),
    }
    result["ratio"] = result["chatkv_tps"] / result["generate_tps"]
    emit(
        result,
        args.json,
        [
            f"decode bench: {lm.description}, {n} tokens after a {len(ids)}-token prompt",
            f"  chatkv loop:           {result['chatkv_tps']:7.1f} tokens/s",
            f"  transformers generate: {result['generate_tps']:7.1f} tokens/s",
            f"  ratio: {result['ratio']:.2f}x",
        ],
    )
    return result
