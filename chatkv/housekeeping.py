"""What the session offers besides turns and the transcript: what the loaded model makes of
a text (token counts, its default system prompt), the models on disk and switching between
them, search, importing history, and the chunk store's upkeep for `chatkv cache` (none of
which needs the model loaded). A part of chatkv.session.Chat, as ChunkIndex
and Finding are parts of the Store."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatkv.api import GenerationSettings, ModelInfo
from chatkv.config import Settings
from chatkv.engine.defaults import generation_defaults
from chatkv.errors import ConfigError, ModelError
from chatkv.paths import kv_dir
from chatkv.store import Store

if TYPE_CHECKING:
    from chatkv.engine.model import LoadedModel
    from chatkv.imports import ImportReport
    from chatkv.kv.maintenance import GcReport, RebuildReport, VerifyReport
    from chatkv.kv.manager import KVManager
    from chatkv.kv.objects import ObjectStore, Tiers
    from chatkv.store.search import SearchHit

log = logging.getLogger(__name__)


class Housekeeping:
    """Models, search, import and cache upkeep (a part of chatkv.session.Chat)."""

    settings: Settings
    store: Store
    kv: KVManager | None
    lm: LoadedModel | None
    model_name: str
    defaults: GenerationSettings
    _preloaded: LoadedModel | None
    _load_lock: threading.Lock

    def load(self) -> None:
        raise NotImplementedError  # chatkv.session.Chat.load

    def count_tokens(self, text: str) -> int | None:
        """Tokens `text` adds as a user message; None while the model is not loaded."""
        lm = self.lm  # read once: a model switch may drop it meanwhile
        if lm is None:
            return None
        from chatkv.engine.model import chat_ids

        return len(chat_ids(lm.tokenizer, [{"role": "user", "content": text}], False))

    @property
    def default_system_prompt(self) -> str:
        """The system prompt the model's template uses when a conversation has none ("" if
        none, or before the model is loaded)."""
        lm = self.lm
        if lm is None:
            return ""
        from chatkv.engine.model import template_default_system_prompt

        return template_default_system_prompt(lm.tokenizer)

    def models(self) -> list[ModelInfo]:
        """The models usable offline, with their KV chunks on disk (chatkv.catalog)."""
        from chatkv.catalog import list_models

        return list_models(self.store.chunk_stats())

    def search(
        self,
        query: str,
        limit: int = 100,
        mark: tuple[str, str] = ("[", "]"),
        conversation_ids: list[int] | None = None,
    ) -> list[SearchHit]:
        """Messages and titles matching `query`, each with the match in context."""
        return self.store.search(query, limit=limit, mark=mark, conversation_ids=conversation_ids)

    def import_from(self, kind: str, path: str, dry_run: bool = False) -> ImportReport:
        """Bring in conversations from another tool ("llm", "chatgpt"); those imported before
        are skipped (chatkv.imports)."""
        from chatkv.imports import import_all

        return import_all(self.store, kind, path, dry_run=dry_run)

    def cache_stats(self) -> dict[str, Any]:
        """Chunks and bytes by codec and model (named where chatkv has seen it load), what
        cannot attach, leftover temp files, and each tier's count and bytes: "memory" (this
        process's live caches), "local" (kv/) and, with cache.url, "remote" (the bucket; an
        "error" instead when it cannot be listed)."""
        from chatkv.engine import seen
        from chatkv.kv.maintenance import chunk_files, reachable_stats, temp_files

        stats = self.store.chunk_stats() | reachable_stats(self.store)
        stats["temp_files"], stats["temp_bytes"] = temp_files(kv_dir())
        names = seen.names_by_fingerprint()
        for fp, entry in (stats.get("by_fingerprint") or {}).items():
            entry["model"] = names.get(fp)
        kv = self.kv
        local_count, local_bytes = chunk_files(kv_dir())
        tiers: dict[str, dict[str, Any]] = {
            "memory": {"count": len(kv.pool) if kv else 0, "bytes": kv.pool.bytes if kv else 0},
            "local": {"count": local_count, "bytes": local_bytes},
        }
        remote = self._remote()
        if remote is not None:
            try:
                sizes = [size for _, size, _ in remote.names()]
                tiers["remote"] = {"count": len(sizes), "bytes": sum(sizes), "where": remote.where}
            except OSError as e:
                tiers["remote"] = {"error": str(e), "where": remote.where}
        return stats | {"kv_dir": str(kv_dir()), "tiers": tiers}

    def _remote(self) -> ObjectStore | None:
        """The object store of cache.url (the loaded KV layer's when there is one); None without."""
        from chatkv.kv.objects import open_objects

        c, kv = self.settings.cache, self.kv
        if not c.url:
            return None
        return kv.tiers.remote if kv is not None and kv.tiers is not None else open_objects(c.url, c.shared)

    @contextmanager
    def _tiers(self) -> Iterator[Tiers | None]:
        """The tiers of cache.url for one maintenance command (None without cache.url)."""
        from chatkv.kv.objects import Tiers, local_budget

        remote = self._remote()
        if remote is None:
            yield None
            return
        c = self.settings.cache
        tiers = Tiers(kv_dir(), remote, local_budget(c.local_bytes, c.disk_bytes))
        try:
            yield tiers
        finally:
            tiers.close()

    def cache_budget(self) -> int | None:
        """What `chatkv cache gc` evicts the index down to by default: cache.disk_bytes, or with
        cache.url cache.remote_bytes (None: unlimited)."""
        c = self.settings.cache
        budget: int | None = c.remote_bytes if c.url else c.disk_bytes
        return budget

    def cache_gc(self, max_bytes: int | None) -> GcReport:
        """Drop index rows without a chunk and old orphan files, then evict down to `max_bytes`
        (None: with cache.url no eviction, else cache.disk_bytes); with cache.url, also trim
        the local copies and, when the index is shared (store.url set), collect the bucket's
        unnamed objects."""
        from chatkv.kv.maintenance import gc, gc_tiers

        with self._tiers() as tiers:
            if tiers is not None:
                c = self.settings.cache
                # Unnamed objects are garbage only when every host writes this one index: a
                # store.url set (a shared database) and the user's own prefix (not cache.shared).
                shared_index = bool(self.settings.store.url) and not c.shared
                return gc_tiers(self.store, tiers, max_bytes, collect_objects=shared_index)
            return gc(
                self.store, kv_dir(), self.settings.cache.disk_bytes if max_bytes is None else max_bytes
            )

    def cache_verify(self, fix: bool = True) -> VerifyReport:
        """Read every chunk (through the bucket with cache.url) and check it; with `fix`,
        remove the bad ones."""
        from chatkv.kv.maintenance import verify

        with self._tiers() as tiers:
            return verify(self.store, kv_dir(), fix=fix, tiers=tiers)

    def cache_rebuild(self) -> RebuildReport:
        """Rebuild the chunk index from the chunk files' own metadata (with cache.url, from
        the bucket's objects first)."""
        from chatkv.kv.maintenance import rebuild, rebuild_tiers

        with self._tiers() as tiers:
            if tiers is not None:
                return rebuild_tiers(self.store, tiers)
            return rebuild(self.store, kv_dir())

    def _use_model(self, model: str, source: str) -> None:
        """Make `model` the one to load, dropping the loaded one (caller holds the load lock)."""
        # First, so a name the config refuses changes nothing.
        self.settings.set("model.name", model, source=source)
        if self.kv is not None:
            self.kv.close()  # flushes the spills still queued, made with the old model
        # Dropped before the next one loads, so two models never share the memory.
        self.kv = self.lm = self._preloaded = None
        self.model_name = model
        self.defaults = generation_defaults(self.settings)  # the new model's sampling

    def follow_model(self, conversation_id: int) -> str | None:
        """Before the model loads: continue conversation `conversation_id` with the model it
        was last used with (as `llm -c` does), when that is not the configured one — its cache
        was made by that model, and the conversation goes on as it began. For a command with
        no --model. Returns a one-line note when its model can no longer be loaded (the
        configured one is used then); None otherwise. Raises NotFoundError."""
        from chatkv.engine.hub import looks_like_path, precheck

        name = self.store.get_conversation(conversation_id).model
        if not name or name == self.model_name or self.lm is not None or self._preloaded is not None:
            return None
        try:
            precheck(name)
            if looks_like_path(name) and not Path(name).expanduser().exists():
                raise ModelError(f"{name} does not exist")
            with self._load_lock:
                self._use_model(name, f"conversation {conversation_id}")
        except (ModelError, ConfigError) as e:
            return (
                f"conversation {conversation_id} was with {name!r}, which cannot be loaded here "
                f"({str(e).split(': ', 1)[0]}); continuing it with {self.model_name!r}"
            )
        return None

    def switch_model(self, name: str, conversation_id: int | None = None) -> None:
        """Use model `name` from now on (blocking: it is loaded before this returns) and, given
        `conversation_id`, record it as that conversation's model.

        The conversation's cache starts anew by itself: chunk keys and kv heads carry the
        model's fingerprint, so the old model's chunks never attach to the new one. Raises
        ModelError when `name` cannot be loaded, after loading the previous model again;
        ConfigError for a name model.name refuses (nothing changes then). Must not run while
        a turn does (the front ends refuse to)."""
        if conversation_id is not None:
            self.store.get_conversation(conversation_id)  # NotFoundError before anything changes
        previous = self.model_name
        if name != previous or self.lm is None:
            # The teardown holds the load lock so no load() interleaves with it; the load takes
            # the lock itself in load() (a plain Lock: it cannot be held across that call).
            with self._load_lock:
                self._use_model(name, "the model picker")
            try:
                self.load()
            except Exception:
                with self._load_lock:
                    self._use_model(previous, "the model picker")
                try:
                    self.load()
                except Exception as e:  # the previous one fails too: the switch's error is the news
                    log.warning("could not load %s again after a failed switch: %s", previous, e)
                raise
        if conversation_id is not None:
            self.store.set_model(conversation_id, name)
