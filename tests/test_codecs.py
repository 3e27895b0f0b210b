"""KV codecs: round trips, bit-exactness, error bounds, payload sizes, registry."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save
from torch import Tensor

from chatkv.kv.codecs import CODECS, Codec, _rotate, get_codec, nbytes

T_VALUES = [1, 7, 32, 33, 256]
LOSSY = ["int8", "int4", "int2"]


def make_kv(t: int, dtype=torch.float32, b: int = 1, h: int = 3, d: int = 64, seed: int = 0):
    """Random K/V (B, H, T, D) with per-channel offsets and an outlier channel, like real keys."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, t, d, generator=g) * 2 + torch.randn(1, h, 1, d, generator=g) * 3
    k[..., 5] *= 8  # an outlier channel
    v = torch.randn(b, h, t, d, generator=g)
    return k.to(dtype), v.to(dtype)


def roundtrip(codec: Codec, k, v, device="cpu"):
    parts = codec.encode(k, v)
    return parts, codec.decode(parts, tuple(k.shape), k.dtype, device)


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("t", T_VALUES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_roundtrip_shapes_dtypes(name, t, dtype):
    codec = get_codec(name)
    k, v = make_kv(t, dtype)
    parts, (kd, vd) = roundtrip(codec, k, v)
    assert kd.shape == k.shape and vd.shape == v.shape
    assert kd.dtype == dtype and vd.dtype == dtype
    assert torch.isfinite(kd.float()).all() and torch.isfinite(vd.float()).all()
    for field, tensor in parts.items():
        assert field.split(".")[0] in ("k", "v"), field
        assert tensor.is_contiguous(), field
    assert any(f.startswith("k.") for f in parts) and any(f.startswith("v.") for f in parts)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_batch_and_odd_head_dim(name):
    """B > 1 and a head_dim that is neither a power of two nor a multiple of the groups."""
    codec = get_codec(name)
    k, v = make_kv(45, b=2, h=2, d=40)
    _, (kd, vd) = roundtrip(codec, k, v)
    assert kd.shape == k.shape and vd.shape == v.shape
    rng = (k.amax() - k.amin()).item()
    assert (kd - k).abs().max().item() < rng / 2  # sane, not garbage from a layout mix-up
    if name != "int2":
        assert torch.allclose(kd, k, atol=rng / 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", T_VALUES)
def test_fp16_bit_exact(dtype, t):
    codec = get_codec("fp16")
    assert codec.lossless
    k, v = make_kv(t, dtype)
    parts, (kd, vd) = roundtrip(codec, k, v)
    assert torch.equal(kd, k) and torch.equal(vd, v)
    assert all(p.dtype == dtype for p in parts.values())  # native dtype, no lossy cast
    assert nbytes(parts) == 2 * k.numel() * k.element_size()


def test_fp16_encode_owns_its_storage():
    """A chunk sliced out of a bigger cache must not alias it (safetensors, later mutation)."""
    k, v = make_kv(512)
    parts = get_codec("fp16").encode(k[:, :, :256], v[:, :, :256])
    k[:, :, :256] = 0
    assert not torch.equal(parts["k.data"], k[:, :, :256])


@pytest.mark.parametrize("name, bits", [("int8", 8), ("int4", 4), ("int2", 2)])
@pytest.mark.parametrize("t", [*T_VALUES, 1000])
def test_error_bounds(name, bits, t):
    """Max error <= half a quantization step of the value range (+ float16 parameter rounding);
    of [-absmax, absmax] for a side quantized on a symmetric range.

    Rotating codecs quantize Hadamard-rotated values, so the bound holds in that space.
    """
    codec = get_codec(name)
    k, v = make_kv(t)
    _, (kd, vd) = roundtrip(codec, k, v)
    for side, x, xd in (("k", k, kd), ("v", v, vd)):
        if codec.params()[f"{side}_rotate"] == "hadamard":
            x, xd = _rotate(x), _rotate(xd)
        span = (x.amax() - x.amin()).item()
        if codec.params().get(f"{side}_zero") == "symmetric":  # [-absmax, absmax] per group
            span = 2 * x.abs().max().item()
        step = span / (2**bits - 1)
        assert (xd - x).abs().max().item() <= step / 2 + x.abs().max().item() * 2**-10


@pytest.mark.parametrize("t", [33, 256])
def test_precision_ordering(t):
    """More bits, less error: fp16 < int8 < int4 < int2 in mean squared error."""
    k, v = make_kv(t)
    errs = []
    for name in ["fp16", "int8", "int4", "int2"]:
        _, (kd, vd) = roundtrip(get_codec(name), k, v)
        errs.append(((kd - k) ** 2).mean().item() + ((vd - v) ** 2).mean().item())
    assert errs[0] == 0.0
    assert errs[0] < errs[1] < errs[2] < errs[3]


@pytest.mark.parametrize(
    "name, lo, hi",
    # bytes relative to fp16 (2 bytes/value) for a full 256-token chunk with head_dim 64
    [("int8", 0.50, 0.55), ("int4", 0.25, 0.30), ("int2", 0.125, 0.19)],
)
def test_payload_ratio(name, lo, hi):
    k, v = make_kv(256)
    parts = get_codec(name).encode(k, v)
    ratio = nbytes(parts) / (2 * k.numel() * 2)
    assert lo <= ratio <= hi, ratio
    bits = get_codec(name).bits
    packed = parts["k.q"].numel() + parts["v.q"].numel()
    assert parts["k.q"].dtype == torch.uint8
    # every value but the 8-bit sink tokens is packed 8 // bits per byte
    sink_values = sum(p.numel() for f, p in parts.items() if f.endswith("sink_q"))
    assert packed == (2 * k.numel() - sink_values) * bits // 8


def test_partial_groups_do_not_pad_payload():
    """T not a multiple of the group: the packed payload grows with T, not with padding."""
    codec = get_codec("int4")
    sizes = {t: codec.encode(*make_kv(t))["k.q"].numel() for t in (33, 34, 63)}
    assert sizes[33] < sizes[34] < sizes[63]


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("t", [1, 33])
def test_safetensors_roundtrip(name, t):
    """Encoded parts survive safetensors (including empty tensors) and decode the same."""
    codec = get_codec(name)
    k, v = make_kv(t, torch.bfloat16)
    parts = codec.encode(k, v)
    loaded = load(save(parts, metadata=codec.params()))
    a = codec.decode(parts, tuple(k.shape), k.dtype, "cpu")
    b = codec.decode(loaded, tuple(k.shape), k.dtype, "cpu")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_deterministic_and_chunk_independent():
    """Encoding is a pure function of the chunk: same input, same bytes."""
    k, v = make_kv(100)
    for name in LOSSY:
        p1, p2 = get_codec(name).encode(k, v), get_codec(name).encode(k.clone(), v.clone())
        assert p1.keys() == p2.keys()
        assert all(torch.equal(p1[f], p2[f]) for f in p1)


def test_constant_input_is_exact():
    """Zero range groups (scale 0) decode to the constant, not NaN."""
    k = torch.full((1, 2, 40, 64), 0.75)
    v = torch.zeros(1, 2, 40, 64)
    for name in LOSSY:
        _, (kd, vd) = roundtrip(get_codec(name), k, v)
        assert torch.equal(kd, k) and torch.equal(vd, v), name


def test_params_are_strings():
    for name, codec in CODECS.items():
        params = codec.params()
        assert params["codec"] == name == codec.name
        assert all(isinstance(a, str) and isinstance(b, str) for a, b in params.items())
        assert "version" in params
    assert CODECS["int4"].params() != CODECS["int2"].params()


def test_get_codec_error_names_choices():
    with pytest.raises(ValueError) as err:
        get_codec("int3")
    msg = str(err.value)
    assert "int3" in msg
    assert all(name in msg for name in CODECS)


def test_nbytes():
    parts = {"a": torch.zeros(3, 4, dtype=torch.float16), "b": torch.zeros(5, dtype=torch.uint8)}
    assert nbytes(parts) == 3 * 4 * 2 + 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CODECS))
def test_cuda_matches_cpu(name):
    codec = get_codec(name)
    k, v = make_kv(77)
    parts_gpu = codec.encode(k.cuda(), v.cuda())
    kd, vd = codec.decode({f: p.cpu() for f, p in parts_gpu.items()}, tuple(k.shape), k.dtype, "cuda")
    assert kd.device.type == "cuda"
    _, (kc, vc) = roundtrip(codec, k, v)
    assert torch.allclose(kd.cpu(), kc, atol=1e-3) and torch.allclose(vd.cpu(), vc, atol=1e-3)


def reference_decode(codec, parts, shape):
    """The plain reading of a GroupQuantCodec's layout (unpack, dequantize, transpose, rotate
    back, prepend the 8-bit sink tokens), float32: what the fast decode must reproduce."""
    from chatkv.kv.codecs import _dequantize_groups, _sym_zero, _unpack

    b, h, t, d = shape
    out = []
    for side in ("k", "v"):
        axis, group, rotate, zero_as = codec.layout[side]
        s = min(codec.sink, t)
        n = t - s
        q = _unpack(parts[f"{side}.q"], codec.bits, b * h * n * d).reshape(b, h, n, d)  # token order
        if zero_as.startswith("range"):  # group ranges as codes within the row's float16 range
            row, grange = parts[f"{side}.range"].float(), parts[f"{side}.grange"]
            pbits = int(zero_as.removeprefix("range"))
            lo_code, hi_code = (grange[..., 0], grange[..., 1]) if pbits == 8 else (grange % 16, grange // 16)
            if axis == "token":  # rows (B, H, D, 2), groups (B, H, G, D)
                lo, hi = row[..., 0].unsqueeze(-2), row[..., 1].unsqueeze(-2)  # (B, H, 1, D)
            else:  # rows (B, H, T, 2), groups (B, H, T, G)
                lo, hi = row[..., :1], row[..., 1:]
            unit = (hi - lo) / (2**pbits - 1)
            zero = lo + lo_code.float() * unit  # the group's min
            scale = (lo + hi_code.float() * unit - zero) / (2**codec.bits - 1)
        else:
            scale = parts[f"{side}.scale"]
            if zero_as == "symmetric":
                zero = _sym_zero(scale, codec.bits)
            elif zero_as in ("uint8", "log8"):  # whole steps below 0
                if zero_as == "log8":  # the scale a power of two: 2 ** (code / 16 - 10)
                    scale = 2.0 ** (scale.double() / 16 - 10)
                zero = -parts[f"{side}.zero"].float() * scale.float()
            else:
                zero = parts[f"{side}.zero"]
        if axis == "token":  # groups along T: parameters (B, H, G, D)
            x = _dequantize_groups(q.mT, scale.mT, zero.mT, group or max(n, 1)).mT
        else:
            x = _dequantize_groups(q, scale, zero, group or d)
        if rotate:
            x = _rotate(x)
        if s:
            head = _dequantize_groups(
                parts[f"{side}.sink_q"], parts[f"{side}.sink_scale"], parts[f"{side}.sink_zero"], d
            )
            x = torch.cat([head, x], dim=-2)
        out.append(x)
    return out


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("t", [1, 2, 33, 255, 256])
@pytest.mark.parametrize("d", [64, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_decode_matches_the_plain_reading_of_the_layout(name, t, d, dtype):
    """decode and decode_into (into strided views of a larger cache, as the chunk reader
    uses it) give what unpack + dequantize + rotate give, in the destination dtype."""
    codec = get_codec(name)
    k, v = make_kv(t, dtype, b=2, d=d)
    parts = codec.encode(k, v)
    want_k, want_v = reference_decode(codec, parts, tuple(k.shape))
    kd, vd = codec.decode(parts, tuple(k.shape), dtype, "cpu")
    tol = 1e-5 * max(want_k.abs().max().item(), 1.0)
    assert torch.allclose(
        kd.float(), want_k.to(dtype).float(), atol=tol, rtol=1e-2 if dtype != torch.float32 else 0
    )
    assert torch.allclose(
        vd.float(), want_v.to(dtype).float(), atol=tol, rtol=1e-2 if dtype != torch.float32 else 0
    )
    big_k = torch.full((2, 3, t + 9, d), float("nan"), dtype=dtype)
    big_v = torch.full((2, 3, t + 9, d), float("nan"), dtype=dtype)
    codec.decode_into(parts, big_k[:, :, 4 : 4 + t], big_v[:, :, 4 : 4 + t])
    assert torch.equal(big_k[:, :, 4 : 4 + t], kd) and torch.equal(big_v[:, :, 4 : 4 + t], vd)
    assert big_k[:, :, :4].isnan().all() and big_k[:, :, 4 + t :].isnan().all()  # nothing outside


def test_an_integer_zero_point_keeps_half_a_step_and_costs_one_byte():
    """int4 values store their zero point as whole steps below 0 in one byte (uint8): the
    error stays within half a step of each group's range (widened to take in 0), and the
    parameters cost 3 bytes a group instead of 4."""
    from chatkv.kv.codecs import GroupQuantCodec

    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 50, 64, generator=g) + torch.linspace(-1, 3, 64)  # groups straddle 0 unevenly
    args = dict(k_axis="channel", k_group=64, v_axis="channel", v_group=64)
    coded = GroupQuantCodec("t", 4, **args, v_zero="uint8")
    plain = GroupQuantCodec("t", 4, **args)
    parts = coded.encode(x, x)
    assert parts["v.zero"].dtype == torch.uint8 and parts["k.zero"].dtype == torch.float16
    assert nbytes(parts) == nbytes(plain.encode(x, x)) - parts["v.zero"].numel()
    _, vd = coded.decode(parts, tuple(x.shape), torch.float32, "cpu")
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    step = (hi - lo) / 15
    assert ((vd - x).abs() <= step / 2 + x.abs().amax(-1, keepdim=True) * 2**-10).all()
    with pytest.raises(ValueError, match="zero must be"):
        GroupQuantCodec("t", 4, **args, v_zero="int8")


def group_stats(x: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """Min and max of each group of ``group`` along the last dim of ``x`` (..., N), a multiple of
    it, broadcast back to (..., N)."""
    xg = x.reshape(*x.shape[:-1], -1, group)
    lo = xg.amin(-1, keepdim=True).expand_as(xg).reshape(x.shape)
    hi = xg.amax(-1, keepdim=True).expand_as(xg).reshape(x.shape)
    return lo, hi


@pytest.mark.parametrize("pbits", [8, 4])
@pytest.mark.parametrize("t", [48, 256])
def test_group_ranges_as_codes_keep_half_a_widened_step(pbits, t):
    """A ``range8`` / ``range4`` side stores each group's min and max as codes within its row's
    float16 range (keys: a channel over the chunk), rounded outwards: the error stays within
    half a step of the group's range widened by at most one code at each end; the parameters
    cost 2 (8-bit) or 1 (4-bit) bytes a group and 4 bytes a row, against 4 bytes a group."""
    from chatkv.kv.codecs import GroupQuantCodec

    mode = f"range{pbits}"
    args = dict(k_axis="token", k_group=16, v_axis="channel", v_group=32)
    coded = GroupQuantCodec("t", 4, **args, k_zero=mode, v_zero=mode)
    plain = GroupQuantCodec("t", 4, **args)
    k, v = make_kv(t, b=2)
    parts = coded.encode(k, v)
    kd, vd = coded.decode(parts, tuple(k.shape), torch.float32, "cpu")
    for x, xd in ((k.mT, kd.mT), (v, vd)):  # both along their grouped axis: (..., N)
        lo, hi = group_stats(x, 16 if x is not v else 32)
        row = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) * (1 + 2**-9)  # float16 outward
        step = (hi - lo + 2 * row / (2**pbits - 1)) / 15
        assert ((xd - x).abs() <= step / 2 + 1e-5 * x.abs().amax()).all()
    k_groups, v_groups = 2 * 3 * 64 * (t // 16), 2 * 3 * t * (64 // 32)
    rows = 2 * 3 * 64 + 2 * 3 * t  # key channels, value tokens
    saved = 4 * (k_groups + v_groups) - (pbits // 4) * (k_groups + v_groups) - 4 * rows
    assert nbytes(plain.encode(k, v)) - nbytes(parts) == saved
    assert not any(f.endswith((".scale", ".zero")) for f in parts)


def test_int4_groups_cost_two_bytes():
    """int4 with version 3's parameter coding (bench quality --explore's "int4 v3"): a key
    group's range in two bytes, a value group's scale and zero point in one byte each (0.278x
    fp16 at 256 tokens; the registered int4, version 2, spends four and three: 0.294x)."""
    from chatkv.bench.quality import frontier_codecs

    codec = next(c for c in frontier_codecs() if c.name == "int4 v3")
    assert get_codec("int4").params()["version"] == "2"
    assert codec.params()["k_zero"] == "range8" and codec.params()["v_zero"] == "log8"
    k, v = make_kv(256, b=30)  # a chunk of all 30 layers of SmolLM2-135M, stacked
    parts = codec.encode(k, v)
    n = 30 * 3 * 255 * 64  # values past the 8-bit sink token, per side
    assert parts["k.grange"].shape == (30, 3, 8, 64, 2) and parts["k.grange"].dtype == torch.uint8
    assert parts["k.range"].shape == (30, 3, 64, 2) and parts["k.range"].dtype == torch.float16
    params = nbytes(parts) - 2 * n // 2 - nbytes({f: p for f, p in parts.items() if "sink" in f})
    assert params == 30 * 3 * (8 * 64 * 2 + 64 * 4 + 255 * 2)  # key groups and rows, value groups
    assert parts["v.scale"].dtype == torch.uint8 and parts["v.zero"].dtype == torch.uint8
    assert 0.275 < nbytes(parts) / (2 * k.numel() * 2) < 0.28


def test_a_log8_scale_is_a_power_of_two_rounded_up():
    """``log8`` stores a group's scale as one byte, 2 ** (code / 16 - 10), the smallest such
    step >= the group's (range widened to take in 0) / qmax: the error stays within half a
    step 4.4% larger than the float16 one; a group too wide for the largest code (about 61 a
    step) is clipped at the top code, finite; an all-zero group decodes to zeros."""
    from chatkv.kv.codecs import GroupQuantCodec

    args = dict(k_axis="channel", k_group=64, v_axis="channel", v_group=32)
    coded = GroupQuantCodec("t", 4, **args, v_zero="log8")
    plain = GroupQuantCodec("t", 4, **args, v_zero="uint8")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 40, 64, generator=g) * torch.logspace(-3, 1, 40)[:, None] + 0.3  # many scales
    x[0, 0, 7] = 0.0  # an all-zero token: scale code 0
    parts = coded.encode(x, x)
    assert parts["v.scale"].dtype == torch.uint8 and nbytes(parts) == nbytes(plain.encode(x, x)) - (
        parts["v.scale"].numel()
    )
    _, vd = coded.decode(parts, tuple(x.shape), torch.float32, "cpu")
    lo, hi = group_stats(x, 32)
    step = (hi.clamp(min=0) - lo.clamp(max=0)) / 15 * 2 ** (1 / 16)
    assert ((vd - x).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(vd[0, 0, 7], x[0, 0, 7])
    wide = torch.linspace(-2000, 2000, 64).expand(1, 1, 2, 64)  # a range past 61 x 15
    _, vw = coded.decode(coded.encode(wide, wide), tuple(wide.shape), torch.float32, "cpu")
    assert torch.isfinite(vw).all() and (vw - wide).abs().max() < 2000


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 8, 13, 64])
def test_codes_of_any_width_pack_and_unpack(bits, n):
    """2, 4, 8 bits pack 8 // bits codes a byte; 3, 5, 6, 7 bits 8 codes in ``bits`` bytes."""
    from chatkv.kv.codecs import _pack, _unpack, _unpack_float

    q = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = _pack(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (-(-n // (8 // bits)) if 8 % bits == 0 else -(-n // 8) * bits)
    assert torch.equal(_unpack(packed, bits, n), q)
    assert torch.equal(_unpack_float(packed, bits, n), q.float())


def test_keys_and_values_can_have_their_own_bits():
    """``k_bits`` / ``v_bits`` (explored, not registered): each side within half a step of its
    own bits, the codec ordered by its coarser side, the parameters saying which is which."""
    from chatkv.kv.codecs import GroupQuantCodec

    args = dict(k_axis="token", k_group=32, v_axis="channel", v_group=64, k_zero="range8")
    mixed = GroupQuantCodec("t", 2, **args, k_bits=5, v_bits=3)
    k, v = make_kv(100)
    parts = mixed.encode(k, v)
    kd, vd = mixed.decode(parts, tuple(k.shape), torch.float32, "cpu")
    params = mixed.params()
    assert mixed.bits == 3 and params["bits"] == "3" and params["k_bits"] == "5" and "v_bits" not in params
    assert parts["k.q"].numel() == -(-k.numel() // 8) * 5 and parts["v.q"].numel() == -(-v.numel() // 8) * 3
    for x, xd, bits in ((k, kd, 5), (v, vd, 3)):
        span = (x.amax() - x.amin()).item()
        assert (xd - x).abs().max().item() <= span / (2**bits - 1) / 2 * (1 + 2 / 255) + 1e-4
    assert "k_bits" not in get_codec("int4").params()  # the same bits on both sides: as before
    with pytest.raises(ValueError, match="bits must be 2 to 8"):
        GroupQuantCodec("t", 4, **args, k_bits=9)
