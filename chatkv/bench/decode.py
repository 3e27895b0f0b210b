"""`chatkv bench decode`: tokens per second of chatkv's decode loop versus transformers'
`generate` and llama.cpp on the same GGUF (when llama-cpp-python is installed), at a short
and a long context, plus prefill tokens per second at the long one (with --ablate also
chatkv's prefill through transformers' forward instead of the lean prefill).

Each context is prefilled once by chatkv and once by llama.cpp (the prefill figures),
then the decode runs are interleaved (chatkv, generate, llama.cpp, chatkv, ...) over
copies of that prefill, so that a machine whose speed drifts moves every figure alike;
medians are reported, and each decode ratio is the median of the ratios within a round.
chatkv's rate is timed from its first token to its last; `generate` gets a copy of the
prefilled cache too, so both time decoding only.
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any

from chatkv.api import GenerationSettings
from chatkv.bench.common import emit, history_messages, load, say


def _contexts(lm: Any, long_tokens: int) -> list[list[int]]:
    """The prompts: a one-line question (about 40 tokens), and a chat cut to `long_tokens`."""
    from chatkv.engine.model import chat_ids

    short = chat_ids(
        lm.tokenizer, [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
    )
    out = [short]
    if long_tokens > len(short):
        out.append(chat_ids(lm.tokenizer, history_messages(lm.tokenizer, long_tokens))[:long_tokens])
    return out


def run(args, settings) -> dict:
    import torch

    from chatkv.bench.peer import open_peer
    from chatkv.engine import lean
    from chatkv.engine.generate import generate, prefill
    from chatkv.kv import live

    quiet = getattr(args, "json", False)
    lm = load(settings)
    n = args.tokens
    gs = GenerationSettings(max_new_tokens=n, temperature=0.0)
    contexts = _contexts(lm, args.long_context)
    peer, peer_note = open_peer(settings.model.name, max(map(len, contexts)) + n + 8, torch.get_num_threads())
    say(peer_note, quiet)

    def ours(ids: list[int], prefilled: live.Layers, lean_step: bool = True) -> float:
        """Decode tokens/s of chatkv's generate() over a copy of the prefilled cache (ids[:-1]):
        n tokens, no EOS, timed from the first token (a one-token prefill) to the last."""
        lean.set_enabled(lm.model, lean_step)
        try:
            cache = live.cache_from_layers(lm.model, prefilled)  # a copy
            steps = generate(lm.model, ids, cache, len(ids) - 1, gs, [], 10**9)
            next(steps)
            t1 = time.perf_counter()
            got = 1 + sum(1 for s in steps if s.token is not None)
            t2 = time.perf_counter()
        finally:
            lean.set_enabled(lm.model, True)
        assert got == n
        return (n - 1) / (t2 - t1)

    def our_prefill(ids: list[int], lean_step: bool = True) -> tuple[float, live.Layers]:
        """Prefill tokens/s of ids[:-1] from nothing, and the cache it made (per layer k, v);
        without `lean_step`, through transformers' forward."""
        lean.set_enabled(lm.model, lean_step)
        try:
            cache = live.new_cache(lm.model)
            t0 = time.perf_counter()
            prefill(lm.model, ids[:-1], cache, 0)
            t1 = time.perf_counter()
        finally:
            lean.set_enabled(lm.model, True)
        return (len(ids) - 1) / (t1 - t0), live.layers_of(cache)

    def theirs(ids: list[int], prefilled: live.Layers) -> float:
        """transformers' generate over a copy of the prefilled cache (ids[:-1]): n forwards."""
        from transformers import DynamicCache

        cache = DynamicCache(config=lm.model.config)
        for layer, (k, v) in zip(live.kv_layers(cache), prefilled, strict=True):
            layer.update(k.clone(), v.clone())
        x = torch.tensor([ids], device=lm.device)
        t0 = time.perf_counter()
        with torch.inference_mode(), warnings.catch_warnings():
            # newer transformers call it `cache` (and warn, on the user's terminal, about the old
            # name); older ones know only `past_key_values`
            warnings.filterwarnings("ignore", ".*past_key_values.*deprecated", FutureWarning)
            out = lm.model.generate(
                x,
                attention_mask=torch.ones_like(x),
                past_key_values=cache,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=lm.tokenizer.pad_token_id or 0,
            )
        assert out.shape[1] - x.shape[1] == n
        return n / (time.perf_counter() - t0)

    say(
        f"decoding {n} tokens at {', '.join(str(len(c)) for c in contexts)} tokens of context, "
        f"{args.repeat} runs each ...",
        quiet,
    )
    # Warm-up: the first calls build the lean step, allocate, and fault pages in.
    _, warm = our_prefill(contexts[0])
    ours(contexts[0], warm)
    if peer is not None:
        peer.prefill(contexts[0])
        peer.decode(2)
    rows = []
    for ids in contexts:
        # Each prefill once (the long one takes seconds), then the decode runs over copies of
        # its cache: chatkv, generate and llama.cpp in turn.
        figures: dict[str, list[float]] = {}
        p, prefilled = our_prefill(ids)
        figures["chatkv_prefill_tps"] = [p]
        if peer is not None:
            figures["llamacpp_prefill_tps"] = [(len(ids) - 1) / peer.prefill(ids[:-1])]
        if args.ablate and len(ids) > 256:
            figures["chatkv_forward_prefill_tps"] = [our_prefill(ids, lean_step=False)[0]]
        for _ in range(args.repeat):
            figures.setdefault("chatkv_tps", []).append(ours(ids, prefilled))
            figures.setdefault("generate_tps", []).append(theirs(ids, prefilled))
            if args.ablate:
                figures.setdefault("chatkv_forward_tps", []).append(ours(ids, prefilled, lean_step=False))
            if peer is not None:
                peer.rewind(len(ids) - 1)
                peer.llm.eval(ids[-1:])  # the last prompt token, as chatkv's one-token prefill
                figures.setdefault("llamacpp_tps", []).append(peer.decode(n - 1))
        row: dict[str, Any] = {"context_tokens": len(ids)}
        row.update({k: statistics.median(v) for k, v in figures.items()})
        row["vs_generate"] = statistics.median(
            a / b for a, b in zip(figures["chatkv_tps"], figures["generate_tps"], strict=True)
        )
        if peer is not None:
            row["vs_llamacpp"] = statistics.median(
                a / b for a, b in zip(figures["chatkv_tps"], figures["llamacpp_tps"], strict=True)
            )
            row["prefill_vs_llamacpp"] = row["chatkv_prefill_tps"] / row["llamacpp_prefill_tps"]
        rows.append(row)
    result = {
        "benchmark": "decode",
        "model": settings.model.name,
        "device": lm.description,
        "threads": torch.get_num_threads(),
        "tokens": n,
        "decode_step": "lean" if lean.lean_for(lm.model) is not None else "transformers forward",
        "peer": peer_note,
        "contexts": rows,
    }
    lines = [f"decode bench: {lm.description}, {n} greedy tokens, {result['threads']} threads; {peer_note}"]
    for row in rows:
        lines.append(f"  at {row['context_tokens']:,} tokens of context:")
        lines.append(f"    chatkv decode ({result['decode_step']} step): {row['chatkv_tps']:7.1f} tokens/s")
        if "chatkv_forward_tps" in row:
            lines.append(f"    chatkv loop, transformers forward: {row['chatkv_forward_tps']:7.1f} tokens/s")
        lines.append(
            f"    transformers generate:      {row['generate_tps']:7.1f} tokens/s   "
            f"chatkv/generate {row['vs_generate']:.2f}x"
        )
        if peer is not None:
            lines.append(
                f"    llama.cpp decode:           {row['llamacpp_tps']:7.1f} tokens/s   "
                f"chatkv/llama.cpp {row['vs_llamacpp']:.2f}x"
            )
        if len(row) and row["context_tokens"] > 256:
            lines.append(f"    chatkv prefill:             {row['chatkv_prefill_tps']:7.1f} tokens/s")
            if "chatkv_forward_prefill_tps" in row:
                lines.append(
                    f"    prefill, transformers forward: {row['chatkv_forward_prefill_tps']:7.1f} tokens/s   "
                    f"lean/forward {row['chatkv_prefill_tps'] / row['chatkv_forward_prefill_tps']:.2f}x"
                )
            if peer is not None:
                lines.append(
                    f"    llama.cpp prefill:          {row['llamacpp_prefill_tps']:7.1f} tokens/s   "
                    f"chatkv/llama.cpp {row['prefill_vs_llamacpp']:.2f}x"
                )
    emit(result, args.json, lines)
    return result
