"""Persistence: conversations, messages and the KV chunk index in SQLite.

Knows nothing of torch or the model. `Store(chatkv.paths.db_path())` opens the
database, upgrading its schema first when needed.
"""

from chatkv.store.common import ChunkRecord, KVHead
from chatkv.store.repo import Store

__all__ = ["ChunkRecord", "KVHead", "Store"]
