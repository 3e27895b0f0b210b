"""`chatkv bench batch`: `chatkv batch` over prompts sharing a long system prompt versus
one transformers `generate` per prompt, both measured in the same run.

- baseline: each prompt alone through `model.generate` (greedy), as a script without
  chatkv would do it; with --baseline-prompts N only N are timed and the rest extrapolated.
- first run: `chatkv batch`'s runner on a scratch data dir — the system prompt is
  prefilled once, spilled, and the prompts decode together over it.
- second run: the same prompts from a fresh session (empty live pool, reopened
  database): the system prompt now comes from the chunk store on disk.
- with --ablate, a third run as the second with the lean decode step off (decoding through
  transformers' forward): the lean step's gain in one run, over the same prompts and prefix.
It also counts lines whose greedy reply equals the baseline's.
"""

from __future__ import annotations

import time

from chatkv.api import GenerationSettings
from chatkv.bench.common import emit, load, say, scratch_home

QUESTIONS = [
    "Who wrote this text?",
    "Summarise it in one sentence.",
    "What year is it from?",
    "Name one grievance it lists.",
    "What is its main claim?",
    "Who is it addressed to?",
    "What does it say about rights?",
    "Give it a short title.",
    "What is the tone?",
    "List three key words.",
    "What happens next?",
    "Who signed it?",
    "Explain 'unalienable'.",
    "Is it a law?",
    "What is a tyrant?",
    "Why was it written?",
    "Translate the first line to French.",
    "What is self-evident?",
    "How long is it?",
    "What is its most famous phrase?",
    "Which king is meant?",
    "What are the colonies?",
    "Say it to a child.",
    "What is consent?",
    "Is it still relevant?",
    "What does 'prudence' mean here?",
    "Give a counterargument.",
    "Where was it signed?",
    "What form of government does it favour?",
    "Write a haiku about it.",
    "What do the people have a right to do?",
    "End with one word describing it.",
]


def system_prompt(tokenizer, n_tokens: int) -> str:
    """About n_tokens of the bundled text, as a system prompt."""
    from chatkv.bench.quality import sample_text

    words = sample_text().split()
    head = "You answer questions about the following document.\n\n"
    lo, hi = 1, len(words)
    while lo < hi:  # the fewest words that reach n_tokens
        mid = (lo + hi) // 2
        if len(tokenizer.encode(head + " ".join(words[:mid]))) >= n_tokens:
            hi = mid
        else:
            lo = mid + 1
    return head + " ".join(words[:lo])


def _questions(n: int) -> list[str]:
    k = len(QUESTIONS)
    return [QUESTIONS[i % k] + (f" (variant {i // k})" if i >= k else "") for i in range(n)]


def _batch_run(settings, lm, items, batch_size: int) -> tuple[dict, dict]:
    """One `chatkv batch` run over `items` in a fresh session; (summary, replies by id)."""
    from copy import deepcopy

    from chatkv.batch import Runner
    from chatkv.paths import db_path
    from chatkv.session import Chat
    from chatkv.store import Store

    chat = Chat(settings, store=Store(db_path()), lm=lm)
    chat.load()
    replies: dict = {}
    runner = Runner(chat, lambda rec: replies.__setitem__(rec["id"], rec), batch_size=batch_size, save="none")
    s = runner.run(deepcopy(items))
    chat.close()  # waits for the prefix's spill (not timed: it runs behind the decoding)
    failed = [r for r in replies.values() if "error" in r]
    if failed:
        raise RuntimeError(f"batch run failed on {len(failed)} prompts: {failed[0]['error']}")
    return {
        "seconds": round(s.elapsed_s, 3),
        "completion_tokens": s.completion_tokens,
        "tokens_per_s": round(s.completion_tokens / s.elapsed_s, 2),
        "first_reply_s": round(s.first_reply_s or 0.0, 3),
        "prefix_tokens": s.prefix_tokens,
        "prefix_from_disk": s.prefix_from_disk,
    }, replies


def run(args, settings) -> dict:
    import torch

    from chatkv.batch import Item, Runner
    from chatkv.engine.batch import default_batch_size
    from chatkv.session import Chat

    quiet = getattr(args, "json", False)
    lm = load(settings)
    gen = GenerationSettings(max_new_tokens=args.new_tokens, temperature=0.0)
    system = system_prompt(lm.tokenizer, args.system_tokens)
    items = [
        Item(line=i + 1, id=i, prompt=q, system=system, settings=gen)
        for i, q in enumerate(_questions(args.prompts))
    ]
    batch_size = args.batch_size or default_batch_size(lm.device)
    with scratch_home():
        chat = Chat(settings, lm=lm)
        chat.load()
        renderer = Runner(chat, lambda rec: None)
        prompts = []
        for item in items:
            renderer.render(item)
            prompts.append(item.ids)
        chat.close()

        n_base = min(args.baseline_prompts or args.prompts, args.prompts)
        say(
            f"baseline: transformers generate, {n_base} prompt(s) of ~{len(prompts[0])} tokens "
            "one at a time ...",
            quiet,
        )
        base_replies, base_tokens = [], 0
        with torch.inference_mode():  # warm-up, not timed: the first call pays one-time setup costs
            x = torch.tensor([prompts[0][-64:]], device=lm.device)
            lm.model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=lm.eos_ids[0],
            )
        t0 = time.perf_counter()
        for ids in prompts[:n_base]:
            x = torch.tensor([ids], device=lm.device)
            with torch.inference_mode():
                out = lm.model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=lm.eos_ids[0],
                    eos_token_id=lm.eos_ids,
                )
            new = [t for t in out[0, len(ids) :].tolist() if t not in lm.eos_ids]
            base_tokens += len(new)
            base_replies.append(lm.tokenizer.decode(new, skip_special_tokens=True))
        base_s = time.perf_counter() - t0

        say(f"chatkv batch, first run ({args.prompts} prompts, batch size {batch_size}) ...", quiet)
        first, replies1 = _batch_run(settings, lm, items, batch_size)
        say("chatkv batch, second run (system prompt from disk) ...", quiet)
        second, replies2 = _batch_run(settings, lm, items, batch_size)
        ablated = replies3 = None
        if getattr(args, "ablate", False):
            from chatkv.engine import lean

            say("chatkv batch, third run (as the second, through transformers' forward) ...", quiet)
            lean.set_enabled(lm.model, False)
            try:
                ablated, replies3 = _batch_run(settings, lm, items, batch_size)
            finally:
                lean.set_enabled(lm.model, True)

    base_rate = base_tokens / base_s
    same_base = sum(replies1[i]["reply"] == base_replies[i] for i in range(n_base))
    same_runs = sum(replies1[i]["reply"] == replies2[i]["reply"] for i in range(args.prompts))
    result = {
        "benchmark": "batch",
        "model": lm.name,
        "device": lm.description,
        "codec": settings.cache.codec,
        "prompts": args.prompts,
        "prompt_tokens": len(prompts[0]),
        "system_tokens": first["prefix_tokens"],
        "new_tokens": args.new_tokens,
        "batch_size": batch_size,
        "cpu_threads": torch.get_num_threads(),
        "baseline": {
            "prompts_timed": n_base,
            "seconds": round(base_s, 3),
            "completion_tokens": base_tokens,
            "tokens_per_s": round(base_rate, 2),
            "seconds_all_prompts": round(base_s * args.prompts / n_base, 3),
        },
        "first_run": first,
        "second_run": second,
        "throughput_speedup": round(first["tokens_per_s"] / base_rate, 2),
        "wall_speedup": round(base_s * args.prompts / n_base / first["seconds"], 2),
        "first_reply_speedup_second_run": round(
            first["first_reply_s"] / max(second["first_reply_s"], 1e-9), 2
        ),
        "greedy_identical_to_baseline": f"{same_base}/{n_base}",
        "second_run_identical_to_first": f"{same_runs}/{args.prompts}",
    }
    if ablated is not None and replies3 is not None:
        same_ablated = sum(replies2[i]["reply"] == replies3[i]["reply"] for i in range(args.prompts))
        result["forward_run"] = ablated
        result["lean_speedup"] = round(second["tokens_per_s"] / ablated["tokens_per_s"], 2)
        result["forward_run_identical_to_second"] = f"{same_ablated}/{args.prompts}"
    est = "" if n_base == args.prompts else ", est."
    lines = [
        f"chatkv bench batch — {lm.name} on {lm.description}, {torch.get_num_threads()} threads, "
        f"codec {settings.cache.codec}",
        f"{args.prompts} prompts of ~{len(prompts[0])} tokens ({first['prefix_tokens']} shared), "
        f"{args.new_tokens} new tokens each, batch size {batch_size}",
        f"  generate, one prompt at a time : {base_rate:7.1f} tok/s  "
        f"({result['baseline']['seconds_all_prompts']:.1f} s for all{est})",
        f"  chatkv batch, first run        : {first['tokens_per_s']:7.1f} tok/s  ({first['seconds']:.1f} s)  "
        f"-> {result['throughput_speedup']:.1f}x throughput",
        f"  first reply: first run {first['first_reply_s']:.2f} s, "
        f"second run {second['first_reply_s']:.2f} s "
        f"({second['prefix_from_disk']} prefix tokens from disk) -> "
        f"{result['first_reply_speedup_second_run']:.1f}x sooner",
        f"  greedy replies identical to generate: {same_base}/{n_base}; second run identical to first: "
        f"{same_runs}/{args.prompts}",
    ]
    if ablated is not None:
        lines.append(
            f"  through transformers' forward : {ablated['tokens_per_s']:7.1f} tok/s  -> lean step "
            f"{result['lean_speedup']:.2f}x (second run); replies identical: "
            f"{result['forward_run_identical_to_second']}"
        )
    emit(result, getattr(args, "json", False), lines)
    return result
