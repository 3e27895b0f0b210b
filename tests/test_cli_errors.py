"""No command-line input produces a traceback: every subcommand's integer, number and path
arguments are walked from `build_parser()` and fed bad values; database failures, `rm`
with missing ids, `export -o` to links and directories, an unknown --model and Ctrl-C in
`ask` are each one line on stderr with what to do.

Run in process (`chatkv.cli.main`); commands that would load a model are only parsed and
their settings built, except `ask`, which runs on the tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import stat

import pytest

from chatkv.cli import build_parser, main, settings_from
from chatkv.cli.args import INT64_MAX, IntArg, NumberArg, PathArg, SizeArg
from chatkv.paths import db_path
from chatkv.store import Store

MODEL_COMMANDS = {"chat", "ask", "batch", "bench"}
BAD_INTS = ["0", "-1", str(10**24), "abc", "1e3", str(INT64_MAX)]


# The tiny model, greedy, 6-token replies, the configured chunk size (conftest's cli_env).
CLI_MAX_NEW_TOKENS, CLI_CHUNK_TOKENS = 6, None
pytestmark = pytest.mark.usefixtures("cli_env")


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("chatkv: error: "), err
    return lines[0]


def leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) of every subcommand that runs something."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for a in subs:
        for name, sp in a.choices.items():
            yield from leaf_parsers(sp, (*path, name))


LEAVES = list(leaf_parsers(build_parser()))
TYPED = [
    (words, action)
    for words, p in LEAVES
    for action in p._actions
    if isinstance(action.type, (IntArg, NumberArg, PathArg, SizeArg))
]


def test_every_numeric_or_path_argument_has_a_checked_type():
    """The walk below covers everything: no argument is a bare int/float, and each subcommand
    that takes a number, an id or a file is among those walked."""
    for words, p in LEAVES:
        for action in p._actions:
            assert action.type not in (int, float), (words, action.dest)
            if action.dest in ("output", "input", "text", "id", "ids", "conversation", "limit"):
                assert action.type is not None, (words, action.dest)
    walked = {w[0] for w, _ in TYPED}
    assert walked == {"chat", "ask", "ls", "show", "rm", "export", "batch", "bench", "cache", "import"}


def _argv(words, action, value: str, jsonl: str) -> list[str]:
    """A command line giving `value` to `action`, with whatever else the command requires."""
    needs = {"show": ["1"], "rm": ["1"], "export": ["1"], "ask": ["hi"], "batch": [jsonl]}
    rest = needs.get(words[0], [])
    if not action.option_strings:  # the positional itself
        return [*words, value]
    return [*words, action.option_strings[0], value, *rest]


@pytest.mark.parametrize("words,action", TYPED, ids=[f"{' '.join(w)}:{a.dest}" for w, a in TYPED])
def test_bad_arguments_are_one_line(words, action, capsys, tmp_path):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"prompt": "hi"}\n')
    if isinstance(action.type, PathArg):
        target = tmp_path / "existing.txt"
        target.write_text("x")
        link = tmp_path / "link"
        # an output through a link is refused; an input link that leads nowhere is missing
        link.symlink_to(target if action.type.output else tmp_path / "nowhere")
        values = [str(tmp_path / "missing-dir" / "f.jsonl"), str(tmp_path), str(link)]
    elif isinstance(action.type, SizeArg):
        values = ["-1", "abc", str(10**24), "1e3", "9" * 400, "0"]
    elif isinstance(action.type, NumberArg):
        values = ["-1", "nan", "inf", "1e400", "abc"]
    else:
        values = BAD_INTS
    for value in values:
        argv = _argv(words, action, value, str(jsonl))
        try:
            action.type(value)
        except argparse.ArgumentTypeError:
            code, out, err = run(capsys, *argv)
            line = one_line(err)
            assert code == 2 and out == "", (argv, err)
            named = action.option_strings[0] if action.option_strings else action.metavar or action.dest
            assert named in line and f"chatkv {' '.join(words)} -h" in line, line
            continue
        # An accepted value is within what its consumer takes.
        if words[0] in MODEL_COMMANDS:
            args = build_parser().parse_args(argv)
            settings_from(args)  # the config schema agrees with the flag's bounds
        else:
            code, out, err = run(capsys, *argv)
            assert code in (0, 1) and "Traceback" not in err and len(err.strip().splitlines()) <= 1, err


def test_ids_past_int64_and_limits_are_usage_errors(capsys):
    """The cases of the issue, by name."""
    for argv in (
        ["show", str(10**24)],
        ["rm", str(10**24)],
        ["export", str(10**24)],
        ["ask", "-C", str(10**24), "hi"],
        ["ls", "-n", "0"],
        ["ls", "-n", str(10**24)],
        ["ask", "--seed", str(10**24), "hi"],
        ["chat", str(10**24)],
        ["ask", "--stop", "", "hi"],  # a value the flag's setting refuses: a usage error too
    ):
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "" and one_line(err), argv
    code, out, err = run(capsys, "show", str(INT64_MAX))
    assert code == 1 and f"conversation {INT64_MAX} not found" in one_line(err)


def test_seed_bounds_in_config_and_engine(tiny_lm):
    from chatkv.api import GenerationSettings
    from chatkv.config import load_settings
    from chatkv.engine.generate import Sampler
    from chatkv.errors import ConfigError

    s = load_settings()
    s.set("generation.seed", 2**64 - 1)
    s.set("generation.seed", -1)
    with pytest.raises(ConfigError, match="generation.seed"):
        s.set("generation.seed", 2**64)
    with pytest.raises(ConfigError, match="generation.top_k"):
        s.set("generation.top_k", 10**30)
    Sampler(GenerationSettings(temperature=1.0, seed=2**64 - 1), tiny_lm.device)
    with pytest.raises(ValueError, match="seed"):
        Sampler(GenerationSettings(temperature=1.0, seed=2**64), tiny_lm.device)


def test_a_misspelt_config_key_names_the_closest_one(capsys):
    (db_path().parent / "config.toml").write_text("[generation]\ntempreture = 1\n")
    code, _, err = run(capsys, "config", "show")
    line = one_line(err)
    assert code == 1 and "did you mean 'generation.temperature'?" in line and "chatkv config show" in line


def test_bad_config_values_are_one_line(capsys, monkeypatch):
    monkeypatch.setenv("CHATKV_CACHE_LIVE_BYTES", "9" * 400)  # float() makes it infinite
    code, _, err = run(capsys, "config", "show")
    assert code == 1 and "CHATKV_CACHE_LIVE_BYTES" in one_line(err)
    monkeypatch.setenv("CHATKV_CACHE_LIVE_BYTES", "0.5")  # half a byte was 0 bytes, silently
    code, _, err = run(capsys, "config", "show")
    assert code == 1 and 'CHATKV_CACHE_LIVE_BYTES: "0.5"' in one_line(err)
    monkeypatch.setenv("CHATKV_CACHE_LIVE_BYTES", "1.2GiB")  # with a unit: rounded down
    assert run(capsys, "config", "show")[0] == 0
    monkeypatch.delenv("CHATKV_CACHE_LIVE_BYTES")
    config = db_path().parent / "config.toml"
    config.write_bytes(b'[cache]\ncodec = "\xff"\n')  # not UTF-8
    code, _, err = run(capsys, "config", "show")
    assert code == 1 and "not valid TOML" in one_line(err)
    config.write_text("[generation]\nseed = 100000000000000000000000000\n")
    code, _, err = run(capsys, "config", "show")
    assert code == 1 and "generation.seed" in one_line(err)


def test_config_show_never_prints_a_database_password(capsys, monkeypatch):
    monkeypatch.setenv("CHATKV_STORE_URL", "postgresql://bob:s3cret@db.example/chat")
    for argv in (["config", "show"], ["config", "show", "--json"]):
        code, out, err = run(capsys, *argv)
        assert code == 0 and "postgresql://bob:***@db.example/chat" in out and "s3cret" not in out + err


# -- database errors ---------------------------------------------------------------


def _conversation() -> int:
    with Store(db_path()) as store:
        return store.create_conversation(title="t", model="m", system_prompt="", settings={}).id


def test_a_damaged_database_is_one_line(capsys):
    db_path().write_bytes(b"this is not a database " * 200)
    code, out, err = run(capsys, "ls")
    line = one_line(err)
    assert code == 1 and "damaged" in line and "move it aside" in line and "[SQL" not in line


def test_a_locked_database_is_one_line(capsys, monkeypatch):
    import chatkv.store.db

    cid = _conversation()
    monkeypatch.setattr(chatkv.store.db, "BUSY_TIMEOUT_S", 0.05)
    other = sqlite3.connect(db_path(), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writing
    try:
        code, out, err = run(capsys, "rm", str(cid))
    finally:
        other.execute("ROLLBACK")
        other.close()
    line = one_line(err)
    assert code == 1 and "locked by another chatkv process" in line and "[SQL" not in line
    code, _, err = run(capsys, "show", str(cid))
    assert code == 0  # nothing was deleted


def _sqlite_error(tmp_path, what: str) -> Exception:
    """A real sqlite3 error of the kind `what`, wrapped as SQLAlchemy raises it."""
    from sqlalchemy.exc import OperationalError

    path = tmp_path / f"{what}.db"
    sqlite3.connect(path).executescript("CREATE TABLE t (x BLOB); INSERT INTO t VALUES (1);").close()
    try:
        if what == "readonly":
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            conn.execute("INSERT INTO t VALUES (2)")
        elif what == "full":
            conn = sqlite3.connect(path)
            conn.execute("PRAGMA max_page_count = 3")
            conn.execute("INSERT INTO t VALUES (zeroblob(100000))")
        elif what == "notadb":
            path.write_bytes(b"x" * 4096)
            sqlite3.connect(path).execute("SELECT * FROM t")
    except sqlite3.DatabaseError as e:
        return OperationalError("INSERT INTO t VALUES (?)", (2,), e)
    raise AssertionError(f"no error for {what}")


@pytest.mark.parametrize("what,says", [("readonly", "read-only"), ("full", "is full"), ("notadb", "damaged")])
def test_database_errors_are_classified(tmp_path, what, says):
    from chatkv.store.db import describe_db_error

    line = describe_db_error(_sqlite_error(tmp_path, what))
    assert says in line and "\n" not in line and "[SQL" not in line and "INSERT" not in line


# -- rm, export, config path, titles -------------------------------------------------------


def test_rm_checks_every_id_first_and_names_the_missing(capsys):
    a, b = _conversation(), _conversation()
    code, out, err = run(capsys, "rm", str(a), "999", "998")
    assert code == 1 and "conversations 999, 998 not found; nothing was deleted" in one_line(err)
    with Store(db_path()) as store:
        assert {c.id for c in store.list_conversations()} == {a, b}
    code, out, err = run(capsys, "rm", str(a), str(a))
    assert code == 0 and err.count("deleted conversation") == 1
    with Store(db_path()) as store:
        assert [c.id for c in store.list_conversations()] == [b]


def test_export_is_private_and_never_follows_a_link(capsys, tmp_path):
    from chatkv.outfile import open_private

    cid = _conversation()
    os.umask(0o022)  # main() tightens it; the file must be 0600 whatever the umask
    existing = tmp_path / "existing.md"
    existing.write_text("old")
    existing.chmod(0o644)
    code, _, err = run(capsys, "export", str(cid), "-o", str(existing))
    assert code == 0 and existing.read_text().startswith("# t")
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    link = tmp_path / "link.md"
    link.symlink_to(victim)
    code, _, err = run(capsys, "export", str(cid), "-o", str(link))
    assert code == 2 and "symbolic link" in one_line(err) and victim.read_text() == "keep me"
    code, _, err = run(capsys, "export", str(cid), "-o", str(tmp_path))
    line = one_line(err)
    assert code == 2 and "is a directory" in line and "nothing was lost" not in line
    # The write itself refuses too (a link may appear after the arguments were checked).
    from chatkv.errors import InputError

    with pytest.raises(InputError, match="symbolic link"):
        open_private(link)
    with pytest.raises(InputError, match="is a directory"):
        open_private(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        open_private(tmp_path / "nope" / "x")
    assert victim.read_text() == "keep me"
    with open_private(tmp_path / "new.md") as f:
        f.write("x")
    assert stat.S_IMODE((tmp_path / "new.md").stat().st_mode) == 0o600


def test_config_path_says_when_the_file_does_not_exist(capsys):
    code, out, err = run(capsys, "config", "path")
    assert code == 0 and out.strip().endswith("config.toml") and "does not exist yet" in err
    (db_path().parent / "config.toml").write_text("")
    code, out, err = run(capsys, "config", "path")
    assert code == 0 and err == ""


def test_long_titles_are_cut_with_an_ellipsis(capsys):
    from chatkv.fmt import display_title

    assert display_title("") == "(untitled)"
    assert display_title("a  b\n c", 10) == "a b c"
    assert display_title("x" * 60, 20) == "x" * 19 + "…"
    assert display_title("Summarise the", source="\n Summarise the GPL\nmore") == "Summarise the…"
    assert display_title("Summarise the GPL", source="Summarise the GPL") == "Summarise the GPL"
    with Store(db_path()) as store:
        store.create_conversation(title="word " * 12, model="m", system_prompt="", settings={})
    code, out, _ = run(capsys, "ls")
    assert code == 0 and out.splitlines()[1].endswith("…")
    long = "Tell me about the sea " * 5  # titled with its first 60 characters, unmarked
    code, out, _ = run(capsys, "ask", "--json", long)
    code, out, _ = run(capsys, "show", str(json.loads(out)["conversation_id"]))
    assert code == 0 and out.splitlines()[0].startswith(f"# {long[:60].rstrip()}…  [")


# -- --model -------------------------------------------------------------------------------


def test_model_paths_and_unknown_names_fail_at_once_in_one_line(
    capsys, monkeypatch, tmp_path, tiny_model_dir
):
    """Issue 11.9: offline, an unknown name fails in about a second (no network is tried:
    HF_HUB_OFFLINE-style lookups are the default) with one line listing what --model takes."""
    import shutil

    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "nowhere")
    for model in (str(tmp_path / "missing-dir" / "m"), str(tmp_path), str(dangling), "smollm3"):
        code, out, err = run(capsys, "ask", "--model", model, "hi")
        assert code == 1 and out == "" and one_line(err), (model, err)
    assert "did you mean 'smollm2'" in err and "a Hugging Face id already in the local cache" in err
    assert "HF_HUB_OFFLINE=0" in err
    assert not db_path().exists() or Store(db_path()).list_conversations() == []

    # A hub model in the local cache is loaded from there (and listed as a choice).
    repo = cache / "models--local--tiny"
    commit = "ab" * 20
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code, out, err = run(capsys, "ask", "--json", "--model", "local/tiny", "hi")
    assert code == 0, err
    assert json.loads(out)["stats"]["completion_tokens"] > 0
    code, out, err = run(capsys, "ask", "--model", "local/tinny", "hi")
    assert code == 1 and "did you mean 'local/tiny'" in one_line(err)

    # A directory transformers cannot load (an architecture it lacks, damaged weights): one
    # line, not a traceback.
    for config, weights in (
        ({"model_type": "nosucharch"}, None),
        (None, b"\x08\x00\x00\x00\x00\x00\x00\x00{not json"),
    ):
        broken = tmp_path / f"broken-{len(list(tmp_path.glob('broken-*')))}"
        shutil.copytree(tiny_model_dir, broken)
        if config is not None:
            (broken / "config.json").write_text(json.dumps(config))
        if weights is not None:
            (broken / "model.safetensors").write_bytes(weights)
        code, out, err = run(capsys, "ask", "--model", str(broken), "hi")
        assert code == 1 and out == "" and "cannot load model" in one_line(err), err


def test_resolve_keeps_a_hub_models_identity(monkeypatch, tmp_path, tiny_model_dir):
    import shutil

    import huggingface_hub.constants

    from chatkv.engine.model import resolve

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--m"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / ("cd" * 20))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("cd" * 20)
    src = resolve("org/m")
    assert src.path == str(repo / "snapshots" / ("cd" * 20)) and src.identity == "hub:org/m"
    assert src.commit == "cd" * 20


# -- Ctrl-C -------------------------------------------------------------------------------


def test_ctrl_c_in_ask_ends_the_line_and_says_how_to_continue(capsys, monkeypatch):
    from chatkv.engine import generate

    real, calls = generate.decode_one, []

    def interrupted(*a, **k):  # Ctrl-C while the model computes the second token
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "decode_one", interrupted)
    code, out, err = run(capsys, "ask", "Tell me a story about the sea.")
    assert code == 130 and calls
    with Store(db_path()) as store:
        (conv,) = store.list_conversations()
        msgs = store.messages(conv.id)
    assert [m.role for m in msgs] == ["user", "assistant"] and msgs[1].stats.finish_reason == "cancelled"
    assert out == (msgs[1].content + "\n" if msgs[1].content else "")  # the reply's line is ended
    assert err.strip().splitlines() == [
        f"chatkv: interrupted; the partial reply is saved in conversation {conv.id} "
        f"— continue with: chatkv ask -C {conv.id} ..."
    ]
    # --json: a script gets the object of what was saved, its finish_reason "cancelled"
    code, out, err = run(capsys, "ask", "--json", "-C", str(conv.id), "And then?")
    rec = json.loads(out)
    assert code == 130 and rec["conversation_id"] == conv.id and rec["stats"]["finish_reason"] == "cancelled"
    with Store(db_path()) as store:
        assert rec["reply"] == store.messages(conv.id)[-1].content and rec["message_id"]
    monkeypatch.setattr(generate, "decode_one", real)
    code, out, err = run(capsys, "ask", "-C", str(conv.id), "Go on.")
    assert code == 0


def test_a_file_where_the_data_dir_should_be_is_one_line(capsys, monkeypatch, tmp_path):
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    monkeypatch.setenv("CHATKV_HOME", str(home))
    code, out, err = run(capsys, "ls")
    line = one_line(err)
    assert code == 1 and "CHATKV_HOME" in line and "nothing was lost" not in line


@pytest.mark.parametrize(
    "value",
    [
        10**30,
        10**400,
        -(10**30),
        1e400,
        float("nan"),
        True,
        [],
        [1],
        {"a": 1},
        "",
        "x",
        "9" * 5000,
        "１２",
        None,
    ],
    ids=lambda v: repr(v)[:20],
)
def test_every_config_key_takes_any_value_without_a_traceback(value):
    """What a TOML file or an environment variable can hold is accepted or a ConfigError."""
    from chatkv.config import SCHEMA, validate
    from chatkv.errors import ConfigError

    for key in SCHEMA:
        try:
            validate(key, value, "test")
        except ConfigError as e:
            assert key in str(e) and "\n" not in str(e)


def test_an_unknown_model_fails_before_torch_is_imported(tmp_path):
    """The check runs before the seconds of `import torch` (measured with -X importtime in
    a fresh process: torch never appears)."""
    import subprocess
    import sys

    from chatkv.engine import hub, model

    assert hub.EMBEDDED == model.EMBEDDED
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"CHATKV_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "hub")}
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "chatkv", "ask", "--model", "smollm3", "hi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    imported = [line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if "import time:" in line]
    said = [line for line in run.stderr.splitlines() if "import time:" not in line]
    assert run.returncode == 1 and len(said) == 1 and "unknown model 'smollm3'" in said[0], run.stderr[-2000:]
    assert "huggingface_hub" in imported and "torch" not in imported


def test_the_chat_screen_does_not_open_for_an_unknown_model(capsys, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for argv in (["chat", "--model", "smollm3"], ["--model", "smollm3"]):
        code, out, err = run(capsys, *argv)
        assert code == 1 and out == "" and "unknown model 'smollm3'" in one_line(err)


def test_a_cache_url_without_its_client_fails_before_the_model_loads(capsys, monkeypatch):
    """cache.url on S3 without boto3 installed: one line naming the extra to install, before
    seconds of model loading (it was found only when the KV layer opened, after the load)."""
    import importlib.util

    from chatkv.engine import model

    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "boto3" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setenv("CHATKV_CACHE_URL", "s3://bucket/prefix")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(model, "load_model", no_load)
    for argv in (["ask", "hi"], ["chat"], ["batch", "-"]):
        code, out, err = run(capsys, *argv)
        assert code == 1 and out == "", err
        assert "cache.url names S3, which needs boto3: pip install 'chatkv[shared]'" in one_line(err)
    assert not db_path().exists() or Store(db_path()).list_conversations() == []


def test_the_chat_screen_wants_an_interactive_terminal(capsys, tiny_settings):
    """Bare `chatkv` with its output in a file or pipe drew the screen there and never
    ended; now one line says what to use instead (pytest's output is no terminal)."""
    code, out, err = run(capsys, "--model", str(tiny_settings.model.name))
    assert code == 2 and out == "" and "needs an interactive terminal" in one_line(err)


def test_a_misspelt_variable_is_named_in_a_warning_with_the_closest_setting(caplog):
    """CHATKV_GENERATION_TEMPERTURE=3 was ignored without a word; a config file's unknown
    key is an error, a variable a warning (it may be another version's, or a script's)."""
    import logging

    from chatkv import config

    caplog.set_level(logging.WARNING, logger=config.__name__)
    env = {"CHATKV_GENERATION_TEMPERTURE": "3", "CHATKV_HOME": "/tmp/x", "CHATKV_CACHE_CODEC": "fp16"}
    settings = config.load_settings(environ=env)
    assert settings.cache.codec == "fp16" and settings.generation.temperature != 3
    (record,) = [r for r in caplog.records if "CHATKV_" in r.getMessage()]
    message = record.getMessage()
    assert "CHATKV_GENERATION_TEMPERTURE names no setting" in message
    assert "did you mean CHATKV_GENERATION_TEMPERATURE?" in message
    config.load_settings(environ=env)
    assert len([r for r in caplog.records if "CHATKV_" in r.getMessage()]) == 1  # once a process
