"""`chatkv bench resume | quality | decode | batch`: each measures its baseline in the same run.

Arguments are declared here so that building the parser never imports torch;
a benchmark's module is imported only when it runs.
"""

from __future__ import annotations

import argparse
import importlib


def _resume(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--context",
        dest="history_tokens",
        type=int,
        default=4096,
        help="tokens of history to resume (default 4096)",
    )
    p.add_argument("--repeat", type=int, default=3, help="resume measurements; the median is reported")


def _quality(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--text", action="append", help="a UTF-8 text file to evaluate on too, besides the bundled sample"
    )
    p.add_argument("--no-sample", action="store_true", help="measure on the --text files only")
    p.add_argument(
        "--lengths", default="32,256,1024,4096", help="prefix lengths in tokens (default 32,256,1024,4096)"
    )
    p.add_argument(
        "--eval", type=int, default=64, help="teacher-forced tokens after each prefix (default 64)"
    )
    p.add_argument(
        "--greedy", type=int, default=64, help="greedy tokens compared after each prefix (default 64)"
    )
    p.add_argument(
        "--prompts", type=int, default=20, help="short prompts asked twice (default 20, at most 20)"
    )
    p.add_argument("--reply-tokens", type=int, default=32, help="greedy reply tokens per prompt (default 32)")
    p.add_argument(
        "--explore", action="store_true", help="also the policy variants the default was chosen from"
    )


def _decode(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per run (default 128)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each, alternated; the median is reported")


def _batch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", type=int, default=32, help="prompts sharing the system prompt (default 32)")
    p.add_argument("--system-tokens", type=int, default=1000, help="length of the shared system prompt")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    p.add_argument("--batch-size", type=int, default=0, help="sequences decoded together (0: default)")
    p.add_argument(
        "--baseline-prompts",
        type=int,
        default=0,
        help="prompts timed for the generate baseline (0: all); the rate is extrapolated",
    )


BENCHES = {
    "resume": ("re-prefill versus resuming a saved conversation's cache from disk", _resume),
    "quality": (
        "how far each codec's and policy's reloaded cache is from the exact one (KL, top-1, greedy, bytes)",
        _quality,
    ),
    "decode": ("chatkv's decode loop versus transformers generate", _decode),
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

    importlib.import_module(f"chatkv.bench.{args.bench}").run(args, settings_from(args))
    return 0
