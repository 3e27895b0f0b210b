"""A Llama model for the lean path, loaded without transformers' model classes.

Importing transformers' Llama classes costs about as much again as importing torch and
transformers together: their modules pull in torch._dynamo, torch.distributed.tensor and
sympy (2 s of the 4.4 s a resumed `chatkv ask` took in a fresh process), and AutoTokenizer
imports them too, through the model's config class. But in bfloat16 on the CPU a
Llama-family model never runs transformers' forward: engine/lean.py decodes and prefills
every piece with the model's own weights. So `ask` loads such a model as a skeleton of
plain torch modules with the attribute layout lean.py reads (`LeanModel`), from the very
safetensors file the transformers load reads (the same bits), and its tokenizer through
the fast tokenizer's own class.

What transformers computes at load and the skeleton cannot (the KV fingerprint from the
full config and vocabulary, the RoPE frequencies, the attention scale, the end-of-sequence
ids) is remembered from the last transformers load of the same files (`remember`), under a
key of everything it follows from: the setting, the torch and transformers versions, and
the stamps of the weights, config and tokenizer files. Nothing remembered (the first start,
a new transformers, a rewritten file, a model lean.py does not take): the transformers load,
which remembers for the next start.

The tokenizer is a LeanTokenizer (engine/leantok.py) over the state the same transformers
load captured, and the model's caches are LeanCaches (kv/appending.py): a resumed `chatkv
ask` does not import transformers at all (0.6 s of imports).

Anything that asks the skeleton for transformers' forward itself (`set_enabled(False)`, a
batched prefill) gets it: the first call builds transformers' model around the skeleton's
own weight tensors (`LeanModel.full`), and a LeanCache handed to it becomes a DynamicCache
over the same layers' storage (`live.as_dynamic`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from chatkv.engine import lean, leantok
from chatkv.engine.model import _read_json, _remember_json, _write_private, dir_stamp, library_version
from chatkv.paths import ensure_private_dir, models_dir

log = logging.getLogger(__name__)

MEMO = "lean-load.json"  # beside the converted copies: what a lean-only load needs, by key
LEAN_FORMAT = "2"  # bump when an entry's fields or their meaning change (2: the tokenizer's state)
TOKENIZER_CLASS = "TokenizersBackend"  # transformers' PreTrainedTokenizerFast: the only class taken
TOKENIZERS = "lean-tokenizers"  # beside the memo: captured tokenizer states, named by their hash
_COPY_FILES = ("config.json", "generation_config.json", "model.safetensors", "done")


def memo_key(setting: str, copy: Path, tokenizer_dir: Path) -> str:
    """The key of a lean-only load's entry: the setting (weights' identity, dtype, load_in,
    device kind), the library versions, and the stamps of the copy's files (size, times,
    inode: any rewrite moves them) and of the tokenizer's. "" when a file is missing."""
    parts = [LEAN_FORMAT, leantok.STATE_FORMAT, setting, torch.__version__]
    parts += [library_version(name) for name in ("transformers", "tokenizers", "jinja2")]
    for name in _COPY_FILES:
        try:
            st = (copy / name).stat()
        except OSError:
            return ""
        parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}")
    tokenizer = dir_stamp(tokenizer_dir, TOKENIZER_CLASS)
    if not tokenizer:
        return ""
    parts.append(tokenizer)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def why_not_remembered(model: Any, tok: Any, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why a transformers-loaded model is not remembered for a lean-only load, or None."""
    from transformers import PreTrainedTokenizerFast

    if device.type != "cpu":
        return f"device {device.type} (the lean-only load is tried on the CPU only)"
    if dtype not in lean.PREFILL_DTYPES:
        return f"dtype {dtype} (its prefill runs through transformers' forward)"
    reason = lean.why_not(model)
    if reason is not None:
        return reason
    if type(tok) is not PreTrainedTokenizerFast:
        return f"tokenizer class {type(tok).__name__}"
    inner = model.model
    rope = inner.rotary_emb
    if getattr(rope, "rope_type", None) != "default":
        return f"RoPE type {getattr(rope, 'rope_type', None)!r} is not 'default'"
    eps = {
        m.variance_epsilon
        for layer in inner.layers
        for m in (layer.input_layernorm, layer.post_attention_layernorm)
    }
    if len(eps | {inner.norm.variance_epsilon}) != 1:
        return "the norms' epsilons differ"
    if len({layer.self_attn.scaling for layer in inner.layers}) != 1:
        return "the layers' attention scales differ"
    return None


def remember(key: str, model: Any, tok: Any, fingerprint: str) -> None:
    """Keep what a lean-only load of `model` and `tok` (loaded by transformers, eligible by
    `why_not_remembered`) needs under `key`. Never raises (a memo not written costs the next
    start the transformers load)."""
    state, why = leantok.capture(tok)
    if state is None:
        log.debug("no lean-only load for this model: %s", why)
        return
    name = leantok.digest(state)
    try:
        where = ensure_private_dir(models_dir() / TOKENIZERS)
        try:
            _tokenizer_state(name)  # kept already, intact
        except (OSError, ValueError):  # absent, or damaged (a lean load fell back because of it)
            _write_private(where / f"{name}.json", json.dumps(state))
    except OSError as e:
        log.debug("could not keep the tokenizer's state: %s", e)
        return
    inner = model.model
    rope = inner.rotary_emb
    entry = {
        "fingerprint": fingerprint,
        "eos_token_id": model.generation_config.eos_token_id if model.generation_config else None,
        "inv_freq": rope.inv_freq.tolist(),
        "inv_freq_dtype": str(rope.inv_freq.dtype).removeprefix("torch."),
        "attention_scaling": float(rope.attention_scaling),
        "scaling": float(inner.layers[0].self_attn.scaling),
        "rms_eps": float(inner.norm.variance_epsilon),
        "tied": model.lm_head.weight is inner.embed_tokens.weight,
        "tokenizer": name,
    }
    _remember_json(MEMO, key, json.dumps(entry), keep=16)
    _prune_tokenizer_states()


def _prune_tokenizer_states() -> None:
    """Remove the kept tokenizer states no memo entry names any more (the memo keeps its
    newest 16; a state is a couple of MB). Never raises. A state another process wrote but
    has not named yet may go: its next start loads through transformers and keeps it again."""
    try:
        named = set()
        for raw in _read_json(models_dir() / MEMO).values():
            try:
                named.add(json.loads(raw).get("tokenizer"))
            except (TypeError, ValueError, AttributeError):
                continue
        for path in (models_dir() / TOKENIZERS).glob("*.json"):
            if path.stem not in named:
                path.unlink(missing_ok=True)
    except OSError as e:
        log.debug("could not prune the kept tokenizer states: %s", e)


def lookup(key: str) -> dict[str, Any] | None:
    """The entry remembered under `key`, or None."""
    if not key:
        return None
    raw = _read_json(models_dir() / MEMO).get(key)
    try:
        entry = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def try_load(
    copy: Path, tokenizer_dir: Path, key: str, dtype: torch.dtype, on_tokenizer: Callable[[Any], None]
) -> tuple[LeanModel, Any, str] | None:
    """The skeleton model from `copy` (a converted copy in `dtype`), its tokenizer from
    `tokenizer_dir` (given to `on_tokenizer` before the weights load) and its fingerprint, when
    an entry is remembered under `key`; None (logged when something was wrong) for the
    transformers load."""
    entry = lookup(key)
    if entry is None:
        return None
    try:
        from safetensors.torch import load_file

        tok = leantok.LeanTokenizer(_tokenizer_state(str(entry["tokenizer"])))
        on_tokenizer(tok)
        config = SimpleNamespace(**json.loads((copy / "config.json").read_text()))
        config._attn_implementation = "sdpa"  # what transformers' load picked (lean.why_not checks it)
        model = LeanModel(config, load_file(copy / "model.safetensors"), entry, dtype, copy)
        if lean.lean_for(model) is None:  # fuses the weights now: the first piece takes the lean step
            raise ValueError("the lean step does not take the skeleton")
        fingerprint = str(entry["fingerprint"])
    except Exception as e:  # whatever the files hold instead: transformers' load decides
        log.warning("lean-only load of %s failed (%s); loading through transformers", copy, e)
        return None
    return model, tok, fingerprint


def _tokenizer_state(name: str) -> dict[str, Any]:
    """The captured tokenizer state kept under `name`; ValueError when it is not that state."""
    if not re.fullmatch("[0-9a-f]{32}", name):
        raise ValueError(f"the tokenizer state's name {name[:40]!r} is not a digest")
    state = json.loads((models_dir() / TOKENIZERS / f"{name}.json").read_text())
    if not isinstance(state, dict) or leantok.digest(state) != name:
        raise ValueError(f"the tokenizer state {name} does not match its name")
    if state.get("format") != leantok.STATE_FORMAT:
        raise ValueError(f"the tokenizer state {name} is of another format")
    return state


class _Proj(nn.Module):
    """A bias-free linear layer over a given weight (nn.Linear would initialise one first)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class _Embed(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> (B, T, hidden); a padding index changes gradients only, so none here."""
        return F.embedding(ids, self.weight)


class _RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm, operation for operation (tests/test_leanload.py compares bits)."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class _Rotary(nn.Module):
    """transformers' LlamaRotaryEmbedding for the default RoPE, with its inverse frequencies as
    that load computed them (remembered)."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float) -> None:
        super().__init__()
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scaling = attention_scaling

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin (B, T, D) in x's dtype."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class _Layer(nn.Module):
    def __init__(self, w: dict[str, torch.Tensor], prefix: str, entry: dict[str, Any]) -> None:
        super().__init__()
        eps = entry["rms_eps"]
        self.input_layernorm = _RMSNorm(w[prefix + "input_layernorm.weight"], eps)
        self.post_attention_layernorm = _RMSNorm(w[prefix + "post_attention_layernorm.weight"], eps)
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, _Proj(w[f"{prefix}self_attn.{name}.weight"]))
        self.self_attn.scaling = entry["scaling"]
        self.mlp = nn.Module()
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self.mlp, name, _Proj(w[f"{prefix}mlp.{name}.weight"]))


class LeanModel(nn.Module):
    """Llama's module layout (model.embed_tokens, .layers[i].self_attn.q_proj..., .norm,
    .rotary_emb; lm_head) over a safetensors file's tensors, for engine/lean.py."""

    def __init__(
        self, config: Any, w: dict[str, torch.Tensor], entry: dict[str, Any], dtype: torch.dtype, copy: Path
    ) -> None:
        super().__init__()
        n = config.num_hidden_layers
        if {t.dtype for t in w.values()} != {dtype}:
            raise ValueError(f"the copy's weights are not all {dtype}")
        self.config = config
        self.generation_config = SimpleNamespace(eos_token_id=entry["eos_token_id"])
        self.model = nn.Module()
        self.model.embed_tokens = _Embed(w["model.embed_tokens.weight"])
        self.model.layers = nn.ModuleList(_Layer(w, f"model.layers.{i}.", entry) for i in range(n))
        self.model.norm = _RMSNorm(w["model.norm.weight"], entry["rms_eps"])
        inv_freq = torch.tensor(entry["inv_freq"], dtype=getattr(torch, entry["inv_freq_dtype"]))
        self.model.rotary_emb = _Rotary(inv_freq, entry["attention_scaling"])
        if entry["tied"]:
            self.lm_head = _Proj(w["model.embed_tokens.weight"])
            self.lm_head.weight = self.model.embed_tokens.weight  # one Parameter, as tie_weights does
        else:
            self.lm_head = _Proj(w["lm_head.weight"])
        known = {name for name, _ in self.named_parameters(remove_duplicate=False)}
        if set(w) - known:
            raise ValueError(
                f"the copy holds weights the skeleton has no place for: {sorted(set(w) - known)[:3]}"
            )
        self._copy = copy
        self._full: list[Any] = []  # transformers' model once built (in a list: not a submodule)
        self._full_lock = threading.Lock()

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def full(self) -> Any:
        """transformers' model over this skeleton's weight tensors (the same memory, so the same
        bits; fused views included), built on first need: imports and loads for seconds."""
        with self._full_lock:
            if not self._full:
                from transformers import AutoModelForCausalLM

                log.info("building transformers' model around the lean-loaded weights")
                full: Any = AutoModelForCausalLM.from_pretrained(self._copy, dtype=self.dtype)
                full = full.to(self.device)
                for name, p in self.named_parameters(remove_duplicate=False):
                    owner, _, attr = name.rpartition(".")
                    setattr(full.get_submodule(owner), attr, p)
                full.eval()
                self._full.append(full)
            return self._full[0]

    @property
    def lean_cache(self) -> bool:
        """New caches for this model are LeanCaches (live.new_cache): it runs no transformers
        forward while the lean step is enabled."""
        return not getattr(self, lean._OFF, False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' forward, for whatever does not take the lean path (see `full`)."""
        from chatkv.kv import live

        for name in ("cache", "past_key_values"):
            if name in kwargs:
                kwargs[name] = live.as_dynamic(kwargs[name], self)
        return self.full()(*args, **kwargs)
