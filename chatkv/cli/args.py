"""Argument types shared by every subcommand, and a parser whose errors are one line.

Every integer, number and path argument of the CLI uses one of these types, bounded
by what finally consumes the value (SQLite stores int64, torch's manual_seed takes
0..2**64-1, the config schema bounds the rest), so no command-line value can reach
a traceback. tests/test_cli_errors.py walks the parser and checks each of them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import NoReturn

INT64_MAX = 2**63 - 1  # SQLite INTEGER; conversation ids and limits end up there
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed


class IntArg:
    """A whole number from `lo` to `hi`; `what` names it in the error ("a conversation id")."""

    def __init__(self, lo: int, hi: int, what: str):
        self.lo, self.hi, self.what = lo, hi, what
        self.__name__ = what  # argparse names the type by it in its own messages

    def __call__(self, text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:  # not a number, or more digits than Python converts
            value = None
        if value is None or not self.lo <= value <= self.hi:
            raise argparse.ArgumentTypeError(
                f"{_short(text)} is not {self.what}: give a whole number from {self.lo} to {self.hi}"
            )
        return value


class NumberArg:
    """A finite number from `lo` to `hi`."""

    def __init__(self, lo: float, hi: float, what: str):
        self.lo, self.hi, self.what = lo, hi, what
        self.__name__ = what

    def __call__(self, text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            value = math.nan
        if not self.lo <= value <= self.hi:  # NaN fails too
            raise argparse.ArgumentTypeError(
                f"{_short(text)} is not {self.what}: give a number from {self.lo} to {self.hi}"
            )
        return value


class PathArg:
    """A file to read (`output=False`; '-' is standard input when `stdin`) or to write.

    Checked when parsed, so a command fails before it loads a model or writes anything:
    an input must exist and not be a directory; an output's directory must exist, and the
    output must not be a directory or a symbolic link (chatkv never writes through one).
    The write itself is checked again (chatkv.outfile), as the file may change meanwhile.
    """

    def __init__(self, output: bool, stdin: bool = False):
        self.output, self.stdin = output, stdin
        self.__name__ = "output file" if output else "input file"

    def __call__(self, text: str) -> str:
        if self.stdin and text == "-":
            return text
        if not text:
            raise argparse.ArgumentTypeError(f"empty {self.__name__} name")
        path = Path(text).expanduser()
        if self.output:
            if path.is_symlink():
                raise argparse.ArgumentTypeError(
                    f"{text} is a symbolic link; chatkv does not write through links, give the real path"
                )
            if path.is_dir():
                raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
            parent = path.parent
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(
                    f"directory {parent} does not exist; create it or write elsewhere"
                )
        else:
            if not path.exists():
                raise argparse.ArgumentTypeError(f"{text} does not exist")
            if path.is_dir():
                raise argparse.ArgumentTypeError(f"{text} is a directory; give a file")
            if not os.access(path, os.R_OK):
                raise argparse.ArgumentTypeError(f"{text} is not readable (permission denied)")
        return str(path) if text.startswith("~") else text


class SizeArg:
    """A byte size such as 0, 1048576, "500MiB" or "2GB" (chatkv.config.parse_size)."""

    __name__ = "byte size"

    def __call__(self, text: str) -> int:
        from chatkv.config import parse_size

        try:
            return parse_size(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{_short(text)} is not a byte size: give e.g. 500MiB, 2GB or 0 (at most 2**63-1 bytes)"
            ) from None


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


conversation_id = IntArg(1, INT64_MAX, "a conversation id")
seed = IntArg(-1, SEED_MAX, "a seed (-1 picks a fresh one each turn)")
byte_size = SizeArg()


def count(lo: int, hi: int = INT64_MAX, what: str = "a count") -> IntArg:
    """A bounded integer argument: `count(1, 1000, "a number of tokens")`."""
    return IntArg(lo, hi, what)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors that name the subcommand and point at its -h.

    Unrecognised arguments are reported by the subcommand that was given them
    (argparse leaves them to the top-level parser, which then shows its own usage).
    """

    def error(self, message: str) -> NoReturn:
        print(f"chatkv: error: {message} (see: {self.prog} -h)", file=sys.stderr)
        sys.exit(2)

    def parse_known_args(self, args=None, namespace=None):  # noqa: D102 - argparse's own contract
        ns, extras = super().parse_known_args(args, namespace)
        if extras and self._subparsers is None and self.prog != "chatkv":
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras
