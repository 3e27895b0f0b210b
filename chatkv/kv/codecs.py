"""KV-cache codecs: turn one layer's keys and values into named tensors and back.

A codec works on one layer of one chunk: ``k`` and ``v`` of shape ``(B, H, T, D)``
(batch, kv heads, tokens, head dim). ``encode`` returns contiguous tensors named
``"k.<field>"`` / ``"v.<field>"`` ready for safetensors; ``decode`` inverts it.
Every chunk is encoded on its own, so no codec may depend on a chunk's position.

Codecs (README, "How it works" and "Cache fidelity"):

- ``fp16``: lossless. Despite the name it stores the tensors *exactly as computed*, in
  their native dtype (bf16 and fp16 as is, float32 as float32), because the product
  promises that an ``fp16`` reload yields the same tokens as a fresh prefill, which
  needs bit-exact caches. On a float32 CPU model this costs 2x the fp16 byte count.
- ``int8``: keys per channel over the whole chunk (KIVI), values per token on a
  symmetric range; each chunk's first token apart (as below).
- ``int4``: KIVI-style: keys per channel over groups of 32 tokens (float16 scale and zero),
  values per token in groups of 64 channels with a one-byte integer zero point; two codes
  per byte. Both sides are Hadamard-rotated over head_dim first, and each chunk's first
  token is kept apart at 8 bits (it is the attention sink in a conversation's first chunk,
  where 4-bit error hurts most).
- ``int2``: as ``int4`` with 2 bits, key groups of 16 tokens whose ranges are 4-bit codes
  within the channel's range over the chunk, four codes per byte (experimental: too lossy
  for use).

Scales and zero points are stored in float16 (a symmetric group stores no zero point: it
follows from the scale; an integer zero point is one byte), or a group's range as codes
within its row's float16 range; the codes are computed against the *stored* (rounded)
parameters so that decode sees exactly what encode assumed.
Codes are stored in token order whichever axis a side is grouped along, so decode writes
(token, head_dim) rows without a transpose: unpacked straight into float32, scaled in
place, rotated back by one matmul.
Each codec's params carry its layout ``version``: a chunk written in an older layout is
refused by the reader and recomputed.
All math is vectorised torch and runs on whatever device the inputs live on.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

Device = torch.device | str  # where a decode puts its tensors

FORMAT_VERSION = "1"
_PARAM_DTYPE = torch.float16


def nbytes(parts: dict[str, Tensor]) -> int:
    """Total payload size in bytes of an encoded chunk (sum over all tensors)."""
    return sum(t.numel() * t.element_size() for t in parts.values())


# --------------------------------------------------------------------------- helpers


def _pad_last(x: Tensor, group: int) -> Tensor:
    """Pad the last dim up to a multiple of ``group`` by repeating its last element.

    Repeating (rather than zero-filling) leaves each group's min and max unchanged.
    """
    n = x.shape[-1]
    pad = -n % group
    if pad == 0:
        return x
    return torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)


def _quantize_groups(
    x: Tensor, bits: int, group: int, zero_as: str = "float16"
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Min/max quantization of the last dim of ``x`` in groups of ``group``.

    ``x``: (..., N) float. Returns ``q`` (..., N) uint8 in ``[0, 2**bits - 1]``, and
    ``scale``, ``zero`` (..., ceil(N / group)) float16 (or uint8 codes, as below), with
    ``x ~= q * scale + zero``.
    ``zero_as`` says how the zero point is stored: ``"float16"``; ``"symmetric"``: the
    range is ``[-absmax, absmax]``, so the zero point follows from the scale
    (:func:`_sym_zero`) and is not stored (None); ``"uint8"``: an integer number of steps
    below 0 (:func:`_code_zero`), the range widened to take in 0 — a byte instead of two,
    for data whose groups straddle 0 but not evenly (Hadamard-rotated values: the first
    rotated channel is the vector's mean); ``"log8"``: as ``"uint8"``, and the scale a
    one-byte code too, a power of two (:func:`_log_scale`), rounded up. A trailing partial
    group is quantized over its own elements only.
    """
    n = x.shape[-1]
    qmax = (1 << bits) - 1
    xg = _pad_last(x.float(), group)
    xg = xg.reshape(*x.shape[:-1], -(-n // group), group)  # (..., G, group)
    if zero_as == "symmetric":
        scale = (xg.abs().amax(dim=-1, keepdim=True) * (2 / qmax)).to(_PARAM_DTYPE)
        zero, z32, s32 = None, _sym_zero(scale, bits), scale.float()
    elif zero_as in ("uint8", "log8"):
        lo = xg.amin(dim=-1, keepdim=True).clamp(max=0)
        hi = xg.amax(dim=-1, keepdim=True).clamp(min=0)
        if zero_as == "log8":
            scale = _log_code((hi - lo) / qmax)
            s32 = _log_scale(scale)
        else:
            scale = ((hi - lo) / qmax).to(_PARAM_DTYPE)
            s32 = scale.float()
        steps = torch.where(s32 > 0, -lo / s32, torch.zeros_like(s32))
        zero = torch.round(steps).clamp_(0, qmax).to(torch.uint8)  # 0 <= steps <= qmax (lo <= 0 <= hi)
        z32 = _code_zero(s32, zero)
    else:
        lo = xg.amin(dim=-1, keepdim=True)
        hi = xg.amax(dim=-1, keepdim=True)
        scale = ((hi - lo) / qmax).to(_PARAM_DTYPE)
        zero = lo.to(_PARAM_DTYPE)
        z32, s32 = zero.float(), scale.float()
    inv = torch.where(s32 > 0, 1.0 / s32, torch.zeros_like(s32))
    q = torch.round((xg - z32) * inv).clamp_(0, qmax).to(torch.uint8)
    q = q.reshape(*x.shape[:-1], -(-n // group) * group)[..., :n]  # (..., N)
    return q, scale.squeeze(-1), None if zero is None else zero.squeeze(-1)


# A "log8" scale is 2 ** (code / LOG_STEPS - LOG_OFFSET): steps of 4.4% from 2**-10 to about 61,
# rounded up, so a group keeps its whole range (for 4-bit codes, ranges up to about 900; a
# wider group is clipped at the top code). Rounding up costs 2% of resolution on average, and
# the byte saved per group of 64 values is 1.4% of int4's chunk (README, "Cache fidelity").
LOG_STEPS, LOG_OFFSET = 16, 10


def _log_code(scale: Tensor) -> Tensor:
    """The ``"log8"`` code (uint8) of the smallest stored scale >= ``scale`` (float32)."""
    code = torch.ceil((torch.log2(scale) + LOG_OFFSET) * LOG_STEPS)  # log2(0) = -inf: code 0
    return code.clamp_(0, 255).to(torch.uint8)


def _log_scale(code: Tensor) -> Tensor:
    """The scale (float32) that a ``"log8"`` code stands for."""
    return torch.exp2(code.float() * (1 / LOG_STEPS) - LOG_OFFSET)


def _code_zero(scale: Tensor, steps: Tensor) -> Tensor:
    """The zero point of a ``"uint8"`` group, float32: ``steps`` whole steps below 0."""
    return steps.float() * -scale.float()


def _sym_zero(scale: Tensor, bits: int) -> Tensor:
    """The zero point of a symmetric group, float32: codes ``0 .. qmax`` span ``[-absmax, absmax]``."""
    return scale.float() * (-((1 << bits) - 1) / 2)


def _round16(x: Tensor, down: bool) -> Tensor:
    """``x`` (float32) in float16, rounded towards -inf (``down``) or +inf: a stored bound
    that still takes in ``x``."""
    h = x.to(_PARAM_DTYPE)
    past = h.float() > x if down else h.float() < x
    return torch.where(past, torch.nextafter(h, torch.full_like(h, float("-inf" if down else "inf"))), h)


def _quantize_ranged(x: Tensor, bits: int, group: int, pbits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Min/max quantization of the last dim of ``x`` in groups of ``group``, each group's range
    stored in ``pbits`` (4 or 8) bits instead of two float16 numbers.

    ``x``: (..., N) float. The row's own range is kept in float16, rounded outwards:
    ``row`` (..., 2) ``[lo, hi]``. Each group's min and max are then codes on ``2**pbits``
    levels of that range (the min rounded down, the max up, so the group's values stay
    inside): ``grange`` (..., G, 2) uint8 for 8 bits, (..., G) uint8 holding ``lo | hi << 4``
    for 4. Returns ``q`` (..., N) uint8 in ``[0, 2**bits - 1]``, ``row``, ``grange``; the
    codes are computed against :func:`_ranged_affine` of what is stored, as decode sees it.
    Why (README, "Cache fidelity"): a key channel's groups of 32 tokens spent 32 bits of
    parameters each, a whole bit a value at 4 bits; 8-bit ranges halve that at no measured KL.
    """
    n = x.shape[-1]
    lead = x.shape[:-1]
    n_groups = -(-n // group)
    xf = x.float()
    if n == 0:
        row = torch.zeros(*lead, 2, dtype=_PARAM_DTYPE, device=x.device)
        grange = torch.zeros((*lead, 0, 2) if pbits == 8 else (*lead, 0), dtype=torch.uint8, device=x.device)
        return torch.zeros_like(xf, dtype=torch.uint8), row, grange
    row = torch.stack([_round16(xf.amin(-1), down=True), _round16(xf.amax(-1), down=False)], -1)  # (..., 2)
    xg = _pad_last(xf, group).reshape(*lead, n_groups, group)  # (..., G, group)
    pmax = (1 << pbits) - 1
    base = row[..., :1].float()  # (..., 1)
    span = row[..., 1:].float() - base
    inv = torch.where(span > 0, pmax / span, torch.zeros_like(span))
    glo = torch.floor((xg.amin(-1) - base) * inv).clamp_(0, pmax).to(torch.uint8)  # (..., G)
    ghi = torch.ceil((xg.amax(-1) - base) * inv).clamp_(0, pmax).to(torch.uint8)
    grange = torch.stack([glo, ghi], -1) if pbits == 8 else glo | (ghi << 4)
    scale, zero = _ranged_affine(row.unsqueeze(-2), grange, bits, pbits)  # (..., G) float32
    inv_s = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round((xg - zero.unsqueeze(-1)) * inv_s.unsqueeze(-1)).clamp_(0, (1 << bits) - 1)
    q = q.to(torch.uint8).reshape(*lead, n_groups * group)[..., :n]  # (..., N)
    return q, row, grange


def _ranged_affine(row: Tensor, grange: Tensor, bits: int, pbits: int) -> tuple[Tensor, Tensor]:
    """Scale and zero point float32 of the groups that :func:`_quantize_ranged` stored: ``grange``
    (codes of each group's min and max, (..., G, 2) or (..., G)) within ``row`` (..., 2) float16,
    whose leading dims broadcast against the groups' (e.g. (..., 1, 2): one row of G groups)."""
    if pbits == 8:
        glo, ghi = grange[..., 0].float(), grange[..., 1].float()
    else:
        glo, ghi = (grange & 15).float(), (grange >> 4).float()
    base = row[..., 0].float()
    step = (row[..., 1].float() - base) / ((1 << pbits) - 1)  # one range code
    return (ghi - glo) * step / ((1 << bits) - 1), base + glo * step


def _dequantize_groups(q: Tensor, scale: Tensor, zero: Tensor, group: int) -> Tensor:
    """Inverse of :func:`_quantize_groups`: (..., N) codes -> (..., N) float32."""
    n = q.shape[-1]
    qg = _pad_last(q, group).reshape(*q.shape[:-1], -(-n // group), group)  # (..., G, group)
    x = qg.float() * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return x.reshape(*q.shape[:-1], -(-n // group) * group)[..., :n]


def _scale_in_place(y: Tensor, scale: Tensor, zero: Tensor, group: int) -> None:
    """``y = y * scale + zero`` per group of ``group`` along the last dim (0: the whole dim),
    in place: ``y`` (..., N) float32 holding codes, ``scale``, ``zero`` (..., ceil(N / group)).

    The same float32 arithmetic as :func:`_dequantize_groups`, without padding: the full
    groups through a view, a trailing partial group on its own.
    """
    n = y.shape[-1]
    g = group or n
    full = n - n % g
    if full:
        yv = y[..., :full].view(*y.shape[:-1], full // g, g)  # (..., G, group): a view, whatever the strides
        yv.mul_(scale[..., : full // g, None]).add_(zero[..., : full // g, None])
    if full < n:
        y[..., full:].mul_(scale[..., -1:]).add_(zero[..., -1:])


def _pack(q: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes of ``bits`` (2 to 8) bits into a flat uint8 tensor, low bits first: 8 // bits
    codes a byte for 2, 4 and 8 bits; 8 codes in ``bits`` bytes for 3, 5, 6 and 7."""
    flat = q.reshape(-1)
    if bits == 8:
        return flat.contiguous()
    if 8 % bits:
        words = torch.nn.functional.pad(flat, (0, -flat.numel() % 8)).reshape(-1, 8).long()  # (n, 8)
        word = sum(words[:, i] << (i * bits) for i in range(8))  # (n,): 8 codes in 8 * bits bits
        assert isinstance(word, Tensor)
        return torch.stack([(word >> (8 * j)) & 255 for j in range(bits)], -1).to(torch.uint8).reshape(-1)
    per = 8 // bits
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % per)).reshape(-1, per)  # (bytes, per)
    out = flat[:, 0].clone()
    for i in range(1, per):  # 2 or 4 bit positions (scalar shifts are fast on CPU)
        out |= flat[:, i] << (i * bits)
    return out


def _unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`_pack`: the first ``numel`` codes as a flat uint8 tensor."""
    if bits == 8:
        return packed.reshape(-1)[:numel]
    mask = (1 << bits) - 1
    flat = packed.reshape(-1)
    if 8 % bits:
        parts = flat.reshape(-1, bits).long()  # (n, bits): the bytes of 8 codes
        word = sum(parts[:, j] << (8 * j) for j in range(bits))
        assert isinstance(word, Tensor)
        codes = torch.stack([(word >> (i * bits)) & mask for i in range(8)], -1).to(torch.uint8)  # (n, 8)
        return codes.reshape(-1)[:numel]
    codes = torch.stack([(flat >> (i * bits)) & mask for i in range(8 // bits)], dim=-1)  # (bytes, per)
    return codes.reshape(-1)[:numel]


def _unpack_float(packed: Tensor, bits: int, numel: int) -> Tensor:
    """:func:`_unpack` straight into float32: the first ``numel`` codes as a flat float32
    tensor, each bit position written into its strided slot (no stacked uint8 temporary)."""
    if 8 % bits:  # 3, 5, 6, 7 bits: only explored (bench quality --explore), not registered
        return _unpack(packed, bits, numel).float()
    flat = packed.reshape(-1)
    per = 8 // bits
    out = torch.empty(flat.numel() * per, dtype=torch.float32, device=packed.device)
    if per == 1:
        out.copy_(flat)
    else:
        slots = out.view(-1, per)  # (bytes, per): code i of each byte is slot i
        mask = (1 << bits) - 1
        for i in range(per):  # 2 or 4 bit positions, each one vectorised op over all bytes
            slots[:, i].copy_((flat >> (i * bits)) & mask if i else flat & mask)
    return out[:numel]


_HADAMARD: dict[tuple[int, torch.device], Tensor] = {}


def _hadamard(d: int, device: Device) -> Tensor:
    """The orthonormal Sylvester Hadamard matrix of size ``d`` (a power of two), float32."""
    key = (d, torch.device(device))
    if key not in _HADAMARD:
        h = torch.ones(1, 1)
        while h.shape[0] < d:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD[key] = (h / d**0.5).to(device)
    return _HADAMARD[key]


def _rotate(x: Tensor) -> Tensor:
    """Rotate the last dim (head_dim) by the orthonormal Hadamard matrix; identity if not a power of 2."""
    d = x.shape[-1]
    if d & (d - 1):
        return x.float()
    return (x.float().reshape(-1, d) @ _hadamard(d, x.device)).reshape(x.shape)  # (B, H, T, D)


# --------------------------------------------------------------------------- codecs


class Codec(ABC):
    """One way of storing a layer's K/V; see the module docstring for the contract."""

    name: str
    lossless: bool
    bits: int  # bits per stored value, before group parameters: orders codecs by precision

    @property
    def tag(self) -> str:
        """``name:digest`` of the codec's parameters: what the chunk index records, so that a
        chunk written by another version of a codec of the same name is never taken for this one."""
        digest = hashlib.sha256(json.dumps(self.params(), sort_keys=True).encode()).hexdigest()
        return f"{self.name}:{digest[:8]}"

    @abstractmethod
    def encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        """Encode one layer's ``k``, ``v`` (B, H, T, D) into named contiguous tensors."""

    @abstractmethod
    def decode(
        self, parts: dict[str, Tensor], shape: Sequence[int], dtype: torch.dtype, device: Device
    ) -> tuple[Tensor, Tensor]:
        """Rebuild ``k``, ``v`` of ``shape`` (B, H, T, D) in ``dtype`` on ``device`` from ``encode``'s
        output."""

    @abstractmethod
    def params(self) -> dict[str, str]:
        """Codec parameters (str -> str) for the chunk file's metadata."""

    def decode_into(self, parts: dict[str, Tensor], out_k: Tensor, out_v: Tensor) -> None:
        """Decode into ``out_k``, ``out_v`` (B, H, T, D; views of a larger cache are fine),
        giving exactly what ``decode`` gives. Codecs override this to skip the copy."""
        k, v = self.decode(parts, tuple(out_k.shape), out_k.dtype, out_k.device)
        out_k.copy_(k)
        out_v.copy_(v)

    def __repr__(self) -> str:
        return f"<Codec {self.name}>"


class Fp16Codec(Codec):
    """Lossless: the tensors in their native dtype, bit for bit (float32 stays float32)."""

    name = "fp16"
    lossless = True
    bits = 16

    def encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        """Copy ``k`` and ``v`` unchanged (contiguous, detached, own storage)."""
        return {
            "k.data": k.detach().clone(memory_format=torch.contiguous_format),
            "v.data": v.detach().clone(memory_format=torch.contiguous_format),
        }

    def decode(
        self, parts: dict[str, Tensor], shape: Sequence[int], dtype: torch.dtype, device: Device
    ) -> tuple[Tensor, Tensor]:
        """Return the stored tensors on ``device`` in ``dtype`` (bit-exact if dtype matches)."""
        k = parts["k.data"].to(device=device, dtype=dtype).reshape(shape)
        v = parts["v.data"].to(device=device, dtype=dtype).reshape(shape)
        return k, v

    def decode_into(self, parts: dict[str, Tensor], out_k: Tensor, out_v: Tensor) -> None:
        """Copy the stored tensors straight into the outputs."""
        out_k.copy_(parts["k.data"].reshape(out_k.shape))
        out_v.copy_(parts["v.data"].reshape(out_v.shape))

    def params(self) -> dict[str, str]:
        """No parameters besides the version: the dtype is the tensor's own."""
        return {"codec": self.name, "version": FORMAT_VERSION, "storage": "native-dtype"}


class SideCodec(Codec):
    """A lossy codec that quantizes keys and values each on their own (`_encode_one` and
    `_decode_one` per side, "k" or "v")."""

    @abstractmethod
    def _encode_one(self, x: Tensor, side: str) -> dict[str, Tensor]:
        """Encode one side (B, H, T, D) into tensors named ``"{side}.<field>"``."""

    @abstractmethod
    def _decode_one(
        self, parts: dict[str, Tensor], side: str, shape: Sequence[int], device: Device
    ) -> Tensor:
        """Rebuild one side of ``shape`` (B, H, T, D) in float32 on ``device``."""

    def encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        """Quantize ``k`` and ``v`` (B, H, T, D) side by side into named tensors."""
        return {**self._encode_one(k.detach(), "k"), **self._encode_one(v.detach(), "v")}

    def decode(
        self, parts: dict[str, Tensor], shape: Sequence[int], dtype: torch.dtype, device: Device
    ) -> tuple[Tensor, Tensor]:
        """Dequantize on ``device`` and return ``k``, ``v`` of ``shape`` in ``dtype``."""
        shape = tuple(int(s) for s in shape)
        k = self._decode_one(parts, "k", shape, device)
        v = self._decode_one(parts, "v", shape, device)
        return k.to(dtype).contiguous(), v.to(dtype).contiguous()


# How a side stores its group parameters (see GroupQuantCodec and _quantize_groups / _quantize_ranged).
ZERO_MODES = ("float16", "symmetric", "uint8", "log8", "range8", "range4")


class GroupQuantCodec(SideCodec):
    """Asymmetric integer quantization with separate layouts for keys and values.

    Each side is quantized along one axis in groups: ``"channel"`` groups ``group``
    consecutive head_dim entries of one token; ``"token"`` groups ``group`` consecutive
    tokens of one channel (KIVI keys). ``group=0`` means the whole axis (e.g. per token
    over all of head_dim). Codes are packed as :func:`_pack` does; ``k_bits`` or ``v_bits``
    give a side other bits than ``bits`` (3, 5, 6: measured by ``bench quality --explore``,
    none registered). ``rotate`` applies an
    orthonormal Hadamard rotation over head_dim first (spreads outlier channels). ``zero``
    says how a side's group parameters are stored (see :func:`_quantize_groups`): ``"float16"``
    scale and zero, ``"symmetric"`` (no zero: the range is ``[-absmax, absmax]``), ``"uint8"``
    (the zero as whole steps below 0), ``"log8"`` (that, and the scale a one-byte power of
    two), or ``"range8"`` / ``"range4"``: no scale or zero, but each group's min and max as
    8- or 4-bit codes within the float16 range of all the groups along the axis
    (:func:`_quantize_ranged`; for keys along tokens: a channel over the chunk).
    ``version`` names the stored layout in :meth:`params`; bump it when the layout of a
    registered codec changes, so that the reader refuses the old chunks.

    ``sink`` > 0 stores the chunk's first ``sink`` tokens apart, 8-bit per token, out of
    the low-bit groups. A chunk does not know its position, so this is done for every
    chunk although only the conversation's first token is an attention sink; it costs
    ``sink`` tokens at 8 bits per chunk (+0.5% bytes for int4 with 256-token chunks).
    """

    lossless = False

    def __init__(
        self,
        name: str,
        bits: int,
        k_axis: str,
        k_group: int,
        v_axis: str,
        v_group: int,
        *,
        k_rotate: bool = False,
        v_rotate: bool = False,
        k_zero: str = "float16",
        v_zero: str = "float16",
        k_bits: int | None = None,
        v_bits: int | None = None,
        sink: int = 0,
        version: str = FORMAT_VERSION,
    ):
        self.side_bits = {"k": k_bits or bits, "v": v_bits or bits}
        for b in (bits, *self.side_bits.values()):
            if not 2 <= b <= 8:
                raise ValueError(f"bits must be 2 to 8, not {b}")
        for axis in (k_axis, v_axis):
            if axis not in ("channel", "token"):
                raise ValueError(f"axis must be 'channel' or 'token', not {axis!r}")
        self.name = name
        self.bits = min(self.side_bits.values())  # the coarser side orders codecs by precision
        self.sink = sink
        self.version = version
        for zero_as in (k_zero, v_zero):
            if zero_as not in ZERO_MODES:
                raise ValueError(f"zero must be one of {', '.join(map(repr, ZERO_MODES))}, not {zero_as!r}")
        self.layout = {"k": (k_axis, k_group, k_rotate, k_zero), "v": (v_axis, v_group, v_rotate, v_zero)}

    def _encode_one(self, x: Tensor, side: str) -> dict[str, Tensor]:
        axis, group, rotate, zero_as = self.layout[side]
        bits = self.side_bits[side]
        out: dict[str, Tensor] = {}
        if self.sink:
            q, scale, zero = _quantize_groups(x[:, :, : self.sink], 8, x.shape[-1])  # (B, H, s, D)
            assert zero is not None
            out |= {f"{side}.sink_q": q.contiguous(), f"{side}.sink_scale": scale, f"{side}.sink_zero": zero}
            x = x[:, :, self.sink :]  # (B, H, T - s, D)
        if rotate:
            x = _rotate(x)
        if zero_as.startswith("range"):
            # parameters along the grouped axis as computed: (B, H, D, ...) along tokens; small
            xt = x.mT if axis == "token" else x  # (B, H, D, T) or (B, H, T, D)
            size = group or max(xt.shape[-1], 1)
            q, row, grange = _quantize_ranged(xt, bits, size, int(zero_as.removeprefix("range")))
            if axis == "token":  # codes in token order (B, H, T, D), group ranges (B, H, G, D[, 2])
                q, grange = q.mT, grange.transpose(-2, -3) if grange.dim() == 5 else grange.mT
            out |= {f"{side}.q": _pack(q, bits), f"{side}.range": row, f"{side}.grange": grange}
            return {name: t.contiguous() for name, t in out.items()}
        if axis == "token":
            # group along tokens (B, H, D, T); codes are stored back in token order (B, H, T, D)
            # and parameters as (B, H, G, D), so that decode writes rows without a transpose
            q, scale, zero = _quantize_groups(x.mT, bits, group or max(x.shape[-2], 1), zero_as)
            q, scale, zero = q.mT, scale.mT, None if zero is None else zero.mT
        else:
            q, scale, zero = _quantize_groups(x, bits, group or x.shape[-1], zero_as)
        out |= {f"{side}.q": _pack(q, bits), f"{side}.scale": scale}
        if zero is not None:
            out[f"{side}.zero"] = zero
        return {name: t.contiguous() for name, t in out.items()}

    def _decode_one(
        self, parts: dict[str, Tensor], side: str, shape: Sequence[int], device: Device
    ) -> Tensor:
        out = torch.empty(tuple(shape), dtype=torch.float32, device=device)  # (B, H, T, D)
        self._decode_side(parts, side, out)
        return out

    def decode(
        self, parts: dict[str, Tensor], shape: Sequence[int], dtype: torch.dtype, device: Device
    ) -> tuple[Tensor, Tensor]:
        """Dequantize on ``device`` into new ``k``, ``v`` of ``shape`` in ``dtype`` (as ``decode_into``)."""
        shape = tuple(int(s) for s in shape)
        k = torch.empty(shape, dtype=dtype, device=device)
        v = torch.empty(shape, dtype=dtype, device=device)
        self.decode_into(parts, k, v)
        return k, v

    def decode_into(self, parts: dict[str, Tensor], out_k: Tensor, out_v: Tensor) -> None:
        """Dequantize straight into ``out_k``, ``out_v`` (B, H, T, D; views of a larger cache
        are fine): what ``decode`` gives, with no per-group Python loop and one float32
        temporary per side at most (none for an unrotated per-token float32 side, as int8's)."""
        self._decode_side(parts, "k", out_k)
        self._decode_side(parts, "v", out_v)

    def _decode_side(self, parts: dict[str, Tensor], side: str, out: Tensor) -> None:
        """Dequantize one side into ``out`` (B, H, T, D), any dtype and strides."""
        axis, group, rotate, zero_as = self.layout[side]
        bits = self.side_bits[side]
        dev = out.device
        b, h, t, d = out.shape
        if self.sink and t:
            s = min(self.sink, t)  # encode kept min(sink, T) tokens apart
            sq, ss, sz = (parts[f"{side}.sink_{f}"].to(dev) for f in ("q", "scale", "zero"))
            out[:, :, :s].copy_(_dequantize_groups(sq, ss, sz, d))  # (B, H, s, D)
            out, t = out[:, :, s:], t - s
        if out.numel() == 0:
            return
        rotate = rotate and not d & (d - 1)  # as _rotate: identity unless a power of two
        packed = parts[f"{side}.q"].to(dev)
        # Float32 arithmetic as in encode's reconstruction; in place in the output where it is
        # float32 and needs no rotation (the output's strides are fine: only T or D is split).
        direct = not rotate and out.dtype == torch.float32 and bits == 8
        if direct:
            y = out
            y.copy_(packed.view(b, h, t, d))
        else:
            y = _unpack_float(packed, bits, b * h * t * d).view(b, h, t, d)
        if zero_as.startswith("range"):
            row, grange = parts[f"{side}.range"].to(dev), parts[f"{side}.grange"].to(dev)
            # rows (B, H, D, 2) of groups (B, H, G, D) along tokens, (B, H, T, 2) of (B, H, T, G) else;
            # parameters (B, H, G, D) along tokens as the other modes store them (scaling the codes
            # runs 4x faster than over (B, H, D, G))
            row = row.unsqueeze(-3) if axis == "token" else row.unsqueeze(-2)
            scale, zero = _ranged_affine(row, grange, bits, int(zero_as.removeprefix("range")))
        else:
            scale = parts[f"{side}.scale"].to(dev)  # (B, H, T, G), or (B, H, G, D) along tokens
            if zero_as == "symmetric":
                zero = _sym_zero(scale, bits)
            elif zero_as in ("uint8", "log8"):
                if zero_as == "log8":
                    scale = _log_scale(scale)
                zero = _code_zero(scale, parts[f"{side}.zero"].to(dev))
            else:
                zero = parts[f"{side}.zero"].to(dev)
        if axis == "token":
            _scale_in_place(y.mT, scale.mT, zero.mT, group)  # groups along T: transposed views
        else:
            _scale_in_place(y, scale, zero, group)
        if direct:
            return
        if rotate:
            y = torch.matmul(y, _hadamard(d, dev))  # its own inverse; (B, H, T, D)
        out.copy_(y)

    def params(self) -> dict[str, str]:
        """Bits, per-side axis, group size and rotation, sink tokens, parameter dtype, version."""
        out = {"codec": self.name, "version": self.version, "bits": str(self.bits), "sink": str(self.sink)}
        for side, (axis, group, rotate, zero_as) in self.layout.items():
            if self.side_bits[side] != self.bits:  # absent where both sides have the same bits
                out[f"{side}_bits"] = str(self.side_bits[side])
            out[f"{side}_axis"] = axis
            out[f"{side}_group"] = str(group) if group else "all"
            out[f"{side}_rotate"] = "hadamard" if rotate else "none"
            if zero_as != "float16":  # absent for float16, so version 1 codecs keep their parameters
                out[f"{side}_zero"] = zero_as
        out["param_dtype"] = str(_PARAM_DTYPE).removeprefix("torch.")
        return out


CODECS: dict[str, Codec] = {
    "fp16": Fp16Codec(),
    # Version 2 (bench quality, README "Cache fidelity"): keys per channel over the whole
    # chunk (KIVI) instead of per token in groups of 64, values per token on a symmetric
    # range: 0.512x fp16 instead of 0.531x, and closer to exact (keys have per-channel
    # offsets that a per-token range spends its levels on).
    "int8": GroupQuantCodec(
        "int8",
        8,
        k_axis="token",
        k_group=0,
        v_axis="channel",
        v_group=0,
        v_zero="symmetric",
        sink=1,
        version="2",
    ),
    # Hadamard rotation and an 8-bit first token per chunk: measured on SmolLM2-135M they cut
    # int4's KL from 0.0033 to 0.0006 and lift top-1 from 96.5% to 98% (see the quality bench).
    # Version 2: the values' zero point as a whole number of steps in one byte instead of a
    # float16 (0.294x fp16 instead of 0.298x, KL about the same). Not a symmetric range: the
    # first rotated channel carries the vector's mean, and [-absmax, absmax] wasted half the
    # levels on it (KL 1.7x at 4,096 tokens of the bundled text).
    # Version 3's parameter coding (key group ranges as 8-bit codes, values' scale a one-byte
    # power of two; `chatkv bench quality --explore`, row "int4 v3") takes int4 to 0.278x fp16
    # but moved the default policy's KL at 4,096 tokens past 0.0002 and flipped a near-tie
    # (README, "Cache fidelity"): int4 stays at version 2, the default's fidelity first.
    "int4": GroupQuantCodec(
        "int4",
        4,
        k_axis="token",
        k_group=32,
        v_axis="channel",
        v_group=64,
        k_rotate=True,
        v_rotate=True,
        v_zero="uint8",
        sink=1,
        version="2",
    ),
    # Version 3: key groups of 16 tokens instead of 32, their ranges in 4-bit codes within
    # the channel's (8 bits a group instead of 32), values' zero point in one byte: 0.158x
    # fp16 instead of 0.173x, and KL 0.10-0.16 instead of 0.10-0.37 (still experimental).
    "int2": GroupQuantCodec(
        "int2",
        2,
        k_axis="token",
        k_group=16,
        v_axis="channel",
        v_group=64,
        k_rotate=True,
        v_rotate=True,
        k_zero="range4",
        v_zero="uint8",
        sink=1,
        version="3",
    ),
}


def codec_by_tag(tag: str) -> Codec | None:
    """The registered codec whose :attr:`Codec.tag` is ``tag``, or None."""
    return next((c for c in CODECS.values() if c.tag == tag), None)


def get_codec(name: str) -> Codec:
    """Return the registered codec called ``name``; ``ValueError`` if there is none."""
    try:
        return CODECS[name]
    except KeyError:
        allowed = ", ".join(sorted(CODECS))
        raise ValueError(f"unknown KV codec {name!r}; allowed: {allowed}") from None


class BnbCodec(SideCodec):
    """bitsandbytes' blockwise routines, measured beside chatkv's own codecs (optional: they
    register only where ``import bitsandbytes`` works; its ``cuda`` extra).

    ``bnb8``: dynamic 8-bit codes, ``nf4``: 4-bit NormalFloat codes (Hadamard-rotated over
    head_dim first, as ``int4``); both in blocks of ``BLOCK`` consecutive values (per token
    and head where head_dim is 64) scaled by the block's absmax, stored in float16.
    """

    BLOCK = 64
    lossless = False

    def __init__(self, name: str, bits: int, rotate: bool):
        self.name, self.bits, self.rotate = name, bits, rotate

    def _encode_one(self, x: Tensor, side: str) -> dict[str, Tensor]:
        bnbf = _bnb()
        flat = (_rotate(x) if self.rotate else x.float()).reshape(-1)
        if self.bits == 8:
            q, state = bnbf.quantize_blockwise(flat, blocksize=self.BLOCK)
        else:
            q, state = bnbf.quantize_4bit(flat, blocksize=self.BLOCK, quant_type="nf4")
        return {f"{side}.q": q.reshape(-1).contiguous(), f"{side}.absmax": state.absmax.to(_PARAM_DTYPE)}

    def _decode_one(
        self, parts: dict[str, Tensor], side: str, shape: Sequence[int], device: Device
    ) -> Tensor:
        bnbf = _bnb()
        q = parts[f"{side}.q"].to(device)
        absmax = parts[f"{side}.absmax"].to(device).float()
        n = shape[0] * shape[1] * shape[2] * shape[3]
        if self.bits == 8:
            code = bnbf.create_dynamic_map().to(device)
            x = bnbf.dequantize_blockwise(q, absmax=absmax, code=code, blocksize=self.BLOCK)
        else:
            state = bnbf.QuantState(
                absmax=absmax,
                shape=torch.Size([n]),
                dtype=torch.float32,
                blocksize=self.BLOCK,
                quant_type="nf4",
            )
            x = bnbf.dequantize_4bit(q.reshape(-1, 1), quant_state=state)
        x = x.reshape(shape)  # (B, H, T, D)
        return _rotate(x) if self.rotate else x

    def params(self) -> dict[str, str]:
        """Routine, block size, rotation, parameter dtype, version."""
        return {
            "codec": self.name,
            "version": FORMAT_VERSION,
            "routine": "bitsandbytes-blockwise8" if self.bits == 8 else "bitsandbytes-nf4",
            "block": str(self.BLOCK),
            "rotate": "hadamard" if self.rotate else "none",
            "param_dtype": str(_PARAM_DTYPE).removeprefix("torch."),
        }


def _bnb() -> Any:  # bitsandbytes.functional: optional and untyped
    """``bitsandbytes.functional``, imported on first use (it is slow to import, and warns on
    CPUs with bf16 instructions about an optional kernel package that chatkv does not use)."""
    import logging

    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnbf
    finally:
        log.setLevel(level)
    return bnbf


def _register_bnb() -> None:
    """Add ``bnb8`` and ``nf4`` to the registry where bitsandbytes is installed (never
    required; the cheap check keeps ``import chatkv`` from importing it)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return
    CODECS["bnb8"] = BnbCodec("bnb8", 8, rotate=False)
    CODECS["nf4"] = BnbCodec("nf4", 4, rotate=True)


_register_bnb()
