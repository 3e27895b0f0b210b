"""What the session offers besides turns and the transcript: the models on disk and
switching between them, search, importing history, and the chunk store's upkeep for
`chatkv cache` (none of which needs the model). A part of chatkv.session.Chat, as ChunkIndex
and Finding are parts of the Store."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from chatkv.api import GenerationSettings, ModelInfo
from chatkv.config import Settings
from chatkv.engine.defaults import generation_defaults
from chatkv.errors import InputError
from chatkv.paths import kv_dir
from chatkv.store import Store

if TYPE_CHECKING:
    from chatkv.engine.model import LoadedModel
    from chatkv.imports import ImportReport
    from chatkv.kv.maintenance import GcReport, RebuildReport, VerifyReport
    from chatkv.kv.manager import KVManager
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
        cannot attach, and leftover temp files."""
        from chatkv.engine import seen
        from chatkv.kv.maintenance import reachable_stats, temp_files

        stats = self.store.chunk_stats() | reachable_stats(self.store)
        stats["temp_files"], stats["temp_bytes"] = temp_files(kv_dir())
        names = seen.names_by_fingerprint()
        for fp, entry in (stats.get("by_fingerprint") or {}).items():
            entry["model"] = names.get(fp)
        return stats | {"kv_dir": str(kv_dir())}

    def _local_cache_only(self, command: str) -> None:
        """Refuse a maintenance command that would take a chunk in the bucket but not in
        this host's kv/ for damage and drop its shared index row (README, "Sharing")."""
        if self.settings.cache.url:
            raise InputError(
                f"`chatkv cache {command}` does not know the shared chunk store yet (cache.url is set): "
                "it would drop chunks other hosts wrote; run it with CHATKV_CACHE_URL= on a host that "
                "has every chunk, or not at all"
            )

    def cache_gc(self, max_bytes: int) -> GcReport:
        """Drop index rows without files and old orphan files, then evict down to `max_bytes`."""
        from chatkv.kv.maintenance import gc

        self._local_cache_only("gc")
        return gc(self.store, kv_dir(), max_bytes)

    def cache_verify(self, fix: bool = True) -> VerifyReport:
        """Read every chunk and check it; with `fix`, remove the bad ones."""
        from chatkv.kv.maintenance import verify

        self._local_cache_only("verify")
        return verify(self.store, kv_dir(), fix=fix)

    def cache_rebuild(self) -> RebuildReport:
        """Rebuild the chunk index from the chunk files' own metadata."""
        from chatkv.kv.maintenance import rebuild

        self._local_cache_only("rebuild")
        return rebuild(self.store, kv_dir())

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

        def use(model: str) -> None:
            # First, so a name the config refuses changes nothing.
            self.settings.set("model.name", model, source="the model picker")
            if self.kv is not None:
                self.kv.close()  # flushes the spills still queued, made with the old model
            # Dropped before the next one loads, so two models never share the memory.
            self.kv = self.lm = self._preloaded = None
            self.model_name = model
            self.defaults = generation_defaults(self.settings)  # the new model's sampling

        if name != previous or self.lm is None:
            # The teardown holds the load lock so no load() interleaves with it; the load takes
            # the lock itself in load() (a plain Lock: it cannot be held across that call).
            with self._load_lock:
                use(name)
            try:
                self.load()
            except Exception:
                with self._load_lock:
                    use(previous)
                try:
                    self.load()
                except Exception as e:  # the previous one fails too: the switch's error is the news
                    log.warning("could not load %s again after a failed switch: %s", previous, e)
                raise
        if conversation_id is not None:
            self.store.set_model(conversation_id, name)
