"""The lean-only load (engine/leanload.py): a Llama model in bfloat16 loaded without
transformers' model classes computes, caches and tokenizes exactly as the transformers load
of the same files, is used only where that load vouched for it, and falls back to that load,
never to an error, whenever something does not match."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys

import pytest
import torch

from chatkv.api import GenerationSettings
from chatkv.engine import lean, leanload, leantok
from chatkv.engine import model as model_mod
from chatkv.engine.generate import generate, prefill
from chatkv.kv import live
from chatkv.paths import models_dir
from chatkv.session import Chat
from chatkv.store import Store

GREEDY = GenerationSettings(max_new_tokens=10, temperature=0.0)
NAME = "x.gguf"


@pytest.fixture
def gguf(fake_gguf, monkeypatch, chatkv_home):
    """`load(...)` loads the fake GGUF model (the tiny one) through load_model."""
    src, loads = fake_gguf
    monkeypatch.setattr(model_mod, "resolve", lambda name: dataclasses.replace(src))
    return loads


def load(lean_only=True, dtype="bfloat16"):
    return model_mod.load_model(NAME, device="cpu", dtype=dtype, lean_only=lean_only)


def both(gguf):
    """The transformers load (which converts and remembers), then the lean-only one."""
    full = load(lean_only=False)
    lean_lm = load()
    assert not isinstance(full.model, leanload.LeanModel)
    assert isinstance(lean_lm.model, leanload.LeanModel)
    return full, lean_lm


def run(model, ids, pieces):
    """Prefill `ids` in pieces of the given lengths; the last logits (1, V) and the cache."""
    cache = live.new_cache(model)
    start, logits = 0, None
    for n in pieces:
        logits = prefill(model, ids[start : start + n], cache, start)
        start += n
    return logits, cache


def test_the_second_load_is_lean_with_the_same_fingerprint_and_limits(gguf):
    first = load()  # nothing remembered yet: converts, loads through transformers, remembers
    assert not isinstance(first.model, leanload.LeanModel)
    second = load()
    assert isinstance(second.model, leanload.LeanModel)
    assert second.fingerprint == first.fingerprint
    assert (second.eos_ids, second.context_limit, second.kv_shape, second.dtype) == (
        first.eos_ids,
        first.context_limit,
        first.kv_shape,
        first.dtype,
    )
    assert model_mod.predict_fingerprint(NAME, "cpu", "bfloat16") == first.fingerprint
    assert not isinstance(load(lean_only=False).model, leanload.LeanModel)  # only where asked for


@pytest.mark.parametrize("pieces", [[100], [70, 7, 1], [5, 9]])  # a long piece, a resumed turn, short only
def test_logits_and_cache_are_bit_identical_to_the_transformers_load(gguf, pieces):
    full, lean_lm = both(gguf)
    ids = [(i * 7 + 3) % 300 + 5 for i in range(sum(pieces))]
    a, ca = run(full.model, ids, pieces)
    b, cb = run(lean_lm.model, ids, pieces)
    assert torch.equal(a, b)
    for (ka, va), (kb, vb) in zip(live.layers_of(ca), live.layers_of(cb), strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


def test_greedy_tokens_are_the_same_as_the_transformers_loads(gguf):
    full, lean_lm = both(gguf)
    ids = list(range(5, 45))

    def tokens(lm):
        steps = generate(lm.model, ids, live.new_cache(lm.model), 0, GREEDY, [], lm.context_limit)
        return [s.token for s in steps if s.token is not None]

    assert len(tokens(full)) == GREEDY.max_new_tokens
    assert tokens(full) == tokens(lean_lm)


def test_the_tokenizer_gives_the_same_ids_template_and_special_tokens(gguf):
    full, lean_lm = both(gguf)
    a, b = full.tokenizer, lean_lm.tokenizer
    assert not isinstance(b, type(a))  # the lean one is not transformers' class
    chats = [
        [{"role": "user", "content": "Hello there"}],
        [
            {"role": "system", "content": "Be brief. <|im_start|>user"},
            {"role": "user", "content": "Licences:\n\n  GPL, MIT"},
            {"role": "assistant", "content": "Both free."},
            {"role": "user", "content": "ünïcödé — and <|im_end|> typed"},
        ],
    ]
    for msgs in chats:
        ids = model_mod.chat_ids(a, msgs)
        assert model_mod.chat_ids(b, msgs) == ids
        for gen in (False, True):
            want = a.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            assert b.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False) == want
        for skip in (False, True):
            assert a.decode(ids, skip_special_tokens=skip) == b.decode(ids, skip_special_tokens=skip)
    assert model_mod.template_default_system_prompt(a) == model_mod.template_default_system_prompt(b)
    assert a.chat_template == b.chat_template
    assert a.get_vocab() == b.get_vocab()
    assert (a.eos_token_id, a.pad_token_id) == (b.eos_token_id, b.pad_token_id)


def test_a_tokenizer_file_s_truncation_does_not_cut_what_the_lean_tokenizer_encodes(gguf):
    """transformers turns a tokenizer file's truncation off for every encode chatkv asks of
    it; the captured state comes back without it, whatever the backend was last set to."""
    full = load(lean_only=False)
    tok = full.tokenizer
    tok.backend_tokenizer.enable_truncation(max_length=8)
    state, why = leantok.capture(tok)
    assert state is not None, why
    text = " ".join(f"word{i}" for i in range(50))
    lean_tok = leantok.LeanTokenizer(state)
    assert len(lean_tok.encode(text, add_special_tokens=False)) > 8
    assert lean_tok.encode(text) == list(tok.encode(text))


def test_a_tokenizer_whose_template_renders_differently_outside_transformers_is_not_taken(gguf):
    """The capture renders probe chats both ways: a template using transformers' own
    `{% generation %}` tag does not compile outside it, so that model keeps the transformers
    load (and says why in the log), where a lean one would fail at its first turn."""
    full = load(lean_only=False)
    tok = full.tokenizer
    assert leantok.capture(tok)[0] is not None
    tok.chat_template = tok.chat_template.replace(
        "{{ message['content'] }}", "{% generation %}{{ message['content'] }}{% endgeneration %}"
    )
    assert "generation" in tok.chat_template
    state, why = leantok.capture(tok)
    assert state is None and "generation" in why


def test_a_conversation_saved_by_one_load_resumes_from_disk_under_the_other(gguf, tiny_settings):
    tiny_settings.set("model.name", NAME)
    tiny_settings.set("model.dtype", "bfloat16")
    full, lean_lm = both(gguf)

    def send(chat, conv_id, text):
        turn = chat.send(conv_id, text, GREEDY)
        return turn, "".join(turn)

    a = Chat(tiny_settings, lm=full)
    conv = a.new_conversation()
    send(a, conv.id, "Summarise the GNU GPL.")
    path = a.store.path
    a.close()  # the cache is spilled to disk by the transformers-loaded model
    b = Chat(tiny_settings, store=Store(path), lm=lean_lm)
    turn, reply = send(b, conv.id, "And the MIT licence?")
    assert turn.stats.cache_source == "disk" and turn.stats.cached_tokens > 0
    b.close()

    # The same two turns with the transformers load alone, in another conversation.
    c = Chat(tiny_settings, store=Store(path), lm=full)
    other = c.new_conversation()
    send(c, other.id, "Summarise the GNU GPL.")
    _, expected = send(c, other.id, "And the MIT licence?")
    c.close()
    assert reply == expected


def test_transformers_forward_runs_over_the_same_weight_tensors(gguf):
    full, lean_lm = both(gguf)
    skeleton = lean_lm.model
    lean.set_enabled(skeleton, False)  # as --ablate does: every piece through the forward
    lean.set_enabled(full.model, False)
    ids = list(range(5, 30))
    a, _ = run(full.model, ids, [25])
    b, _ = run(skeleton, ids, [25])
    assert torch.equal(a, b)
    built = skeleton.full()
    assert built.model.layers[0].self_attn.q_proj.weight is skeleton.model.layers[0].self_attn.q_proj.weight
    assert built.lm_head.weight is skeleton.model.embed_tokens.weight  # tied, as loaded


def test_a_lean_cache_handed_to_transformers_forward_goes_on_as_that_forward_would(gguf):
    """A cache begun by the lean step (a LeanCache) and continued through transformers'
    forward (`set_enabled(False)`, as --ablate) becomes a DynamicCache over the same layers:
    the forward extends it as it extends its own, and the LeanCache sees what it added."""
    full, lean_lm = both(gguf)
    skeleton = lean_lm.model
    ids = list(range(5, 30))
    cache = live.new_cache(skeleton)
    assert type(cache).__name__ == "LeanCache"
    prefill(skeleton, ids[:10], cache, 0)  # the lean prefill, as the full model's below
    lean.set_enabled(skeleton, False)
    got = prefill(skeleton, ids[10:], cache, 10)
    want_cache = live.new_cache(full.model)
    prefill(full.model, ids[:10], want_cache, 0)
    lean.set_enabled(full.model, False)
    want = prefill(full.model, ids[10:], want_cache, 10)
    assert torch.equal(got, want)
    assert live.seq_len(cache) == 25
    for (ka, va), (kb, vb) in zip(live.layers_of(want_cache), live.layers_of(cache), strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


def test_a_fresh_process_imports_no_transformers(gguf, tiny_model_dir, chatkv_home):
    """Load, tokenize a chat, prefill it into a new cache and decode a token: none of it
    imports transformers (0.6 s) or its model classes (2 s more)."""
    full, _ = both(gguf)
    chat = [{"role": "user", "content": "hi <|im_end|>"}]
    want = full.tokenizer.decode(model_mod.chat_ids(full.tokenizer, chat))
    code = f"""
import sys
from chatkv.engine import model as m
from chatkv.engine.generate import decode_one, prefill
from chatkv.kv import live
src = m.ModelSource("x.gguf", {str(tiny_model_dir)!r}, "x.gguf", "gguf:abc")
m.resolve = lambda name: src
lm = m.load_model("x.gguf", device="cpu", dtype="bfloat16", lean_only=True)
ids = m.chat_ids(lm.tokenizer, [{{"role": "user", "content": "hi <|im_end|>"}}])
cache = live.new_cache(lm.model)
logits = prefill(lm.model, ids, cache, 0)
decode_one(lm.model, logits.argmax(-1), cache, len(ids))
print(type(lm.model).__name__, lm.fingerprint, type(cache).__name__, live.seq_len(cache) == len(ids) + 1)
print(lm.tokenizer.decode(ids) == {want!r})
print(sorted(k for k in sys.modules if k.startswith(("transformers", "torch._dynamo"))))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, same_text, imported = done.stdout.splitlines()
    assert loaded == f"LeanModel {load().fingerprint} LeanCache True"
    assert same_text == "True"
    assert imported == "[]"


def test_a_damaged_tokenizer_state_falls_back_to_transformers_which_mends_it(gguf, caplog):
    both(gguf)
    (state,) = (models_dir() / leanload.TOKENIZERS).glob("*.json")
    state.write_text(state.read_text().replace("<|im_end|>", "<|im_fin|>"))  # valid JSON, not its hash
    with caplog.at_level(logging.WARNING):
        fell_back = load()
    assert not isinstance(fell_back.model, leanload.LeanModel)
    assert "lean-only load" in caplog.text and "does not match" in caplog.text
    again = load()  # the transformers load wrote the state again
    assert isinstance(again.model, leanload.LeanModel)
    assert again.tokenizer.encode("<|im_end|>") == fell_back.tokenizer.encode("<|im_end|>")


def test_tokenizer_states_no_memo_entry_names_are_removed(gguf):
    both(gguf)
    where = models_dir() / leanload.TOKENIZERS
    (kept,) = where.glob("*.json")
    stale = where / ("0" * 32 + ".json")
    stale.write_text("{}")
    load(lean_only=False)  # a transformers load remembers again, and prunes
    assert sorted(where.glob("*.json")) == [kept]
    assert isinstance(load().model, leanload.LeanModel)


def test_a_rewritten_copy_or_a_new_transformers_is_loaded_through_transformers(gguf, monkeypatch):
    both(gguf)
    conv = model_mod._converted_dir(model_mod.resolve(NAME))
    config = conv / "bfloat16" / "config.json"
    config.write_text(config.read_text())  # the same bytes, rewritten: its stamp moves
    assert not isinstance(load().model, leanload.LeanModel)
    assert isinstance(load().model, leanload.LeanModel)  # remembered again by that load
    real = leanload.library_version
    for upgraded in ("transformers", "tokenizers", "jinja2"):  # what renders and tokenizes
        monkeypatch.setattr(
            leanload, "library_version", lambda n, u=upgraded: real(n) + (".post1" if n == u else "")
        )
        assert not isinstance(load().model, leanload.LeanModel)


def _untied(entry):
    entry["tied"] = False  # the copy holds no lm_head: the skeleton cannot be built


def _no_fingerprint(entry):
    del entry["fingerprint"]  # a hand-edited or partly written memo


@pytest.mark.parametrize("spoil", [_untied, _no_fingerprint])
def test_an_entry_the_files_do_not_match_falls_back_with_one_warning(gguf, caplog, spoil):
    full, _ = both(gguf)
    memo = models_dir() / leanload.MEMO
    known = json.loads(memo.read_text())
    for key, raw in known.items():
        entry = json.loads(raw)
        spoil(entry)
        known[key] = json.dumps(entry)
    memo.write_text(json.dumps(known))
    with caplog.at_level(logging.WARNING, logger="chatkv.engine.leanload"):
        lm = load()
    assert not isinstance(lm.model, leanload.LeanModel) and lm.fingerprint == full.fingerprint
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        f"lean-only load of {model_mod._converted_dir(model_mod.resolve(NAME)) / 'bfloat16'} failed"
    ]


def test_float32_and_models_the_lean_step_does_not_take_are_never_remembered(gguf, monkeypatch):
    load(dtype="float32")
    load(dtype="float32")
    assert not (models_dir() / leanload.MEMO).exists()
    monkeypatch.setattr(lean, "why_not", lambda model: "not this one")
    load()
    assert not isinstance(load().model, leanload.LeanModel)
    assert not (models_dir() / leanload.MEMO).exists()


def test_ask_resumes_through_the_lean_load_and_says_so(gguf, capsys, monkeypatch, tmp_path):
    from chatkv.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).write_bytes(b"")  # the CLI's early check of --model finds a file
    for key, value in {
        "MODEL_NAME": NAME,
        "MODEL_DEVICE": "cpu",
        "MODEL_DTYPE": "bfloat16",
        "GENERATION_TEMPERATURE": "0",
        "GENERATION_MAX_NEW_TOKENS": "6",
        "CACHE_CHUNK_TOKENS": "32",
        "CACHE_CODEC": "fp16",
    }.items():
        monkeypatch.setenv("CHATKV_" + key, value)

    def ask(*args):
        capsys.readouterr()
        code = main(["ask", "--json", *args])
        out, err = capsys.readouterr()
        assert code == 0, err
        return json.loads(out)

    first = ask("Summarise the GNU GPL in three bullet points, please.")
    assert first["startup"]["model_classes"] == "transformers"  # converts, then remembers
    second = ask("-C", str(first["conversation_id"]), "And the MIT licence?")
    assert second["startup"]["model_classes"] == "lean"
    assert second["stats"]["cache_source"] == "disk" and second["stats"]["cached_tokens"] > 32
    # read during the load (the attach reads whatever the load left unread)
    assert 0 < second["startup"]["prefetched_tokens"] <= second["stats"]["cached_tokens"]


def test_batched_rows_over_a_lean_loaded_model_decode_as_over_the_transformers_load(gguf):
    from chatkv.engine.batch import BatchDecoder, BatchRow

    full, lean_lm = both(gguf)
    prompts = [list(range(5, 5 + n)) for n in (9, 17, 30)]

    def batched(lm):
        rows = [BatchRow(ids, GREEDY) for ids in prompts]
        toks: list[list[int]] = [[] for _ in rows]
        for step in BatchDecoder(lm.model, rows, None, lm.eos_ids, lm.context_limit):
            if step.token is not None:
                toks[step.row].append(step.token)
        return toks

    want = batched(full)
    assert all(len(t) == GREEDY.max_new_tokens for t in want)
    assert batched(lean_lm) == want


def test_the_chat_loads_lean_and_its_warm_up_packs_the_decode_weights(gguf, tiny_settings):
    tiny_settings.set("model.name", NAME)
    tiny_settings.set("model.dtype", "bfloat16")
    load(lean_only=False)  # remembers
    chat = Chat(tiny_settings)
    chat.load()  # as the chat UI does: warm, lean-only by default
    assert chat.lm is not None and chat.lm.lean_loaded
    model_mod.settle(chat.lm)
    built = lean.lean_for(chat.lm.model)
    assert built is not None
    assert all(
        linear._int4 is not lean._PENDING for w in built.layers for linear in (w.qkv, w.o, w.gate_up, w.down)
    )
    conv = chat.new_conversation()
    assert "".join(chat.send(conv.id, "Hello!", GREEDY))
    chat.close()
