"""`chatkv batch`: answer a JSONL file of prompts, sharing what their prompts share.

Each input line is rendered exactly as `chatkv ask` would render it (same chat
template, same context fitting, same sampler), then:

- lines continuing a saved conversation attach that conversation's cache
  (memory or disk) and decode together with other lines;
- the other lines are grouped by common token prefix (a system prompt, a
  few-shot block): each group's prefix is attached from the chunk store once,
  the rest of it is prefilled once and spilled, so the next run reads it from
  disk; the group's lines then decode over that one shared prefix
  (`chatkv.engine.batch`).

Output records are one JSON object per input line, in input order: a finished
line's record is written as soon as every earlier line's is (`InOrder`), so an
interrupted run keeps what is done and can resume where it stopped. Every failure of
a line (not JSON, a bad field, a missing conversation, a prompt too long, an error
while generating it) is that line's error record, with its id and line number.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from chatkv.api import GenerationSettings, TurnStats
from chatkv.config import validate
from chatkv.errors import ChatKVError, ConfigError, InputError

log = logging.getLogger(__name__)

# Tokens two prompts must share to decode over one prefix: well past the chat template's
# own header (~5 tokens), which every prompt shares.
MIN_SHARED = 32
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


@dataclass
class Item:
    """One input line that parsed."""

    line: int
    id: Any
    prompt: str | None
    system: str | None = None
    messages: list[dict[str, str]] | None = None
    conversation: int | None = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    # filled when rendered:
    chat: list[dict[str, str]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    dropped: int = 0


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
    )


def read_lines(source: TextIO) -> Iterable[tuple[int, str]]:
    """(line number, text) of the non-blank lines."""
    for n, text in enumerate(source, 1):
        if text.strip():
            yield n, text


def answered_ids(path: Path) -> tuple[set[str], list[str]]:
    """Ids answered in an earlier output, and those records' lines (error records are dropped:
    their lines are tried again)."""
    done, keep = set(), []
    with open(path, encoding="utf-8") as f:
        for text in f:
            try:
                rec = json.loads(text)
            except ValueError:
                continue  # a line cut short by a crash: that id is answered again
            if isinstance(rec, dict) and "reply" in rec and "error" not in rec:
                done.add(id_key(rec.get("id")))
                keep.append(text if text.endswith("\n") else text + "\n")
    return done, keep


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


# -- the runner -----------------------------------------------------------------


@dataclass
class Summary:
    served: int = 0
    failed: int = 0
    skipped: int = 0
    completion_tokens: int = 0
    prefix_tokens: int = 0  # tokens of shared prefixes (each counted once per group)
    prefix_from_disk: int = 0  # of those, attached from the chunk store
    elapsed_s: float = 0.0
    first_reply_s: float | None = None
    interrupted: bool = False


class Runner:
    """Serve parsed items through a loaded `Chat`, writing records with `emit`.

    Args:
        chat: a loaded chatkv.session.Chat (its store, KV manager and model are used).
        emit: called with each output record (a dict) as soon as it is ready.
        batch_size: rows decoded together (0: the engine's default for the device).
        save: "all" (every line becomes or extends a conversation), "continue"
            (only lines continuing a conversation write), or "none".
    """

    def __init__(
        self,
        chat,
        emit: Callable[[dict], None],
        batch_size: int = 0,
        save: str = "continue",
        progress: Progress | None = None,
    ):
        from chatkv.engine.batch import default_batch_size

        self.chat = chat
        self.emit = emit
        self.lm, self.kv = chat.lm, chat.kv
        self.batch_size = batch_size or default_batch_size(self.lm.device)
        layers, heads, head_dim = self.lm.kv_shape
        per_token = layers * 2 * heads * head_dim * self.lm.dtype.itemsize
        self.max_tokens = max(1, chat.settings.cache.live_bytes // per_token)  # padded positions per batch
        self.save = save
        self.progress = progress or Progress(0, False)
        self.summary = Summary()
        self.t0 = time.perf_counter()
        self._recorded: set[int] = set()  # lines whose record was emitted
        self._held: dict[int, Any] = {}  # line -> lease on the conversation it continues

    # -- records ---------------------------------------------------------------

    def _release(self, line: int) -> None:
        held = self._held.pop(line, None)
        if held is not None:
            held.release()

    def fail(self, line: int, id_: Any, error: str) -> None:
        self._release(line)
        self.summary.failed += 1
        self._recorded.add(line)
        self.emit({"id": id_, "line": line, "error": error})
        self.progress.update(items=1)

    def _failed(self, items: Iterable[Item], what: str, e: Exception) -> None:
        """An unexpected error while serving `items`: each of them not yet answered gets an
        error record (the other lines go on); the traceback is logged for --debug."""
        import sqlite3

        from sqlalchemy.exc import DBAPIError

        from chatkv.store.db import describe_db_error

        log.debug("%s failed", what, exc_info=True)
        if isinstance(e, (DBAPIError, sqlite3.Error)):  # locked, full, read-only: say which
            why = describe_db_error(e)
        else:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            why = f"{type(e).__name__}{': ' if first else ''}{first}"
        for item in items:
            if item.line not in self._recorded:
                self.fail(item.line, item.id, f"{what} failed: {why}")

    def _reply(self, item: Item, text: str, st: TurnStats, conversation_id: int | None) -> None:
        rec = {
            "id": item.id,
            "line": item.line,
            "reply": text,
            "usage": {
                "prompt_tokens": st.prompt_tokens,
                "cached_tokens": st.cached_tokens,
                "completion_tokens": st.completion_tokens,
            },
            "ttft_s": round(st.ttft_s, 4),
            "decode_tps": round(st.decode_tps, 2),
            "finish_reason": st.finish_reason,
            "cache_source": st.cache_source,
        }
        if conversation_id is not None:
            rec["conversation_id"] = conversation_id
        self._release(item.line)
        self.summary.served += 1
        self._recorded.add(item.line)
        self.summary.completion_tokens += st.completion_tokens
        if self.summary.first_reply_s is None:
            self.summary.first_reply_s = time.perf_counter() - self.t0
        self.emit(rec)
        self.progress.update(items=1)

    # -- rendering ---------------------------------------------------------------

    def render(self, item: Item) -> None:
        """Fill item.chat and item.ids as `chatkv ask` would. Raises ChatKVError."""
        chat = self.chat
        if item.conversation is not None:
            msgs = chat.render(item.conversation)  # NotFoundError for an unknown id
            msgs.append({"role": "user", "content": item.prompt})
        else:
            msgs = list(item.messages or [])
            if not (msgs and msgs[0]["role"] == "system"):
                system = item.system if item.system is not None else chat.settings.chat.system_prompt
                if system:
                    msgs.insert(0, {"role": "system", "content": system})
            elif item.system is not None:
                raise InputError('give the system prompt either as "system" or in "messages", not both')
            if item.prompt is not None:
                msgs.append({"role": "user", "content": item.prompt})
        item.chat = msgs
        item.ids, item.dropped = chat.fit(msgs, item.settings.max_new_tokens)

    # -- serving -------------------------------------------------------------------

    def run(self, items: list[Item]) -> Summary:
        """Serve every item. Lines continuing the same conversation run one after
        another (each sees the reply before it, when saving); all others together."""
        rounds: list[list[Item]] = []
        seen: dict[int, int] = {}
        for item in items:
            k = 0
            if item.conversation is not None:
                k = seen.get(item.conversation, 0)
                seen[item.conversation] = k + 1
            while len(rounds) <= k:
                rounds.append([])
            rounds[k].append(item)
        for group in rounds:
            self._round(group)
        self.kv.flush()
        self.summary.elapsed_s = time.perf_counter() - self.t0
        return self.summary

    def _round(self, items: list[Item]) -> None:
        try:
            self._serve_round(items)
        finally:
            for line in list(self._held):
                self._release(line)

    def _serve_round(self, items: list[Item]) -> None:
        from chatkv.kv.manager import common_prefix

        ready: list[Item] = []
        for item in items:
            try:
                if item.conversation is not None and self._saves(item):
                    # No other turn may run in it from now until this line's reply is saved.
                    self.chat.get_conversation(item.conversation)
                    self._held[item.line] = self.chat.hold(item.conversation)
                self.render(item)
            except ChatKVError as e:
                self.fail(item.line, item.id, str(e))
                continue
            except Exception as e:  # e.g. a chat template that rejects this message order
                self._failed([item], "rendering the prompt", e)
                continue
            ready.append(item)
        own = [i for i in ready if i.conversation is not None]
        fresh = sorted((i for i in ready if i.conversation is None), key=lambda i: i.ids)
        groups: list[list[Item]] = []
        for item in fresh:  # sorted: a group's common prefix is the minimum of neighbours' ones
            if groups and common_prefix(groups[-1][-1].ids, item.ids) >= MIN_SHARED:
                groups[-1].append(item)
            else:
                groups.append([item])
        for g in groups:
            if len(g) == 1:
                own.extend(g)
                continue
            p = min(min(common_prefix(g[0].ids, i.ids) for i in g), min(len(i.ids) for i in g) - 1)
            try:
                self._shared(g, p)
            except Exception as e:  # out of memory, a model error: these lines fail, not the run
                self._failed(g, "generating", e)
        for batch in self._batches(own, 0):
            try:
                self._own(batch)
            except Exception as e:
                self._failed(batch, "generating", e)

    def _batches(self, items: list[Item], shared: int) -> Iterable[list[Item]]:
        """Split into batches of at most batch_size rows whose padded per-row caches (beyond
        the `shared` prefix) stay within the live-cache byte budget; similar lengths together."""
        batch: list[Item] = []
        for item in sorted(items, key=lambda i: len(i.ids)):
            padded = (len(batch) + 1) * (len(item.ids) - shared)  # sorted: this row is the longest
            full = len(batch) == self.batch_size or padded > self.max_tokens
            if batch and full:
                yield batch
                batch = []
            batch.append(item)
        if batch:
            yield batch

    def _shared(self, items: list[Item], p: int) -> None:
        """Lines sharing their first `p` tokens: attach/prefill/spill the prefix once."""
        from chatkv.engine.batch import BatchRow
        from chatkv.engine.generate import prefill
        from chatkv.kv import live

        t0 = time.perf_counter()
        prefix = items[0].ids[:p]
        att = self.kv.attach(None, prefix, whole=True)
        if att.cached < p:
            prefill(self.lm.model, prefix[att.cached :], att.cache, att.cached)
            self.kv.spill(None, prefix, att.cache)  # the next run attaches it from disk
        self.summary.prefix_tokens += p
        self.summary.prefix_from_disk += att.cached
        layers = live.layers_of(att.cache)
        for n, part in enumerate(self._batches(items, p)):
            rows = [BatchRow(i.ids, i.settings, None, p, keep_cache=self._saves(i)) for i in part]
            stats = [self._stats(i, att) for i in part]
            self._decode(part, rows, layers, stats, t0 if n == 0 else time.perf_counter())

    def _stats(self, item: Item, att) -> TurnStats:
        """A line's statistics before decoding: its prompt and where its cache came from."""
        return TurnStats(
            prompt_tokens=len(item.ids),
            cached_tokens=att.cached,
            prefilled_tokens=len(item.ids) - att.cached,
            cache_source=att.source,
            cache_load_s=att.load_s,
            dropped_messages=item.dropped,
            codec=self.kv.codec.name,
        )

    def _own(self, items: list[Item]) -> None:
        """Lines with no prefix shared in this file: each attaches its own cache."""
        from chatkv.engine.batch import BatchRow

        t0 = time.perf_counter()
        rows, stats = [], []
        for i in items:
            att = self.kv.attach(i.conversation, i.ids)
            rows.append(
                BatchRow(
                    i.ids,
                    i.settings,
                    att.cache if att.cached else None,
                    att.cached,
                    keep_cache=self._saves(i),
                )
            )
            stats.append(self._stats(i, att))
        self._decode(items, rows, None, stats, t0)

    def _saves(self, item: Item) -> bool:
        return self.save == "all" or (self.save == "continue" and item.conversation is not None)

    def _decode(self, items: list[Item], rows, prefix, stats: list[TurnStats], t0: float) -> None:
        from chatkv.engine.batch import BatchDecoder
        from chatkv.engine.generate import TextStream

        dec = BatchDecoder(self.lm.model, rows, prefix, self.lm.eos_ids, self.lm.context_limit)
        texts = [TextStream(self.lm.tokenizer, i.settings.stop) for i in items]
        gens: list[list[int]] = [[] for _ in items]
        first: list[float | None] = [None] * len(items)
        last: list[float] = [0.0] * len(items)
        for step in dec:
            r = step.row
            if step.token is not None:
                now = time.perf_counter()
                first[r] = first[r] or now
                last[r] = now
                gens[r].append(step.token)
                texts[r].push(step.token)
                if texts[r].stopped:
                    dec.stop(r)
                self.progress.update(tokens=1)
                continue
            texts[r].finish()
            st = stats[r]
            st.finish_reason = "stop" if texts[r].stopped else step.finish_reason
            st.completion_tokens = len(gens[r])
            st.ttft_s = (first[r] or time.perf_counter()) - t0
            span = last[r] - first[r] if first[r] else 0.0
            st.decode_tps = (len(gens[r]) - 1) / span if span > 0 else 0.0
            try:
                conv_id = self._save(items[r], texts[r].text, st, gens[r], step.cache)
            except Exception as e:  # a full disk, a locked database: this line's record says so
                self._failed([items[r]], "saving the reply", e)
                continue
            self._reply(items[r], texts[r].text, st, conv_id)

    def _save(self, item: Item, text: str, st: TurnStats, gen: list[int], cache) -> int | None:
        """Save the line's question and reply through the session (when saving) and spill its
        cache. Returns the conversation id."""
        if not self._saves(item):
            return None
        if item.conversation is not None:
            new = [{"role": "user", "content": item.prompt or ""}]
        else:
            new = list(item.chat)
        tokens = list(item.ids) + gen
        return self.chat.save_exchange(item.conversation, new, text, st, tokens, cache)


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
            self.write(self.held.pop(self.order[self.next]))
            self.next += 1

    def flush(self) -> None:
        for line in sorted(self.held):
            self.write(self.held.pop(line))


def open_output(path: str | None, overwrite: bool) -> tuple[TextIO, set[str]]:
    """The output stream and the ids already answered in it (resume). A file is opened
    private and never through a symbolic link (chatkv.outfile)."""
    from chatkv.outfile import open_private

    if path in (None, "-"):
        return sys.stdout, set()
    p = Path(path)
    done: set[str] = set()
    if p.exists() and not overwrite:
        done, keep = answered_ids(p)
        tmp = p.with_name(f".{p.name}.tmp")
        with open_private(tmp) as f:
            f.write("".join(keep))
        os.replace(tmp, p)
        return open_private(p, append=True), done
    return open_private(p), done


def sort_output(path: str, id_lines: dict[str, int]) -> None:
    """Rewrite a finished output file in input order: answers by their id's line in this
    input (`id_lines`: id_key -> line), error records by their "line". Used after a resumed
    run, whose earlier answers came first in the file."""
    from chatkv.outfile import open_private

    p = Path(path)
    with open(p, encoding="utf-8") as f:
        texts = [t if t.endswith("\n") else t + "\n" for t in f if t.strip()]

    def where(text: str) -> int:
        try:
            rec = json.loads(text)
        except ValueError:
            return INT64_MAX
        if not isinstance(rec, dict):
            return INT64_MAX
        line = rec.get("line") if "error" in rec else id_lines.get(id_key(rec.get("id")), rec.get("line"))
        return line if isinstance(line, int) else INT64_MAX

    tmp = p.with_name(f".{p.name}.tmp")
    with open_private(tmp) as f:
        f.write("".join(sorted(texts, key=where)))
    os.replace(tmp, p)
