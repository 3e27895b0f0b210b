"""A lean decode step for Llama-family models: one token through the model's own weights.

transformers' forward is general: per token it builds masks and cache positions,
dispatches attention through an interface, checks kwargs and wraps outputs. For a
135M model on a 2-core CPU that Python work costs as much as the arithmetic. This
step does only the arithmetic, with the model's own modules' weights:

- q, k and v projections as one matrix product, gate and up as another. The fused
  weights are built once and the modules' own weights become views into them, so
  the fused copies cost no memory and transformers' forward (prefill, the fallback)
  reads the very same numbers. (Weights on a 4-bit grid are held twice: dense for the
  forward, packed int4 for this step.)
- keys and values appended in place into the live cache (`GrowableLayer`), then one
  SDPA call per layer with the GQA groups folded into the query length: a single
  query attends to every cached key, so no mask and no repeated keys are needed.
- a projection whose weights lie on a 4-bit grid (a Q4 GGUF's, dequantized at load)
  runs through torch's int4 kernel in bfloat16 on the CPU: the same weights, a quarter
  of the bytes to read per token (`_int4_form`). Other weights stay dense.

Only what is known to compute the same function as transformers' forward takes this
path: `model_type` "llama" with SDPA attention, SiLU, no biases and plain float
weights. Anything else decodes through transformers' forward (`lean_for` returns None
and says why once in the log). The step is device-agnostic; on CUDA (untested: no GPU
was at hand) it runs with dense weights.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
import torch.nn.functional as F

from chatkv.kv import live

log = logging.getLogger(__name__)

_ATTR = "_chatkv_lean"  # the LeanLlama (or False: not eligible) kept on the model object
_OFF = "_chatkv_lean_off"  # True: decode through transformers' forward even where the lean step applies
_lock = threading.Lock()


def why_not(model: Any) -> str | None:
    """The reason `model` cannot take the lean path, or None when it can."""
    c = getattr(model, "config", None)
    if c is None or getattr(c, "model_type", None) != "llama":
        return f"model type {getattr(c, 'model_type', None)!r} is not 'llama'"
    if getattr(c, "_attn_implementation", None) != "sdpa":
        return f"attention implementation {c._attn_implementation!r} is not 'sdpa'"
    if getattr(c, "hidden_act", None) != "silu":
        return f"activation {c.hidden_act!r} is not 'silu'"
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        return "the model's projections have biases"
    if getattr(model, "hf_quantizer", None) is not None or getattr(c, "quantization_config", None):
        return "the weights are quantized"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "the model does not have the Llama module layout"
    for p in model.parameters():
        if type(p) is not torch.nn.Parameter or not p.dtype.is_floating_point:
            return f"a weight is {type(p).__name__} of {p.dtype}, not a plain float tensor"
    return None


def lean_for(model: Any) -> LeanLlama | None:
    """The lean decoder for `model`, built on first use and kept on the model; None (logged
    once per model) when the model must decode through transformers' forward."""
    if getattr(model, _OFF, False):
        return None
    got = getattr(model, _ATTR, None)
    if got is None:
        with _lock:
            got = getattr(model, _ATTR, None)
            if got is None:
                reason = why_not(model)
                if reason is None:
                    try:
                        got = LeanLlama(model)
                    except (RuntimeError, ValueError) as e:  # e.g. a kernel this torch lacks
                        reason = f"the lean step could not be built ({e})"
                if reason is not None:
                    log.info("decoding through transformers' forward: %s", reason)
                    got = False
                setattr(model, _ATTR, got)
    return got if isinstance(got, LeanLlama) else None


def set_enabled(model: Any, enabled: bool) -> None:
    """Let `model` take the lean step (the default where it can) or not (benchmarks compare)."""
    setattr(model, _OFF, not enabled)


def _fuse(*linears: torch.nn.Linear) -> torch.Tensor:
    """One weight (sum of outs, in) holding the linears' weights; each linear's weight
    becomes a view of its rows, so memory is not doubled and the modules still work."""
    fused = torch.cat([m.weight.detach() for m in linears], dim=0)
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(fused[row : row + n], requires_grad=False)
        row += n
    return fused


GROUP = 32  # Q4_0/Q4_1 GGUF blocks: 32 weights along the input dimension share a scale
GRID_TOL = 0.1  # of a step: a dequantized Q4 weight rounded to bfloat16 is within 0.04


def _int4_form(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`w` (N, K) in torch's packed int4 form (packed weight, (K/32, N, 2) scales and zeros)
    when every group of 32 along K lies on a 16-level grid, as the weights of a Q4 GGUF
    dequantized at load do: then int4 is those weights again, with a quarter of the bytes
    of bfloat16 to read per token. None for weights that are not on such a grid (they
    would lose precision), for other dtypes than bfloat16 and other devices than the CPU
    (the kernel's fast case)."""
    if w.device.type != "cpu" or w.dtype != torch.bfloat16 or w.shape[1] % GROUP:
        return None
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None
    n, k = w.shape
    g = w.float().view(n, k // GROUP, GROUP)  # (N, K/32, 32)
    low = g.amin(-1, keepdim=True)
    step = (g.amax(-1, keepdim=True) - low) / 15
    unit = torch.where(step > 0, step, torch.ones_like(step))
    q = ((g - low) / unit).round().clamp(0, 15)
    if ((q * step + low - g).abs() > GRID_TOL * unit).any():
        return None
    zero = low + 8 * step  # the kernel computes (q - 8) * scale + zero
    scales = torch.stack([step.view(n, -1), zero.view(n, -1)], dim=-1)  # (N, K/32, 2)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(n, k).to(torch.int32), 1)
    return packed, scales.transpose(0, 1).contiguous().to(torch.bfloat16)


class _Linear:
    """A bias-free projection: the dense weight (N, K), or its int4 form where exact."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w
        self.n = w.shape[0]
        self.int4 = _int4_form(w)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (1, 1, K) -> (1, 1, N)."""
        if self.int4 is None:
            return F.linear(x, self.w)
        packed, scales = self.int4
        y: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(x.view(1, -1), packed, GROUP, scales)
        return y.view(1, 1, self.n)  # from (1, N)


class _Layer:
    """One decoder layer's weights for the lean step."""

    def __init__(self, layer: Any) -> None:
        a, m = layer.self_attn, layer.mlp
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv = _Linear(_fuse(a.q_proj, a.k_proj, a.v_proj))  # (Hq*D + 2*Hkv*D, hidden)
        self.o = _Linear(a.o_proj.weight)  # (hidden, Hq*D)
        self.gate_up = _Linear(_fuse(m.gate_proj, m.up_proj))  # (2*inter, hidden)
        self.down = _Linear(m.down_proj.weight)  # (hidden, inter)
        self.scale = a.scaling


class LeanLlama:
    """Decode one token of a Llama model through its own weights (see the module doc)."""

    def __init__(self, model: Any) -> None:
        c = model.config
        self.hq = c.num_attention_heads
        self.hkv = getattr(c, "num_key_value_heads", None) or self.hq
        self.d = getattr(c, "head_dim", None) or c.hidden_size // self.hq
        self.embed = model.model.embed_tokens
        self.rope = model.model.rotary_emb
        self.norm = model.model.norm
        self.head = model.lm_head.weight  # (V, hidden); may be the embedding (tied)
        with torch.no_grad():
            self.layers = [_Layer(layer) for layer in model.model.layers[: c.num_hidden_layers]]

    @torch.inference_mode()
    def step(self, token: torch.Tensor, cache: Any, pos: int) -> torch.Tensor:
        """Feed `token` (1,) at position `pos`, extending `cache` (a DynamicCache of batch 1
        covering positions [0, pos)); return the next-token logits (1, V)."""
        hq, hkv, d = self.hq, self.hkv, self.d
        g = hq // hkv  # query heads per kv head
        x = self.embed(token.view(1, 1))  # (1, 1, hidden)
        cos, sin = self.rope(x, torch.tensor([[pos]], device=x.device))  # (1, 1, D) each
        cos, sin = cos[:, None], sin[:, None]  # (1, 1, 1, D): broadcast over heads
        kv_layers = live.kv_layers(cache)
        nq, nk = hq * d, hkv * d
        for i, w in enumerate(self.layers):
            h = w.norm1(x)
            qkv = w.qkv(h)  # (1, 1, nq + 2 nk)
            q = qkv[..., :nq].view(1, hq, 1, d)  # one position: (1, 1, Hq*D) is (1, Hq, 1, D)
            k = qkv[..., nq : nq + nk].view(1, hkv, 1, d)
            v = qkv[..., nq + nk :].view(1, hkv, 1, d)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = kv_layers[i].update(k, v)  # (1, Hkv, pos+1, D)
            # A single query attends to every key: fold each kv head's g query heads into
            # the query length, (1, Hkv, g, D), so SDPA reads each key once.
            att = F.scaled_dot_product_attention(q.view(1, hkv, g, d), keys, values, scale=w.scale)
            x = x + w.o(att.reshape(1, 1, nq))
            h = w.norm2(x)
            gate, up = w.gate_up(h).chunk(2, dim=-1)  # (1, 1, inter) each
            x = x + w.down(F.silu(gate) * up)
        logits = F.linear(self.norm(x)[:, -1], self.head)  # (1, V)
        return logits


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (-x2, x1), as transformers' Llama rotates."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
