"""One assistant turn: prepared from the transcript, run through the engine, saved.

`Chat.send`, `regenerate` and `edit` (chatkv.session) make a `Turn`; iterating it renders
the conversation, attaches the longest cached prefix, prefills the rest and streams the
reply; at the end the reply and what it replaces are saved in one transaction and the
cache is kept live and spilled. Every piece is journaled before it is shown, and the
conversation's lease is held throughout (see chatkv.journal and chatkv.lease).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from dataclasses import replace as changed
from typing import TYPE_CHECKING

from sqlalchemy import exc

from chatkv import journal, lease
from chatkv.api import FinishReason, GenerationSettings, MessageView, TurnStats
from chatkv.errors import ChatKVError
from chatkv.store.common import new_turn_id
from chatkv.store.db import describe_db_error

if TYPE_CHECKING:
    from chatkv.kv.manager import Attached, KVManager
    from chatkv.session import Chat

log = logging.getLogger(__name__)


@dataclass
class Replace:
    """A change to the transcript that takes effect when the new reply is saved: the prompt
    stops before `position` (None: nothing is cut), message `message_id` reads `text`, and
    the messages `set_aside` (by id, never by position) become earlier versions."""

    position: int | None
    message_id: int | None = None
    text: str | None = None
    set_aside: list[int] = field(default_factory=list)
    reply_position: int | None = None  # where the reply goes (for a kept-aside stopped turn)

    @property
    def edit(self) -> tuple[int, str] | None:
        """(message id, new text) of an edit; None for a regenerate."""
        return (self.message_id, self.text) if self.message_id is not None and self.text is not None else None


class Turn:
    """One assistant reply being generated (implements chatkv.api.TurnStream).

    Holds the conversation's lease from creation to the end of iteration, so no other turn
    (in this process or another) interleaves with it. Every piece it yields is in its
    journal before the consumer sees it; the reply and what it replaces are saved in one
    transaction at the end (chatkv.store.Store.finish_turn).
    """

    def __init__(
        self,
        chat: Chat,
        conversation_id: int,
        settings: GenerationSettings,
        held: lease.Lease,
        new_user_message: MessageView | None = None,
        replace: Replace | None = None,
        new_conversation: bool = False,
    ):
        self.replace = replace
        self.chat = chat
        self.conversation_id = conversation_id
        self.settings = settings
        self.new_user_message = new_user_message
        self.new_conversation = new_conversation
        self.message: MessageView | None = None
        self.kept_aside = False  # a stopped regenerate/edit: kept as an earlier version
        self.forgotten = False  # stopped before its reply began: the message it added was taken back
        self.stats = TurnStats()
        self.warnings: list[str] = []
        self.tokens: list[int] = []  # what the cache covers after the turn: prompt and reply
        self.turn_id = new_turn_id()
        # What the turn changes when its reply is saved: the journal holds the same.
        r = replace
        self.header = journal.Header(
            conversation_id=conversation_id,
            turn_id=self.turn_id,
            set_aside=list(r.set_aside) if r else [],
            edit=r.edit if r else None,
            reply_position=r.reply_position if r else None,
            model=chat.model_name,
        )
        self._lease = held
        self._journal: journal.Journal | None = None
        self._cancel = threading.Event()
        self._started = False

    def cancel(self) -> None:
        self._cancel.set()

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a turn can be iterated once")
        self._started = True
        return self._run()

    def _run(self) -> Iterator[str]:
        try:
            yield from self._generate()
        finally:
            self.chat.activity = ""
            if self._journal is not None:
                self._journal.close(saved=False)
            self._lease.release()

    def _generate(self) -> Iterator[str]:
        from chatkv.engine.generate import TextStream, generate

        chat = self.chat
        t0 = time.perf_counter()
        try:
            lm, kv = chat.loaded()
            ids, dropped = chat.fit(
                chat.render(self.conversation_id, self.replace), self.settings.max_new_tokens
            )
            chat.activity = f"reading the cache of {len(ids):,} tokens"
            # inside: Ctrl-C while the cache is read (seconds from a bucket) takes the
            # message back too, as the front end says
            att, self.stats = chat.prepare(self.conversation_id, ids, dropped)
            self.warnings += att.problems
            self._journal = self._open_journal()
            text = TextStream(lm.tokenizer, self.settings.stop)
        except BaseException:
            self._forget_user_message()
            raise
        chat.activity = f"prefilling {len(ids) - att.cached:,} tokens" if len(ids) - att.cached > 1 else ""
        st = self.stats
        gen: list[int] = []
        first = last = None
        reason: FinishReason = "error"
        try:
            for step in generate(
                lm.model,
                ids,
                att.cache,
                att.cached,
                self.settings,
                lm.eos_ids,
                lm.context_limit,
                self._cancel,
                on_prefill=self._prefill_reporter(st.prefilled_tokens),
            ):
                if step.token is None:
                    reason = step.finish_reason or "stop"
                    break
                last = time.perf_counter()
                if first is None:
                    first = last
                    chat.activity = ""
                    if self._journal is not None:  # a kill from here on still saves it
                        self._journal.stats(changed(st, ttft_s=first - t0))
                gen.append(step.token)
                piece = text.push(step.token)
                if piece:
                    if self._journal is not None:
                        self._journal.piece(piece, len(gen))
                    yield piece
                if text.stopped:
                    reason = "stop"
                    break
            piece = text.finish()
            if piece:
                if self._journal is not None:
                    self._journal.piece(piece, len(gen))
                yield piece
        # Cut short, the reply saved is what was shown (as its journal has it): not the text
        # held back as the possible start of a stop string, nor a piece not yet handed out.
        except GeneratorExit:  # the consumer stopped iterating: keep what was made
            reason = "cancelled"
            text.text = text.text[: text.emitted]
        except KeyboardInterrupt:  # Ctrl-C: keep what was shown, then let the front end exit
            if gen:  # the reply began (its first token may show nothing yet)
                self._save(text.text[: text.emitted], "cancelled", ids, gen, att, first, last, t0)
            else:
                self._forget_user_message()
            raise
        except BaseException:
            if not gen:
                self._forget_user_message()
                raise
            self._save(text.text[: text.emitted], reason, ids, gen, att, first, last, t0)
            raise
        if not gen and reason == "cancelled":
            # Stopped before the first token: no empty reply is saved and a pending edit or
            # regeneration is not applied; what was prefilled stays live for the next turn.
            kv.keep_live(self.conversation_id, ids, att.cache)
            return
        self._save(text.text, reason, ids, gen, att, first, last, t0)

    def _prefill_reporter(self, tokens: int) -> Callable[[int, int], None] | None:
        """An on_prefill callback for a prefill long enough to be worth showing (more than one
        engine step), reporting to the chat's on_progress; else None."""
        from chatkv.engine.generate import PREFILL_STEP

        if tokens <= PREFILL_STEP:
            return None
        report = self.chat.progress
        return lambda done, total: report("prefill", done, total)

    def _open_journal(self) -> journal.Journal | None:
        try:
            jr = journal.Journal(self.header)
        except OSError as e:  # no journal (a full disk, say): the turn still runs
            log.warning("could not open a reply journal: %s", e)
            return None
        jr.stats(self.stats)
        return jr

    def _save(
        self,
        content: str,
        reason: FinishReason,
        ids: list[int],
        gen: list[int],
        att: Attached,
        first: float | None,
        last: float | None,
        t0: float,
    ) -> None:
        st = self.stats
        st.finish_reason = reason
        st.completion_tokens = len(gen)
        st.ttft_s = (first - t0) if first else time.perf_counter() - t0
        st.decode_tps = (len(gen) - 1) / (last - first) if first and last and last > first else 0.0
        jr = self._journal
        if jr is not None:
            jr.end(reason, st)
        covered = self.tokens = list(ids) + gen
        try:
            self.message = journal.apply(self.chat.store, self.header, content, st, reason)
            self.kept_aside = self.message is None
        except exc.SQLAlchemyError as e:
            self._keep_live(covered, att)  # for the turn that saves it from the journal
            where = f"; its text is kept in {jr.path} and will be saved when chatkv next starts" if jr else ""
            raise ChatKVError(f"the reply could not be saved: {describe_db_error(e)}{where}") from e
        if jr is not None:
            jr.close(saved=True)
            self._journal = None
        kv = self._keep_live(covered, att)  # after the save: its failure costs a prefill, not the reply
        if kv is not None and not self.kept_aside:
            kv.spill(self.conversation_id, covered, att.cache)

    def _keep_live(self, covered: list[int], att: Attached) -> KVManager | None:
        """Keep the turn's cache for the next turn; a failure only logs (a prefill next time)."""
        try:
            _, kv = self.chat.loaded()
            kv.keep_live(self.conversation_id, covered, att.cache)
        except Exception as e:
            log.warning("could not keep the conversation's cache: %s", e)
            return None
        return kv

    def _forget_user_message(self) -> None:
        """A send that produced nothing leaves no trace: the front end gives the text back.
        Deleted by id: another process may have written to the conversation since."""
        m = self.new_user_message
        if m is None:
            return
        self.new_user_message = None
        self.forgotten = True
        try:
            if self.new_conversation:
                self.chat.store.delete_conversation(m.conversation_id)
            else:
                self.chat.store.delete_message(m.id)
        except Exception as e:  # the turn's own error is the one to report
            log.warning("could not remove the unanswered message: %s", e)
