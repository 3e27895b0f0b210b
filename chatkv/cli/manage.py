"""`chatkv ls | show | rm | export | config`: the saved conversations and settings."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

from chatkv.api import ConversationSummary
from chatkv.cli.args import INT64_MAX, PathArg, conversation_id, count
from chatkv.fmt import display_title, format_bytes, relative_time, stats_text, visible

# Titles are stored cut to 60 characters with no mark (store/repo.py); the listing cuts
# them to this width with "…", so that a cut title reads as one.
LS_TITLE_CHARS = 48


def register(sub, common) -> None:
    p = sub.add_parser("ls", parents=[common], help="list saved conversations, most recent first")
    p.add_argument(
        "-q", "--query", default="", help="only conversations whose title or messages contain this"
    )
    p.add_argument("-n", "--limit", type=count(1, INT64_MAX, "a number of conversations"), default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_ls)

    p = sub.add_parser("show", parents=[common], help="print a conversation with its turn statistics")
    p.add_argument("id", type=conversation_id)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_show)

    p = sub.add_parser(
        "rm",
        parents=[common],
        help="delete conversations with their earlier versions, journals and the cache chunks only they use",
    )
    p.add_argument("ids", type=conversation_id, nargs="+", metavar="ID")
    p.set_defaults(func=run_rm)

    p = sub.add_parser("export", parents=[common], help="write a conversation as Markdown or JSON")
    p.add_argument("id", type=conversation_id)
    p.add_argument("--format", "-f", choices=["md", "json"], default="md")
    p.add_argument(
        "--output",
        "-o",
        type=PathArg(output=True, stdin=True),
        help="file to write (default, or '-': standard output)",
    )
    p.set_defaults(func=run_export)

    p = sub.add_parser(
        "config", parents=[common], help="show the effective settings and where they come from"
    )
    p.add_argument("what", nargs="?", choices=["show", "path"], default="show")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_config)


def _chat(args: argparse.Namespace):
    """The session: every face reads and writes conversations through it."""
    from chatkv.cli import settings_from
    from chatkv.session import Chat

    return Chat(settings_from(args))


def summary_dict(c: ConversationSummary) -> dict:
    return {
        "id": c.id,
        "title": c.title,
        "model": c.model,
        "message_count": c.message_count,  # in `show --json` too, where "messages" is the list
        "messages": c.message_count,  # ls's count under its first name, kept for scripts
        "tokens": c.token_count,
        "cache": c.cache_state,
        "cache_bytes": c.cache_bytes,
        "created_at": c.created_at.isoformat(),
        "updated_at": c.updated_at.isoformat(),
    }


def run_ls(args: argparse.Namespace) -> int:
    """List saved conversations."""
    chat = _chat(args)
    convs = chat.list_conversations(query=args.query, limit=args.limit)
    color = sys.stdout.isatty() and not args.json
    matches = _matches(chat, args.query, convs, ("\x1b[1m", "\x1b[22m") if color else ("[", "]"))
    if args.json:
        rows = [summary_dict(c) | ({"match": matches.get(c.id)} if args.query else {}) for c in convs]
        json.dump(rows, sys.stdout, indent=2, ensure_ascii=False)
        print()
        return 0
    if not convs:
        if args.query:
            print(f"no conversations match {args.query!r}; `chatkv ls` lists them all", file=sys.stderr)
        else:
            print('no conversations yet; start one with: chatkv ask "Hello"', file=sys.stderr)
        return 0
    now, tty = datetime.now(UTC), sys.stdout.isatty()
    print(f"{'ID':>5}  {'UPDATED':>9}  {'MSGS':>4}  {'TOKENS':>6}  {'CACHE':<14}  TITLE")
    for c in convs:
        cache = f"disk {format_bytes(c.cache_bytes)}" if c.cache_state == "disk" else c.cache_state
        print(
            f"{c.id:>5}  {relative_time(c.updated_at, now):>9}  {c.message_count:>4}  "
            f"{c.token_count:>6}  {cache:<14}  {visible(display_title(c.title, LS_TITLE_CHARS), tty)}"
        )
        if c.id in matches:
            print(f"{'':>5}  {visible(matches[c.id], tty)}")
    return 0


def _matches(chat, query: str, convs: list[ConversationSummary], mark: tuple[str, str]) -> dict[int, str]:
    """Each listed conversation's best match for `query`, in context on one line
    ("assistant: …the [capital] of…"), as `llm logs -q` shows it."""
    if not query or not convs:
        return {}
    wanted = {c.id for c in convs}
    out: dict[int, str] = {}
    hits = chat.search(query, limit=100 * len(convs), mark=mark, conversation_ids=list(wanted))
    for hit in sorted(hits, key=lambda h: h.message_id is None):  # a message says more than its title
        if hit.conversation_id in wanted and hit.conversation_id not in out:
            out[hit.conversation_id] = f"{hit.role}: " + " ".join(hit.snippet.split())
    return out


def run_show(args: argparse.Namespace) -> int:
    """Print a conversation."""
    from chatkv.session import message_dict

    chat = _chat(args)
    c = chat.get_conversation(args.id)
    msgs = chat.messages(args.id)
    if args.json:
        json.dump(
            summary_dict(c) | {"system_prompt": c.system_prompt, "messages": [message_dict(m) for m in msgs]},
            sys.stdout,
            indent=2,
            ensure_ascii=False,
        )
        print()
        return 0
    first_user = next((m.content for m in msgs if m.role == "user"), "")
    age = relative_time(c.updated_at, datetime.now(UTC))
    tty = sys.stdout.isatty()
    print(visible(f"# {display_title(c.title, source=first_user)}  [{c.id}, {c.model}, {age}]", tty))
    if c.system_prompt:
        print(visible(f"\nsystem: {c.system_prompt}", tty))
    for m in msgs:
        print(visible(f"\n{m.role}: {m.content}", tty))
        if m.stats:
            print(f"  [{stats_text(m.stats)}]")
    return 0


def run_rm(args: argparse.Namespace) -> int:
    """Delete conversations, with every cache chunk only they used."""
    from chatkv.errors import NotFoundError

    ids = list(dict.fromkeys(args.ids))  # `rm 6 6` deletes 6 once
    chat = _chat(args)
    try:
        missing = [cid for cid in ids if not _exists(chat, cid)]
        if missing:  # all ids are checked before any is deleted
            which = ", ".join(map(str, missing))
            raise NotFoundError(
                f"conversation{'s' if len(missing) > 1 else ''} {which} not found; nothing was deleted "
                "(`chatkv ls` lists conversations)"
            )
        for cid in ids:
            chat.delete(cid)  # with the cache chunks only this conversation used
            print(f"deleted conversation {cid}", file=sys.stderr)
    finally:
        chat.close()
    return 0


def _exists(chat, cid: int) -> bool:
    from chatkv.errors import NotFoundError

    try:
        chat.get_conversation(cid)
    except NotFoundError:
        return False
    return True


def run_export(args: argparse.Namespace) -> int:
    """Export a conversation."""
    text = _chat(args).export(args.id, args.format)
    if args.output and args.output != "-":  # '-' is standard output, as for batch
        from chatkv.outfile import open_private

        with open_private(args.output) as f:
            f.write(text + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    else:  # on a terminal, stored control characters written out (as `show` does)
        sys.stdout.write(visible(text, sys.stdout.isatty()) + "\n")
    return 0


def run_config(args: argparse.Namespace) -> int:
    """Show settings."""
    from chatkv.cli import settings_from
    from chatkv.config import env_name
    from chatkv.paths import config_file, data_dir

    if args.what == "path":
        path = config_file()
        print(path)
        if not path.exists():
            print(
                "chatkv: that file does not exist yet; create it to override the defaults "
                "(`chatkv config show` lists every key)",
                file=sys.stderr,
            )
        return 0
    from dataclasses import asdict

    from chatkv.config import shown
    from chatkv.engine.defaults import generation_defaults, recommended

    settings = settings_from(args)
    values = {key: shown(value) for key, value in settings.as_dict().items()}  # no URL's password
    # Sampling the user did not set comes from the model: show what will be used, and why.
    _, source = recommended(settings.model.name)
    from_model = {}
    for k, v in asdict(generation_defaults(settings)).items():
        key = f"generation.{k}"
        if key in values and values[key] != v:
            values[key], from_model[key] = v, source
    if args.json:
        json.dump(
            {
                "config_file": str(config_file()),
                "data_dir": str(data_dir()),
                "settings": values,
                "from_model": from_model,
            },
            sys.stdout,
            indent=2,
        )
        print()
        return 0
    print(f"# config file: {config_file()}\n# data dir:    {data_dir()}")
    for key, value in values.items():
        why = f"; from the model ({from_model[key]})" if key in from_model else ""
        print(f"{key} = {json.dumps(value)}    # {env_name(key)}{why}")
    return 0
