"""`chatkv models`: what can be used offline, its size, and its KV chunks on disk."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict


def register(sub, common) -> None:
    p = sub.add_parser(
        "models",
        parents=[common],
        help="list the models usable offline (embedded, loaded before, converted copies)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """List models."""
    from chatkv.cli import settings_from
    from chatkv.fmt import format_bytes
    from chatkv.session import Chat

    models = Chat(settings_from(args)).models()
    if args.json:
        json.dump([asdict(m) for m in models], sys.stdout, indent=2)
        print()
        return 0
    print(f"{'MODEL':<40}  {'KIND':<9}  {'SIZE':>10}  {'KV CHUNKS':>20}  STATUS")
    for m in models:
        size = format_bytes(m.size_bytes) if m.size_bytes else "-"
        chunks = f"{m.chunk_count} / {format_bytes(m.chunk_bytes)}" if m.chunk_count else "none"
        status = "ready" if m.available else "unavailable"
        if m.converted_bytes:
            status += f" (converted copy {format_bytes(m.converted_bytes)})"
        if m.note:
            status += f"; {m.note}"
        name = m.name if len(m.name) <= 40 else "…" + m.name[-39:]
        print(f"{name:<40}  {m.kind:<9}  {size:>10}  {chunks:>20}  {status}")
    print("use one with: chatkv --model NAME (or model.name in your config file)", file=sys.stderr)
    return 0
