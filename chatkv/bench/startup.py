"""`chatkv bench resume --fresh-process`: the real CLI in fresh processes, A/B interleaved.

In a private scratch data dir (the converted model copies linked in from the real one), a
conversation of about `--context` tokens is saved; then each round runs, one after the
other:

- the re-prefill: `chatkv cache gc --max-bytes 0`, then `chatkv ask -C ID --json -n 1`
  (no chunk left: the whole history is prefilled; the turn spills its cache again);
- the resume: the same `ask` again, which reads that cache (during the model's load);
- `python -c "import torch, transformers"`, the floor any process that runs the model pays;
- the same importing transformers' Llama classes too (`LLAMA_IMPORT`): what any process that
  builds a model through transformers pays before its first weight (`configuration_llama`
  and `activations` pull in `torch._dynamo`, `torch.distributed.tensor` and sympy).

Each round's ratios are taken within the round (the machine's speed drifts between them)
and the medians reported: first token of the re-prefill over the resume's (both from the
turn's start, as `ask --json` reports them), the resume's first token over its chunk-read
time, the resume's whole process over the import's, and the Llama import's over the
import's (the part of the last ratio that no change to chatkv can remove).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from chatkv.bench.common import emit, history_messages, load, say, scratch_home

QUESTION = "Summarise our conversation in one sentence."
LLAMA_IMPORT = (
    "import torch, transformers; "
    "from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM"
)


def _link_models(real: Path, scratch: Path) -> None:
    """Make the real data dir's converted models visible in the scratch one (links, not copies:
    a converted copy is hundreds of MB), and copy the small memo files."""
    scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
    for entry in real.iterdir() if real.is_dir() else []:
        target = scratch / entry.name
        if entry.is_dir():
            target.symlink_to(entry, target_is_directory=True)
        elif entry.suffix == ".json":
            target.write_bytes(entry.read_bytes())
            target.chmod(0o600)


def _cli(settings) -> list[str]:
    m = settings.model
    return [
        sys.executable,
        "-m",
        "chatkv",
        "ask",
        "--model",
        m.name,
        "--device",
        m.device,
        "--dtype",
        m.dtype,
        "--load-in",
        m.load_in,
        "--codec",
        settings.cache.codec,
    ]


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of a whole process, and its standard output; a failure stops the bench."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:5])} ... exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return wall, done.stdout


def run(args, settings) -> dict:
    from chatkv.paths import models_dir
    from chatkv.session import Chat

    quiet = getattr(args, "json", False)
    real_models = models_dir()
    lm = load(settings)  # once, to size the history with its tokenizer (and convert a GGUF first)
    msgs = history_messages(lm.tokenizer, args.history_tokens)
    description = lm.description
    del lm
    rounds = []
    with scratch_home() as home:
        _link_models(real_models, home / "models")
        chat = Chat(settings)
        conv = chat.new_conversation(system_prompt="", history=msgs)
        chat.close()
        env = dict(os.environ, CHATKV_HOME=str(home))
        ask = [*_cli(settings), "-C", str(conv.id), "--json", "-n", "1", "-t", "0", QUESTION]
        gc = [sys.executable, "-m", "chatkv", "cache", "gc", "--max-bytes", "0"]
        floor = [sys.executable, "-c", "import torch, transformers"]
        llama = [sys.executable, "-c", LLAMA_IMPORT]
        for i in range(args.repeat):
            say(f"round {i + 1}/{args.repeat}: re-prefill, resume, imports ...", quiet)
            _run(gc, env)
            _, out = _run(ask, env)
            prefill = json.loads(out)
            resume_wall, out = _run(ask, env)
            resume = json.loads(out)
            floor_wall, _ = _run(floor, env)
            llama_wall, _ = _run(llama, env)
            rounds.append((prefill, resume, resume_wall, floor_wall, llama_wall))

    def med(values) -> float:
        return statistics.median(values)

    st = [r[1]["stats"] for r in rounds]
    su = [r[1]["startup"] for r in rounds]
    result = {
        "benchmark": "resume-fresh-process",
        "model": settings.model.name,
        "device": description,
        "codec": settings.cache.codec,
        "rounds": len(rounds),
        "prompt_tokens": med(s["prompt_tokens"] for s in st),
        "cached_tokens": med(s["cached_tokens"] for s in st),
        "reprefill_cached_tokens": max(r[0]["stats"]["cached_tokens"] for r in rounds),  # 0: all prefilled
        "reprefill_ttft_s": med(r[0]["stats"]["ttft_s"] for r in rounds),
        "resume_ttft_s": med(s["ttft_s"] for s in st),
        "resume_chunk_read_s": med(s["chunk_read_s"] for s in su),
        "resume_chunk_read_cpu_s": med(s["chunk_read_cpu_s"] for s in su),
        "resume_model_load_s": med(s["model_load_s"] for s in su),
        "read_overlapped_load": all(s["read_overlapped_load"] for s in su),
        "read_hidden_by_load": all(s["read_hidden_by_load"] for s in su),
        "resume_process_s": med(r[2] for r in rounds),
        "import_torch_transformers_s": med(r[3] for r in rounds),
        "import_llama_s": med(r[4] for r in rounds),
        # ratios within each round, then their median
        "speedup": med(r[0]["stats"]["ttft_s"] / r[1]["stats"]["ttft_s"] for r in rounds),
        "ttft_over_chunk_read_cpu": med(
            s["ttft_s"] / max(u["chunk_read_cpu_s"], 1e-9) for s, u in zip(st, su, strict=True)
        ),
        "process_over_import": med(r[2] / r[3] for r in rounds),
        "llama_import_over_import": med(r[4] / r[3] for r in rounds),
    }
    r = result
    emit(
        result,
        args.json,
        [
            f"resume bench, fresh processes: {description}, codec {r['codec']}, "
            f"{r['prompt_tokens']:.0f} prompt tokens, {r['rounds']} rounds (medians)",
            f"  re-prefill, first token:        {r['reprefill_ttft_s'] * 1000:10.1f} ms",
            f"  resume, first token:            {r['resume_ttft_s'] * 1000:10.1f} ms "
            f"(chunks read during the load: {'yes' if r['read_overlapped_load'] else 'no'}, "
            f"{r['resume_chunk_read_cpu_s'] * 1000:.1f} ms of processor time, "
            f"{r['resume_chunk_read_s'] * 1000:.1f} ms wall; model load {r['resume_model_load_s']:.2f} s)",
            f"  speedup:                        {r['speedup']:10.1f}x",
            f"  first token / chunk reads:      {r['ttft_over_chunk_read_cpu']:10.2f}x",
            f"  resume, whole process (-n 1):   {r['resume_process_s']:10.2f} s",
            f"  import torch, transformers:     {r['import_torch_transformers_s']:10.2f} s",
            f"  whole process / import:         {r['process_over_import']:10.2f}x",
            f"  import with the Llama classes:  {r['import_llama_s']:10.2f} s "
            f"({r['llama_import_over_import']:.2f}x the import: the floor of the ratio above)",
        ],
    )
    return result
