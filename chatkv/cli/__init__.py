"""Command-line entry point: parse, load settings, dispatch, translate errors.

Exit codes: 0 success, 1 a user error (one line on stderr), 2 a usage error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

from chatkv import __version__
from chatkv.cli.args import INT64_MAX, NumberArg, Parser, conversation_id, count, seed
from chatkv.config import CODEC_NAMES, Settings, load_settings
from chatkv.errors import ChatKVError, ConfigError, UsageError

STARTED = time.perf_counter()  # for `ask --json`'s startup figures: about when the CLI began

COMMANDS = (
    "chat",
    "ask",
    "ls",
    "show",
    "rm",
    "export",
    "cache",
    "bench",
    "batch",
    "config",
    "models",
    "import",
)


def _model_flags(p: argparse.ArgumentParser, context: bool = True) -> None:
    g = p.add_argument_group("model and cache")
    g.add_argument(
        "--model", "-m", help="'smollm2' (embedded), a Hugging Face id, a model dir or a .gguf file"
    )
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument(
        "--load-in", dest="load_in", choices=["none", "8bit", "4bit"], help="bitsandbytes weights (CUDA only)"
    )
    g.add_argument("--codec", choices=CODEC_NAMES, help="how KV caches are stored on disk")
    if context:
        g.add_argument(
            "--context",
            type=count(0, INT64_MAX, "a number of tokens"),
            help="largest context in tokens (0: the model's maximum)",
        )


def _gen_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    # Bounds as in chatkv.config.SCHEMA, checked here so that a bad flag is a usage error.
    g.add_argument(
        "--max-new-tokens", "-n", dest="max_new_tokens", type=count(1, 1_000_000, "a number of tokens")
    )
    g.add_argument(
        "--temperature", "-t", type=NumberArg(0.0, 5.0, "a temperature"), help="0 for greedy decoding"
    )
    g.add_argument("--top-p", dest="top_p", type=NumberArg(0.0, 1.0, "a probability"))
    g.add_argument("--top-k", dest="top_k", type=count(0, INT64_MAX, "a number of tokens"), help="0 disables")
    g.add_argument("--seed", type=seed, help="-1 picks a fresh seed each turn")
    g.add_argument("--stop", action="append", help="a string that ends the reply (repeatable)")


def _not_utf8(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The first text argument holding bytes that are not UTF-8 (under a C/POSIX locale Python
    hands them over as lone surrogates, which no database or JSON takes), by its flag; paths
    and model names are exempt (a file name may be any bytes)."""
    from chatkv.cli.args import PathArg

    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    command = sub.choices.get(getattr(args, "command", None) or "") if sub is not None else None
    for action in (command or parser)._actions:
        if isinstance(action.type, PathArg) or action.dest in ("model", "help"):
            continue
        value = getattr(args, action.dest, None)
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    return action.option_strings[0] if action.option_strings else action.dest
    return None


FLAG_KEYS = {
    "model": "model.name",
    "device": "model.device",
    "dtype": "model.dtype",
    "load_in": "model.load_in",
    "codec": "cache.codec",
    "context": "model.context",
    "max_new_tokens": "generation.max_new_tokens",
    "temperature": "generation.temperature",
    "top_p": "generation.top_p",
    "top_k": "generation.top_k",
    "seed": "generation.seed",
    "stop": "generation.stop",
}


def build_parser() -> argparse.ArgumentParser:
    from chatkv.cli import ask, batch, bench, cache, imports, manage, models

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    parser = Parser(
        prog="chatkv",
        parents=[common],
        description="Chat with a local language model; every conversation's KV cache "
        "survives turns and restarts.",
        epilog="Run 'chatkv' alone to open the chat UI. 'chatkv COMMAND -h' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"chatkv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("chat", parents=[common], help="open the chat UI (the default command)")
    p.add_argument("id", nargs="?", type=conversation_id, help="conversation to open")
    _model_flags(p)
    _gen_flags(p)
    p.set_defaults(func=run_chat)

    ask.register(sub, common)
    manage.register(sub, common)
    cache.register(sub, common)
    bench.register(sub, common)
    batch.register(sub, common)
    models.register(sub, common)
    imports.register(sub, common)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from config files and environment, with this command's flags on top."""
    settings = load_settings()
    for attr, key in FLAG_KEYS.items():
        value = getattr(args, attr, None)
        if value is not None:
            try:
                settings.set(key, value, source=f"--{attr.replace('_', '-')}")
            except ConfigError as e:  # a flag's value: a usage error, as argparse's own are
                raise UsageError(str(e)) from None
    return settings


def check_model(settings: Settings) -> None:
    """Fail at once for a --model that nothing can load (a mistyped name) or a cache.url whose
    client is not installed, before a command spends seconds importing torch or opens a screen."""
    from chatkv.config import client_missing
    from chatkv.engine.hub import precheck

    precheck(settings.model.name)
    missing = client_missing(settings.cache.url)
    if missing:
        raise ConfigError(missing)


def run_chat(args: argparse.Namespace) -> int:
    """Open the chat UI."""
    from chatkv.session import Chat
    from chatkv.ui.app import create_app

    settings = settings_from(args)
    check_model(settings)
    chat = Chat(settings)
    if args.id is not None:
        chat.get_conversation(args.id)  # unknown id: one line, before the screen opens
        if args.model is None:
            note = chat.follow_model(args.id)  # it goes on with the model it began with
            if note:
                print(f"chatkv: {note}", file=sys.stderr)
        chat.prefetch(args.id)  # its saved cache is read while the UI opens and the model loads
    if not (sys.stdin.isatty() and sys.stdout.isatty()):  # it would draw into a file or pipe forever
        chat.close()
        raise UsageError("the chat UI needs an interactive terminal; for scripts and pipes use `chatkv ask`")
    app = create_app(chat, settings, args.id)
    try:
        app.run()
    finally:
        chat.close()
    return 0


def _quiet_libraries(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="chatkv: %(levelname)s: %(message)s" if not debug else None,
    )
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        # huggingface_hub sets its loggers' level from this when imported, after this function
        # ran: without it each retry warning printed twice (its handler and ours).
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        # transformers' GGUF conversion draws a tqdm bar of its own (tqdm.auto, outside its
        # progress-bar switch): chatkv says "converting …" itself, on a terminal only, and a
        # script's stderr got a dozen bar redraws. tqdm reads this when it is imported.
        os.environ.setdefault("TQDM_DISABLE", "1")
        for name in ("transformers", "accelerate", "alembic", "huggingface_hub", "urllib3"):
            logging.getLogger(name).setLevel(logging.ERROR)
        if "transformers" in sys.modules:  # imported before main() (in process): the variable came late
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()


def os_error_line(e: OSError) -> str:
    """One line for a failed file operation, with what to do about it."""
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    what = f"{e.strerror or e}{where}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):  # mid-write: say what survived
        return f"{what}; nothing was lost: what was saved before stays saved; free some space and retry"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what}; chatkv needs to write there (CHATKV_HOME moves its data elsewhere)"
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        return f"{what}; a file is where chatkv expects a directory (check CHATKV_HOME)"
    return what


def main(argv: Sequence[str] | None = None) -> int:
    """Run chatkv with `argv` and return its exit code; with None, as the program itself: with
    the process's arguments, ending the process when done (`end_process`)."""
    if argv is None:
        from chatkv import gcpause

        gcpause.hold()  # until the model has loaded (see gcpause)
        code = _main(sys.argv[1:], program=True)
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # exiting now: a SIGTERM ends it as usual
        end_process(code)
    return _main(argv)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, `kill`, systemd, docker stop), taken as Ctrl-C is: the reply so far
    is saved and the process ends at once, with 143 (128 + SIGTERM)."""


def interrupted_code(e: KeyboardInterrupt) -> int:
    """The exit code of a command stopped by Ctrl-C (130) or SIGTERM (143)."""
    return 143 if isinstance(e, Terminated) else 130


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


def _on_sigterm_stop_as_on_ctrl_c() -> None:
    import signal

    try:
        signal.signal(signal.SIGTERM, _terminated)
    except (ValueError, OSError):  # not the main thread, or no such signal here
        pass


def end_process(code: int) -> NoReturn:
    """End the process with `code` once everything that exiting does for the program is done
    (non-daemon threads joined, exit handlers run, standard streams flushed), without the
    interpreter's teardown of every module.

    That teardown only frees memory, module by module, and with torch and transformers
    loaded it took 0.7 s (after running a model, 1.5 s) on a busy 2-core machine: after
    `chatkv ask` had printed its reply, the largest step left. A process that never
    imported torch exits as usual, and so does one being profiled or traced (cProfile,
    coverage): the profiler writes its file after the program returns."""
    if "torch" not in sys.modules or sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    import atexit
    import threading

    # What the interpreter's own exit does first: join the non-daemon threads after running
    # the hooks registered for it (concurrent.futures wakes its idle pool workers there; a
    # plain join of an idle worker waits forever).
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    else:  # pragma: no cover - CPython has had threading._shutdown since 3.x began
        for t in threading.enumerate():
            if t is not threading.current_thread() and not t.daemon:
                t.join()
    atexit._run_exitfuncs()  # logging's flush, temporary directories' cleanup, ...
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: what it did not take is lost anyway
            pass
    os._exit(code)


def _main(argv: Sequence[str], program: bool = False) -> int:
    argv = list(argv)
    os.umask(0o077)  # everything chatkv writes is private to the user
    if not argv or (
        argv[0].startswith("-")
        and argv[0] not in ("-h", "--help", "--version")
        and not any(a in COMMANDS for a in argv)
    ):
        argv = ["chat", *argv]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (one line, printed), -h or --version: a code, in process too
        return e.code if isinstance(e.code, int) else 0
    from sqlalchemy.exc import DBAPIError

    debug = getattr(args, "debug", False)
    bad = _not_utf8(parser, args)
    if bad:
        print(
            f"chatkv: error: {bad} is not UTF-8 text; give it in UTF-8 (or from a UTF-8 file)",
            file=sys.stderr,
        )
        return 2
    _quiet_libraries(debug)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if program and args.command != "chat":  # the chat UI quits on its own keys; a kill stays a kill
        _on_sigterm_stop_as_on_ctrl_c()
    try:
        return int(args.func(args) or 0)
    except ChatKVError as e:
        if debug:
            raise
        print(f"chatkv: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated):
            print("chatkv: terminated", file=sys.stderr)
            return 143
        print("chatkv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except UnicodeError as e:  # text that is not UTF-8 somewhere no check caught: one line all the same
        if debug:
            raise
        print(f"chatkv: error: text that is not UTF-8 ({e.reason}); give it in UTF-8", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions: one line, not a traceback
        if debug:
            raise
        print(f"chatkv: error: {os_error_line(e)}", file=sys.stderr)
        return 1
    except (DBAPIError, sqlite3.Error) as e:  # OperationalError, DatabaseError, IntegrityError...
        if debug:
            raise
        from chatkv.paths import db_path
        from chatkv.store.db import describe_db_error

        # One line by the sqlite error's name (locked, full, read-only, damaged), never
        # SQLAlchemy's text with the statement in it.
        print(f"chatkv: error: {describe_db_error(e, db_path())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    main()
