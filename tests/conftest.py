"""Shared fixtures: a private CHATKV_HOME per test, and a tiny randomly initialised
chat model (byte-level BPE tokenizer with a ChatML template, 2-layer Llama) built
once per session, so the fast suite never needs the real model."""

from __future__ import annotations

import io
import os
import shutil
import tempfile

import pytest


@pytest.fixture(scope="session", autouse=True)
def _session_home():
    """A data dir for what session-wide fixtures write (the tiny model's models/seen.json),
    never the user's own: each test then gets its own (chatkv_home)."""
    home = tempfile.mkdtemp(prefix="chatkv-test-session-")
    before = os.environ.get("CHATKV_HOME")
    os.environ["CHATKV_HOME"] = home
    yield home
    if before is None:
        os.environ.pop("CHATKV_HOME", None)
    else:
        os.environ["CHATKV_HOME"] = before
    shutil.rmtree(home, ignore_errors=True)


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Summarise the GNU GPL in three bullet points.",
    "How does the Apache license differ? It is permissive and has a patent grant.",
    "Caches keep keys and values of attention for every token of the history.",
    "Hello! How can I help you today? Tell me a story about the sea and the stars.",
    "0123456789 +-*/=()[]{}<>,.;:!?'\" \n\t",
]


@pytest.fixture(autouse=True)
def chatkv_home(tmp_path, monkeypatch):
    """Every test gets its own data dir and no user config."""
    home = tmp_path / "chatkv-home"
    monkeypatch.setenv("CHATKV_HOME", str(home))
    for key in list(os.environ):
        if key.startswith("CHATKV_") and key != "CHATKV_HOME":
            monkeypatch.delenv(key)
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A directory holding a tiny random Llama chat model and its tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-model")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.bos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    # Larger random weights make the logits peaked, so greedy choices are far from ties.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    """The tiny model loaded through chatkv's own loader (a LoadedModel)."""
    from chatkv.engine.model import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture
def tiny_settings(tiny_model_dir):
    """Settings that point at the tiny model, greedy, small chunks so tests cross chunk boundaries."""
    from chatkv.config import load_settings

    s = load_settings()
    s.set("model.name", str(tiny_model_dir))
    s.set("model.device", "cpu")
    s.set("generation.temperature", 0.0)
    s.set("generation.max_new_tokens", 12)
    s.set("cache.chunk_tokens", 32)
    s.set("cache.codec", "fp16")
    return s


@pytest.fixture
def cli_env(request, monkeypatch, tiny_model_dir):
    """The CLI on the tiny model, set up through the environment as a user would: greedy, fp16
    chunks, nothing on standard input. A module using it (`pytestmark =
    pytest.mark.usefixtures("cli_env")`) sets CLI_MAX_NEW_TOKENS (default 6) and
    CLI_CHUNK_TOKENS (None, the default: the configured chunk size). The process umask,
    which some tests change, is restored after."""
    max_new = getattr(request.module, "CLI_MAX_NEW_TOKENS", 6)
    chunk_tokens = getattr(request.module, "CLI_CHUNK_TOKENS", None)
    monkeypatch.setenv("CHATKV_MODEL_NAME", str(tiny_model_dir))
    monkeypatch.setenv("CHATKV_MODEL_DEVICE", "cpu")
    monkeypatch.setenv("CHATKV_GENERATION_TEMPERATURE", "0")
    monkeypatch.setenv("CHATKV_GENERATION_MAX_NEW_TOKENS", str(max_new))
    if chunk_tokens is not None:
        monkeypatch.setenv("CHATKV_CACHE_CHUNK_TOKENS", str(chunk_tokens))
    monkeypatch.setenv("CHATKV_CACHE_CODEC", "fp16")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    umask = os.umask(0o022)
    os.umask(umask)
    yield
    os.umask(umask)


@pytest.fixture
def store(chatkv_home):
    """An open Store on the test's own database (in its CHATKV_HOME), closed after."""
    from chatkv.paths import db_path
    from chatkv.store import Store

    s = Store(db_path())
    yield s
    s.close()


@pytest.fixture
def chat(tiny_settings, tiny_lm):
    """A Chat on the tiny model (the loaded model is shared across tests)."""
    from chatkv.session import Chat

    c = Chat(tiny_settings, lm=tiny_lm)
    c.load()
    yield c
    c.close()


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL server for the whole run (tests/servers.py); new_database(pg_server)
    gives each test its own database."""
    from servers import postgres

    yield from postgres()


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 for the whole run (tests/servers.py): its endpoint URL."""
    from servers import s3

    yield from s3()


@pytest.fixture
def fake_gguf(tiny_model_dir, monkeypatch):
    """A GGUF source whose conversion loads the tiny model (in float32, as a GGUF's does);
    every other from_pretrained is the real one, its paths recorded in `loads`."""
    import torch
    import transformers

    from chatkv.engine import model as model_mod

    real_model = transformers.AutoModelForCausalLM.from_pretrained
    real_tok = transformers.AutoTokenizer.from_pretrained
    loads: list[str] = []

    def model(cls, path, **kw):
        if "gguf_file" in kw:
            return transformers.LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        loads.append(str(path))
        return real_model(path, **kw)

    def tok(cls, path, **kw):
        return real_tok(tiny_model_dir if "gguf_file" in kw else path)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(model))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(tok))
    return model_mod.ModelSource("x.gguf", str(tiny_model_dir), "x.gguf", "gguf:abc"), loads
