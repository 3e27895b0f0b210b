"""`chatkv batch`: answer a JSONL file of prompts, one JSON answer per line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from chatkv.cli.args import PathArg, count
from chatkv.errors import ChatKVError, UsageError

EPILOG = """\
input lines: {"id": ..., "prompt": ...} with optional "system", "messages" (a full chat),
"conversation" (id of a saved conversation to continue) and generation settings
("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop"); no other field.
output lines: one per input line, in input order, each with its "id" and "line": a "reply"
with usage, timings and the "input_digest" of its line, or an "error" saying what is wrong
with that line. An existing output file is resumed: ids answered there are skipped unless
their line changed since.
exit status: 0 every line served, 1 some failed (see their "error" records), 2 usage error."""


def register(sub, common) -> None:
    from chatkv.cli import _gen_flags, _model_flags

    p = sub.add_parser(
        "batch",
        parents=[common],
        help="answer a JSONL file of prompts",
        description="Answer a JSONL file of prompts, decoding several together and computing "
        "shared prefixes (system prompts, few-shot blocks) once.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "input",
        type=PathArg(output=False, stdin=True),
        help="JSONL file of prompts; '-' reads standard input",
    )
    p.add_argument(
        "-o",
        "--output",
        type=PathArg(output=True, stdin=True),
        help="JSONL file for the answers (default: standard output)",
    )
    p.add_argument(
        "--batch-size",
        "-b",
        dest="batch_size",
        type=count(0, 4096, "a batch size"),
        help="sequences decoded together (0, the default: chosen for the device)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--save",
        dest="save",
        action="store_const",
        const="all",
        help="store every line as a conversation (a line continuing one appends to it)",
    )
    g.add_argument(
        "--no-save",
        dest="save",
        action="store_const",
        const="none",
        help="write nothing: no conversation (not even a continued one), no cache to disk",
    )
    r = p.add_mutually_exclusive_group()
    r.add_argument(
        "--resume",
        dest="overwrite",
        action="store_false",
        help="skip ids already answered in the output file (the default when it exists)",
    )
    r.add_argument("--overwrite", dest="overwrite", action="store_true", help="start the output file over")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    _model_flags(p)
    _gen_flags(p)
    p.set_defaults(func=run, save="continue", overwrite=False)


def _read_input(path: str) -> list[str]:
    """The input's lines. Bytes that are not UTF-8 are kept as surrogates (surrogateescape),
    so that only their line fails ("not UTF-8 text"), not the whole batch."""
    try:
        if path == "-":
            stream = getattr(sys.stdin, "buffer", None)
            if stream is None:  # a text stream without bytes underneath (tests, embedding)
                lines = sys.stdin.readlines()
                return [lines[0].removeprefix("\ufeff"), *lines[1:]] if lines else lines
            data = stream.read()
        else:
            data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"input file {path} does not exist") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    # "\n" only: str.splitlines would also split on U+2028 and friends, legal inside JSON strings.
    # A byte-order mark (Windows editors, PowerShell) is no part of the first line.
    return data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="surrogateescape").split("\n")


def run(args: argparse.Namespace) -> int:
    """Answer a JSONL file of prompts."""
    from chatkv.batch import Item, Runner
    from chatkv.cli import check_model, interrupted_code, settings_from
    from chatkv.cli.jsonl import (
        BadLine,
        InOrder,
        Progress,
        answered_ids,
        id_key,
        open_output,
        parse_line,
        read_lines,
        sort_output,
    )
    from chatkv.session import Chat

    settings = settings_from(args)
    check_model(settings)
    if args.batch_size is not None:
        settings.set("batch.batch_size", args.batch_size, source="--batch-size")
    to_file = bool(args.output) and args.output != "-"
    if to_file and args.input != "-" and Path(args.output).resolve() == Path(args.input).resolve():
        raise UsageError("the output file is the input file; choose another -o")
    lines = _read_input(args.input)
    resuming = to_file and not args.overwrite and Path(args.output).exists()
    earlier = answered_ids(Path(args.output)) if resuming else {}
    errors: list[dict] = []
    items: list[Item] = []
    order: list[int] = []  # the lines that get a record in this run, in input order
    id_lines: dict[str, int] = {}
    skipped = changed = 0
    chat = Chat(settings)
    for n, text in read_lines(lines):
        try:
            item = parse_line(n, text, chat.defaults)
        except ChatKVError as e:
            errors.append({"id": e.id if isinstance(e, BadLine) else None, "line": n, "error": str(e)})
            order.append(n)
            continue
        key = id_key(item.id)
        if key in id_lines:
            why = f"duplicate id {key}; line {id_lines[key]} has it"
            if item.id == n and not item.given_id:
                why = f"no id, and its line number {n} is line {id_lines[key]}'s id; give every line an id"
            errors.append({"id": item.id, "line": n, "error": why})
            order.append(n)
            continue
        id_lines[key] = n
        answer = earlier.get(key)
        if answer is not None and answer.digest in (None, item.digest):
            skipped += 1
            continue
        if answer is not None:  # the line asks something else now: its old answer goes
            del earlier[key]
            changed += 1
        items.append(item)
        order.append(n)
    foreign = [key for key in earlier if key not in id_lines]
    if foreign:  # resuming would mix two runs in one file, or drop the other run's answers
        chat.close()
        raise UsageError(
            f"{args.output} holds answers to {len(foreign)} id(s) that are not in {args.input} "
            f"(first: {foreign[0]}); give another -o, or --overwrite to start it over"
        )
    if resuming and (skipped or changed):  # never silently: the file may hold answers to other prompts
        again = f"; {changed} changed since answered there: answered again" if changed else ""
        print(
            f"chatkv: {skipped} line(s) already answered in {args.output} are skipped{again} "
            "(--overwrite answers every line anew)",
            file=sys.stderr,
        )
    out = open_output(args.output, args.overwrite, [a.text for a in earlier.values()])

    def write(rec: dict) -> None:
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        out.flush()

    ordered = InOrder(write, order)
    progress = Progress(len(items) + len(errors), enabled=not args.quiet and sys.stderr.isatty())
    runner, interrupted = None, 0
    try:
        for e in errors:
            ordered.emit(e)
            progress.update(items=1)
        if items:
            if progress.enabled:  # converting or loading the model shows too
                from chatkv.progress import RichProgress, driver

                chat.on_progress = driver(RichProgress())
            # Batched prefill runs rows through transformers' forward with its own attention
            # (engine/batch.py): the transformers load, not the lean-only one.
            chat.load(lean_only=False)
            progress.start()
            runner = Runner(
                chat,
                ordered.emit,
                batch_size=settings.batch.batch_size,
                save=args.save,
                progress=progress,
                model_given=args.model is not None,
            )
            runner.run(items)
    except KeyboardInterrupt as e:
        ordered.flush()  # what is finished is kept, even ahead of an unfinished earlier line
        progress.close()
        served = runner.summary.served if runner else 0
        print(
            f"chatkv: interrupted; {served + skipped} of {len(items) + skipped} lines answered are in the "
            "output; run the same command again to finish",
            file=sys.stderr,
        )
        interrupted = interrupted_code(e)
    finally:
        chat.close()  # waits for queued spills
        if out is not sys.stdout:
            ordered.flush()
            out.close()
    progress.close()
    if resuming:  # a resumed run: the earlier answers came first; put all in input order
        sort_output(args.output, id_lines)
    if interrupted:
        return interrupted
    failed = len(errors) + (runner.summary.failed if runner else 0)
    if failed:
        print(
            f"chatkv: {failed} line(s) could not be served; their error records are in the output",
            file=sys.stderr,
        )
    return 1 if failed else 0
