"""The `chatkv batch` file format: JSONL lines parsed into `chatkv.batch.Item`s, output
records written in input order, resuming from an earlier output, and the progress bar.

One JSON object per input line (`{"id": …, "prompt": …}`, optionally "system",
"messages", "conversation" and per-line generation settings); every failure of a line
is that line's error record, with its id and line number.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from chatkv.api import GenerationSettings
from chatkv.batch import Item
from chatkv.config import validate
from chatkv.errors import ConfigError, InputError, UsageError

GEN_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop")
KNOWN_KEYS = ("id", "prompt", "system", "messages", "conversation", *GEN_KEYS)
ROLES = ("system", "user", "assistant")
MAX_DEPTH = 16  # nesting of a line's JSON: "messages" needs 3; deeper is a mistake or an attack
INT64_MAX = 2**63 - 1  # conversation ids are SQLite integers


class BadLine(InputError):
    """An input line that cannot be served; `id` is its id when the line got far enough to
    have one (else None)."""

    def __init__(self, message: str, id_: Any = None):
        super().__init__(message)
        self.id = id_


def id_key(value: Any) -> str:
    """A hashable, type-exact key for a JSON id (1 and "1" are different ids)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion (a list of scalars is 1)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            d += 1
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                break
            stack.extend((x, d) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _load(text: str) -> Any:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable input bytes, kept as surrogates by the reader
        raise InputError("the line is not UTF-8 text") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise InputError(f"JSON nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # also integers of more digits than Python converts
        raise InputError(f"not JSON ({e})") from None


def _storable(value: Any) -> bool:
    """False for strings with lone surrogates ("\\ud800" escapes), which no file or database
    can store."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_line(n: int, text: str, defaults: GenerationSettings) -> Item:
    """Parse input line `n` (1-based). Raises InputError with what is wrong: a BadLine
    carrying the line's id when the line is a JSON object with a usable one."""
    obj = _load(text)
    if not isinstance(obj, dict):
        raise InputError('a line must be a JSON object with at least "prompt"')
    id_ = obj.get("id", n)
    usable = id_ is None or (isinstance(id_, (str, int, float)) and _storable(id_))
    try:
        if not usable:
            raise InputError('"id" must be a string or a number')
        if _depth(obj) > MAX_DEPTH:
            raise InputError(f"JSON nested more than {MAX_DEPTH} levels deep")
        if not _storable(obj):
            raise InputError("a string holds an unpaired surrogate escape (\\ud800-\\udfff)")
        return _item(n, obj, defaults)
    except InputError as e:
        raise BadLine(str(e), id_ if usable else None) from None


def _item(n: int, obj: dict[str, Any], defaults: GenerationSettings) -> Item:
    unknown = [k for k in obj if k not in KNOWN_KEYS]
    if unknown:
        hints = [
            f"{k!r} (did you mean {close[0]!r}?)"
            if (close := difflib.get_close_matches(k, KNOWN_KEYS, 1))
            else repr(k)
            for k in unknown
        ]
        raise InputError(f"unknown field {', '.join(hints)}; the fields are {', '.join(KNOWN_KEYS)}")
    prompt = obj.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise InputError('"prompt" must be a non-empty string')
    messages = obj.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise InputError('"messages" must be a list of {"role": system|user|assistant, "content": str}')
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    conv = obj.get("conversation")
    if conv is not None and (
        isinstance(conv, bool) or not isinstance(conv, int) or not 1 <= conv <= INT64_MAX
    ):
        raise InputError('"conversation" must be a conversation id (an integer from 1 to 2**63-1)')
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise InputError('"system" must be a string')
    if conv is not None and (messages is not None or system is not None):
        raise InputError(
            '"conversation" continues a saved chat; it cannot be combined with "messages" or "system"'
        )
    if prompt is None and not (messages and messages[-1]["role"] == "user"):
        raise InputError('missing "prompt" (or "messages" ending with a user message)')
    if conv is not None and prompt is None:
        raise InputError('a line continuing a conversation needs a "prompt"')
    settings = replace(defaults, stop=list(defaults.stop))
    for key in GEN_KEYS:
        if key in obj:
            try:
                setattr(settings, key, validate(f"generation.{key}", obj[key], f"line {n}"))
            except ConfigError as e:
                raise InputError(str(e).removeprefix("invalid value for generation.")) from None
    return Item(
        line=n,
        id=obj.get("id", n),
        prompt=prompt,
        system=system,
        messages=messages,
        conversation=conv,
        settings=settings,
        digest=input_digest(obj),
        given_id="id" in obj,
    )


def input_digest(obj: dict[str, Any]) -> str:
    """What a line asks, whatever its id, key order or spacing: 16 hex digits of a sha256."""
    fields = {k: v for k, v in obj.items() if k != "id"}
    text = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def read_lines(source: TextIO) -> Iterable[tuple[int, str]]:
    """(line number, text) of the non-blank lines."""
    for n, text in enumerate(source, 1):
        if text.strip():
            yield n, text


@dataclass
class Answered:
    """A reply record of an earlier run in the output file."""

    digest: str | None  # its line's input_digest (None: written before records had one)
    text: str  # the record's line in the file


def answered_ids(path: Path) -> dict[str, Answered]:
    """Reply records of an earlier output, by id (error records are dropped: their lines are
    tried again). Raises UsageError for a file that is not an output of chatkv batch (not
    UTF-8, or lines that are not its records but for a last one cut short by a crash):
    resuming would replace it."""
    done: dict[str, Answered] = {}
    refuse = (
        f"{path} exists and is not an output of chatkv batch; give another -o, or --overwrite to replace it"
    )
    try:
        with open(path, encoding="utf-8") as f:
            texts = [t for t in f.readlines() if t.strip()]
    except UnicodeDecodeError:
        raise UsageError(refuse) from None
    for i, text in enumerate(texts):
        try:
            rec = json.loads(text)
        except ValueError:
            if i == len(texts) - 1 and not text.endswith("\n"):
                continue  # a line cut short by a crash: that id is answered again
            raise UsageError(refuse) from None
        if not (isinstance(rec, dict) and "line" in rec and ("reply" in rec or "error" in rec)):
            raise UsageError(refuse)
        if "reply" in rec and "error" not in rec:
            digest = rec.get("input_digest")
            done[id_key(rec.get("id"))] = Answered(
                digest if isinstance(digest, str) else None, text if text.endswith("\n") else text + "\n"
            )
    return done


# -- progress -------------------------------------------------------------------


class Progress:
    """Lines answered of the total, tokens per second and time left: a `rich` bar on stderr
    (drawn only when `enabled`: a terminal, and no --quiet). The bar appears at `start()`,
    after the model has loaded (its own progress is another bar: rich draws one at a time)."""

    def __init__(self, total: int, enabled: bool, stream: TextIO = sys.stderr):
        self.total, self.enabled = total, enabled
        self.done = self.tokens = 0
        self.t0 = time.perf_counter()
        self._bar: Any = None
        self.stream = stream

    def start(self) -> None:
        if self.enabled and self._bar is None:
            import rich.progress as rp
            from rich.console import Console

            self._bar = rp.Progress(
                rp.TextColumn("batch"),
                rp.BarColumn(),
                rp.MofNCompleteColumn(),
                rp.TextColumn("lines · {task.fields[rate]}"),
                rp.TimeRemainingColumn(),
                console=Console(file=self.stream),
            )
            self._task = self._bar.add_task("batch", total=self.total or None, completed=self.done, rate="")
            self._bar.start()

    def update(self, items: int = 0, tokens: int = 0) -> None:
        self.done += items
        self.tokens += tokens
        if self._bar is not None:
            elapsed = time.perf_counter() - self.t0
            rate = f"{self.tokens / elapsed:.1f} tok/s" if elapsed > 0 else ""
            self._bar.update(self._task, completed=self.done, rate=rate)

    def close(self) -> None:
        if self.enabled and self._bar is None and self.done:  # only bad lines: still show the count
            self.start()
        if self._bar is not None:
            self._bar.stop()  # leaves the final bar on screen, with the totals
            self._bar = None


class InOrder:
    """Writes records in input order: a record is held until the records of every earlier
    line in `order` are written. `flush()` writes what is held, in order but with gaps
    (Ctrl-C: finished work is kept; a resumed run puts the file back in order)."""

    def __init__(self, write: Callable[[dict], None], order: Iterable[int]):
        self.write = write
        self.order = list(order)
        self.next = 0
        self.held: dict[int, dict] = {}

    def emit(self, rec: dict) -> None:
        self.held[rec["line"]] = rec
        while self.next < len(self.order) and self.order[self.next] in self.held:
            line = self.order[self.next]
            self.write(self.held[line])  # then forgotten: Ctrl-C while it is written keeps it held
            del self.held[line]
            self.next += 1

    def flush(self) -> None:
        for line in sorted(self.held):
            self.write(self.held[line])
            del self.held[line]


def open_output(path: str | None, overwrite: bool, keep: Iterable[str] = ()) -> TextIO:
    """The output stream. A file is started over, or (resuming) rewritten with the records
    `keep` and opened to append; it is opened private and never through a symbolic link
    (chatkv.outfile)."""
    from chatkv.outfile import open_private

    if path in (None, "-"):
        return sys.stdout
    p = Path(path)
    if p.exists() and not overwrite:
        tmp = p.with_name(f".{p.name}.tmp")
        with open_private(tmp) as f:
            f.write("".join(keep))
        os.replace(tmp, p)
        return open_private(p, append=True)
    return open_private(p)


def sort_output(path: str, id_lines: dict[str, int]) -> None:
    """Rewrite a finished output file in input order: answers by their id's line in this
    input (`id_lines`: id_key -> line), error records by their "line". Used after a resumed
    run, whose earlier answers came first in the file; an earlier answer whose line moved
    (lines added or reordered since) gets its line in this input."""
    from chatkv.outfile import open_private

    p = Path(path)
    with open(p, encoding="utf-8") as f:
        texts = [t if t.endswith("\n") else t + "\n" for t in f if t.strip()]

    def placed(text: str) -> tuple[int, str]:
        try:
            rec = json.loads(text)
        except ValueError:
            return INT64_MAX, text
        if not isinstance(rec, dict):
            return INT64_MAX, text
        line = rec.get("line") if "error" in rec else id_lines.get(id_key(rec.get("id")), rec.get("line"))
        if not isinstance(line, int):
            return INT64_MAX, text
        if line != rec.get("line"):
            text = json.dumps({**rec, "line": line}, ensure_ascii=False) + "\n"
        return line, text

    tmp = p.with_name(f".{p.name}.tmp")
    with open_private(tmp) as f:
        f.write("".join(text for _, text in sorted(map(placed, texts), key=lambda x: x[0])))
    os.replace(tmp, p)
