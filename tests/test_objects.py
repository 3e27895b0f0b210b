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
import threading
import time
import uuid
from pathlib import Path

import pytest

import chatkv
from chatkv.engine.generate import cache_arg
from chatkv.errors import ConfigError
from chatkv.kv import maintenance, objects
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


def test_a_spill_trims_without_listing_the_cache_while_it_stays_within_budget(
    tmp_path: Path, monkeypatch
) -> None:
    """trim_after lists the local copies only when the last listing's total plus what this
    process added since could be over budget, or that listing is old (other processes on the
    host add copies too); over budget, it trims as trim does."""
    kv = tmp_path / "kv"
    tiers = Tiers(kv, open_objects((tmp_path / "bucket").as_uri()), local_bytes=3000)
    listings = []
    real = Tiers.trim
    monkeypatch.setattr(Tiers, "trim", lambda self: listings.append(1) or real(self))

    def spill(i: int) -> ChunkRecord:
        blob = bytes([i]) * 1000
        rec = _rec(blob)
        objects.write_atomic(chunk_path(kv, rec.key), blob)
        tiers.trim_after(len(blob))
        return rec

    first = spill(1)  # nothing listed yet: it lists once
    spill(2)  # 2,000 bytes: within budget, not listed
    assert len(listings) == 1
    os.utime(chunk_path(kv, first.key), ns=(1, 1))  # read longest ago
    spill(3)
    spill(4)  # 4,000 bytes could be over 3,000: listed and trimmed
    assert len(listings) == 2 and not chunk_path(kv, first.key).exists()
    assert sum(f.stat().st_size for f in kv.rglob("*.safetensors")) == 3000
    tiers._scanned_at -= objects.RESCAN_S  # an old listing is not trusted
    tiers.trim_after(0)
    assert len(listings) == 3
    tiers.close()


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
    s3_env, pg_server, tiny_model_dir, tmp_path: Path, monkeypatch, capsys
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
    # `cache gc` and `verify` on a host with none of the chunks on its disk leave them all.
    for k, v in env.items():
        if k.startswith("CHATKV_"):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("CHATKV_HOME", str(tmp_path / "host-gc"))
    gc = _cache(capsys, "gc")
    assert (gc["missing_files"], gc["removed"], gc["objects_removed"]) == (0, 0, 0)
    assert _cache(capsys, "verify")["bad"] == []
    # host-b has loaded the model once (a fingerprint to predict from), none of conv's chunks.
    _ask(tmp_path / "host-b", env, "--new", "hello")
    second, _ = _ask(tmp_path / "host-b", env, "-C", str(conv), "and then?")
    stats = second["stats"]
    assert stats["cache_source"] == "remote", stats
    # fetched from the bucket and read while the model loaded (what the load left unread,
    # the attach reads)
    assert 0 < second["startup"]["prefetched_tokens"] <= stats["cached_tokens"], second["startup"]
    # Everything but the new message came from the bucket: nothing of the history prefilled.
    assert stats["cached_tokens"] >= first["stats"]["prompt_tokens"]
    assert stats["prefilled_tokens"] < 32
    assert any((tmp_path / "host-b" / "kv").rglob("*.safetensors"))  # kept locally for next time

    # A third host while the bucket is unreachable: the turn still answers, recomputing,
    # with one warning line that names the bucket and no credential.
    # (Its model loaded once before: the chunks are looked for while it loads, and again after.)
    down = {**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    _ask(tmp_path / "host-c", down, "--new", "hello")
    third, err = _ask(tmp_path / "host-c", down, "-C", str(conv), "still there?")
    assert third["reply"] and third["stats"]["cache_source"] == "none"
    assert third["stats"]["prefilled_tokens"] > second["stats"]["prompt_tokens"]
    assert "not usable" in err and len(err.strip().splitlines()) == 1, err  # one line for one failure
    assert SECRET not in err and "Traceback" not in err

    # gc on one host evicts every chunk of the shared index: on another, the next resume
    # misses and recomputes; nothing fails.
    assert _cache(capsys, "gc", "--max-bytes", "0")["removed"] > 0
    fourth, _ = _ask(tmp_path / "host-b", env, "-C", str(conv), "one more?")
    assert fourth["reply"] and fourth["stats"]["cache_source"] == "none"
    assert fourth["stats"]["prefilled_tokens"] > third["stats"]["prompt_tokens"]


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


def _cache(capsys, *args: str, code: int = 0) -> dict:
    from chatkv.cli import main

    assert main(["cache", *args, "--json"]) == code, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_cache_commands_work_on_the_tiers_of_a_shared_store(
    s3_env, s3_endpoint, tiny_settings, tiny_lm, tmp_path, monkeypatch, capsys
) -> None:
    """With cache.url, `chatkv cache stats|gc|verify|rebuild` on a host that has none of the
    chunks locally: they are the other host's, in the bucket, and stay indexed; a chunk
    really gone goes; an unreachable bucket drops nothing."""
    from chatkv.api import GenerationSettings
    from chatkv.session import Chat
    from chatkv.store import Store

    url, index = f"s3://{s3_env}/kv", f"sqlite:///{tmp_path}/shared.db"  # one index for both hosts
    tiny_settings.set("cache.url", url)
    tiny_settings.set("store.url", index)
    host_a = Chat(tiny_settings, lm=tiny_lm)
    host_a.load()
    "".join(host_a.send(None, " ".join(f"word{i}" for i in range(150)), GenerationSettings(max_new_tokens=2)))
    host_a.close()
    remote = open_objects(url)
    n = len(list(remote.names()))
    assert n >= 3

    # Host B: its own data dir, the same index and bucket, none of the chunks on its disk.
    home_b = tmp_path / "host-b"
    for k, v in {"HOME": home_b, "CACHE_URL": url, "STORE_URL": index, "CACHE_LOCAL_BYTES": "1GiB"}.items():
        monkeypatch.setenv(f"CHATKV_{k}", str(v))
    stats = _cache(capsys, "stats")
    assert stats["count"] == n and stats["tiers"]["local"] == {"count": 0, "bytes": 0}
    assert stats["tiers"]["remote"]["count"] == n and stats["tiers"]["remote"]["bytes"] == stats["bytes"]
    assert stats["tiers"]["memory"] == {"count": 0, "bytes": 0}
    gc = _cache(capsys, "gc")
    assert (gc["missing_files"], gc["removed"], gc["objects_removed"], gc["remote_error"]) == (0, 0, 0, "")
    assert _cache(capsys, "stats")["count"] == n  # host A's rows stay
    verify = _cache(capsys, "verify")
    assert (verify["checked"], verify["bad"], verify["unreadable"]) == (n, [], 0)
    copies = sorted((home_b / "kv").rglob("*.safetensors"))
    assert len(copies) == n  # read through the bucket
    # A damaged local copy is replaced by the bucket's sound object, not dropped.
    blob = bytearray(copies[0].read_bytes())
    blob[-1] ^= 0xFF
    copies[0].write_bytes(bytes(blob))
    verify = _cache(capsys, "verify")
    assert (verify["checked"], verify["bad"], verify["refetched"]) == (n, [], 1)

    # The bucket unreachable: a miss, not damage; nothing is dropped.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    for copy in copies:
        copy.unlink()
    verify = _cache(capsys, "verify")
    assert (verify["checked"], verify["removed"], verify["unreadable"]) == (0, 0, n)
    gc = _cache(capsys, "gc")
    assert gc["remote_error"] and gc["missing_files"] == 0 and _cache(capsys, "stats")["count"] == n
    from chatkv.cli import main

    assert main(["cache", "rebuild"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "index is left as it is" in err and SECRET not in err
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # reachable again

    # An object really gone (and no local copy): its row goes.
    gone = sorted(remote.names())[0][0]
    remote.delete([gone])
    verify = _cache(capsys, "verify", code=1)  # damage found
    assert (verify["checked"], verify["removed"]) == (n, 1) and gone.split("/")[1] in verify["bad"][0]["key"]

    # Rebuild from the bucket's objects, on a host with an empty kv/ and an empty index.
    with Store(index) as store:
        store.replace_chunk_index([])
    monkeypatch.setenv("CHATKV_HOME", str(tmp_path / "host-c"))
    rebuilt = _cache(capsys, "rebuild")
    assert (rebuilt["indexed"], rebuilt["objects"], rebuilt["bad"]) == (n - 1, n - 1, [])
    assert _cache(capsys, "stats")["count"] == n - 1


def _keys(remote) -> set[str]:
    return {name.split("/")[1] for name, _, _ in remote.names()}


def _chain(store, conversation_id: int) -> set[str]:
    """The keys of a conversation's chunk chain, from its head back to position 0."""
    key, keys = store.get_kv_head(conversation_id).key, set()
    while key:
        keys.add(key)
        key = store.get_chunks([key])[key].parent
    return keys


def test_rm_removes_the_objects_only_its_conversation_used(
    s3_env, tiny_settings, tiny_lm, monkeypatch, caplog
) -> None:
    """`chatkv rm` with cache.url: the deleted conversation's chunk objects leave the bucket
    (they hold token ids: its text), those another conversation's chain names stay; a bucket
    unreachable at rm time leaves them for `cache gc` and says so in one line."""
    from chatkv.api import GenerationSettings
    from chatkv.errors import NotFoundError
    from chatkv.paths import kv_dir
    from chatkv.session import Chat

    tiny_settings.set("cache.url", f"s3://{s3_env}/kv")
    remote = open_objects(f"s3://{s3_env}/kv")
    common = " ".join(f"word{i}" for i in range(40))  # the chunks both conversations begin with
    chat = Chat(tiny_settings, lm=tiny_lm)
    chat.load()
    settings = GenerationSettings(max_new_tokens=2, temperature=0.0)
    ids = []
    for tail in ("alpha beta gamma " * 12, "delta epsilon " * 14, "zeta eta theta " * 12):
        turn = chat.send(None, common + " " + tail, settings)
        "".join(turn)
        ids.append(turn.conversation_id)
    chat.kv.flush()
    chains = {cid: _chain(chat.store, cid) for cid in ids}
    assert chains[ids[0]] & chains[ids[1]] and chains[ids[0]] - chains[ids[1]]  # shared and own chunks
    assert _keys(remote) == set().union(*chains.values())
    own = chains[ids[0]] - chains[ids[1]] - chains[ids[2]]
    chat.delete(ids[0])
    assert _keys(remote) == chains[ids[1]] | chains[ids[2]]  # its own went, the shared stayed
    assert not any(chunk_path(kv_dir(), k).exists() for k in own)
    chat.close()

    # The bucket is unreachable at rm time (a CLI process: no model loaded).
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    caplog.set_level(logging.WARNING)
    offline = Chat(tiny_settings, lm=tiny_lm)
    offline.delete(ids[2])
    with pytest.raises(NotFoundError):
        offline.get_conversation(ids[2])  # deleted all the same
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert f"conversation {ids[2]} is deleted, but the" in line and "could not be removed" in line
    assert "chatkv cache gc" in line and SECRET not in line and "\n" not in line
    left = chains[ids[2]] - chains[ids[1]]
    assert left and left <= _keys(remote)  # still there: no index row names them now
    offline.close()
    # `chatkv cache gc` once the bucket answers, with an index private to this host (no
    # store.url: objects no row names may be another host's, so gc collects none of those)
    # removes exactly the keys rm listed.
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    online = Chat(tiny_settings, lm=tiny_lm)
    report = online.cache_gc(None)
    assert report.remote_error == "" and report.objects_removed >= len(left)
    assert _keys(remote) == chains[ids[1]]
    assert not (kv_dir().parent / maintenance.UNREMOVED).exists()
    online.close()


def test_a_spill_on_one_host_never_evicts_another_hosts_chunks(
    s3_env, tiny_settings, tiny_lm, tmp_path, monkeypatch, capsys
) -> None:
    """With cache.url the index is shared: disk_bytes bounds this host's copies only (with
    local_bytes unset) and the spill trims them; the index and bucket are bounded by
    cache.remote_bytes (unset: unlimited), by `chatkv cache gc` only."""
    from chatkv.api import GenerationSettings
    from chatkv.config import load_settings
    from chatkv.session import Chat

    url, index = f"s3://{s3_env}/kv", f"sqlite:///{tmp_path}/shared.db"
    tiny_settings.set("cache.url", url)
    tiny_settings.set("store.url", index)
    settings = GenerationSettings(max_new_tokens=2, temperature=0.0)
    host_a = Chat(tiny_settings, lm=tiny_lm)
    host_a.load()
    "".join(host_a.send(None, " ".join(f"alpha{i}" for i in range(120)), settings))
    host_a.close()
    theirs = {r.key for r in host_a.store.all_chunks()}
    assert theirs

    # Host B, its disk budget smaller than one chunk: its spill keeps the shared index whole
    # and its own kv/ within the budget.
    monkeypatch.setenv("CHATKV_HOME", str(tmp_path / "host-b"))
    tiny_settings.set("cache.disk_bytes", 1000)
    host_b = Chat(tiny_settings, lm=tiny_lm)
    host_b.load()
    "".join(host_b.send(None, " ".join(f"beta{i}" for i in range(120)), settings))
    host_b.close()
    keys = {r.key for r in host_b.store.all_chunks()}
    assert theirs < keys  # host A's chunks are all indexed still, and host B's added
    assert len(list(open_objects(url).names())) == len(keys)
    assert sum(p.stat().st_size for p in (tmp_path / "host-b" / "kv").rglob("*.safetensors")) <= 1000

    # gc: remote_bytes unset bounds nothing; set, it evicts the shared index down to it.
    for k, v in {"CACHE_URL": url, "STORE_URL": index, "CACHE_DISK_BYTES": "1000"}.items():
        monkeypatch.setenv(f"CHATKV_{k}", v)
    gc = _cache(capsys, "gc")
    assert (gc["removed"], gc["budget"]) == (0, None)
    assert _cache(capsys, "stats")["count"] == len(keys)
    monkeypatch.setenv("CHATKV_CACHE_REMOTE_BYTES", "1")
    gc = _cache(capsys, "gc")
    assert gc["removed"] == len(keys) and gc["budget"] == 1
    assert _cache(capsys, "stats")["count"] == 0

    from chatkv.kv.objects import local_budget

    monkeypatch.delenv("CHATKV_CACHE_REMOTE_BYTES")
    monkeypatch.delenv("CHATKV_CACHE_DISK_BYTES")
    assert load_settings().cache.local_bytes is None and load_settings().cache.remote_bytes is None
    assert local_budget(None, 123) == 123 and local_budget(7, 123) == 7


def _bucket_and_cache(store, tiny_lm, tmp_path: Path):
    """A file:// bucket, a local kv dir, a maker of managers over both (fp16, 16-token
    chunks), a new conversation and its 37 tokens' computed cache."""
    import torch

    from chatkv.kv import live
    from chatkv.kv.manager import KVManager
    from chatkv.kv.objects import DirObjects

    bucket, kv = DirObjects(tmp_path / "bucket"), tmp_path / "kv"

    def manager() -> KVManager:
        return KVManager(store, kv, tiny_lm, codec="fp16", chunk_tokens=16, tiers=Tiers(kv, bucket, 1 << 30))

    conv = store.create_conversation()
    tokens = list(range(3, 40))
    cache = live.new_cache(tiny_lm.model)
    with torch.no_grad():
        tiny_lm.model(torch.tensor([tokens]), **cache_arg(tiny_lm.model, cache), use_cache=True)
    return bucket, kv, manager, conv, tokens, cache


def test_a_spill_for_a_conversation_deleted_meanwhile_takes_its_objects_too(tiny_lm, store, tmp_path) -> None:
    """`chatkv rm` while the conversation's spill runs: the spill writes the chunks, finds
    the conversation gone and removes them, from the bucket as well (they hold its text).
    One that was still queued writes nothing."""
    bucket, kv, manager, conv, tokens, cache = _bucket_and_cache(store, tiny_lm, tmp_path)
    kvm = manager()
    real = store.add_chunk

    def deleted_after_the_first_chunk(rec):
        real(rec)
        if store.list_conversations():
            store.delete_conversation(conv.id)

    store.add_chunk = deleted_after_the_first_chunk
    kvm.spill(conv.id, tokens, cache)
    kvm.flush()
    assert kvm.bytes_written > 0  # written (and pushed), then taken back
    assert store.all_chunks() == [] and list(bucket.names()) == []
    assert not any(kv.rglob("*.safetensors"))
    store.add_chunk = real
    again = store.create_conversation()
    store.delete_conversation(again.id)  # deleted before its spill ran
    written = kvm.bytes_written
    kvm.spill(again.id, tokens, cache)
    kvm.close()
    assert kvm.bytes_written == written
    assert store.all_chunks() == [] and list(bucket.names()) == []
    kvm.tiers.close()


def test_cache_gc_without_a_budget_uses_the_configured_one() -> None:
    from chatkv.config import load_settings
    from chatkv.session import Chat

    chat = Chat(load_settings())  # no cache.url: disk_bytes
    assert chat.cache_budget() == load_settings().cache.disk_bytes
    assert chat.cache_gc(None).removed == 0
    chat.close()


def test_a_local_copy_trimmed_between_fetch_and_read_is_a_miss_not_damage(tiny_lm, store, tmp_path) -> None:
    """Another process on this host may trim a local copy just after this one found it: the
    chunk is still in the bucket, so the resume recomputes and keeps the shared index row
    (dropping it would make every host miss the chunk), and the next resume fetches it again."""
    bucket, kv, manager, conv, tokens, cache = _bucket_and_cache(store, tiny_lm, tmp_path)
    writer = manager()
    writer.spill(conv.id, tokens, cache)
    writer.close()
    rows = {r.key for r in store.all_chunks()}
    assert rows

    reader = manager()
    assert reader.tiers is not None
    fetch = reader.tiers.ensure_local

    def fetch_then_trimmed(rec: ChunkRecord) -> str:
        where = fetch(rec)
        chunk_path(kv, rec.key).unlink()  # the other process's trim, right after
        return where

    reader.tiers.ensure_local = fetch_then_trimmed  # type: ignore[method-assign]
    att = reader.attach(conv.id, tokens + [7])
    assert att.cached == 0 and att.problems  # recomputed ...
    assert {r.key for r in store.all_chunks()} == rows  # ... and the shared rows kept
    reader.tiers.ensure_local = fetch  # type: ignore[method-assign]
    assert reader.attach(conv.id, tokens + [7]).cached == len(tokens)  # fetched from the bucket again
    reader.close()
    reader.tiers.close()


def test_a_damaged_local_copy_is_fetched_again_and_the_shared_row_kept(tiny_lm, store, tmp_path) -> None:
    """This host's copy of a chunk is damaged but the bucket's is sound: the resume recomputes,
    removes only the local copy and keeps the shared row; the next resume fetches the chunk
    from the bucket. Closing the manager stops the tier's fetches and leaves it usable."""
    bucket, kv, manager, conv, tokens, cache = _bucket_and_cache(store, tiny_lm, tmp_path)
    kvm = manager()
    kvm.spill(conv.id, tokens, cache)
    kvm.close()
    rows = {r.key for r in store.all_chunks()}
    first = store.get_kv_head(conv.id).key
    chain = store.chunk_chain(first)
    damaged = chunk_path(kv, chain[0].key)
    raw = bytearray(damaged.read_bytes())
    raw[-8:] = b"\xff" * 8  # the payload, not the header: the checksum finds it
    damaged.write_bytes(bytes(raw))

    kvm.pool.drop(conv.id)
    att = kvm.attach(conv.id, tokens + [7])
    assert att.cached == 0 and att.problems
    assert {r.key for r in store.all_chunks()} == rows and not damaged.exists()
    assert kvm.attach(conv.id, tokens + [7]).cached == len(tokens)  # from the bucket again
    kvm.close()


def test_gc_collects_unnamed_objects_only_when_every_host_writes_this_index(
    tiny_settings, tmp_path, monkeypatch
) -> None:
    """An object no row of this index names is garbage only when the index is the one every
    host writes (store.url set) and the prefix is the user's own: with a host-local SQLite
    index, or a team prefix (cache.shared) written under several roles, it is another index's
    chunk and gc leaves it."""
    from chatkv.session import Chat

    bucket = tmp_path / "bucket"
    url = f"file://{bucket}"
    blob = b"\x01" * 500
    rec = _rec(blob)

    def old_object(shared: bool) -> Path:
        remote = open_objects(url, shared)
        assert isinstance(remote, objects.DirObjects)
        remote.put(object_name(rec), blob)
        path = remote.root / object_name(rec)
        os.utime(path, (time.time() - 2 * 3600,) * 2)  # older than gc's grace
        return path

    def gc(store_url: str, shared: bool) -> int:
        tiny_settings.set("cache.url", url)
        tiny_settings.set("cache.shared", shared)
        tiny_settings.set("store.url", store_url)
        chat = Chat(tiny_settings)
        try:
            return chat.cache_gc(None).objects_removed
        finally:
            chat.close()

    index = f"sqlite:///{tmp_path}/shared.db"
    mine = old_object(shared=False)
    assert gc("", shared=False) == 0 and mine.exists()  # this host's own index
    team = old_object(shared=True)
    assert team != mine
    assert gc(index, shared=True) == 0 and team.exists()  # a team prefix
    assert gc(index, shared=False) == 1  # the user's prefix, the index every host writes
    assert not mine.exists() and team.exists()


def test_gc_lists_the_bucket_once(tiny_settings, tmp_path, monkeypatch) -> None:
    """`cache gc` reads the bucket's listing once and uses it both to find index rows
    whose object is gone and to collect unnamed objects (a listing of a large bucket is
    thousands of requests)."""
    from chatkv.session import Chat

    url = f"file://{tmp_path / 'bucket'}"
    remote = open_objects(url, False)
    assert isinstance(remote, objects.DirObjects)
    blob = b"\x02" * 300
    rec = _rec(blob)
    remote.put(object_name(rec), blob)
    os.utime(remote.root / object_name(rec), (time.time() - 2 * 3600,) * 2)  # past gc's grace
    listings = []
    real = objects.DirObjects.names

    def counted(self, under: str = ""):
        listings.append(under)
        return real(self, under)

    monkeypatch.setattr(objects.DirObjects, "names", counted)
    tiny_settings.set("cache.url", url)
    tiny_settings.set("store.url", f"sqlite:///{tmp_path}/shared.db")
    chat = Chat(tiny_settings)
    try:
        report = chat.cache_gc(None)
    finally:
        chat.close()
    assert report.objects_removed == 1 and not (remote.root / object_name(rec)).exists()
    assert listings == [""]


def test_closing_the_tiers_does_not_wait_for_a_fetch_held_up_by_the_bucket(
    tmp_path: Path, monkeypatch
) -> None:
    """Ctrl-C during a resume from a slow bucket: closing the tiers cancels the fetches not
    started and returns while one is still held up (up to a 15 s read time-out), and the
    fetch threads are daemons, which the interpreter does not wait for at exit. The tiers
    stay usable; the held-up fetch, let go later, still leaves a whole file."""
    entered, release, left = threading.Event(), threading.Event(), threading.Event()
    remote = open_objects((tmp_path / "bucket").as_uri())
    assert isinstance(remote, objects.DirObjects)
    blobs = [bytes([i]) * 100 for i in range(1, 4)]
    recs = [_rec(b) for b in blobs]
    for rec, blob in zip(recs, blobs, strict=True):
        remote.put(object_name(rec), blob)

    class Held(objects.DirObjects):
        def get(self, name: str, size: int) -> bytes | None:
            if name == object_name(recs[0]):
                entered.set()
                release.wait(30)
                left.set()
            return super().get(name, size)

    monkeypatch.setattr(objects, "FETCH_THREADS", 1)  # one fetch thread: the rest queue
    tiers = Tiers(tmp_path / "kv", Held(remote.root), 1 << 20)
    tiers.prefetch(recs)
    assert entered.wait(10)
    tiers.close()
    assert not left.is_set()  # returned while the fetch is held up
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("chatkv-fetch"))
    assert tiers.ensure_local(recs[2]) == "remote"  # usable after close; the queued one was cancelled
    release.set()
    deadline = time.monotonic() + 10
    while not chunk_path(tmp_path / "kv", recs[0].key).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert chunk_path(tmp_path / "kv", recs[0].key).read_bytes() == blobs[0]
    assert not chunk_path(tmp_path / "kv", recs[1].key).exists()  # cancelled before it started


def test_two_processes_noting_unremoved_objects_keep_both_lists(tmp_path) -> None:
    """Two `rm`s with the bucket down (or an rm and a gc) each read the list before the
    other wrote it: under the lock, the second reads what the first wrote."""
    import threading

    kv = tmp_path / "kv"
    kv.mkdir()
    a, b = "a" * 64, "b" * 64
    first_read, let_go = threading.Event(), threading.Event()

    def slow(old: list[str]) -> list[str]:
        first_read.set()
        let_go.wait(10)
        return [*old, a]

    t = threading.Thread(target=maintenance._note_unremoved, args=(kv, slow))
    t.start()
    first_read.wait(10)
    second = threading.Thread(target=maintenance._note_unremoved, args=(kv, lambda old: [*old, b]))
    second.start()
    second.join(0.3)
    assert second.is_alive()  # waits for the first
    let_go.set()
    t.join(10)
    second.join(10)
    assert maintenance._unremoved(kv) == [a, b]
    maintenance._note_unremoved(kv, lambda old: [k for k in old if k != a])
    assert maintenance._unremoved(kv) == [b]
