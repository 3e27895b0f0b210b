"""Chunks in object storage (kv/objects.py) against moto's S3 server on loopback: the store
interface, the local tier reading through it, misses instead of failures when the bucket is
missing or unreachable (without credentials in what is logged), and two hosts with their
own data dirs: one resumes the other's conversation from the bucket, without prefilling it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import chatkv
from chatkv.errors import ConfigError
from chatkv.kv import objects
from chatkv.kv.chunks import chunk_path
from chatkv.kv.objects import S3Objects, Tiers, collect, object_name, open_objects
from chatkv.store.common import ChunkRecord

REPO = Path(chatkv.__file__).resolve().parents[1]
SECRET = "not-a-real-secret-but-never-printed"


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """Credentials and endpoint where boto3 looks for them, and a fresh bucket; its name."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    bucket = "b" + uuid.uuid4().hex[:12]
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


def _rec(blob: bytes, key: str | None = None) -> ChunkRecord:
    key = key or hashlib.sha256(blob + b"key").hexdigest()
    return ChunkRecord(
        key=key,
        parent=None,
        fingerprint="fp",
        codec="int8",
        start=0,
        n_tokens=256,
        partial=False,
        path="",
        nbytes=len(blob),
        checksum=hashlib.sha256(blob).hexdigest(),
    )


def test_s3_objects_round_trip(s3_env) -> None:
    store = open_objects(f"s3://{s3_env}/chatkv", shared=False, user="ann")
    assert isinstance(store, S3Objects) and store.where == f"s3://{s3_env}/chatkv/users/ann/"
    rec = _rec(b"x" * 1000)
    name = object_name(rec)
    assert name == f"{rec.key[:2]}/{rec.key}/{rec.checksum}.safetensors"
    assert store.get(name, 1000) is None  # absent
    store.put(name, b"x" * 1000)
    assert store.get(name, 1000) == b"x" * 1000
    assert store.get(name, 999) is None  # another size: not read at all
    assert [(n, size) for n, size, _ in store.names()] == [(name, 1000)]
    # Another user's namespace does not see it; the team's neither.
    assert open_objects(f"s3://{s3_env}/chatkv", user="bob").get(name, 1000) is None
    assert open_objects(f"s3://{s3_env}/chatkv", shared=True).get(name, 1000) is None
    store.delete([name])
    assert store.get(name, 1000) is None


def test_object_names_only_from_hex() -> None:
    bad = _rec(b"x")
    bad.checksum = "../../etc/passwd"  # a damaged or forged index row
    with pytest.raises(ValueError, match="checksum"):
        object_name(bad)
    with pytest.raises(ConfigError, match="bucket"):
        open_objects("s3://Not_A_Bucket/x")
    with pytest.raises(ConfigError, match="file:///"):
        open_objects("file://relative/path")


def test_tiers_read_through_keep_a_copy_and_trim(s3_env, tmp_path: Path) -> None:
    remote = open_objects(f"s3://{s3_env}/kv")
    writer = Tiers(tmp_path / "host-a", remote, local_bytes=1 << 30)
    blobs = [bytes([i]) * (1000 + i) for i in range(4)]
    recs = [_rec(b) for b in blobs]
    for rec, blob in zip(recs, blobs, strict=True):
        assert writer.push(rec, blob)
    reader = Tiers(tmp_path / "host-b", remote, local_bytes=2500)
    reader.prefetch(recs[:2])
    assert [reader.ensure_local(r) for r in recs[:2]] == ["remote", "remote"]
    assert chunk_path(tmp_path / "host-b", recs[0].key).read_bytes() == blobs[0]
    assert reader.ensure_local(recs[0]) == "local"  # the copy serves the next resume
    assert reader.fetched_bytes == len(blobs[0]) + len(blobs[1])
    # A row whose object was never written (or was collected): a miss, not an error.
    assert reader.ensure_local(_rec(b"never pushed")) == "missing"
    # A re-coded chunk (same key, other bytes) is another object: the old copy is not it.
    recoded = _rec(b"y" * 900, key=recs[0].key)
    assert reader.ensure_local(recoded) == "missing"
    # Over budget: the least recently read copies go first.
    reader.ensure_local(recs[2])
    os.utime(chunk_path(tmp_path / "host-b", recs[1].key), ns=(1, 1))  # read longest ago
    assert reader.trim() == (1, len(blobs[1]))
    assert not chunk_path(tmp_path / "host-b", recs[1].key).exists()
    assert chunk_path(tmp_path / "host-b", recs[0].key).exists()
    assert reader.ensure_local(recs[1]) == "remote"  # fetched again when needed
    reader.close()
    writer.close()


def test_unreachable_or_missing_bucket_is_a_miss_without_credentials(
    s3_env, tmp_path: Path, monkeypatch, caplog
) -> None:
    rec = _rec(b"z" * 100)
    caplog.set_level(logging.WARNING, logger=objects.__name__)
    gone = Tiers(tmp_path / "a", open_objects(f"s3://{s3_env}-missing/kv"), 1 << 20)
    assert gone.ensure_local(rec) == "failed"
    assert gone.push(rec, b"z" * 100) is False
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    down = Tiers(tmp_path / "b", open_objects(f"s3://{s3_env}/kv"), 1 << 20)
    assert down.ensure_local(rec) == "failed"
    assert "NoSuchBucket" in caplog.text and "not usable" in caplog.text
    assert SECRET not in caplog.text and "testing" not in caplog.text
    gone.close()
    down.close()


# One host: `chatkv ask` on the tiny model with its own data dir, the shared database and
# bucket from the environment; prints the turn's JSON.
def _ask(home: Path, env: dict[str, str], *args: str) -> tuple[dict, str]:
    out = subprocess.run(
        [sys.executable, "-m", "chatkv", "ask", "--json", *args],
        env={**env, "CHATKV_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr


def test_a_conversation_resumes_on_another_host_from_the_bucket(
    s3_env, pg_server, tiny_model_dir, tmp_path: Path
) -> None:
    from servers import new_database

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "CHATKV_STORE_URL": new_database(pg_server),
        "CHATKV_CACHE_URL": f"s3://{s3_env}/chatkv",
        "CHATKV_MODEL_NAME": str(tiny_model_dir),
        "CHATKV_MODEL_DEVICE": "cpu",
        "CHATKV_CACHE_CHUNK_TOKENS": "32",
        "CHATKV_CACHE_CODEC": "fp16",
        "CHATKV_GENERATION_TEMPERATURE": "0",
        "CHATKV_GENERATION_MAX_NEW_TOKENS": "4",
    }
    prompt = " ".join(f"word{i}" for i in range(120))  # several chunks
    first, _ = _ask(tmp_path / "host-a", env, prompt)
    conv = first["conversation_id"]
    second, _ = _ask(tmp_path / "host-b", env, "-C", str(conv), "and then?")
    stats = second["stats"]
    assert stats["cache_source"] == "remote", stats
    # Everything but the new message came from the bucket: nothing of the history prefilled.
    assert stats["cached_tokens"] >= first["stats"]["prompt_tokens"]
    assert stats["prefilled_tokens"] < 32
    assert any((tmp_path / "host-b" / "kv").rglob("*.safetensors"))  # kept locally for next time

    # A third host while the bucket is unreachable: the turn still answers, recomputing,
    # with one warning line that names the bucket and no credential.
    down = {**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    third, err = _ask(tmp_path / "host-c", down, "-C", str(conv), "still there?")
    assert third["reply"] and third["stats"]["cache_source"] == "none"
    assert third["stats"]["prefilled_tokens"] > second["stats"]["prompt_tokens"]
    assert "not usable" in err and SECRET not in err and "Traceback" not in err


def test_bench_resume_from_a_cold_local_disk(tiny_model_dir, tmp_path: Path, capsys) -> None:
    from chatkv.cli import main

    remote = tmp_path / "bucket"
    args = ["bench", "resume", "--model", str(tiny_model_dir), "--device", "cpu", "--context", "160"]
    assert main([*args, "--repeat", "1", "--cache-url", f"file://{remote}", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cache_source"] == "remote" and result["cache_url"] == f"file://{remote}"
    assert result["cached_tokens"] >= 128 and result["speedup"] > 0
    assert any(remote.rglob("*.safetensors"))


def test_turn_summary_says_a_resume_came_from_the_shared_cache() -> None:
    from chatkv.api import TurnStats
    from chatkv.ui.widgets import turn_summary

    stats = TurnStats(cache_source="remote", cached_tokens=4096, cache_load_s=0.12)
    assert turn_summary(stats).startswith("resumed 4,096 tokens from the shared cache in 120 ms")


def test_collect_removes_only_old_objects_no_index_row_names(s3_env) -> None:
    remote = open_objects(f"s3://{s3_env}/kv")
    blobs = [bytes([i]) * 500 for i in range(3)]
    recs = [_rec(b) for b in blobs]
    for rec, blob in zip(recs, blobs, strict=True):
        remote.put(object_name(rec), blob)
    damaged = _rec(b"row")
    damaged.key = "not a key"
    # Young objects stay whatever the index says: their rows may be on their way.
    assert collect(remote, [recs[0]]) == (0, 0)
    assert collect(remote, [recs[0], damaged], grace_s=-60) == (2, 1000)
    assert [n for n, _, _ in remote.names()] == [object_name(recs[0])]


@pytest.mark.parametrize("command", ["gc", "verify", "rebuild"])
def test_cache_maintenance_refuses_to_drop_chunks_of_a_shared_store(command, monkeypatch, tmp_path, capsys):
    from chatkv.cli import main

    monkeypatch.setenv("CHATKV_CACHE_URL", f"file://{tmp_path}/bucket")
    assert main(["cache", command]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"`chatkv cache {command}` does not know the shared chunk store" in err
