"""`chatkv import llm PATH | chatgpt FILE`: bring conversations from elsewhere."""

from __future__ import annotations

import argparse
import json
import sys

from chatkv.cli.args import PathArg
from chatkv.fmt import visible


def register(sub, common) -> None:
    p = sub.add_parser("import", parents=[common], help="import conversations from llm or a ChatGPT export")
    isub = p.add_subparsers(dest="import_kind", metavar="SOURCE", required=True)
    for kind, what, help_ in (
        ("llm", "path", "simonw/llm's logs.db (`llm logs path` prints where it is)"),
        ("chatgpt", "file", "conversations.json of a ChatGPT data export (or the export's .zip)"),
    ):
        q = isub.add_parser(kind, parents=[common], help=f"import {help_}")
        q.add_argument(what, type=PathArg(output=False), help=help_)
        q.add_argument("--dry-run", action="store_true", help="say what would be imported; write nothing")
        q.add_argument("--json", action="store_true")
        q.set_defaults(func=run, kind=kind, source_path_attr=what)


def run(args: argparse.Namespace) -> int:
    """Import conversations; those imported before are skipped."""
    from chatkv.cli import settings_from
    from chatkv.session import Chat

    path = getattr(args, args.source_path_attr)
    report = Chat(settings_from(args)).import_from(args.kind, path, dry_run=args.dry_run)
    if args.json:
        json.dump(
            {
                "source": args.kind,
                "dry_run": args.dry_run,
                "imported": len(report.imported),
                "messages": report.messages,
                "skipped": report.skipped,
                "empty": report.empty,
                "conversations": [
                    {"id": cid, "source": c.source, "title": c.title, "messages": len(c.messages)}
                    for c, cid in report.imported
                ],
            },
            sys.stdout,
            indent=2,
            ensure_ascii=False,
        )
        print()
        return 0
    verb = "would import" if args.dry_run else "imported"
    tty = sys.stdout.isatty()  # titles from a file not looked at yet: no escape sequences run
    for c, cid in report.imported:
        where = f"#{cid}" if cid is not None else "-"
        print(f"{where:>6}  {len(c.messages):>4} messages  {visible(c.title or '(untitled)', tty)}")
    extra = []
    if report.skipped:
        extra.append(f"{report.skipped} already imported")
    if report.empty:
        extra.append(f"{report.empty} with no text")
    print(
        f"{verb} {len(report.imported)} conversations ({report.messages} messages)"
        + (f"; skipped {', '.join(extra)}" if extra else ""),
        file=sys.stderr,
    )
    return 0
