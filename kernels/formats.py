"""Weight formats of the sparse linears, one value each: how weights are stored, quantized, widened and scaled.

A format travels with the weights (SparseLinear.fmt, the `quantization` field of a quantized file's metadata), so
nothing guesses a scheme from a dtype. Weights are input-channel-major [K, N] (or [K, N / per_word] words):
skipping input k skips one contiguous row.
- FLOAT: the model's 16/32-bit float weights, no scales.
- INT8: round to nearest, one symmetric scale per output column, w = q * scale[n] (scale [N] float32).
- INT4: round to nearest, asymmetric, eight weights per int32 word (column 8c + i in bits 4i..4i+3 of word c), a
  scale and offset per group of `group(K)` inputs and output column: w = q * scale[0, g, n] + scale[1, g, n]
  (scale [2, K / group, N] float16). AutoAWQ's (q - zero) * s is the same with offset -zero * s.
The kernels read `code` (their QUANT constexpr: 0, 1, 2) and stream each format's rows (kernels/stream.py).
Adding a format: a value here, and its step in kernels/stream.py.
"""
import math
import sys
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import Tensor

from errors import UserError


def rtn_int8(w: Tensor, group: int = 0) -> tuple:
    """w [in, out] -> (q int8 [in, out], scale float32 [out]): per output channel, absmax / 127, rounded to nearest."""
    wf = w.to(torch.float32, copy=True)  # rounded in place below
    scale = torch.maximum(wf.amax(0), -wf.amin(0)).clamp_min(1e-30) / 127  # absmax without an |w| copy
    return wf.div_(scale).round_().clamp_(-127, 127).to(torch.int8), scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale


def int4_group(K: int, preferred: int = 128) -> int:
    """The scale group for int4 weights with K inputs: `preferred` inputs, or the largest of 64 and 32 below it that
    divides K."""
    group = next((g for g in (128, 64, 32) if g <= preferred and K % g == 0), None)
    if group is None:
        raise UserError(f"int4 weights need an input size divisible by 32; got {K}")
    return group


def pack_int4(q: Tensor) -> Tensor:
    """q [K, N] in 0..15 -> int32 [K, N/8]: column 8c + i in bits 4i..4i+3 of word c."""
    if sys.byteorder != "little":  # the bytes below are read back as words
        raise UserError("int4 packing needs a little-endian machine")
    K, N = q.shape
    b = q.to(torch.uint8).view(K, N // 2, 2)
    # byte j of a little-endian word holds nibbles 2j (low) and 2j + 1 (high): bits 4i..4i+3 for nibble i
    return (b[..., 0] | (b[..., 1] << 4)).view(torch.int32)


def unpack_int4(w: Tensor) -> Tensor:
    """int32 [K, N/8] -> q [K, N] int32 in 0..15 (pack_int4's inverse)."""
    K = w.shape[0]
    return ((w[:, :, None] >> torch.arange(0, 32, 4, device=w.device, dtype=torch.int32)) & 0xF).reshape(K, -1)


def rtn_int4(w: Tensor, group: Optional[int] = None) -> tuple:
    """w [in, out] -> (q int32 [in, out/8] (pack_int4), scale float16 [2, in/group, out]): per group of `group`
    inputs (default int4_group) and output channel, asymmetric round to nearest over [min(w, 0), max(w, 0)]:
    w ≈ q * scale[0] + scale[1] with q in 0..15 and scale[1] = -zero * scale[0] (the zero point an integer)."""
    K, N = w.shape
    group = group or int4_group(K)
    if N % 8 or K % group:
        raise UserError(f"int4 weights need outputs divisible by 8 and inputs by the group {group}; got {K}x{N}")
    wg = w.float().reshape(K // group, group, N)
    q, s, m = round_int4(wg, wg.amin(1).clamp_max(0), wg.amax(1).clamp_min(0))
    if not s.isfinite().all():
        raise UserError("int4: a weight group's range does not fit a float16 scale")
    return pack_int4(q.reshape(K, N)), torch.stack([s, m]).half()


def round_int4(wg: Tensor, lo: Tensor, hi: Tensor) -> tuple:
    """Weight groups wg [G, g, N] float32 rounded over the range [lo, hi] [G, N] (lo <= 0 <= hi) -> (q [G, g, N] in
    0..15 as floats, scale s, offset m [G, N] float32 holding float16 values): s = (hi - lo) / 15, an integer zero
    point, w ≈ q s + m (rtn_int4's rounding; awq.py's clipping search scores it)."""
    s = ((hi - lo) / 15).clamp_min(2 ** -14).half().float()
    m = (-(-lo / s).round().clamp(0, 15) * s).half().float()
    return ((wg - m[:, None]) / s[:, None]).round_().clamp_(0, 15), s, m


def dequantize_int4(w: Tensor, scale: Tensor) -> Tensor:
    """int4 weights w int32 [K, N/8] with scale [2, K/g, N] -> float32 [K, N]: q * scale[0] + scale[1] of each
    weight's group of g inputs."""
    K = w.shape[0]
    s, m = scale.float().repeat_interleave(K // scale.shape[1], dim=1)
    return unpack_int4(w).float() * s + m


@dataclass(frozen=True)
class QuantFormat:
    name: str  # the --quant / --mode name
    scheme: str  # what a quantized file's metadata records (an earlier scheme's files are refused: re-quantize)
    code: int  # the kernels' QUANT constexpr
    bits: int  # bits per weight as streamed (float32 weights count as 16: their summation order was measured so)
    storage: Optional[torch.dtype]  # the stored element (None: the model's float dtype)
    per_word: int  # weights per stored element
    quantize: Optional[Callable] = None  # (w [K, N] float, group) -> (q, scale)
    dequantize: Optional[Callable] = None  # (q, scale) -> float32 [K, N]
    group_size: int = 0  # inputs per scale group where the input size allows (see group); 0: per output column
    calibrated: bool = False  # made with calibration data (awq.py): read from its file, never quantized on load;
    # its linears keep per-input-channel scales (`input_scale`) that the source's thresholds are divided by

    @property
    def quantized(self) -> bool:
        return self.code != 0

    def group(self, K: int) -> int:
        """Inputs per scale group for K inputs (0: scales per output column, or none)."""
        return int4_group(K, self.group_size) if self.group_size else 0

    def quantize_weight(self, w: Tensor) -> tuple:
        """w [K, N] float -> (q, scale) in this format."""
        return self.quantize(w, self.group(w.shape[0]))

    def stored_shape(self, K: int, N: int) -> tuple:
        return K, N // self.per_word

    def scale_shape(self, K: int, N: int) -> Optional[tuple]:
        if self.code == 1:
            return (N,)
        if self.code == 2:
            return 2, K // self.group(K), N
        return None

    def scale_bytes(self, K: int, N: int) -> int:
        shape = self.scale_shape(K, N)
        return 0 if shape is None else math.prod(shape) * self.scale_dtype().itemsize

    def scale_dtype(self) -> Optional[torch.dtype]:
        return {1: torch.float32, 2: torch.float16}.get(self.code)

    def empty(self, K: int, N: int, device) -> tuple:
        """Uninitialised (q, scale) of this format for a [K, N] weight, for a quantized state dict to load into."""
        return (torch.empty(self.stored_shape(K, N), dtype=self.storage, device=device),
                torch.empty(self.scale_shape(K, N), dtype=self.scale_dtype(), device=device))

    def group_of(self, w: Tensor, scale: Optional[Tensor]) -> int:
        """The scale group of stored weights (int4: from the scales' shape, which a file fixes)."""
        return w.shape[0] // scale.shape[1] if self.code == 2 else 0

    def check(self, w: Tensor, scale: Optional[Tensor]):
        """What a launch asserts of a format's weights and scales."""
        assert (scale is None) == (self.code == 0), "quantized weights (only) have scales"
        if self.code:
            assert w.dtype == self.storage and scale.dtype == self.scale_dtype() and scale.is_contiguous()
        if self.code == 1:
            assert scale.shape == (w.shape[1],)
        elif self.code == 2:
            assert scale.dim() == 3 and scale.shape[0] == 2 and scale.shape[2] == w.shape[1] * 8
            assert w.shape[0] % scale.shape[1] == 0


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: nibble i of word c holds column 8c + AWQ_ORDER[i]


def unpack_awq(words: Tensor) -> Tensor:
    """AutoAWQ's GEMM packing, int32 [R, N/8] -> [R, N] int32 in 0..15."""
    nib = (words[:, :, None] >> torch.arange(0, 32, 4, device=words.device, dtype=torch.int32)) & 0xF  # [R, N/8, 8]
    out = torch.empty_like(nib)
    out[:, :, list(AWQ_ORDER)] = nib
    return out.reshape(words.shape[0], -1)


def from_awq(qweight: Tensor, qzeros: Tensor, scales: Tensor) -> tuple:
    """An AutoAWQ GEMM linear (qweight int32 [K, N/8], qzeros int32 [K/g, N/8], scales float16 [K/g, N]; w = (q - z)
    s) -> INT4's (words int32 [K, N/8], scale float16 [2, K/g, N]) with w = q s + m, m = -z s rounded to float16 (within
    half a float16 ulp of z s < 16 s: at most s / 128, under 1% of a quantization step)."""
    z = unpack_awq(qzeros).float()
    s = scales.float()
    return pack_int4(unpack_awq(qweight)), torch.stack([scales.half(), (-z * s).half()])


def int4_variant(group: int, source: str = "rtn") -> "QuantFormat":
    """INT4 with scale groups of `group` inputs, from RTN (quantize.py) or AWQ (a converted AutoAWQ checkpoint)."""
    if group not in (128, 64, 32) or source not in ("rtn", "awq"):
        raise UserError(f"int4 weights come in groups of 128, 64 or 32 inputs (rtn or awq), not {group} ({source})")
    scheme = "int4-rtn-group-int8-head" if (group, source) == (128, "rtn") else f"int4-{source}-g{group}-int8-head"
    return replace(INT4, scheme=scheme, group_size=group)


def awq_variant(group: int) -> "QuantFormat":
    """AWQ (awq.py's scales, then int4) with scale groups of `group` inputs (128: AWQ itself)."""
    if group not in (128, 64, 32):
        raise UserError(f"awq weights come in groups of 128, 64 or 32 inputs, not {group}")
    return replace(AWQ, scheme=f"awq-int4-g{group}-int8-head", group_size=group)


def format_of_scheme(scheme: str) -> "QuantFormat":
    """The format a file's `quantization` metadata names; UserError for a scheme this engine does not read."""
    for fmt in (INT8, INT4, AWQ):
        if fmt.scheme == scheme:
            return fmt
    parts = scheme.split("-")  # int4-<source>-g<group>-int8-head (converted), awq-int4-g<group>-int8-head (awq.py)
    if len(parts) == 5 and parts[0] == "int4" and parts[2][:1] == "g" and parts[2][1:].isdigit():
        return int4_variant(int(parts[2][1:]), parts[1])
    if len(parts) == 5 and parts[:2] == ["awq", "int4"] and parts[2][:1] == "g" and parts[2][1:].isdigit() \
            and parts[3:] == ["int8", "head"]:
        return awq_variant(int(parts[2][1:]))
    raise UserError(f"weights quantized as {scheme!r} are not read by this engine (re-run quantize.py)")


FLOAT = QuantFormat("float", "", 0, 16, None, 1)
INT8 = QuantFormat("int8", "int8-rtn-channel-head", 1, 8, torch.int8, 1, rtn_int8, dequantize_int8)
INT4 = QuantFormat("int4", "int4-rtn-group-int8-head", 2, 4, torch.int32, 8, rtn_int4, dequantize_int4, 128)
AWQ = replace(INT4, name="awq", scheme="awq-int4-g128-int8-head", calibrated=True)  # INT4 after awq.py's scaling
FORMATS = {f.name: f for f in (FLOAT, INT8, INT4, AWQ)}
QUANT_FORMATS = {f.name: f for f in (INT8, INT4, AWQ)}  # what --quant offers; the LM head is INT8 under each


def quant_format(name: Optional[str]) -> QuantFormat:
    """The format of a --quant name (None: FLOAT)."""
    if name is None:
        return FLOAT
    if name not in QUANT_FORMATS:
        raise UserError(f"unknown quantization {name!r}; choose one of {', '.join(QUANT_FORMATS)}")
    return QUANT_FORMATS[name]
