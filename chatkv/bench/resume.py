"""`chatkv bench resume`: first token of a resumed conversation versus re-prefilling it.

Both are measured in the same run on the same prompt: a conversation of about
`--context` tokens plus a new question. The resume uses a fresh Chat (empty live
pool, reopened database), as a new process would; model load is not counted.
With `--cache-url`, chunks also go to that object store, and each resume starts with an
empty local kv/ (a cold local disk, as on another host): every chunk comes from the remote.
"""

from __future__ import annotations

import shutil
import time

from chatkv.api import GenerationSettings
from chatkv.bench.common import emit, history_messages, load, say, scratch_home


def run(args, settings) -> dict:
    import torch

    from chatkv.bench.peer import open_peer
    from chatkv.engine.generate import generate
    from chatkv.kv import live
    from chatkv.paths import db_path, kv_dir
    from chatkv.session import Chat
    from chatkv.store import Store

    quiet = getattr(args, "json", False)
    remote = getattr(args, "cache_url", None)
    if remote:
        settings = settings.copy()
        settings.set("cache.url", remote, "--cache-url")
    lm = load(settings)
    one = GenerationSettings(max_new_tokens=1, temperature=0.0)
    with scratch_home():
        chat = Chat(settings, lm=lm)
        chat.load()
        msgs = history_messages(lm.tokenizer, args.history_tokens)
        conv = chat.new_conversation(system_prompt="", history=msgs)
        say(
            f"prefilling {args.history_tokens} tokens of history, spilling as {settings.cache.codec} ...",
            quiet,
        )
        turn = chat.send(conv.id, "Summarise our conversation in one sentence.", one)
        list(turn)
        chat.close()  # waits for the spill
        disk_bytes = chat.store.chunk_stats()["bytes"]

        resumes = []
        for _ in range(args.repeat):
            if remote:
                shutil.rmtree(kv_dir(), ignore_errors=True)  # cold local disk: fetch everything
            fresh = Chat(settings, store=Store(db_path()), lm=lm)  # empty live pool, as in a new process
            fresh.load()
            t = fresh.regenerate(conv.id, one)
            list(t)
            resumes.append(t.stats)
            fresh.close()
        resumes.sort(key=lambda s: s.ttft_s)
        med = resumes[len(resumes) // 2]

        # Baseline: the same prompt with no cache at all.
        ids, _ = chat.fit(chat.render(conv.id)[:-1], 1)
        say(f"re-prefilling {len(ids)} tokens for the baseline ...", quiet)
        t0 = time.perf_counter()
        for _step in generate(lm.model, ids, live.new_cache(lm.model), 0, one, lm.eos_ids, lm.context_limit):
            break
        prefill_s = time.perf_counter() - t0

    # The peer: llama.cpp on the same GGUF has no cache across launches; its first token
    # after a restart costs the prefill of the whole prompt.
    peer, peer_note = open_peer(settings.model.name, len(ids) + 8, torch.get_num_threads())
    say(peer_note, quiet)
    peer_s = peer.prefill(ids) if peer is not None else None

    result = {
        "benchmark": "resume",
        "model": settings.model.name,
        "device": lm.description,
        "codec": settings.cache.codec,
        "prompt_tokens": med.prompt_tokens,
        "cached_tokens": med.cached_tokens,
        "cached_fraction": med.cached_tokens / med.prompt_tokens,
        "cache_source": med.cache_source,
        "cache_url": remote or "",
        "disk_bytes": disk_bytes,
        "reprefill_s": prefill_s,
        "resume_ttft_s": med.ttft_s,
        "resume_load_s": med.cache_load_s,
        "speedup": prefill_s / med.ttft_s,
        "peer": peer_note,
    }
    peer_lines = []
    if peer_s is not None:
        result["llamacpp_ttft_s"] = peer_s
        result["speedup_vs_llamacpp"] = peer_s / med.ttft_s
        result["prefill_vs_llamacpp"] = peer_s / prefill_s
        peer_lines = [
            f"  llama.cpp, first token (prefill of all {len(ids)} tokens): {peer_s * 1000:8.1f} ms",
            f"  resume vs llama.cpp: {result['speedup_vs_llamacpp']:.1f}x sooner; "
            f"chatkv's own re-prefill {result['prefill_vs_llamacpp']:.2f}x llama.cpp's speed",
        ]
    else:
        peer_lines = [f"  {peer_note}"]
    emit(
        result,
        args.json,
        [
            f"resume bench: {lm.description}, codec {result['codec']}, "
            f"{result['prompt_tokens']} prompt tokens",
            f"  re-prefill, first token:  {prefill_s * 1000:10.1f} ms",
            f"  resume from {med.cache_source}, first token: {med.ttft_s * 1000:8.1f} ms "
            f"(chunks loaded in {med.cache_load_s * 1000:.1f} ms, {disk_bytes / 2**20:.1f} MiB on disk)",
            f"  cached: {med.cached_tokens}/{med.prompt_tokens} tokens ({result['cached_fraction']:.1%})",
            f"  speedup: {result['speedup']:.1f}x",
            *peer_lines,
        ],
    )
    return result
