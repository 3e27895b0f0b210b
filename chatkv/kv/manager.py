"""The KV layer's front: find the longest cached prefix of a prompt, keep caches
live across turns, and spill what is new to the chunk store off the critical path.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from chatkv.api import CacheSource
from chatkv.errors import CacheError, NotFoundError
from chatkv.kv import live, maintenance
from chatkv.kv.appending import Appending
from chatkv.kv.chunks import (
    chain_keys,
    chunk_key,
    chunk_path,
    encode_chunk,
    inspect_chunk,
    peek_tokens,
    read_chunk,
    relpath,
    write_atomic,
)
from chatkv.kv.codecs import Codec, codec_by_tag, get_codec
from chatkv.kv.policy import DEFAULT_POLICY, get_policy
from chatkv.store.chunk_index import ChunkRecord
from chatkv.tokens import common_prefix as common_prefix  # re-exported: tests use it from here

if TYPE_CHECKING:
    import torch

    from chatkv.engine.model import LoadedModel
    from chatkv.kv.chunks import ChunkData, FileId, Layers
    from chatkv.kv.live import Cache
    from chatkv.kv.objects import Tiers
    from chatkv.kv.prefetch import Prefetch, Prefetched
    from chatkv.store.chunk_index import ChunkIndex

log = logging.getLogger(__name__)

LOAD_THREADS = 2  # chunk reads in flight while resuming from disk
PEEK_PARTIALS = 8  # partial chunks whose token ids an attach compares, newest first
# A chunk file sound in itself but unlike its row, for longer than this: no re-code is under
# way (one writes its row within moments of the file), its writer died or lost a race with
# another's row. The row is written again from the file (else every resume stopped there).
SETTLED_S = 30.0


@dataclass
class Attached:
    """A cache covering the first `cached` tokens of a prompt, and where it came from."""

    cache: Cache
    cached: int
    source: CacheSource
    load_s: float = 0.0
    problems: list[str] = field(default_factory=list)


class KVManager:
    """Attach, keep and spill KV caches for one loaded model.

    Args:
        store: the chunk index (chatkv.store.chunk_index.ChunkIndex, usually the Store:
            only its chunk, conversation-chunk and kv-head methods are used).
        kv_dir: where chunk files live.
        lm: the LoadedModel (model, fingerprint, device, dtype).
        codec: the storage policy for chunks on disk (kv/policy.py): a tiered policy's
            name or a single codec's.
    """

    def __init__(
        self,
        store: ChunkIndex,
        kv_dir: Path,
        lm: LoadedModel,
        codec: str = DEFAULT_POLICY,
        chunk_tokens: int = 256,
        live_bytes: int = 1 << 30,
        disk_bytes: int = 10 << 30,
        tiers: Tiers | None = None,
    ) -> None:
        self.store = store
        # cache.url: chunks also in an object store, read through kv_dir (kv/objects.py)
        self.tiers = tiers
        self.kv_dir = kv_dir
        self.lm = lm
        self.policy = get_policy(codec)
        self.codec = self.policy  # its .name is what turn statistics record
        self.chunk_tokens = chunk_tokens
        self.disk_bytes = disk_bytes
        self.pool = live.LivePool(live_bytes)
        # Chunks assume every layer caches every position; a model with sliding-window or
        # other special layers keeps live caches only.
        # A model whose weights could not be identified has no fingerprint: nothing it
        # computes may be saved (chatkv.engine.model.fingerprint said so once).
        self.persist = bool(lm.fingerprint) and all(
            isinstance(layer, Appending) for layer in live.new_cache(lm.model).layers
        )
        if lm.fingerprint and not self.persist:
            log.warning("this model's cache layers are not plain attention; caches are kept in memory only")
        self.bytes_written = 0  # chunk bytes written by spills, for tests and stats
        # The spill queue holds slots (a conversation, or a batch prefix); `_pending` the
        # newest snapshot of each slot not yet started. A newer snapshot of a conversation
        # covers the older one, so it replaces it: at most one queued and one being
        # written per conversation, however fast turns come.
        # For a cache attached from disk: up to which position it holds what lossy chunks
        # decoded to. A chunk there is not re-coded from it: int4 of int8's output is
        # measurably worse than int4 of the exact cache (bench quality --explore).
        self._inexact: weakref.WeakKeyDictionary[Cache, int] = weakref.WeakKeyDictionary()
        # chunks a read found sound in themselves but unlike their rows: the next spill that
        # holds their tokens writes them again (file, then row), whatever the row says
        self._unlike_rows: set[str] = set()
        self._q: queue.Queue[object] = queue.Queue()  # slots; None stops the worker
        # slot -> (conversation id, tokens, layers, pool ticket, inexact up to)
        self._pending: dict[object, tuple[int | None, list[int], Layers, object, int]] = {}
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        self._temp_cleaned = False
        # Chunks of one conversation read while the model loaded (kv/prefetch.py): used by
        # that conversation's next attach from disk, then dropped.
        self.prefetch: Prefetch | None = None
        # The model's first forward on a throwaway cache (engine.model.warm_up), run aside
        # while the first prompt is attached: joined at the end of that attach, since the
        # caller's own forward comes next and the two should not share the cores.
        self.warm_up: threading.Thread | None = None

    # -- attach --------------------------------------------------------------

    def attach(self, conv: object, tokens: Sequence[int], whole: bool = False) -> Attached:
        """A cache for the longest known prefix of `tokens`.

        It covers at most len-1 tokens, so that the caller prefills at least one token and
        gets the next-token logits from it; `whole` lets it cover all of `tokens` (batch
        attaches a shared prefix that its lines then continue each on its own)."""
        pre = self.prefetch if self.prefetch is not None and self.prefetch.conversation_id == conv else None
        if pre is not None:
            self.prefetch = None  # one attach uses it, or nothing does
        elif self.prefetch is not None and conv is not None:
            self.drop_prefetch()  # the first turn went elsewhere: its buffers would be held to the end
        try:
            return self._attach(conv, tokens, whole, pre)
        finally:
            if pre is not None and not pre.taken:  # memory had it, or disk was not worth reading
                pre.cancel()  # frees its buffers
            if pre is not None:
                pre.release_fetches()  # those the attach did not wait for
            warm, self.warm_up = self.warm_up, None
            if warm is not None:
                warm.join()

    def drop_prefetch(self, conv: object = None) -> None:
        """Cancel the prefetch (of conversation `conv` only, when given) and free its buffers."""
        pre = self.prefetch
        if pre is None or (conv is not None and pre.conversation_id != conv):
            return
        self.prefetch = None
        pre.cancel()
        pre.release_fetches()

    def _attach(
        self, conv: object, tokens: Sequence[int], whole: bool, pre: Prefetch | None = None
    ) -> Attached:
        t0 = time.perf_counter()
        limit = len(tokens) if whole else len(tokens) - 1
        item = self.pool.take(conv) if conv is not None else None
        mem = min(common_prefix(item.tokens, tokens), limit) if item else 0
        problems: list[str] = []
        # Disk is consulted when memory has nothing, or when disk could give a chunk more.
        if self.persist and (mem == 0 or mem < limit - self.chunk_tokens):
            try:
                plan, disk = self._disk_plan(tokens, limit, conv)
                if disk > (mem + self.chunk_tokens if mem else 0):  # worth reading over memory
                    cache, n, problems, remote = self._load(plan, tokens, limit, pre)
                    if n > mem:
                        assert cache is not None  # n > 0: _load returns a cache with it
                        source: CacheSource = "remote" if remote else "disk"
                        return Attached(cache, n, source, time.perf_counter() - t0, problems)
            except Exception as e:  # never fail a turn for its cache: prefill instead
                log.warning("could not read the saved KV cache (%s); recomputing it", e)
                problems.append(str(e))
        if item and mem > 0 and live.crop_to(item.cache, mem):
            return Attached(item.cache, mem, "memory", time.perf_counter() - t0, problems)
        return Attached(live.new_cache(self.lm.model), 0, "none", time.perf_counter() - t0, problems)

    def _disk_plan(
        self, tokens: Sequence[int], limit: int, conv: object = None
    ) -> tuple[list[ChunkRecord], int]:
        """The chunk records covering the longest prefix of `tokens` on disk, and at most how
        many tokens they give.

        Full chunks are found by key. After the last one, the plan may end with a chunk that
        only begins like `tokens`: a partial tail continuing that chain, or else the next
        chunk of the conversation's own saved chain (its reply re-tokenized differently, or
        the template renders past turns differently); `_load` uses their common prefix.
        """
        fp, c = self.lm.fingerprint, self.chunk_tokens
        keys = chain_keys(fp, tokens, c)
        found = self.store.get_chunks(keys) if keys else {}
        allowed = self.policy.allowed_tags
        plan: list[ChunkRecord] = []
        for k in keys:
            if k not in found or found[k].codec not in allowed:  # a coarser codec than the policy's
                break
            plan.append(found[k])
        start = len(plan) * c
        parent = plan[-1].key if plan else None
        # tails are lossless; the tag (codec name and parameters) leaves other versions' alone
        partials = self.store.find_partials(parent, fp, self.policy.tail.tag, start)  # newest first
        exact = [
            r
            for r in partials
            if start + r.n_tokens <= len(tokens)
            and chunk_key(fp, parent, tokens[start : start + r.n_tokens]) == r.key
        ]
        best = max(exact, key=lambda r: r.n_tokens) if exact else None
        # A longer partial that only begins like `tokens` (the same prompt asked before, its
        # reply after it) may give more than the longest exact one (a shared system prompt's):
        # the newest few are compared by the token ids their files hold.
        have, unlike = (best.n_tokens if best else 0), set()
        for r in [r for r in partials if r not in exact and r.n_tokens > have][:PEEK_PARTIALS]:
            try:
                held = peek_tokens(chunk_path(self.kv_dir, r.key))  # None: not here (a remote tier's)
            except CacheError:  # a damaged row: _load says so and removes it, if it is planned
                held = None
            same = common_prefix(held, tokens[start : start + len(held)]) if held is not None else 0
            if same > have:
                best, have = r, same
            elif held is not None and not same:
                unlike.add(r.key)
        if best is not None:
            plan.append(best)
        elif start < len(tokens):
            left = [r for r in partials if r.key not in unlike]
            near = left[0] if left else self._own_next_chunk(conv, plan)
            if near is not None:
                plan.append(near)
        n = sum(r.n_tokens for r in plan)
        return plan, min(n, limit)

    def _own_next_chunk(self, conv: object, plan: list[ChunkRecord]) -> ChunkRecord | None:
        """The chunk of the conversation's saved chain that follows `plan`, if the chain
        starts with exactly `plan`."""
        if not isinstance(conv, int):
            return None
        try:
            head = self.store.get_kv_head(conv)
        except NotFoundError:
            return None
        if not head.key or head.fingerprint != self.lm.fingerprint:
            return None
        chain = self.store.chunk_chain(head.key)
        if len(chain) <= len(plan) or [r.key for r in chain[: len(plan)]] != [r.key for r in plan]:
            return None
        nxt = chain[len(plan)]
        ok = nxt.codec in self.policy.allowed_tags and nxt.parent == (plan[-1].key if plan else None)
        return nxt if ok else None

    def _read_into(
        self, rec: ChunkRecord, offset: int, k_buf: torch.Tensor, v_buf: torch.Tensor, retry: bool = True
    ) -> ChunkData | CacheError:
        """Read one chunk and decode it straight into the buffers at `offset`.
        A CacheError is returned, not raised, so that reads can run ahead."""
        t = rec.n_tokens
        out = (k_buf[..., offset : offset + t, :], v_buf[..., offset : offset + t, :])  # (L, B, H, t, D)
        try:
            data = read_chunk(
                chunk_path(self.kv_dir, rec.key),  # never the row's path column: it is not trusted
                self.policy,
                self.lm.fingerprint,
                rec.key,
                self.lm.dtype,
                self.lm.device,
                out=out,
                nbytes=rec.nbytes,
                checksum=rec.checksum,
            )
        except CacheError as e:
            # A spill of another conversation may have re-coded this chunk (file first, then
            # its row) since the row was read: read it again under its current row, once.
            fresh = self.store.get_chunks([rec.key]).get(rec.key) if retry else None
            if fresh is not None and (fresh.checksum, fresh.nbytes) != (rec.checksum, rec.nbytes):
                return self._read_into(fresh, offset, k_buf, v_buf, retry=False)
            if e.damaged and retry and self._sound_in_itself(rec.key):
                # ... or has re-coded it, and its row is not written yet: the file is sound by
                # its own checksum, only not the row's. Not damage: it stays, this turn
                # recomputes from here (removing it would leave the new row without a file).
                healed = self._reindex(rec)
                if healed is not None:
                    return self._read_into(healed, offset, k_buf, v_buf, retry=False)
                self._unlike_rows.add(rec.key)
                return CacheError(f"{e} (a re-code under way)", damaged=False)
            return e
        if data.start != offset:
            return CacheError(f"chunk {rec.key[:12]} starts at {data.start}, expected {offset}")
        return data

    def _reindex(self, rec: ChunkRecord) -> ChunkRecord | None:
        """The row of a chunk file that has disagreed with it for SETTLED_S, written again
        from the file's own metadata; None while a re-code may still be writing its row (or
        with a bucket, whose object the row describes: this host's copy is fetched again)."""
        path = chunk_path(self.kv_dir, rec.key)
        try:
            if self.tiers is not None or time.time() - path.stat().st_mtime < SETTLED_S:
                return None
            found = maintenance.record_of(path, rec.key, relpath(rec.key))
        except (OSError, CacheError):
            return None
        if (found.fingerprint, found.start, found.parent) != (rec.fingerprint, rec.start, rec.parent):
            return None
        healed = replace(found, created_at=rec.created_at, last_used_at=rec.last_used_at)
        self.store.add_chunk(healed)
        log.info("chunk %s: its index row is written again from its file", rec.key[:12])
        return healed

    def _sound_in_itself(self, key: str) -> bool:
        """Whether the chunk file of `key` passes every check but the index row's size and
        checksum: its own metadata for this model, its structure and its own checksum."""
        try:
            inspect_chunk(chunk_path(self.kv_dir, key), key, expect={"fingerprint": self.lm.fingerprint})
        except CacheError:
            return False
        return True

    def _prefetched(
        self, pre: Prefetch | None, plan: list[ChunkRecord], total: int
    ) -> tuple[Prefetched | None, int]:
        """What a prefetch read of `plan`'s first chunks (and how many), when it was read for
        this model, into buffers of this cache's shape with room for `total` tokens, from
        the index rows `plan` has now (a chunk re-coded since is read again)."""
        got = pre.take(self.lm.fingerprint, self.lm.dtype, self.lm.device) if pre is not None else None
        if got is None:
            return None, 0
        layers, heads, dim = self.lm.kv_shape
        shape = got.k.shape  # (L, B, H, capacity, D)
        if (shape[0], shape[1], shape[2], shape[4]) != (layers, 1, heads, dim) or shape[3] < total:
            return None, 0
        same = 0
        for want, have in zip(plan, got.records, strict=False):
            if (want.key, want.start, want.nbytes, want.checksum) != (
                have.key,
                have.start,
                have.nbytes,
                have.checksum,
            ):
                break
            same += 1
        return (got, same) if same else (None, 0)

    def _load(
        self, plan: list[ChunkRecord], tokens: Sequence[int], limit: int, pre: Prefetch | None = None
    ) -> tuple[Cache | None, int, list[str], bool]:
        """Read chunks two at a time (file reads, checksums and dequantizing overlap)
        straight into one preallocated cache, use them in order, and stop at the first one
        that cannot be trusted (it is removed; its tokens will be prefilled again).
        Chunks `pre` read already (while the model loaded) are taken as read.
        With a remote tier, all of the plan's other chunks missing locally are fetched in
        parallel first, each decoded as soon as it is here. The last result: whether a used
        chunk came from the remote."""
        offsets = [sum(r.n_tokens for r in plan[:i]) for i in range(len(plan))]
        total = offsets[-1] + plan[-1].n_tokens
        got, ahead = self._prefetched(pre, plan, total)
        if got is not None:
            k_buf, v_buf = got.k, got.v
        else:
            k_buf, v_buf = live.buffers(self.lm.model, total, dtype=self.lm.dtype, device=self.lm.device)
        problems: list[str] = []
        n, used, inexact = 0, 0, 0
        rest = plan[ahead:]
        where: dict[str, str] = {}
        tiers = self.tiers
        if tiers is not None:
            tiers.prefetch(rest)

        def read(rec: ChunkRecord, offset: int) -> ChunkData | CacheError:
            if tiers is not None:
                # "missing": no file, read_chunk finds the row stale; "failed": keep the row
                where[rec.key] = tiers.ensure_local(rec)
                if where[rec.key] == "failed":
                    return CacheError(f"chunk {rec.key[:12]} could not be fetched", damaged=False)
            got = self._read_into(rec, offset, k_buf, v_buf)
            if tiers is None or not isinstance(got, CacheError) or not got.damaged:
                return got
            # With a bucket, the shared row goes only when the bucket's object itself is bad
            # ("remote": just fetched) or gone ("missing"); dropping it for this host's copy
            # would cost every other host the chunk.
            path = chunk_path(self.kv_dir, rec.key)
            if where[rec.key] != "missing" and not path.exists():
                # trimmed by another process on this host between the fetch and the read
                return CacheError(f"chunk {rec.key[:12]}: local copy trimmed meanwhile", damaged=False)
            if where[rec.key] == "local":  # this host's copy is bad: fetch it again next time
                path.unlink(missing_ok=True)
                return CacheError(f"{got}; the local copy is removed", damaged=False)
            return got

        with ThreadPoolExecutor(
            max_workers=max(1, min(LOAD_THREADS, len(rest))), thread_name_prefix="chatkv-load"
        ) as ex:
            reads = ex.map(read, rest, offsets[ahead:])
            results = itertools.chain(got.data[:ahead] if got is not None else [], reads)
            for i, (rec, data) in enumerate(zip(plan, results, strict=True)):
                if not isinstance(data, CacheError) and data.parent != (plan[i - 1].key if i else None):
                    # a row that names another parent than its file (partials are found by the
                    # row's): the file is sound, but its cache follows another prefix
                    data = CacheError(f"chunk {rec.key[:12]} follows another prefix than its index row says")
                if isinstance(data, CacheError):
                    problems.append(str(data))
                    if data.damaged:
                        log.warning("dropping KV chunk: %s; its tokens will be recomputed", data)
                        self._remove_chunks([rec], {rec.key: data.file_id})
                    else:  # a transient read error: the chunk may well be sound, keep it
                        # (a failed bucket is said once, by its tiers: not again for each chunk)
                        say = log.debug if where.get(rec.key) == "failed" else log.warning
                        say("could not read KV chunk: %s; its tokens will be recomputed", data)
                    break
                # a chunk that only begins like the prompt (a reply re-tokenized differently):
                # use that much, and nothing after it
                same = common_prefix(data.tokens, tokens[n : n + len(data.tokens)])
                n += same
                used += same > 0
                if same and not get_codec(data.codec).lossless:
                    inexact = n
                if same < len(data.tokens):
                    break
            ex.shutdown(cancel_futures=True)  # after a break: don't read chunks that won't be used
        fetched = pre.fetched if pre is not None else set()  # by the prefetch, while the model loaded
        remote = any(where.get(r.key) == "remote" or r.key in fetched for r in plan[:used])
        if tiers is not None:
            tiers.forget(plan)
            if "remote" in where.values() or fetched:
                tiers.trim_after()  # the copies just fetched (counted by the tiers) against cache.local_bytes
        if n == 0:
            return None, 0, problems, False
        self.store.touch_chunks([r.key for r in plan[:used]])
        if pre is not None and got is not None:
            pre.used_tokens = min(n, sum(r.n_tokens for r in plan[:ahead]))
        n = min(n, limit)
        cache = live.cache_from_buffers(self.lm.model, k_buf, v_buf, n)
        self._inexact[cache] = min(inexact, n)
        return cache, n, problems, remote

    # -- keep and spill ------------------------------------------------------

    def keep_live(self, conv: object, tokens: Sequence[int], cache: Cache) -> None:
        """Keep `cache` (covering `tokens`) live for the conversation's next turn."""
        n = live.untear(cache)
        self.pool.put(conv, list(tokens[:n]), cache)

    def inexact(self, cache: Cache) -> int:
        """How many leading positions of `cache` were decoded from lossy chunks (0: none)."""
        return self._inexact.get(cache, 0)

    def spill(self, conv_id: int | None, tokens: Sequence[int], cache: Cache, inexact: int = 0) -> None:
        """Queue writing what is new of `cache` to disk; returns at once. `inexact`: leading
        positions decoded from lossy chunks, for a cache built from such a one (batch's rows),
        which the chunks' re-coding must not take for exact (see _inexact)."""
        if not self.persist:
            return
        n = live.untear(cache)
        snapshot = [(k[..., :n, :], v[..., :n, :]) for k, v in live.layers_of(cache)]  # (B, H, n, D)
        slot = conv_id if conv_id is not None else ("prefix", hash(tuple(tokens[:n])))
        ticket = object()
        self.pool.hold(ticket, conv_id, sum(k.nbytes + v.nbytes for k, v in snapshot))
        with self._worker_lock:
            older = self._pending.get(slot)
            lossy = min(max(self._inexact.get(cache, 0), inexact), n)
            self._pending[slot] = (conv_id, list(tokens[:n]), snapshot, ticket, lossy)
            if older is not None:  # superseded before it started
                self.pool.release(older[3])
            else:
                self._q.put(slot)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="chatkv-spill", daemon=True)
                self._worker.start()

    def flush(self) -> None:
        """Wait until every queued spill is on disk."""
        self._q.join()

    def _run(self) -> None:
        while True:
            slot = self._q.get()
            if slot is None:  # close(): leave no thread behind at interpreter exit
                self._q.task_done()
                return
            with self._worker_lock:
                conv_id, tokens, layers, ticket, inexact = self._pending.pop(slot)
            try:
                self._spill(conv_id, tokens, layers, inexact)
            except Exception as e:  # a failed spill only costs a future prefill
                log.warning("could not save the KV cache: %s", e)
            finally:
                self.pool.release(ticket)
                self._q.task_done()

    def _spill(self, conv_id: int | None, tokens: list[int], layers: Layers, inexact: int = 0) -> int:
        """Write the chunks of `tokens` that are missing or due for another codec; `layers`
        hold their cache, decoded from lossy chunks before position `inexact`."""
        if not self._temp_cleaned:  # temp files of spills killed half-way, once a process
            self._temp_cleaned = True
            maintenance.clean_temp(self.kv_dir)
        fp, c = self.lm.fingerprint, self.chunk_tokens
        wanted = self.keys_of(tokens)
        tail_key = wanted[-1] if len(tokens) % c else None
        if conv_id is not None and not self.store.add_conversation_chunks(conv_id, wanted):
            # Recorded before the files exist, so `chatkv rm` finds every chunk that holds
            # this conversation's tokens even if the process dies half-way through; a
            # conversation deleted while its spill was queued gets none written.
            return 0
        on_disk = self.store.get_chunks(wanted)
        if on_disk:  # served from memory this turn, but used all the same: not the next to evict
            self.store.touch_chunks(list(on_disk))
        written = 0
        layout = self.policy.layout(len(tokens), c)  # per chunk (start, end, codec, sink)
        for i, key in enumerate(wanted):
            partial = key == tail_key
            codec = layout[i][2]
            rec = on_disk.get(key)
            if rec is not None and key not in self._unlike_rows and chunk_path(self.kv_dir, key).exists():
                held = codec_by_tag(rec.codec)
                if not self._recode(rec, codec) or (i * c < inexact and held and self.policy.allows(held)):
                    continue  # as wanted, or only a lossy copy of it is at hand: left as it is
            if codec.lossless and i * c < inexact:
                # It would begin with positions decoded from a lossy chunk (a prompt that
                # parted from a quantized chunk part-way), labelled exact: a new conversation
                # asking the same would reuse them as exact. Not stored; computed next time
                # (and nothing after it: no chunk past a gap in the chain can be attached).
                break
            start, end = i * c, min((i + 1) * c, len(tokens))
            part = [(k[..., start:end, :], v[..., start:end, :]) for k, v in layers]  # (B, H, end-start, D)
            written += self._write(
                codec, key, wanted[i - 1] if i else None, start, tokens[start:end], part, partial
            )
            self._unlike_rows.discard(key)
        if conv_id is not None:
            try:
                old = self.store.get_kv_head(conv_id).key
                head = wanted[-1] if wanted else None
                self.store.set_kv_head(conv_id, head, len(tokens), fp)
                self._drop_superseded(old, head)
            except NotFoundError:  # deleted while its spill was queued: take its chunks too
                self._forget_orphans(wanted)
        self.bytes_written += written
        if self.tiers is not None:
            if written:  # the index is shared (cache.remote_bytes, by gc only): this host's copies
                self.tiers.trim_after(written)
        elif written:  # 0 too: as `cache gc` takes it, nothing kept but what was just written
            self.gc(self.disk_bytes, keep=set(wanted))
        return written

    def keys_of(self, tokens: list[int]) -> list[str]:
        """The keys of the chunks a spill of `tokens` writes: the full ones, then the tail."""
        fp, c = self.lm.fingerprint, self.chunk_tokens
        keys = chain_keys(fp, tokens, c)
        tail = len(keys) * c
        if tail < len(tokens):
            keys.append(chunk_key(fp, keys[-1] if keys else None, tokens[tail:]))
        return keys

    def claim(self, conv_id: int, tokens: list[int]) -> None:
        """Record that the conversation holds the chunks of `tokens`, a prefix spilled on its
        own (batch's shared prefix): its tail chunk is no chunk of the conversation's chain,
        and `chatkv rm` must find it all the same."""
        self.store.add_conversation_chunks(conv_id, self.keys_of(tokens))

    def _recode(self, rec: ChunkRecord, codec: Codec) -> bool:
        """Whether a chunk on disk is to be written again with `codec`: when the policy
        refuses what it holds, or it has aged into a coarser tier. Never to a finer codec
        the policy does not need (conversations sharing a chunk would take turns)."""
        held = codec_by_tag(rec.codec)
        if held is None or not self.policy.allows(held):
            return True
        return held.tag != codec.tag and held.bits > codec.bits

    def _write(
        self,
        codec: Codec,
        key: str,
        parent: str | None,
        start: int,
        tokens: list[int],
        layers: Layers,
        partial: bool,
    ) -> int:
        """Write a chunk atomically under its key (replacing a re-coded one), then index it."""
        blob, checksum = encode_chunk(
            codec, self.lm.fingerprint, key, parent, start, tokens, layers, partial, sink=self.policy.sink
        )
        rel = relpath(key)
        write_atomic(chunk_path(self.kv_dir, key), blob)
        now = datetime.now(UTC)
        rec = ChunkRecord(
            key=key,
            parent=parent,
            fingerprint=self.lm.fingerprint,
            codec=codec.tag,
            start=start,
            n_tokens=len(tokens),
            partial=partial,
            path=rel,
            nbytes=len(blob),
            checksum=checksum,
            created_at=now,
            last_used_at=now,
        )
        if self.tiers is not None:
            self.tiers.push(rec, blob)  # before the row: a host that finds the row finds the object
        self.store.add_chunk(rec)
        return len(blob)

    def _forget_orphans(self, keys: list[str]) -> None:
        """Remove chunks that no conversation uses any more (their conversation was deleted
        while this spill ran)."""
        orphans = self.store.unreferenced_chunks(keys)
        if orphans:
            remote = self.tiers.remote if self.tiers is not None else None  # pushed already: take them back
            try:
                maintenance.remove_keys(self.store, self.kv_dir, orphans, remote)
            except CacheError as e:  # the bucket unreachable: no row names them, `cache gc` collects them
                log.warning("a deleted conversation's %s", str(e).removeprefix("the "))

    def _drop_superseded(self, old_head: str | None, new_head: str | None) -> None:
        """A conversation's previous partial tail chunk is replaced by the new head."""
        if not old_head or old_head == new_head:
            return
        rec = self.store.get_chunks([old_head]).get(old_head)
        if rec and rec.partial and not self.store.chunk_is_head(old_head):
            self._remove_chunks([rec])

    def _remove_chunks(self, recs: list[ChunkRecord], judged: dict[str, FileId | None] | None = None) -> None:
        maintenance.remove(self.store, self.kv_dir, recs, judged)

    def gc(self, max_bytes: int, keep: frozenset[str] | set[str] = frozenset()) -> tuple[int, int]:
        """Evict least recently used chunks down to `max_bytes`; returns (removed, bytes freed)."""
        return maintenance.evict_lru(self.store, self.kv_dir, max_bytes, keep)

    def close(self) -> None:
        """Finish queued spills and stop the spill thread (a later spill starts a new one);
        stop the remote tier's fetches."""
        self.flush()
        with self._worker_lock:
            worker, self._worker = self._worker, None
        # outside the lock: a spill queued since the flush has the worker take that lock
        if worker is not None and worker.is_alive():
            self._q.put(None)
            worker.join()
        if self.tiers is not None:
            self.tiers.close()
