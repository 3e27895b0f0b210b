"""Bring history from elsewhere: simonw/llm's logs database and a ChatGPT data export.

Each reader turns its source into `Imported` conversations; `import_all` writes those not
imported before through `Store.import_conversation` (one transaction each, the source id
kept in the conversation's settings, so importing again adds nothing). Only text is
imported: attachments, images and tool calls are left out. Files are read, never written.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chatkv.errors import InputError

LLM_HINT = "`llm logs path` prints where llm keeps it"
CHATGPT_HINT = (
    "give conversations.json (or the zip) of a ChatGPT data export (Settings > Data controls > Export)"
)


@dataclass
class Imported:
    """One conversation read from a source, ready for Store.import_conversation."""

    source: str  # "llm:<conversation id>", "chatgpt:<conversation id>"
    title: str
    model: str
    system_prompt: str = ""
    created_at: datetime | None = None
    messages: list[tuple[str, str, datetime | None]] = field(default_factory=list)  # (role, content, at)


@dataclass
class ImportReport:
    imported: list[tuple[Imported, int | None]] = field(default_factory=list)  # (conversation, new id)
    skipped: int = 0  # imported before
    empty: int = 0  # no text to import

    @property
    def messages(self) -> int:
        return sum(len(c.messages) for c, _ in self.imported)


def _when(value: Any) -> datetime | None:
    """A timezone-aware UTC time from an ISO string or a Unix time (None when neither)."""
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return datetime.fromtimestamp(float(value), UTC)
        if isinstance(value, str) and value.strip():
            t = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    except (ValueError, OverflowError, OSError):
        pass
    return None


def _merge(messages: list[tuple[str, str, datetime | None]]) -> list[tuple[str, str, datetime | None]]:
    """Join consecutive messages of one role (a reply split around tool calls reads as one)."""
    out: list[tuple[str, str, datetime | None]] = []
    for role, text, at in messages:
        if out and out[-1][0] == role:
            out[-1] = (role, out[-1][1] + "\n\n" + text, out[-1][2])
        else:
            out.append((role, text, at))
    return out


# -- llm ------------------------------------------------------------------------


def _as_text(value: object) -> str:
    """A column's value as text: a BLOB decoded as UTF-8 (bytes that are not, replaced),
    not written as Python's b'...'."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def read_llm(path: str | Path) -> Iterator[Imported]:
    """Conversations of llm's logs.db: `conversations(id, name, model)` and `responses(id,
    model, prompt, system, response, conversation_id, datetime_utc)`, one prompt and its
    response per row. Raises InputError for a file that is not such a database."""
    path = Path(path)
    try:
        # a file URI, escaped: a name with '#', '?' or '%' must not open another file
        db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise InputError(f"cannot open {path} as a SQLite database ({e}); {LLM_HINT}") from None
    try:
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as e:
            raise InputError(f"{path} is not an llm logs database ({e}); {LLM_HINT}") from None
        if "responses" not in tables:
            raise InputError(f"{path} has no responses table, so it is not llm's logs.db; {LLM_HINT}")
        cols = {r[1] for r in db.execute("PRAGMA table_info(responses)")}
        missing = {"id", "prompt", "response", "conversation_id"} - cols
        if missing:
            raise InputError(f"{path}: table responses lacks {', '.join(sorted(missing))}; {LLM_HINT}")
        pick = [c if c in cols else f"NULL AS {c}" for c in ("model", "system", "datetime_utc")]
        names: dict[str, tuple[str, str]] = {}
        if "conversations" in tables:
            ccols = {r[1] for r in db.execute("PRAGMA table_info(conversations)")}
            if {"id", "name", "model"} <= ccols:
                names = {
                    str(cid): (name or "", model or "")
                    for cid, name, model in db.execute("SELECT id, name, model FROM conversations")
                }
        order = "datetime_utc, rowid" if "datetime_utc" in cols else "rowid"
        rows = db.execute(
            f"SELECT id, conversation_id, prompt, response, {', '.join(pick)} FROM responses "
            f"ORDER BY conversation_id, {order}"
        )
        current: Imported | None = None
        for rid, cid, prompt, response, model, system, at in rows:
            key = str(cid) if cid is not None else f"response-{rid}"  # a response with no conversation
            if current is None or current.source != f"llm:{key}":
                if current is not None:
                    yield current
                name, cmodel = names.get(key, ("", ""))
                current = Imported(f"llm:{key}", name, cmodel or model or "", created_at=_when(at))
            when = _when(at)
            if system and not current.system_prompt:
                current.system_prompt = _as_text(system)
            if prompt:
                current.messages.append(("user", _as_text(prompt), when))
            if response:
                current.messages.append(("assistant", _as_text(response), when))
        if current is not None:
            yield current
    except sqlite3.DatabaseError as e:
        raise InputError(f"cannot read {path} ({e}); {LLM_HINT}") from None
    finally:
        db.close()


# -- ChatGPT --------------------------------------------------------------------


def _chatgpt_json(path: Path) -> Any:
    try:
        if path.read_bytes()[:2] == b"PK" and not zipfile.is_zipfile(path):
            raise InputError(f"{path} looks like a zip file but is damaged or cut short; {CHATGPT_HINT}")
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                try:
                    raw = z.read("conversations.json")
                except KeyError:
                    raise InputError(f"{path} has no conversations.json inside; {CHATGPT_HINT}") from None
        else:
            raw = path.read_bytes()
        return json.loads(raw)
    except RecursionError:
        raise InputError(f"{path} is JSON nested too deep to be a ChatGPT export; {CHATGPT_HINT}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); {CHATGPT_HINT}") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise InputError(f"cannot read {path} ({e}); {CHATGPT_HINT}") from None


def _text(message: dict[str, Any]) -> str:
    """The text of a ChatGPT message: its string parts (images and files are left out)."""
    content = message.get("content") or {}
    if not isinstance(content, dict):
        return ""
    parts = content.get("parts")
    if isinstance(parts, list):
        return "\n".join(p for p in parts if isinstance(p, str) and p.strip()).strip()
    text = content.get("text")
    return text.strip() if isinstance(text, str) else ""


def _active_branch(mapping: dict[str, Any], current: Any) -> list[dict[str, Any]]:
    """The messages from the root to `current_node`: the branch shown in ChatGPT (earlier
    edits and regenerations are other branches). Without a current node, the branch of
    first children."""
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    node_id = current if isinstance(current, str) and current in mapping else None
    if node_id is None:  # walk down from the root instead
        root = next((k for k, v in mapping.items() if isinstance(v, dict) and not v.get("parent")), None)
        node_id = root
        while node_id is not None and node_id not in seen:
            seen.add(node_id)
            node = mapping.get(node_id) or {}
            chain.append(node)
            kids = node.get("children") or []
            node_id = kids[0] if kids and isinstance(kids[0], str) else None
        return [n.get("message") or {} for n in chain]
    while node_id is not None and node_id in mapping and node_id not in seen:  # a cycle cannot loop
        seen.add(node_id)
        node = mapping[node_id] if isinstance(mapping[node_id], dict) else {}
        chain.append(node)
        parent = node.get("parent")
        node_id = parent if isinstance(parent, str) else None
    chain.reverse()
    return [n.get("message") or {} for n in chain]


def read_chatgpt(path: str | Path) -> Iterator[Imported]:
    """Conversations of a ChatGPT export's conversations.json (or the export's zip): each
    with `title`, `create_time` and a `mapping` of message nodes, imported along the
    `current_node` branch. Raises InputError for a file that is not such an export."""
    path = Path(path)
    data = _chatgpt_json(path)
    if not isinstance(data, list) or not all(isinstance(c, dict) for c in data):
        raise InputError(f"{path} is not a list of conversations; {CHATGPT_HINT}")
    for n, conv in enumerate(data):
        try:
            yield _chatgpt_conversation(conv)
        except (AttributeError, TypeError, ValueError) as e:  # a node or author of the wrong type
            raise InputError(f"{path}: conversation {n + 1} is malformed ({e}); {CHATGPT_HINT}") from None


def _chatgpt_conversation(conv: dict[str, Any]) -> Imported:
    """One conversation of a ChatGPT export. Raises ValueError, or AttributeError or
    TypeError for a value of the wrong type somewhere inside."""
    mapping = conv.get("mapping")
    if not isinstance(mapping, dict):
        raise ValueError("it has no message mapping")
    cid = conv.get("conversation_id") or conv.get("id")
    if not isinstance(cid, str) or not cid:
        basis = json.dumps([conv.get("title"), conv.get("create_time")], default=str)
        cid = "sha256-" + hashlib.sha256(basis.encode()).hexdigest()[:24]
    out = Imported(
        f"chatgpt:{cid}",
        str(conv.get("title") or ""),
        str(conv.get("default_model_slug") or "chatgpt"),
        created_at=_when(conv.get("create_time")),
    )
    msgs: list[tuple[str, str, datetime | None]] = []
    for m in _active_branch(mapping, conv.get("current_node")):
        role = ((m.get("author") or {}).get("role")) if isinstance(m, dict) else None
        meta = m.get("metadata") if isinstance(m, dict) else None
        if isinstance(meta, dict) and meta.get("is_visually_hidden_from_conversation"):
            continue  # ChatGPT's own context (custom instructions), never shown
        text = _text(m) if role in ("system", "user", "assistant") else ""
        if not text:
            continue
        if role == "system":
            if not msgs and not out.system_prompt:
                out.system_prompt = text
            continue
        msgs.append((role, text, _when(m.get("create_time"))))
    out.messages = _merge(msgs)
    return out


READERS = {"llm": read_llm, "chatgpt": read_chatgpt}


def import_all(store, kind: str, path: str | Path, dry_run: bool = False) -> ImportReport:
    """Read `path` as `kind` ("llm", "chatgpt") and store what was not imported before.
    With `dry_run`, nothing is written (the report says what would be)."""
    report = ImportReport()
    known = store.imported_sources()
    for conv in READERS[kind](path):
        if conv.source in known:
            report.skipped += 1
            continue
        if not any(role == "user" for role, _, _ in conv.messages):
            report.empty += 1
            continue
        known.add(conv.source)  # a source listed twice in one file is imported once
        if dry_run:
            report.imported.append((conv, None))
            continue
        made = store.import_conversation(
            conv.source, conv.title, conv.model, conv.system_prompt, conv.messages, conv.created_at
        )
        if made is None:  # imported meanwhile by another process
            report.skipped += 1
        else:
            report.imported.append((conv, made.id))
    return report
