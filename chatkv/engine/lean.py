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

The same weights serve two more paths: `prefill` (a piece of a prompt in bfloat16 or
float16; on the CPU its rows never depend on how the prompt was split into pieces, and
its products run in float32 where that is faster: see PREFILL_DTYPES) and
`step_rows` (one token of each of B left-padded rows, for engine/batch.py, whose
attention the caller supplies).

Only what is known to compute the same function as transformers' forward takes this
path: `model_type` "llama" with SDPA attention, SiLU, no biases and plain float
weights. Anything else decodes and prefills through transformers' forward (`lean_for` returns
None and says why once in the log). The step is device-agnostic; on CUDA (untested: no GPU
was at hand) it runs with dense weights.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from chatkv.kv import live

log = logging.getLogger(__name__)

_ATTR = "_chatkv_lean"  # the LeanLlama (or False: not eligible) kept on the model object
_OFF = "_chatkv_lean_off"  # True: decode through transformers' forward even where the lean step applies
_lock = threading.Lock()

# A batched step's attention for layer i: (i, q (B, Hq, 1, D), keys, values (B, Hkv, S, D))
# -> (B, 1, Hq, D); engine/batch.py masks each row's padding and adds a shared prefix.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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


def prefill_step_for(model: Any, tokens: int) -> LeanLlama | None:
    """The lean step to prefill a piece of `tokens` with, or None for transformers' forward.

    Only bfloat16/float16 prefill through it (PREFILL_DTYPES). On the CPU every piece
    takes it (built at the first: a lean-only load, engine/leanload.py, has it already), so
    that a prompt's cache has the same bits however it is split. Elsewhere a piece shorter
    than WIDE_MIN_TOKENS is transformers' forward bit for bit either way, so it takes the
    lean step only when that is built already (a resumed conversation's new message does not
    wait for the build, which the chat's warm-up does aside). Which path a piece takes never
    depends on timing, so neither do the cache's bits."""
    if model.dtype not in PREFILL_DTYPES or getattr(model, _OFF, False):
        return None
    built = getattr(model, _ATTR, None)
    if built is None and (tokens >= WIDE_MIN_TOKENS or model.device.type == "cpu"):
        return lean_for(model)
    return built if isinstance(built, LeanLlama) else None


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


# Prefill in bfloat16 (or float16) on the CPU. Every row of a prompt gets the same bits
# whatever piece it is computed in (one piece, or after a cached prefix of any length): the
# matrix products are given enough rows (a one-row bfloat16 product, and float32 ones of
# up to 11 rows, rounded differently from the same row among many: `_Linear.many`), and
# attention takes the same keys for a query in every piece (_attend_fixed). So a prompt
# asked twice, its prefix from disk the second time, gets the same greedy reply in
# bfloat16 too.
#
# On a CPU without AMX the products run in float32 over the same bfloat16 numbers where
# that is faster (`float32_products_pay`, timed once per CPU and remembered): on an
# AVX512-BF16 Xeon torch's bfloat16 product ran at about half the rate of MKL's float32 one
# (150-160 versus 290-300 GFLOP/s for a (512, 576) x (576, 3072) product, 2 threads), on an
# AVX512-BF16 EPYC at 2.2x it (200-220 versus 80-100 GFLOP/s, 1 thread), and no CPU flag
# tells the two apart. Float32 products convert their operands, multiply and round the
# result back: the same bfloat16 numbers in, products accumulated in float32 as the
# bfloat16 kernel accumulates them, one rounding out. The weights are converted per piece,
# not kept: that costs 3-7% of a 512-token piece's time (measured), where float32 copies
# would hold 425 MB more for SmolLM2-135M. Decode (one token, memory-bound) stays in
# bfloat16, where reading half the bytes is what counts.
#
# On other devices (CUDA, untested) a piece attends through one SDPA call and multiplies in
# its dtype; a piece shorter than this is then transformers' forward bit for bit.
WIDE_MIN_TOKENS = 64
# Prefill takes the lean step in these. Float32 stays on transformers' forward: there a
# re-prefill of the same text is bit-equal to the cache a conversation built turn by turn,
# and the tests pin that.
PREFILL_DTYPES = (torch.bfloat16, torch.float16)


def wide_pays(device: torch.device) -> bool:
    """Whether prefill products may run in float32 on `device` (as `float32_products_pay`
    says): a CPU without AMX tiles (with AMX, oneDNN's bfloat16 kernels are the fast ones)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return device.type == "cpu" and not (amx is not None and amx())


_products: dict[str, bool] = {}  # float32_products_pay's answer, per device type
PRODUCTS_MEMO = "cpu-products.json"  # beside the converted copies: the answer, per CPU and torch


def float32_products_pay(device: torch.device) -> bool:
    """Whether a prefill piece's matrix products run faster in float32 over its bfloat16
    numbers (weights converted per call) than in bfloat16, on this CPU: timed once (about
    20 ms, at the first long piece; best of three each; bfloat16 unless float32 is clearly
    faster: no conversions, no float32 copies), then remembered for this CPU model and torch
    version. Remembered, not timed at each start: the choice rounds a long prefill's
    numbers, and a conversation continued in another process must be computed as it would
    have been in the first (a timing near the threshold could flip from run to run)."""
    if device.type != "cpu":
        return False
    if "cpu" not in _products:
        from chatkv.engine.model import _read_json, _remember_json
        from chatkv.paths import models_dir

        key = f"{_cpu_name()}|{torch.__version__}"
        known = _read_json(models_dir() / PRODUCTS_MEMO).get(key)
        if isinstance(known, bool):
            _products["cpu"] = known
        else:
            b16, f32 = _time_products()
            _products["cpu"] = f32 < 0.8 * b16
            log.info(
                "prefill products in %s (bfloat16 %.2f ms, float32 %.2f ms)",
                "float32" if _products["cpu"] else "bfloat16",
                b16 * 1e3,
                f32 * 1e3,
            )
            _remember_json(PRODUCTS_MEMO, key, _products["cpu"])
    return _products["cpu"]


def _cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or what the platform says of it."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}".strip()


def _time_products() -> tuple[float, float]:
    """Seconds of a (256, 512) x (512, 1024) product in bfloat16, and in float32 over the
    same bfloat16 numbers (converted, rounded back): best of three each."""
    x = torch.randn(256, 512).to(torch.bfloat16)
    w = torch.randn(1024, 512).to(torch.bfloat16)

    def best(f: Callable[[], torch.Tensor]) -> float:
        f()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(lambda: F.linear(x, w)), best(lambda: F.linear(x.float(), w.float()).to(torch.bfloat16))


_PENDING = object()  # a _Linear's int4 form, not looked for yet


class _Linear:
    """A bias-free projection: the dense weight (N, K), or its int4 form where exact.

    The int4 form is looked for on the first one-token call (or by `LeanLlama.pack`), not
    at build: a prefill only reads the dense weight, so a resumed conversation's new message
    does not wait for the packing (most of the build's 0.7 s for SmolLM2)."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w
        self.n = w.shape[0]
        self._int4: Any = _PENDING

    @property
    def int4(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._int4 is _PENDING:
            with _lock:  # the warm-up's pack() and a first decode step: each weight packed once
                if self._int4 is _PENDING:
                    try:
                        self._int4 = _int4_form(self.w)
                    except (RuntimeError, ValueError) as e:  # e.g. a shape torch's packer refuses
                        log.info("keeping a (%d, %d) weight dense for decoding: %s", *self.w.shape, e)
                        self._int4 = None
        return self._int4  # type: ignore[no-any-return]

    def many(self, x: torch.Tensor, f32: bool) -> torch.Tensor:
        """x (1, T, K) -> (1, T, N) for a prefill piece: the dense weight, or with `f32` a
        float32 product of the same numbers rounded back to x's dtype. A row's bits never
        depend on how many rows came with it (see WIDE_MIN_TOKENS): a float32 product is
        given a multiple of 16 rows, a bfloat16 one at least 16 (zeros added, dropped)."""
        t = x.shape[1]
        rows = -(-t // 16) * 16 if f32 else max(t, 16)
        if rows > t:
            x = F.pad(x, (0, 0, 0, rows - t))
        y = F.linear(x, self.w) if not f32 else F.linear(x.float(), self.w.float()).to(x.dtype)
        return y[:, :t] if rows > t else y

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, K) -> (B, 1, N): one token of each of B rows."""
        if self.int4 is None:
            return F.linear(x, self.w)
        packed, scales = self.int4
        b = x.shape[0]
        y: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(x.view(b, -1), packed, GROUP, scales)
        return y.view(b, 1, self.n)  # from (B, N)


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
        self.wide = self.head.dtype in (torch.bfloat16, torch.float16) and wide_pays(self.head.device)
        self.products32: bool | None = None  # prefill products in float32 (measured at the first piece)

    def pack(self) -> None:
        """Put the weights that lie on a 4-bit grid in int4 form now (see _Linear), rather than
        at the first decode step: for a caller with time to spare (the chat's warm-up)."""
        with torch.no_grad():
            for w in self.layers:
                for linear in (w.qkv, w.o, w.gate_up, w.down):
                    _ = linear.int4

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

    @torch.inference_mode()
    def step_rows(self, ids: torch.Tensor, pos: torch.Tensor, cache: Any, attend: Attend) -> torch.Tensor:
        """Feed one token of each of B rows, `ids` (B, 1) at positions `pos` (B, 1), extending
        `cache` (a left-padded (B, Hkv, S, D) cache; engine/batch.py); layer i's attention is
        `attend(i, q, keys, values)` with q (B, Hq, 1, D) and keys, values (B, Hkv, S + 1, D),
        returning (B, 1, Hq, D) (the caller knows the rows' masks). Returns (B, V) logits."""
        hq, hkv, d = self.hq, self.hkv, self.d
        b = ids.shape[0]
        x = self.embed(ids)  # (B, 1, hidden)
        cos, sin = self.rope(x, pos)  # (B, 1, D) each
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, 1, D): broadcast over heads
        kv_layers = live.kv_layers(cache)
        nq, nk = hq * d, hkv * d
        for i, w in enumerate(self.layers):
            h = w.norm1(x)
            qkv = w.qkv(h)  # (B, 1, nq + 2 nk)
            q = qkv[..., :nq].view(b, hq, 1, d)  # one position: (B, 1, Hq*D) is (B, Hq, 1, D)
            k = qkv[..., nq : nq + nk].view(b, hkv, 1, d)
            v = qkv[..., nq + nk :].view(b, hkv, 1, d)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = kv_layers[i].update(k, v)  # (B, Hkv, S + 1, D)
            x = x + w.o(attend(i, q, keys, values).reshape(b, 1, nq))
            h = w.norm2(x)
            gate, up = w.gate_up(h).chunk(2, dim=-1)  # (B, 1, inter) each
            x = x + w.down(F.silu(gate) * up)
        return F.linear(self.norm(x[:, -1]), self.head)  # (B, V)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, cache: Any, start: int) -> torch.Tensor:
        """Feed `ids` (1, T) at positions [start, start + T), extending `cache` (batch 1,
        covering [0, start)); return the last position's next-token logits (1, V).

        The same operations as transformers' forward in the same order, without its mask
        building and per-layer dispatch. On the CPU a row's bits do not depend on the piece
        it comes in, and on one without AMX the matrix products run in float32 over the
        same bfloat16 numbers where that is faster (see WIDE_MIN_TOKENS)."""
        hq, hkv, d = self.hq, self.hkv, self.d
        t = ids.shape[1]
        nq, nk = hq * d, hkv * d
        x = self.embed(ids)  # (1, T, hidden)
        dt = x.dtype
        cpu = x.device.type == "cpu" and dt != torch.float32 and _CPU_FLASH
        if cpu and self.wide and self.products32 is None:
            self.products32 = float32_products_pay(x.device)
        f32 = cpu and self.wide and bool(self.products32)
        pos = torch.arange(start, start + t, device=x.device)
        cos, sin = self.rope(x, pos[None])  # (1, T, D) each
        cos, sin = cos[:, None], sin[:, None]  # (1, 1, T, D): broadcast over heads
        # SDPA's is_causal aligns its mask top-left; past a cached prefix the piece's rows see
        # every cached key and their own past: one (T, start + T) mask for all layers
        # (_attend_fixed makes its own).
        mask = None
        if start and not cpu:
            mask = pos[:, None] >= torch.arange(start + t, device=x.device)  # (T, start + T)
        kv_layers = live.kv_layers(cache)
        for i, w in enumerate(self.layers):
            h = w.norm1(x)
            qkv = w.qkv.many(h, f32)  # (1, T, nq + 2 nk)
            q = qkv[..., :nq].view(1, t, hq, d).transpose(1, 2)  # (1, Hq, T, D)
            k = qkv[..., nq : nq + nk].view(1, t, hkv, d).transpose(1, 2)  # (1, Hkv, T, D)
            v = qkv[..., nq + nk :].view(1, t, hkv, d).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = kv_layers[i].update(k, v)  # (1, Hkv, start + T, D)
            if cpu:
                att = _attend_fixed(q, keys, values, start, w.scale)
            else:
                att = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask, is_causal=mask is None, scale=w.scale, enable_gqa=True
                )  # (1, Hq, T, D)
            x = x + w.o.many(att.transpose(1, 2).reshape(1, t, nq), f32)
            h = w.norm2(x)
            gate, up = w.gate_up.many(h, f32).chunk(2, dim=-1)  # (1, T, inter) each
            x = x + w.down.many(F.silu(gate) * up, f32)
        return F.linear(self.norm(x[:, -1]), self.head)  # (1, V): only the last position's


_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")  # _attend_fixed's
BLOCK = 128  # queries are taken in blocks of this many, at absolute positions (see _attend_fixed)
# A flash call of a prefill piece gets a multiple of this many query rows (zero rows added,
# dropped): torch's CPU loops take the last few elements of an elementwise op one by one,
# and scalar exp and log round differently from the vector ones (two vectors of 16 floats
# a step), so the merge of a row's two parts must see it in the same lanes in every call.
ROWS = 32


def _attend_fixed(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float
) -> torch.Tensor:
    """Causal attention of a prefill piece on the CPU: q (1, Hq, T, D) at positions
    [start, start + T) over keys, values (1, Hkv, start + T, D); returns (1, Hq, T, D) in
    q's dtype, computed in that of the keys.

    A query's result depends only on its position and the keys, never on which piece it
    came in: a prompt computed in one piece or after a cached prefix of any length gets the
    same bits, so a prefix read from disk (fp16 codec) never changes a greedy reply, in
    bfloat16 too. The queries of each absolute block of BLOCK positions attend to the keys
    of their own block (padded with zeros past the piece, masked) and, in a second flash call,
    to every key before it (unmasked, the GQA groups folded into the query length); the two
    are merged by their log-sum-exps. So each call for a query has the same keys, as many,
    whatever the piece: the CPU kernel's sums over a row depend on how many keys it is given
    (a vector tail of under 16), and one causal call over a piece's own keys rounded a
    prompt's rows differently after a cached prefix. Each call's rows are padded to a
    multiple of ROWS, so that the merge's exp and log take every row in the same vector
    lanes. The blocks skip most of the masked half of a long piece's own square (the kernel
    takes keys 512 at a time)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    _, hq, t, d = q.shape
    hkv = keys.shape[1]
    g = hq // hkv
    end = start + t
    q = q.to(keys.dtype)
    outs = []
    for lo in range(start // BLOCK * BLOCK, end, BLOCK):
        r0, r1 = max(start, lo), min(end, lo + BLOCK)  # this block's queries (positions)
        n = r1 - r0
        rows = -(-g * n // ROWS) * ROWS
        qf = q[:, :, r0 - start : r1 - start].reshape(1, hkv, g * n, d)  # query head h reads kv head h // g
        qf = F.pad(qf, (0, 0, 0, rows - g * n))
        pos = torch.arange(r0, r1, device=q.device).repeat(g)
        pos = F.pad(pos, (0, rows - g * n), value=lo + BLOCK)  # added rows see every key: no empty row
        mask = torch.zeros(rows, BLOCK, dtype=keys.dtype, device=q.device)
        mask.masked_fill_(pos[:, None] < torch.arange(lo, lo + BLOCK, device=q.device), float("-inf"))
        kb, vb = keys[:, :, lo : min(end, lo + BLOCK)], values[:, :, lo : min(end, lo + BLOCK)]
        if kb.shape[2] < BLOCK:  # the piece ends inside the block: zeros up to its end, masked
            kb = F.pad(kb, (0, 0, 0, BLOCK - kb.shape[2]))
            vb = F.pad(vb, (0, 0, 0, BLOCK - vb.shape[2]))
        out, lse = flash(qf, kb, vb, attn_mask=mask, scale=scale)
        if lo:
            out_p, lse_p = flash(qf, keys[:, :, :lo], values[:, :, :lo], scale=scale)
            out, lse = _merge(out, lse, out_p, lse_p)
        outs.append(out[:, :, : g * n].reshape(1, hq, n, d))
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 2)).to(q.dtype)


def _merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over two disjoint sets of keys, from each one's output (..., T, D) and
    log-sum-exp (..., T): the attention over both, and its log-sum-exp."""
    both = torch.logaddexp(lse_a, lse_b)
    return out_a * (lse_a - both).exp()[..., None] + out_b * (lse_b - both).exp()[..., None], both


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (-x2, x1), as transformers' Llama rotates."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
