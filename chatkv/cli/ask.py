"""`chatkv ask`: one prompt from a shell; the reply streams to stdout."""

from __future__ import annotations

import argparse
import json
import sys
import time

from chatkv.cli.args import conversation_id
from chatkv.errors import InputError, UsageError
from chatkv.fmt import visible


def register(sub, common) -> None:
    from chatkv.cli import _gen_flags, _model_flags

    p = sub.add_parser(
        "ask",
        parents=[common],
        help="send one prompt and print the reply",
        description="Send one prompt and print the reply as it streams. "
        "Starts a new conversation unless -c or -C is given.",
    )
    p.add_argument("prompt", nargs="*", help="the prompt; '-' or nothing reads standard input")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "-c", "--continue", dest="cont", action="store_true", help="continue the most recent conversation"
    )
    g.add_argument(
        "-C", "--conversation", type=conversation_id, metavar="ID", help="continue conversation ID"
    )
    g.add_argument("--new", action="store_true", help="start a new conversation (the default)")
    p.add_argument("--system", "-s", help="system prompt for a new conversation")
    p.add_argument("--json", action="store_true", help="print one JSON object with the reply and statistics")
    p.add_argument("--stats", action="store_true", help="print the turn's statistics to stderr")
    _model_flags(p)
    _gen_flags(p)
    p.set_defaults(func=run)


def read_prompt(parts: list[str]) -> str:
    if parts and parts != ["-"]:
        text, where = " ".join(parts), "the prompt argument"
    elif sys.stdin is None or sys.stdin.isatty():
        raise UsageError("no prompt given; pass it as an argument or pipe it in with '-'")
    else:
        where = "standard input"
        try:
            # a file's or echo's final newline is not the prompt's, nor a byte-order mark
            text = sys.stdin.read().rstrip("\r\n").removeprefix("\ufeff")
        except UnicodeDecodeError:
            raise InputError("cannot read the prompt from standard input: it is not UTF-8 text") from None
        except OSError as e:
            raise InputError(f"cannot read the prompt from standard input: {e}") from None
    try:
        # Under a C/POSIX locale Python hands bytes that are not UTF-8 over as lone
        # surrogates, which the database cannot store.
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"cannot read the prompt from {where}: it is not UTF-8 text") from None
    if not text.strip():
        raise InputError("the prompt is empty; pass some text")
    return text


def run(args: argparse.Namespace) -> int:
    """Send one prompt and print the reply."""
    from chatkv.cli import check_model, interrupted_code, settings_from
    from chatkv.errors import NotFoundError
    from chatkv.session import Chat

    settings = settings_from(args)
    text = read_prompt(args.prompt)
    chat = Chat(settings)
    try:
        # Check everything a user can get wrong before writing anything.
        if args.conversation is not None:
            conv = chat.get_conversation(args.conversation)
        elif args.cont:
            conv = chat.latest_conversation()
            if conv is None:
                raise NotFoundError("there is no conversation to continue; drop -c to start one")
        else:
            conv = None
        if conv is not None and args.system is not None:
            raise UsageError("--system applies to a new conversation; use it without -c/-C")
        if conv is not None and args.model is None:
            note = chat.follow_model(conv.id)  # it goes on with the model it began with
            if note:
                print(f"chatkv: {note}", file=sys.stderr)
        check_model(chat.settings)
        from chatkv.progress import RichProgress, driver

        # Conversion, loading and a long prefill show a bar on stderr (a terminal only).
        chat.on_progress = driver(RichProgress())
        if conv is not None:
            chat.prefetch(conv.id)  # its saved cache is read while the model loads
        load_began = time.perf_counter()
        chat.load(warm=False)  # the prompt is here: nothing to warm up while it is typed
        loaded_at = time.perf_counter()
        # A new conversation is created together with the message, by the session: a
        # refused or failed first turn leaves nothing behind.
        turn = chat.send(conv.id if conv else None, text, system_prompt=args.system)
        out = sys.stdout
        tty = out.isatty()  # on a terminal, a reply's control characters are written out
        pieces = iter(turn)
        streamed = False
        first_at = 0.0
        try:
            for piece in pieces:
                first_at = first_at or time.perf_counter()
                if not args.json and piece:
                    out.write(visible(piece, tty))
                    out.flush()
                    streamed = True
        except KeyboardInterrupt as e:
            # Interrupted between two pieces, the turn is still open: closing it saves what it
            # made (interrupted inside it, it saved already and this does nothing).
            pieces.close()
            if streamed:
                out.write("\n")  # end the reply's line before saying anything
                out.flush()
            if args.json and turn.message is not None:  # a script gets what was saved, "cancelled"
                json.dump(_record(chat, turn, load_began, loaded_at, first_at), out, ensure_ascii=False)
                out.write("\n")
                out.flush()
            _say_interrupted(turn.conversation_id, turn.message is not None, turn.forgotten)
            return interrupted_code(e)
        except BrokenPipeError:
            # The reader went away (`| head`): no one reads the rest, so stop as Ctrl-C does,
            # saving what was made, and exit as a process ended by SIGPIPE does, silently.
            pieces.close()
            _quiet_stdout()
            return 141
        # turn.warnings (a cache chunk dropped and recomputed) were logged to stderr already
        # by the KV layer, once each; printing them again would report each twice.
        if args.json:
            json.dump(_record(chat, turn, load_began, loaded_at, first_at), out, ensure_ascii=False)
        out.write("\n")
        out.flush()
        if args.stats:
            from chatkv.fmt import stats_text

            print(f"conversation {turn.conversation_id}: {stats_text(turn.stats)}", file=sys.stderr)
    finally:
        chat.close()
    return 0


def _record(chat, turn, load_began: float, loaded_at: float, first_at: float) -> dict:
    """The turn as `ask --json` prints it."""
    msg = turn.message
    return {
        "conversation_id": turn.conversation_id,
        "message_id": msg.id if msg else None,
        "reply": msg.content if msg else "",
        "stats": turn.stats.to_dict(),
        "startup": _startup(chat, turn.stats.cache_load_s, load_began, loaded_at, first_at),
    }


def _startup(chat, attach_s: float, load_began: float, loaded_at: float, first_at: float) -> dict:
    """Where a fresh process's time to the first token went: importing and starting up,
    loading the model, and reading the conversation's saved cache, which a resumed
    conversation reads while the model loads (chat.prefetch)."""
    from chatkv import gcpause
    from chatkv.cli import STARTED

    pre = chat.prefetched
    used = pre is not None and pre.used_tokens > 0
    out = {
        "process_first_token_s": (first_at or time.perf_counter()) - STARTED,
        "before_load_s": load_began - STARTED,
        "model_load_s": loaded_at - load_began,
        # "lean": loaded without transformers' model classes (engine/leanload.py)
        "model_classes": "lean" if chat.lm is not None and chat.lm.lean_loaded else "transformers",
        # whether anything imported transformers (a lean load does not: 0.6 s of imports)
        "transformers_imported": "transformers" in sys.modules,
        # how long the garbage collector was held off while the program started (gcpause)
        "collector_paused_s": gcpause.paused_s,
        # the turn's chunk reads: in the background during the load, plus what the turn's
        # attach read itself (and checking what was read ahead)
        "chunk_read_s": (pre.read_s if used else 0.0) + attach_s,
        # the background reads' own processor time: their wall time above includes waiting
        # for the loading thread, with which they share the interpreter
        "chunk_read_cpu_s": (pre.read_cpu_s if used else 0.0) + attach_s,
        "prefetched_tokens": pre.used_tokens if used else 0,
        "read_overlapped_load": bool(used and pre.started_at < loaded_at),
        "read_hidden_by_load": bool(used and pre.finished_at <= loaded_at),
    }
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush of it at exit does not complain
    about the closed pipe again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # not a real file (a test's capture): nothing to quiet
        pass


def _say_interrupted(cid: int, saved: bool, forgotten: bool) -> None:
    if saved:
        print(
            f"chatkv: interrupted; the partial reply is saved in conversation {cid} "
            f"— continue with: chatkv ask -C {cid} ...",
            file=sys.stderr,
        )
    elif forgotten:  # the session removed the unanswered message (and a conversation it started)
        print("chatkv: interrupted before the reply began; your message was not saved", file=sys.stderr)
    else:  # the reply streamed, its save was cut short: the journal has it
        print(
            f"chatkv: interrupted while the reply was saved; chatkv saves it to conversation {cid} "
            "when it next starts",
            file=sys.stderr,
        )
