"""Reading a conversation's KV chunks while the model loads.

Resuming a saved conversation in a fresh process used to load the model first and read
the chunks after: two waits in a row. The conversation's chain is known from the index
before the model is (its kv_head), and the fingerprint the model will have is known from
the last load with the same settings (chatkv.engine.model.predict_fingerprint), so a
thread can read and decode the chain, straight into the compute dtype, while the main
thread imports and loads the model. With a remote tier (cache.url), the chunks this host
has no copy of are fetched in parallel in that thread too, each read as it arrives: a
resume on a cold host waits for the bucket during the load, not after it.

Nothing is trusted for being prefetched: every chunk goes through `read_chunk` with the
same checks as any read (format, fingerprint, codec the policy allows, size and checksum
of the index row, token ids hashing to the key, shapes, finite values); the KV layer then
uses a prefetched chunk only where its index row is still the one the prefetch read, the
loaded model's fingerprint, dtype, device and cache shape are the ones predicted, and
compares its token ids with the prompt's as for any chunk (KVManager._load). A chunk the
prefetch could not read is simply not prefetched: the attach reads it again and judges it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatkv.errors import CacheError, NotFoundError

if TYPE_CHECKING:
    import torch

    from chatkv.config import Settings
    from chatkv.engine.model import LoadedModel
    from chatkv.kv.chunks import ChunkData
    from chatkv.kv.objects import Tiers
    from chatkv.kv.policy import Policy
    from chatkv.store.chunk_index import ChunkIndex, ChunkRecord

log = logging.getLogger(__name__)


@dataclass
class Prefetched:
    """Chunks read ahead, in chain order from position 0, decoded into one buffer pair."""

    records: list[ChunkRecord]  # the index rows the reads were checked against
    data: list[ChunkData]  # what each decoded to; k/v are views of the buffers
    k: torch.Tensor  # (L, B, H, capacity, D)
    v: torch.Tensor  # (L, B, H, capacity, D)

    @property
    def tokens(self) -> int:
        return sum(r.n_tokens for r in self.records)


@dataclass
class Prefetch:
    """A background read of conversation `conversation_id`'s saved chunk chain, made for a
    model with `fingerprint`, `dtype` and `device` (or those `model` will load as) under
    the storage policy named `codec`.

    `start()` begins it; `take()` stops it after the chunk being read and hands over what
    was read (once): the attach reads the rest on two threads, where this one reads on one
    while the turn would wait; the timing attributes say how long the reads took and when,
    for statistics."""

    index: ChunkIndex
    kv_dir: Path
    conversation_id: int
    codec: str  # the storage policy's name (kv.policy)
    fingerprint: str = ""  # "" with `model` given: predicted in the thread
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    # (name, device, dtype, load_in) as in config's [model]: the fingerprint, dtype and device
    # are found from them in the thread, so the caller goes on loading at once
    model: tuple[str, str, str, str] | None = None
    # the conversation as chat-template messages, tokenized while the weights load (`tokenize`)
    render: Callable[[], list[dict[str, str]]] | None = None
    # cache.url's tiers (kv/objects.py), opened in the thread: chunks this host lacks are
    # fetched from the remote while the model loads, as the attach would after it. The KV
    # layer then takes the same tiers (`opened_tiers`): one client, one record of a failing
    # bucket (said once, never waited for twice).
    open_tiers: Callable[[], Tiers | None] | None = None
    tiers: Tiers | None = None
    started_at: float = 0.0  # time.perf_counter() when the thread began
    reads_began: float = 0.0  # when it began reading (after imports and finding the chain)
    finished_at: float = 0.0  # and when it ended
    read_cpu_s: float = 0.0  # processor time of the reads (their wall time counts waits for the loader)
    read_tokens: int = 0  # tokens read and checked
    used_tokens: int = 0  # of those, how many the attach took
    taken: bool = False
    problem: str = ""  # why the reads stopped early, if they did
    policy: Policy | None = None
    # Set once the thread has imported what it needs (torch, no transformers): a loader waits
    # for it before importing the rest, since two threads importing the same package at once
    # can see a lazy module half-built (ImportError), and the thread imports nothing of
    # transformers after (the tiers' client, boto3, is its own).
    imported: threading.Event = field(default_factory=threading.Event)
    _tiers_opened: threading.Event = field(default_factory=threading.Event)
    # keys of the chunks the thread copied from the remote tier: this resume's, even where
    # the attach reads them again (a read not taken), and over cache.local_bytes until trimmed
    fetched: set[str] = field(default_factory=set)
    _tokenizing: threading.Thread | None = None
    _result: Prefetched | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)
    _enough: threading.Event = field(default_factory=threading.Event)  # take(): stop, keep what was read
    _thread: threading.Thread | None = None
    _chain: list[ChunkRecord] = field(default_factory=list)  # what it set out to read (and fetch)

    @property
    def read_s(self) -> float:
        """Seconds the chunk reads took (0 before they end or when none began)."""
        return max(0.0, self.finished_at - self.reads_began) if self.finished_at and self.reads_began else 0.0

    def start(self) -> Prefetch:
        # A daemon thread: Ctrl-C during the load must not wait for it (cancel() stops it
        # between two chunks, and the process may exit before that).
        self._thread = threading.Thread(target=self._run, name="chatkv-prefetch", daemon=True)
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Stop reading (after the chunk being read) and drop what was read."""
        self._cancel.set()
        self._result = None

    def tokenize(self, tokenizer: Any) -> Callable[[], None] | None:
        """Start tokenizing the conversation with `tokenizer`, so that its turn finds the ids
        remembered (chat_ids); returns what waits for it. For load_model's on_tokenizer: the
        weights load meanwhile."""
        from chatkv.engine.model import tokenize_aside

        if self.render is None:
            return None
        # A lean load that failed after giving its tokenizer gives the fallback's too: the
        # first thread ends before the second starts, and no thread is left unwaited for.
        self.tokenized()
        self._tokenizing = tokenize_aside(tokenizer, self.render)
        return self.tokenized

    def tokenized(self) -> None:
        """Until `tokenize` is done with the tokenizer."""
        if self._tokenizing is not None:
            self._tokenizing.join()

    def opened_tiers(self) -> Tiers | None:
        """The tiers the thread opened (None without cache.url, or when opening them failed:
        the KV layer opens its own then). Waits for the thread to get that far."""
        self._tiers_opened.wait()
        return self.tiers

    def wait(self) -> None:
        """Until the reads have ended."""
        if self._thread is not None:
            self._thread.join()

    def take(self, fingerprint: str, dtype: torch.dtype, device: torch.device) -> Prefetched | None:
        """Stop the reads after the chunk being read and hand over what they gave, if it was
        read for this model (`fingerprint`, `dtype`, `device`); None otherwise or when nothing
        was read. Once: a second call returns None. The attach reads the chunks not read yet
        itself, two at a time: once the model has loaded, the reads left over no longer share
        the processor with the load, and the turn waits for them (a resumed 3,600-token
        conversation's last 0.2 s of reads, on two cores)."""
        self._enough.set()
        self.wait()
        result, self._result = self._result, None
        if self.taken or result is None:
            return None
        self.taken = True
        if (fingerprint, dtype, device) != (self.fingerprint, self.dtype, self.device):
            log.debug("discarding prefetched chunks: made for another model, dtype or device")
            return None
        return result

    def _run(self) -> None:
        self.started_at = time.perf_counter()
        try:
            try:
                # torch, not transformers: the loader imports that meanwhile, and these reads,
                # mostly torch work outside the interpreter lock, overlap it.
                import chatkv.engine.model  # noqa: F401
                import chatkv.kv.chunks  # noqa: F401
                from chatkv.kv.policy import get_policy
            finally:
                self.imported.set()
            try:
                self.tiers = self.open_tiers() if self.open_tiers is not None else None
            finally:
                self._tiers_opened.set()
            self.policy = get_policy(self.codec)
            if self.model is not None:
                self._predict(*self.model)
            self._result = self._read() if self.fingerprint else None
        except Exception as e:  # a prefetch never fails anything: the attach reads as usual
            self.problem = str(e)
            log.debug("prefetch of conversation %s stopped: %s", self.conversation_id, e)
        finally:
            self._tiers_opened.set()  # also when the imports failed
            self.finished_at = time.perf_counter()
            if self._cancel.is_set():
                self._result = None

    def _predict(self, name: str, device: str, dtype: str, load_in: str) -> None:
        from chatkv.engine.model import pick_device, pick_dtype, predict_fingerprint

        self.fingerprint = predict_fingerprint(name, device, dtype, load_in)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)

    def _saved_chain(self) -> list[ChunkRecord]:
        """The conversation's saved chain from position 0, as far as this model and policy
        can use it."""
        try:
            head = self.index.get_kv_head(self.conversation_id)
        except NotFoundError:
            return []
        if not head.key or head.fingerprint != self.fingerprint:
            return []
        assert self.policy is not None  # set before the chain is looked up
        chain: list[ChunkRecord] = []
        for rec in self.index.chunk_chain(head.key):
            if (
                rec.fingerprint != self.fingerprint
                or rec.codec not in self.policy.allowed_tags
                or rec.start != sum(r.n_tokens for r in chain)
                or rec.parent != (chain[-1].key if chain else None)
            ):
                break
            chain.append(rec)
        return chain

    def release_fetches(self) -> None:
        """Drop this prefetch's bucket fetches nobody waited for (after the attach that took
        it has read what it uses): a later read looks again instead of trusting them."""
        if self.tiers is not None and self._chain:
            self.tiers.forget(self._chain)

    def _read(self) -> Prefetched | None:
        chain = self._chain = self._saved_chain()
        if not chain or self.dtype is None or self.device is None or self.policy is None:
            return None
        try:
            return self._read_chain(chain, self.tiers)
        finally:
            # Fetches not waited for: not wanted when the resume stopped (cancelled, or a chunk
            # that could not be read), so that a later read looks again; taken by the attach
            # (`take`), which goes on reading this chain at once, they are its to wait for
            # (it releases the rest: `release_fetches`).
            if self.tiers is not None and (self._cancel.is_set() or not self._enough.is_set()):
                self.tiers.forget(chain)

    def _read_chain(self, chain: list[ChunkRecord], tiers: Tiers | None) -> Prefetched | None:
        import torch

        from chatkv.kv.capacity import capacity
        from chatkv.kv.chunks import chunk_path, read_chunk

        assert self.dtype is not None and self.device is not None and self.policy is not None
        total = sum(r.n_tokens for r in chain)
        self.reads_began, cpu0 = time.perf_counter(), time.thread_time()
        if tiers is not None:
            tiers.prefetch(chain)  # in parallel, each read as soon as it is here
        data: list[ChunkData] = []
        k_buf = v_buf = None
        offset = 0
        for rec in chain:
            if self._cancel.is_set():
                return None
            if self._enough.is_set():
                break
            out = None
            if k_buf is not None and v_buf is not None:
                out = (
                    k_buf[..., offset : offset + rec.n_tokens, :],  # (L, B, H, t, D)
                    v_buf[..., offset : offset + rec.n_tokens, :],
                )
            if tiers is not None:
                where = tiers.ensure_local(rec)
                if where in ("missing", "failed"):  # the attach looks again and judges
                    self.problem = f"chunk {rec.key[:12]}: {where} in the remote tier"
                    break
                if where == "remote":
                    self.fetched.add(rec.key)
            try:
                d = read_chunk(
                    chunk_path(self.kv_dir, rec.key),
                    self.policy,
                    self.fingerprint,
                    rec.key,
                    self.dtype,
                    self.device,
                    out=out,
                    nbytes=rec.nbytes,
                    checksum=rec.checksum,
                )
            except CacheError as e:  # left for the attach to read again and judge
                self.problem = str(e)
                break
            if d.start != offset:
                self.problem = f"chunk {rec.key[:12]} starts at {d.start}, expected {offset}"
                break
            if k_buf is None or v_buf is None:
                # The first chunk says the cache's shape (the model is not loaded yet): one
                # buffer pair for the whole chain, with room to grow as live.buffers leaves.
                layers, batch, heads, _, dim = d.k.shape  # (L, B, H, t, D)
                shape = (layers, batch, heads, capacity(total), dim)
                k_buf = torch.empty(shape, dtype=self.dtype, device=self.device)
                v_buf = torch.empty(shape, dtype=self.dtype, device=self.device)
                k_buf[..., : rec.n_tokens, :].copy_(d.k)
                v_buf[..., : rec.n_tokens, :].copy_(d.v)
                d.k, d.v = k_buf[..., : rec.n_tokens, :], v_buf[..., : rec.n_tokens, :]
            data.append(d)
            offset += rec.n_tokens
        self.read_cpu_s = time.thread_time() - cpu0
        if not data or k_buf is None or v_buf is None:
            return None
        self.read_tokens = offset
        return Prefetched(chain[: len(data)], data, k_buf, v_buf)


def start(
    index: ChunkIndex,
    kv_dir: Path,
    conversation_id: int,
    settings: Settings,
    lm: LoadedModel | None = None,
    render: Callable[[], list[dict[str, str]]] | None = None,
) -> Prefetch:
    """Begin reading the conversation's chunks in the background, under the storage policy
    `settings` names, for the model its [model] settings will load as, or for `lm`, a model
    loaded already but not yet given to the KV layer. `render` gives the conversation's
    messages, to tokenize while the weights load (Prefetch.tokenize)."""
    m, c = settings.model, settings.cache

    def open_tiers() -> Tiers | None:
        from chatkv.kv.objects import tiers_for

        return tiers_for(kv_dir, c)

    pre = Prefetch(
        index,
        kv_dir,
        conversation_id,
        c.codec,
        model=(m.name, m.device, m.dtype, m.load_in),
        render=render,
        open_tiers=open_tiers if c.url else None,
    )
    if lm is not None:
        pre.fingerprint, pre.dtype, pre.device, pre.model = lm.fingerprint, lm.dtype, lm.device, None
    return pre.start()
