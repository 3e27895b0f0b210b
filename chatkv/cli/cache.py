"""`chatkv cache stats | gc | verify | rebuild`: the chunk store on disk."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from chatkv.cli.args import byte_size
from chatkv.config import parse_size
from chatkv.errors import UsageError


def register(sub, common) -> None:
    p = sub.add_parser("cache", parents=[common], help="inspect and trim the KV chunk store")
    csub = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    s = csub.add_parser("stats", parents=[common], help="chunks, bytes, codecs and models on disk")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_stats)
    g = csub.add_parser(
        "gc", parents=[common], help="remove orphans, then least recently used chunks down to the budget"
    )
    g.add_argument(
        "--max-bytes",
        type=byte_size,
        help="budget, e.g. 500MiB (default: cache.disk_bytes; with cache.url, cache.remote_bytes); "
        "0 empties the store",
    )
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=run_gc)
    v = csub.add_parser(
        "verify",
        parents=[common],
        help="check every chunk's checksum; remove bad ones (exit 1 if any were bad)",
    )
    v.add_argument("--dry-run", action="store_true", help="report only, remove nothing")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=run_verify)
    r = csub.add_parser(
        "rebuild", parents=[common], help="drop the chunk index and index again every sound chunk file"
    )
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=run_rebuild)


def _chat(args: argparse.Namespace):
    from chatkv.cli import settings_from
    from chatkv.session import Chat

    return Chat(settings_from(args))


def run_stats(args: argparse.Namespace) -> int:
    """Show what the chunk store holds."""
    from chatkv.fmt import format_bytes

    stats = _chat(args).cache_stats()  # models are named as chatkv has seen them load
    if args.json:
        json.dump(stats, sys.stdout, indent=2, default=str)
        print()
        return 0
    print(f"{stats['count']} chunks, {format_bytes(stats['bytes'])} in {stats['kv_dir']}")
    for k, v in (stats.get("by_codec") or {}).items():
        print(f"  codec {k}: {v['count']} chunks, {format_bytes(v['bytes'])}")
    for k, v in (stats.get("by_fingerprint") or {}).items():
        who = f"{v['model']} ({k[:12]})" if v.get("model") else f"{k} (not loaded since chatkv kept names)"
        print(f"  model {who}: {v['count']} chunks, {format_bytes(v['bytes'])}")
    if stats["unreachable"]:
        print(
            f"  {stats['unreachable']} chunks ({format_bytes(stats['unreachable_bytes'])}) cannot attach "
            "(an earlier chunk of their chain is gone); evicted first"
        )
    for tier, t in stats["tiers"].items():
        if "error" in t:
            print(f"  {tier}: {t['where']} could not be listed ({t['error']})")
        else:
            where = f" in {t['where']}" if t.get("where") else ""
            print(
                f"  {tier}: {t['count']} {'caches' if tier == 'memory' else 'chunks'}, "
                f"{format_bytes(t['bytes'])}{where}"
            )
    if stats["temp_files"]:
        print(
            f"  {stats['temp_files']} leftover temp files, {format_bytes(stats['temp_bytes'])} "
            "(`chatkv cache gc` removes them)"
        )
    return 0


def run_gc(args: argparse.Namespace) -> int:
    """Trim the chunk store."""
    from chatkv.fmt import format_bytes

    chat = _chat(args)
    if args.max_bytes is not None:
        try:
            budget = parse_size(args.max_bytes)
        except ValueError:
            raise UsageError(f"--max-bytes {args.max_bytes!r} is not a size; use e.g. 500MiB or 0") from None
    else:
        budget = chat.cache_budget()
    report = chat.cache_gc(budget)
    if args.json:
        json.dump(asdict(report) | {"budget": budget}, sys.stdout)
        print()
    else:
        print(
            f"removed {report.removed} chunks ({format_bytes(report.freed)}), {report.orphan_files} orphan "
            f"files, {report.missing_files} index rows without a file, {report.damaged_rows} damaged "
            f"index rows; budget {format_bytes(budget) if budget is not None else 'unlimited'}"
        )
        if report.local_removed or report.objects_removed:
            print(
                f"local copies: removed {report.local_removed} ({format_bytes(report.local_freed)}); bucket: "
                f"removed {report.objects_removed} objects no index row names "
                f"({format_bytes(report.objects_freed)})"
            )
        if report.remote_error:
            print(
                f"the bucket was left alone this time ({report.remote_error}); "
                "run gc again once it is reachable"
            )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Check every chunk. Exits 1 when any was bad (removed, or with --dry-run would be), so
    that a script notices damage."""
    report = _chat(args).cache_verify(fix=not args.dry_run)
    if args.json:
        json.dump(
            {
                "checked": report.checked,
                "removed": report.removed,
                "unreadable": report.unreadable,
                "refetched": report.refetched,
                "bad": [{"key": k, "problem": p} for k, p in report.bad],
            },
            sys.stdout,
        )
        print()
    else:
        for key, problem in report.bad:
            print(f"bad chunk {key[:16]}: {problem}")
        action = "would remove" if args.dry_run else "removed"
        count = len(report.bad) if args.dry_run else report.removed
        print(f"checked {report.checked} chunks: {len(report.bad)} bad, {action} {count}")
        if report.refetched:
            print(f"{report.refetched} damaged local copies were replaced by the bucket's sound objects")
        if report.unreadable:
            print(f"{report.unreadable} chunks could not be read this time (kept); run verify again later")
    return 1 if report.bad else 0


def run_rebuild(args: argparse.Namespace) -> int:
    """Drop the chunk index and rebuild it from the chunk files' own metadata."""
    from chatkv.fmt import format_bytes

    report = _chat(args).cache_rebuild()
    if args.json:
        json.dump(
            {
                "indexed": report.indexed,
                "bytes": report.bytes,
                "objects": report.objects,
                "bad": [{"file": f, "problem": p} for f, p in report.bad],
            },
            sys.stdout,
        )
        print()
    else:
        for name, problem in report.bad:
            print(f"skipped {name}: {problem}")
        print(
            f"indexed {report.indexed} chunks ({format_bytes(report.bytes)}); skipped {len(report.bad)} "
            "files that failed verification (`chatkv cache gc` removes them later)"
        )
    return 0
