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

The file format (JSONL lines in, records out in input order, resuming from an earlier
output) and the progress bar belong to the command: `chatkv.cli.jsonl`. The runner
reports each line's record through `emit`, and saves through the session
(`Chat.save_exchange`, under the conversation's lease): it adds grouping and batched
decoding to what the session does for one turn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from chatkv.api import GenerationSettings, TurnStats
from chatkv.errors import ChatKVError, InputError
from chatkv.tokens import common_prefix

log = logging.getLogger(__name__)

# Tokens two prompts must share to decode over one prefix: well past the chat template's
# own header (~5 tokens), which every prompt shares.
MIN_SHARED = 32
# Tokens a line without a shared prefix has to prefill beyond what is cached past which it
# is prefilled on its own, in steps, as `chatkv ask` does, before the batch decodes: in the
# batch's one forward an 8k-token line took 5x as long as ask and held the others up.
LONG_PREFILL = 256


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
    digest: str = ""  # of the line's fields but its id: a resumed run answers a changed line again
    given_id: bool = True  # False: the line has no "id", its line number stands for it
    # filled when rendered:
    chat: list[dict[str, str]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    dropped: int = 0
    inexact: int = 0  # leading positions of its cache decoded from lossy chunks (KVManager.spill)
    shared: int = 0  # tokens of the group's prefix, spilled on its own (its chunks are this line's too)


class LineProgress(Protocol):
    """What the runner reports: lines answered and tokens generated (chatkv.cli.jsonl.Progress)."""

    def update(self, items: int = 0, tokens: int = 0) -> None: ...


class _Silent:
    def update(self, items: int = 0, tokens: int = 0) -> None:
        pass


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
        model_given: the batch's model was named for it (--model). Without that, a line
            continuing a conversation that was with another model fails with the fix, where
            `ask -C` would load that model: one process serves a batch with one model, and
            going on with another would record the switch in the user's conversation.
    """

    def __init__(
        self,
        chat,
        emit: Callable[[dict], None],
        batch_size: int = 0,
        save: str = "continue",
        progress: LineProgress | None = None,
        model_given: bool = True,
    ):
        from chatkv.engine.batch import default_batch_size

        self.chat = chat
        self.emit = emit
        self.lm, _ = chat.loaded()
        self.batch_size = batch_size or default_batch_size(self.lm.device)
        layers, heads, head_dim = self.lm.kv_shape
        per_token = layers * 2 * heads * head_dim * self.lm.dtype.itemsize
        self.max_tokens = max(1, chat.settings.cache.live_bytes // per_token)  # padded positions per batch
        self.save = save
        self.model_given = model_given
        self.progress: LineProgress = progress or _Silent()
        self.summary = Summary()
        self.t0 = time.perf_counter()
        self._recorded: set[int] = set()  # lines whose record was emitted
        self._held: dict[int, Any] = {}  # line -> lease on the conversation it continues

    # -- records ---------------------------------------------------------------

    def _release(self, line: int) -> None:
        held = self._held.pop(line, None)
        if held is not None:
            held.release()

    def fail(self, line: int, id_: Any, error: str, reply: str | None = None) -> None:
        self._release(line)
        self.summary.failed += 1
        self._recorded.add(line)
        rec = {"id": id_, "line": line, "error": error}
        if reply is not None:  # generated, then not saved: the record keeps it (a rerun saves it)
            rec["reply"] = reply
        self.emit(rec)
        self.progress.update(items=1)

    def _failed(self, items: Iterable[Item], what: str, e: Exception, reply: str | None = None) -> None:
        """An unexpected error while serving `items`: each of them not yet answered gets an
        error record (the other lines go on), with `reply` where one was generated; the
        traceback is logged for --debug."""
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
                self.fail(item.line, item.id, f"{what} failed: {why}", reply)

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
        if item.digest:
            rec["input_digest"] = item.digest
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
            had = chat.get_conversation(item.conversation).model
            if not self.model_given and had and had != chat.model_name:
                raise InputError(
                    f"conversation {item.conversation} was with {had!r}, not {chat.model_name!r} that "
                    f"this batch runs: give --model {had} to continue it with its own model, or "
                    f"--model {chat.model_name} to go on with this one"
                )
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
        self.chat.flush()  # the spilled prefixes are on disk when the run ends
        self.summary.elapsed_s = time.perf_counter() - self.t0
        return self.summary

    def _round(self, items: list[Item]) -> None:
        try:
            self._serve_round(items)
        finally:
            for line in list(self._held):
                self._release(line)

    def _serve_round(self, items: list[Item]) -> None:
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

        t0 = time.perf_counter()
        prefix, layers, lossy = self.chat.prepare_prefix(items[0].ids[:p], spill=self.save != "none")
        for i in items:
            i.inexact, i.shared = lossy, p
        self.summary.prefix_tokens += p
        self.summary.prefix_from_disk += prefix.cached_tokens
        for n, part in enumerate(self._batches(items, p)):
            rows = [BatchRow(i.ids, i.settings, None, p, keep_cache=self._saves(i)) for i in part]
            stats = [self._stats(i, prefix) for i in part]
            self._decode(part, rows, layers, stats, t0 if n == 0 else time.perf_counter())

    @staticmethod
    def _stats(item: Item, prefix: TurnStats) -> TurnStats:
        """A line over a shared prefix: its statistics before decoding, as the session's
        `prepare` makes them, with the prefix's cache as the line's own."""
        return replace(
            prefix,
            prompt_tokens=len(item.ids),
            prefilled_tokens=len(item.ids) - prefix.cached_tokens,
            dropped_messages=item.dropped,
        )

    def _own(self, items: list[Item]) -> None:
        """Lines with no prefix shared in this file: each attaches its own cache."""
        from chatkv.engine.batch import BatchRow

        t0 = time.perf_counter()
        ready, rows, stats = [], [], []
        for i in items:
            try:
                att, st = self.chat.prepare(i.conversation, i.ids, i.dropped)
                i.inexact = self.chat.loaded()[1].inexact(att.cache)
                cached = att.cached
                if len(i.ids) - 1 - cached > LONG_PREFILL:
                    from chatkv.engine.generate import prefill

                    prefill(self.lm.model, i.ids[cached:-1], att.cache, cached)
                    cached = len(i.ids) - 1
            except Exception as e:  # out of memory on one long line: that line fails, not its batch
                self._failed([i], "generating", e)
                continue
            ready.append(i)
            rows.append(
                BatchRow(i.ids, i.settings, att.cache if cached else None, cached, keep_cache=self._saves(i))
            )
            stats.append(st)
        if ready:
            self._decode(ready, rows, None, stats, t0)

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
            except Exception as e:  # a full disk, a locked database: this line's record says so,
                self._failed([items[r]], "saving the reply", e, reply=texts[r].text)  # and keeps it
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
        shared = item.ids[: item.shared]
        return self.chat.save_exchange(item.conversation, new, text, st, tokens, cache, item.inexact, shared)
