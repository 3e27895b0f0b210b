"""The house's structure: which layer may import which (issue 10), who writes the transcript,
and what is computed in one place."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import LlamaConfig

from chatkv.engine.model import kv_shape
from chatkv.kv import live
from chatkv.kv.growable import capacity


def test_live_buffers_take_their_shape_from_the_engines_kv_shape() -> None:
    # Grouped-query attention and a head_dim that is not hidden_size / heads: the two cases
    # where reading the config naively gives the wrong shape.
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_hidden_layers=3
    )
    model = SimpleNamespace(config=config, dtype=torch.float32, device=torch.device("cpu"))
    assert kv_shape(config) == (3, 2, 24)
    k, v = live.buffers(model, 10, batch=2)
    assert k.shape == v.shape == (3, 2, 2, capacity(10), 24)  # (L, B, H, capacity, D)


# -- the arrows between layers -----------------------------------------------------------
#
# Imports flow face -> session -> (engine, kv, store); kv reaches the store through the chunk
# index alone; the neutral modules are shared by all and import nothing above them.

ROOT = Path(__file__).resolve().parent.parent / "chatkv"

SESSION = {"session", "turn", "journal", "lease", "catalog", "imports", "conversations", "housekeeping"}
NEUTRAL = {"api", "errors", "config", "paths", "progress", "fmt", "outfile", "tokens", "gcpause", "__main__"}

# Which layers each layer may import (besides its own). "store.chunk_index": that module only.
ALLOWED: dict[str, set[str]] = {
    "face": {"session", "batch", "bench", "neutral"},
    # Benchmarks measure the layers themselves beside the session (a re-prefill without any
    # cache, a codec round trip), so they may reach below it; nothing but the CLI imports them.
    "bench": {"session", "batch", "engine", "kv", "store", "neutral"},
    "session": {"engine", "kv", "store", "neutral"},
    # Batch groups lines and decodes them together; preparing and saving them is the session's.
    "batch": {"session", "engine", "neutral"},
    "engine": {"neutral"},
    "kv": {"engine", "store.chunk_index", "neutral"},
    "store": {"neutral"},
    "neutral": set(),
}

# Edges outside those rules, each with why it stays.
DECLARED: dict[tuple[str, str], str] = {
    ("chatkv.__main__", "chatkv.cli"): "`python -m chatkv` is the CLI's entry point",
    ("chatkv.engine.batch", "chatkv.kv.live"): (
        "batched decoding builds, pads and splits DynamicCaches with the KV layer's live-cache helpers"
    ),
    ("chatkv.engine.lean", "chatkv.kv.live"): (
        "the lean decode step appends each layer's new key and value to the live cache's layers in place"
    ),
    ("chatkv.engine.generate", "chatkv.kv.live"): (
        "prefill and decode extend a live cache, typed as the KV layer's Cache (DynamicCache or LeanCache)"
    ),
    ("chatkv.engine.model", "chatkv.kv.live"): (
        "the warm-up's throwaway cache comes from new_cache: a lean-loaded model's needs no transformers"
    ),
    ("chatkv.engine.leanload", "chatkv.kv.live"): (
        "a LeanCache handed to transformers' forward becomes a DynamicCache over the same layers"
    ),
    ("chatkv.batch", "chatkv.store.db"): (
        "a line's database error is translated where its record is written (as the turn does)"
    ),
    ("chatkv.cli", "chatkv.engine.hub"): (
        "a mistyped --model fails at once, before the session (and torch) is imported: hub.precheck is light"
    ),
    ("chatkv.cli", "chatkv.store.db"): (
        "errors are translated at the edge: describe_db_error names an sqlite error in one line"
    ),
    ("chatkv.cli.manage", "chatkv.engine.defaults"): (
        "`chatkv config show` prints the model's recommended sampling without loading a model or a session"
    ),
}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    base = ROOT.parent / rel
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """The chatkv modules `path` imports (TYPE_CHECKING and function-level imports included)."""
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if _is_module(sub) else base)
    return {m for m in found if m == "chatkv" or m.startswith("chatkv.")}


def layer_of(module: str) -> str:
    """The layer of a chatkv module (AssertionError for one no layer claims)."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top in ("cli", "ui"):
        return "face"
    if top in ("bench", "engine", "kv", "store"):
        return "store.chunk_index" if module == "chatkv.store.chunk_index" else top
    if top == "batch":
        return "batch"
    if top in SESSION:
        return "session"
    if top in NEUTRAL or top == "__init__":
        return "neutral"
    raise AssertionError(f"{module} belongs to no layer: add it to SESSION or NEUTRAL in {__file__}")


def _allowed(src: str, dst: str) -> bool:
    a, b = layer_of(src), layer_of(dst)
    a = "store" if a == "store.chunk_index" else a
    if b == "neutral" or b == a or (a == "store" and b == "store.chunk_index"):
        return True
    if b == "store.chunk_index" and "store.chunk_index" in ALLOWED[a]:
        return True
    b = "store" if b == "store.chunk_index" else b
    return b in ALLOWED[a]


def edges() -> set[tuple[str, str]]:
    return {(_module(p), m) for p in ROOT.rglob("*.py") for m in _imports(p) if m != _module(p)}


def test_every_import_follows_the_arrows_or_is_declared() -> None:
    found = edges()
    # The walk sees the house: these edges are there, each allowed or declared.
    assert {("chatkv.session", "chatkv.turn"), ("chatkv.kv.manager", "chatkv.store.chunk_index")} <= found
    assert ("chatkv.engine.batch", "chatkv.kv.live") in found
    forbidden = sorted(
        f"{src} -> {dst}" for src, dst in found if not _allowed(src, dst) and (src, dst) not in DECLARED
    )
    assert forbidden == [], "imports against the arrows (fix them, or declare one in DECLARED with why)"
    unused = sorted(f"{s} -> {d}" for s, d in DECLARED if (s, d) not in found)
    assert unused == [], "declared edges that no longer exist: remove them"


def test_the_rules_catch_the_edges_issue_10_removed() -> None:
    assert not _allowed("chatkv.batch", "chatkv.kv.live")
    assert not _allowed("chatkv.batch", "chatkv.kv.manager")
    assert _allowed("chatkv.batch", "chatkv.session") and _allowed("chatkv.batch", "chatkv.engine.batch")
    assert not _allowed("chatkv.kv.manager", "chatkv.store.common")  # past the chunk index
    assert not _allowed("chatkv.kv.manager", "chatkv.session")
    assert not _allowed("chatkv.store.repo", "chatkv.kv.chunks")
    assert not _allowed("chatkv.engine.generate", "chatkv.store.db")
    assert not _allowed("chatkv.ui.app", "chatkv.kv.live")
    assert not _allowed("chatkv.cli.ask", "chatkv.store.repo")
    assert _allowed("chatkv.kv.maintenance", "chatkv.store.chunk_index")


# -- who writes the transcript ------------------------------------------------------------

# The Store's methods that write conversations or messages.
WRITERS = {
    "add_message",
    "create_conversation",
    "delete_conversation",
    "delete_message",
    "delete_messages_from",
    "finish_turn",
    "import_conversation",
    "keep_version",
    "rename",
    "restore",
    "save_new_conversation",
    "set_conversation_settings",
    "set_model",
    "set_system_prompt",
    "start_conversation",
    "update_message",
}


def _store_writes(path: Path) -> list[str]:
    """Calls like `store.add_message(...)` or `chat.store.finish_turn(...)` in `path`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in WRITERS:
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", None)
            if name in ("store", "_store"):
                out.append(f"{_module(path)}:{node.lineno} {node.func.attr}")
    return out


def test_only_the_session_writes_the_transcript() -> None:
    writes = [w for p in ROOT.rglob("*.py") for w in _store_writes(p)]
    assert any(w.startswith("chatkv.session:") for w in writes)  # the check sees the writers
    outside = [w for w in writes if layer_of(w.split(":")[0]) not in ("session", "store")]
    assert outside == []


# -- one file for the turn ------------------------------------------------------------------


def test_a_turn_is_prepared_run_and_saved_in_the_session_and_the_rest_is_apart() -> None:
    from chatkv import session
    from chatkv.api import ChatBackend

    chat = session.Chat
    for name in ("send", "regenerate", "edit", "render", "fit", "prepare", "prepare_prefix", "hold"):
        assert getattr(chat, name).__module__ == "chatkv.session", name
    assert chat.save_exchange.__module__ == "chatkv.session"
    for name in ("cache_stats", "cache_gc", "cache_verify", "cache_rebuild", "switch_model", "search"):
        assert getattr(chat, name).__module__ == "chatkv.housekeeping", name
    for name in ("list_conversations", "delete", "restore", "export"):
        assert getattr(chat, name).__module__ == "chatkv.conversations", name
    # Every method of the front ends' contract is still Chat's (the type checker checks signatures).
    contract = [n for n in dir(ChatBackend) if not n.startswith("_") and callable(getattr(ChatBackend, n))]
    assert contract and all(hasattr(chat, n) for n in contract)
    assert len(Path(session.__file__).read_text().splitlines()) <= 400  # STYLE: files under ~400 lines
