"""A fresh process's way to its first token, on the tiny model: the lean decode step is built
aside (the first token comes from a forward), and not at all for a one-token turn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import transformers

import chatkv.engine.generate  # noqa: F401  # binds the real lean_for before a test patches lean's
import chatkv.engine.lean as lean
import chatkv.engine.model as model_mod
from chatkv.engine.model import settle, warm_up
from chatkv.session import Chat


@pytest.fixture
def held_lean_build(monkeypatch):
    """The warm-up's lean build blocks until `release` is set; `began` says it was reached.
    (The decode step's own lean_for, imported by chatkv.engine.generate, is the real one.)"""
    began, release = threading.Event(), threading.Event()
    real = lean.lean_for

    def held(model):
        began.set()
        release.wait(20)  # a bound: a test that waits for this build fails, not hangs
        return real(model)

    monkeypatch.setattr(lean, "lean_for", held)
    yield began, release
    release.set()


def test_the_first_token_does_not_wait_for_the_lean_build(tiny_settings, held_lean_build):
    began, release = held_lean_build
    chat = Chat(tiny_settings)
    chat.load()
    conv = chat.new_conversation()
    pieces = iter(chat.send(conv.id, "Hello!"))
    next(pieces)  # the first token: the warm-up's forward was joined, its lean build was not
    assert began.is_set() and not release.is_set()
    assert [t.name for t in chat.lm.aside] == ["chatkv-warm-up", "chatkv-lean-build"]
    assert chat.lm.aside[1].is_alive()
    release.set()
    list(pieces)  # the decode steps build the lean step themselves if needed
    chat.close()
    settle(chat.lm)
    assert not any(t.is_alive() for t in chat.lm.aside)
    assert isinstance(getattr(chat.lm.model, lean._ATTR, None), lean.LeanLlama)


def test_a_one_token_turn_builds_the_lean_step_only_for_a_prefill_that_takes_it(tiny_settings):
    """Nothing is decoded; the prefill builds the lean step (47 ms for SmolLM2) only where it
    takes it: bfloat16 on the CPU, where a prompt's bits must not depend on its split."""
    tiny_settings.set("generation.max_new_tokens", 1)
    chat = Chat(tiny_settings)
    chat.load()
    conv = chat.new_conversation()
    turn = chat.send(conv.id, "Hello!")
    "".join(turn)
    assert turn.stats.completion_tokens == 1
    chat.close()
    settle(chat.lm)
    assert [t.name for t in chat.lm.aside] == ["chatkv-warm-up"]
    built = getattr(chat.lm.model, lean._ATTR, None)
    assert (built is not None) == (chat.lm.dtype in lean.PREFILL_DTYPES)
    assert built is None or all(
        linear._int4 is lean._PENDING for w in built.layers for linear in (w.qkv, w.down)
    )


def test_settle_waits_for_the_build_the_warm_up_starts(tiny_lm, held_lean_build):
    began, release = held_lean_build
    tiny_lm.aside.clear()
    warm_up(tiny_lm, "aside").join()  # the forward only
    began.wait(20)
    assert tiny_lm.aside[1].is_alive()
    release.set()
    settle(tiny_lm)
    assert not tiny_lm.aside[1].is_alive()
    with pytest.raises(ValueError, match="lean must be"):
        warm_up(tiny_lm, "later")


class Labels:
    """A Progress that keeps the labels of the steps started."""

    def __init__(self):
        self.labels: list[str] = []

    def start(self, label, total=0, unit=""):
        self.labels.append(label)

    def advance(self, n=1):
        pass

    def done(self):
        pass


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_converted_copy_is_kept_in_the_compute_dtype(fake_gguf, tiny_model_dir, chatkv_home, caplog):
    src, loads = fake_gguf
    conv = model_mod._converted_dir(src)
    bf16 = torch.bfloat16
    reference = transformers.LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).to(bf16)

    p = Labels()
    first, tok = model_mod._load_gguf(src, bf16, p)  # converts, keeps float32 and bfloat16 copies
    assert [label.split(" (")[0] for label in p.labels] == [
        "converting x.gguf",
        "keeping a converted copy",
        "keeping a bfloat16 copy of the weights",
    ]
    assert (conv / "done").exists() and (conv / "bfloat16" / "done").exists()
    assert same_weights(first, reference)

    p = Labels()
    second, _ = model_mod._load_gguf(src, bf16, p)
    assert p.labels == ["loading x.gguf"] and loads[-1] == str(conv / "bfloat16")
    assert second.dtype == bf16 and same_weights(second, reference)
    fp = model_mod.fingerprint(src, first, tok, bf16, "none", "cpu")
    assert model_mod.fingerprint(src, second, tok, bf16, "none", "cpu") == fp

    # float32 reads the float32 copy; a damaged bfloat16 copy is cast again from it, and kept.
    model_mod._load_gguf(src, torch.float32, Labels())
    assert loads[-1] == str(conv)
    (conv / "bfloat16" / "model.safetensors").write_bytes(b"not safetensors")
    p = Labels()
    third, _ = model_mod._load_gguf(src, bf16, p)
    assert "unusable" in caplog.text and loads[-2:] == [str(conv / "bfloat16"), str(conv)]
    assert [label.split(" (")[0] for label in p.labels] == [
        "loading x.gguf",
        "keeping a bfloat16 copy of the weights",
    ]
    assert same_weights(third, reference) and (conv / "done").exists()
    model_mod._load_gguf(src, bf16, Labels())
    assert loads[-1] == str(conv / "bfloat16")


@pytest.mark.parametrize("failure", ["full disk", "interrupted"])
def test_a_failed_dtype_copy_keeps_the_converted_copy(
    fake_gguf, tiny_model_dir, chatkv_home, caplog, monkeypatch, failure
):
    """Writing the bfloat16 copy can fail where the float32 copy fit: a full disk comes from
    safetensors as its own error type (not an OSError). The start goes on from the float32
    copy, which stays; a Ctrl-C during the write leaves no temporary folder behind."""
    from safetensors import SafetensorError

    src, loads = fake_gguf
    conv = model_mod._converted_dir(src)
    model_mod._load_gguf(src, torch.float32, Labels())  # the float32 copy only
    assert (conv / "done").exists() and not (conv / "bfloat16").exists()
    error = SafetensorError("Error while serializing: IoError(StorageFull)")
    if failure == "interrupted":
        error = KeyboardInterrupt()

    def no_room(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", no_room)
    if failure == "interrupted":
        with pytest.raises(KeyboardInterrupt):
            model_mod._load_gguf(src, torch.bfloat16, Labels())
    else:
        model, _ = model_mod._load_gguf(src, torch.bfloat16, Labels())
        assert model.dtype == torch.bfloat16 and "could not keep a converted copy" in caplog.text
        assert "converting again" not in caplog.text
    assert (conv / "done").exists() and loads[-1] == str(conv)  # read, kept, not converted again
    assert not (conv / "bfloat16").exists()
    assert not list(conv.parent.rglob(".convert-*"))


def test_a_conversion_killed_mid_save_leaves_nothing_behind_at_the_next(fake_gguf, chatkv_home):
    """A process killed while it saves a converted copy leaves its temporary folder (hundreds
    of MB for a real model); the next conversion removes it, never a live process's."""
    src, _ = fake_gguf
    conv = model_mod._converted_dir(src)
    where = conv.parent
    where.mkdir(parents=True, exist_ok=True)
    dead = run_python("import os; print(os.getpid())")
    killed = where / f".convert-{int(dead.stdout)}-abc123"
    live = where / f".convert-{os.getppid()}-def456"  # the test runner's parent: alive
    for d in (killed, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half written")
    model_mod._load_gguf(src, torch.float32, Labels())
    assert (conv / "done").exists()
    assert not killed.exists() and live.exists()
    assert [p.name for p in where.glob(".convert-*")] == [live.name]


def run_python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def test_the_program_ends_without_teardown_but_after_threads_and_exit_handlers():
    done = run_python(
        textwrap.dedent(
            """
            import atexit, threading, time
            import torch
            from chatkv.cli import end_process

            atexit.register(lambda: print("exit handler ran"))
            def late():
                time.sleep(0.3)
                print("thread done")
            threading.Thread(target=late).start()
            print("buffered", end="")  # stdout is a pipe: block-buffered, never flushed by this code
            end_process(3)
            """
        )
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout == "bufferedthread done\nexit handler ran\n"


def test_the_collector_held_by_the_program_is_back_on_once_the_model_has_loaded(tiny_model_dir, monkeypatch):
    """gcpause: only what `hold` turned off is turned on again, everything alive at the load
    frozen; chatkv used in process (main with arguments, a load) leaves the collector alone."""
    import gc

    from chatkv import gcpause
    from chatkv.cli import main

    assert gc.isenabled()
    assert main(["config", "path"]) == 0
    model_mod.load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    assert gc.isenabled() and gc.get_freeze_count() == 0  # never held: untouched
    monkeypatch.setattr(gcpause, "paused_s", 0.0)
    try:
        gcpause.hold()
        assert not gc.isenabled()
        model_mod.load_model(str(tiny_model_dir), device="cpu", dtype="float32")
        assert gc.isenabled() and gc.get_freeze_count() > 0 and gcpause.paused_s > 0
        gc.disable()
        gcpause.release()  # once only: what it did not turn off stays off
        assert not gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()


def test_the_cli_as_a_program_still_reports_and_exits_with_its_code(tiny_model_dir, chatkv_home):
    env = dict(
        os.environ,
        CHATKV_MODEL_NAME=str(tiny_model_dir),
        CHATKV_MODEL_DEVICE="cpu",
        CHATKV_GENERATION_TEMPERATURE="0",
        CHATKV_GENERATION_MAX_NEW_TOKENS="3",
        OMP_NUM_THREADS="1",
    )
    ask = [sys.executable, "-m", "chatkv", "ask", "--json"]
    done = subprocess.run([*ask, "Hello!"], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["stats"]["completion_tokens"] == 3 and reply["startup"]["process_first_token_s"] > 0
    # the program held its garbage collector off until the model had loaded (chatkv/gcpause.py)
    assert 0 < reply["startup"]["collector_paused_s"] < reply["startup"]["process_first_token_s"]
    again = subprocess.run(
        [*ask, "-C", str(reply["conversation_id"]), "Again!"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert again.returncode == 0 and json.loads(again.stdout)["stats"]["cached_tokens"] > 0
    missing = subprocess.run([*ask, "-C", "999", "Hi"], capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 1 and missing.stderr.startswith("chatkv: error:")


@pytest.mark.usefixtures("cli_env")
def test_ask_warms_nothing_up_aside_but_a_chat_does(tiny_settings, monkeypatch, capsys):
    """`ask` has its prompt in hand: a forward or a lean build aside would only delay its own."""
    from chatkv.cli import main
    from chatkv.engine import generate

    fed: list[int] = []
    real = generate.prefill

    def counted(model, ids, *args, **kwargs):
        fed.append(len(ids))
        return real(model, ids, *args, **kwargs)

    warmed = []
    real_warm_up = model_mod.warm_up
    monkeypatch.setattr(model_mod, "warm_up", lambda *a: warmed.append(a) or real_warm_up(*a))
    monkeypatch.setattr(generate, "prefill", counted)
    assert main(["ask", "Hello!"]) == 0
    assert len(fed) == 1 and fed[0] > 1  # the prompt's prefill only
    assert warmed == []  # nor a lean build aside: the first decode step builds it, after the first token
    fed.clear()
    chat = Chat(tiny_settings)
    chat.load()
    conv = chat.new_conversation()
    "".join(chat.send(conv.id, "Hello!"))
    chat.close()
    settle(chat.lm)
    assert fed[0] == 1 and len(fed) == 2  # the warm-up's one token, then the prompt
    assert len(warmed) == 1


def test_the_fingerprint_is_remembered_until_the_tokenizer_files_change(
    tiny_model_dir, tmp_path, chatkv_home
):
    import shutil

    from chatkv.engine.model import load_model

    where = tmp_path / "m"
    shutil.copytree(tiny_model_dir, where)
    lm = load_model(str(where), device="cpu", dtype="float32")
    memo = model_mod.models_dir() / model_mod.FINGERPRINT_MEMO
    assert list(json.loads(memo.read_text()).values()) == [lm.fingerprint]

    calls = []
    tok = lm.tokenizer
    real = tok.get_vocab
    tok.get_vocab = lambda: calls.append(1) or real()
    source = model_mod.resolve(str(where))
    assert model_mod.fingerprint(source, lm.model, tok, torch.float32, "none", "cpu") == lm.fingerprint
    assert calls == []  # remembered: the vocabulary was not read
    memo.unlink()
    assert model_mod.fingerprint(source, lm.model, tok, torch.float32, "none", "cpu") == lm.fingerprint
    assert calls == [1]  # computed again, the same

    grown = transformers.AutoTokenizer.from_pretrained(where)
    grown.add_tokens(["<|a new token|>"])
    grown.save_pretrained(where)
    again = load_model(str(where), device="cpu", dtype="float32")
    assert again.fingerprint != lm.fingerprint
    memo.unlink()
    assert model_mod.fingerprint(source, again.model, again.tokenizer, torch.float32, "none", "cpu") == (
        again.fingerprint
    )


def test_the_tokenizer_stamp_sees_any_vocabulary_file_even_with_its_time_kept(tmp_path):
    """A tokenizer may read its vocabulary from any file of its directory (vocab.txt,
    spiece.model, *.tiktoken): each counts, weights excepted, and rewriting one with its
    modification time put back (`cp -p`, `rsync -t`) still changes the stamp."""
    from types import SimpleNamespace

    (tmp_path / "vocab.txt").write_text("a\nb\n")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    tok = SimpleNamespace(name_or_path=str(tmp_path))
    before = model_mod._tokenizer_stamp(tok)
    assert "vocab.txt" in before and "model.safetensors" not in before
    (tmp_path / "model.safetensors").write_bytes(b"other weights")  # the weights' hash covers these
    assert model_mod._tokenizer_stamp(tok) == before
    st = (tmp_path / "vocab.txt").stat()
    (tmp_path / "vocab.txt").write_text("a\nc\n")  # same size
    os.utime(tmp_path / "vocab.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_mod._tokenizer_stamp(tok) != before


def test_a_profiled_program_exits_as_usual_so_the_profile_is_written(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text("import torch\nfrom chatkv.cli import end_process\nend_process(4)\n")
    out = tmp_path / "prog.prof"
    done = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(out), str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )
    assert done.returncode == 0, done.stderr  # cProfile swallows the SystemExit, code and all
    assert out.stat().st_size > 0  # os._exit would have ended it before it wrote this


def test_a_memo_keeps_its_newest_entries(chatkv_home):
    for i in range(70):
        model_mod._remember_json("m.json", f"k{i}", f"v{i}")
    model_mod._remember_json("m.json", "k10", "v10")  # already there: kept where it is
    model_mod._remember_json("m.json", "k8", "again")  # a new value: the newest
    known = json.loads((model_mod.models_dir() / "m.json").read_text())
    assert len(known) == 64 and list(known)[-1] == "k8" and known["k8"] == "again"
    assert "k5" not in known and "k6" in known and known["k69"] == "v69"


def test_the_program_ends_with_an_idle_thread_pool_open():
    """A thread pool left open (the remote tier's fetch pool when a second Ctrl-C skipped its
    close) has idle non-daemon workers: the exit wakes them as the interpreter's would, instead
    of joining them forever."""
    done = run_python(
        textwrap.dedent(
            """
            from concurrent.futures import ThreadPoolExecutor
            import torch
            from chatkv.cli import end_process

            pool = ThreadPoolExecutor(max_workers=2)
            print(pool.submit(lambda: 41 + 1).result())
            end_process(5)
            """
        )
    )
    assert done.returncode == 5, done.stderr
    assert done.stdout == "42\n"


def test_the_first_start_computes_with_the_model_later_starts_load(fake_gguf, chatkv_home):
    # The conversion's model was cast in memory: its RoPE frequencies too, which a loaded
    # model keeps in float32, so the first start cached other bits than later ones would.
    src, _ = fake_gguf
    first, _ = model_mod._load_gguf(src, torch.bfloat16, Labels())
    later, _ = model_mod._load_gguf(src, torch.bfloat16, Labels())
    assert same_weights(first, later)
    buffers = dict(later.named_buffers())
    assert buffers and all(
        b.dtype == buffers[n].dtype and torch.equal(b, buffers[n]) for n, b in first.named_buffers()
    )


def test_library_progress_bars_stay_off_the_users_stderr():
    """transformers' GGUF conversion draws a tqdm bar of its own (outside its switch for
    progress bars): chatkv's start turns tqdm off before any library imports it, as it says
    "converting …" itself, on a terminal only."""
    probe = (
        "import sys\n"
        "from chatkv.cli import _quiet_libraries\n"
        "assert 'tqdm' not in sys.modules\n"
        "_quiet_libraries(False)\n"
        "from tqdm.auto import tqdm\n"
        "for _ in tqdm(range(3), desc='converting-probe'): pass\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    done = run_python(probe, env=env)
    assert done.returncode == 0, done.stderr
    assert "converting-probe" not in done.stderr
    shown = run_python(probe.replace("_quiet_libraries(False)", "_quiet_libraries(True)"), env=env)
    assert "converting-probe" in shown.stderr  # --debug: the libraries' own output as it is
