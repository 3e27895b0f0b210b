"""`chatkv bench resume | quality | decode | batch`: each measures its baseline in the same run.

Arguments are declared here so that building the parser never imports torch;
a benchmark's module is imported only when it runs.
"""

from __future__ import annotations

import argparse

from chatkv.cli.args import PathArg, count

TOKENS = count(1, 1_000_000, "a number of tokens")
REPEAT = count(1, 1000, "a number of runs")
PROMPTS = count(1, 100_000, "a number of prompts")


def _resume(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--context",
        dest="history_tokens",
        type=TOKENS,
        default=4096,
        help="tokens of history to resume (default 4096)",
    )
    p.add_argument("--repeat", type=REPEAT, default=3, help="resume measurements; the median is reported")
    p.add_argument(
        "--fresh-process",
        action="store_true",
        help="run the real CLI in fresh processes: resume versus re-prefill versus importing torch "
        "(rounds of three, --repeat of them; a re-prefill each round)",
    )
    p.add_argument(
        "--cache-url",
        help="resume from this object store (s3://BUCKET/PREFIX or file:///PATH) with a cold local "
        "disk: each resume starts with an empty kv/ and fetches every chunk",
    )


def _quality(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--text",
        action="append",
        type=PathArg(output=False),
        help="a UTF-8 text file to evaluate on too, besides the bundled sample (repeatable)",
    )
    p.add_argument("--no-sample", action="store_true", help="measure on the --text files only")
    p.add_argument(
        "--lengths",
        type=_lengths,
        default="32,256,1024,4096",
        help="prefix lengths in tokens (default 32,256,1024,4096)",
    )
    p.add_argument(
        "--eval", type=TOKENS, default=64, help="teacher-forced tokens after each prefix (default 64)"
    )
    p.add_argument(
        "--greedy", type=TOKENS, default=64, help="greedy tokens compared after each prefix (default 64)"
    )
    p.add_argument(
        "--prompts",
        type=count(0, 20, "a number of prompts"),
        default=20,
        help="short prompts asked twice (default 20, at most 20)",
    )
    p.add_argument(
        "--reply-tokens", type=TOKENS, default=32, help="greedy reply tokens per prompt (default 32)"
    )
    p.add_argument(
        "--explore", action="store_true", help="also the policy variants the default was chosen from"
    )


def _lengths(text: str) -> str:
    """Comma-separated prefix lengths, each a number of tokens (kept as text for the bench)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of token counts, e.g. 32,256,1024")
    for part in parts:
        TOKENS(part)  # raises the same one-line error as any other count
    return ",".join(parts)


def _decode(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=TOKENS, default=64, help="tokens generated per run (default 64)")
    p.add_argument(
        "--repeat", type=REPEAT, default=3, help="runs of each, alternated; the median is reported"
    )
    p.add_argument(
        "--long-context",
        type=count(0, 1_000_000, "a number of tokens"),
        default=3500,
        help="tokens of context for the second measurement and the prefill figure (default 3500; 0: skip)",
    )
    p.add_argument(
        "--ablate",
        action="store_true",
        help="also chatkv's loop through transformers' forward instead of the lean step",
    )


def _batch(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompts", type=PROMPTS, default=32, help="prompts sharing the system prompt (default 32)"
    )
    p.add_argument("--system-tokens", type=TOKENS, default=1000, help="length of the shared system prompt")
    p.add_argument("--new-tokens", type=TOKENS, default=64, help="tokens generated per prompt (default 64)")
    p.add_argument(
        "--batch-size",
        type=count(0, 4096, "a batch size"),
        default=0,
        help="sequences decoded together (0: default)",
    )
    p.add_argument(
        "--baseline-prompts",
        type=count(0, 100_000, "a number of prompts"),
        default=0,
        help="prompts timed for the generate baseline (0: all); the rate is extrapolated",
    )
    p.add_argument(
        "--ablate",
        action="store_true",
        help="also a run through transformers' forward instead of the lean decode step",
    )


BENCHES = {
    "resume": ("re-prefill versus resuming a saved conversation's cache from disk", _resume),
    "quality": (
        "how far each codec's and policy's reloaded cache is from the exact one (KL, top-1, greedy, bytes)",
        _quality,
    ),
    "decode": (
        "chatkv's decode and prefill versus transformers generate and llama.cpp (when installed)",
        _decode,
    ),
    "batch": ("chatkv batch with a shared system prompt versus one generate per prompt", _batch),
}


def register(sub, common) -> None:
    from chatkv.cli import _model_flags

    p = sub.add_parser("bench", parents=[common], help="measure speed and cache quality")
    bsub = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name, (help_text, add_arguments) in BENCHES.items():
        b = bsub.add_parser(name, parents=[common], help=help_text, description=help_text)
        b.add_argument("--json", action="store_true", help="print the result as JSON")
        _model_flags(b, context=False)
        add_arguments(b)
        b.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run a benchmark."""
    from chatkv.cli import settings_from

    # Imported only when it runs (the parser never imports torch), but each by name, so that
    # the import graph shows which modules the bench command uses.
    if args.bench == "resume" and args.fresh_process:
        from chatkv.bench import startup as bench
    elif args.bench == "resume":
        from chatkv.bench import resume as bench
    elif args.bench == "quality":
        from chatkv.bench import quality as bench
    elif args.bench == "decode":
        from chatkv.bench import decode as bench
    elif args.bench == "batch":
        from chatkv.bench import batch as bench
    else:  # the parser's choices make this unreachable
        raise ValueError(f"unknown benchmark {args.bench!r}")
    settings = settings_from(args).copy()
    for key in ("store.url", "cache.url"):  # a bench works in a scratch home, never on a shared store
        settings.set(key, "", "chatkv bench")
    bench.run(args, settings)
    return 0
