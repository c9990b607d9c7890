"""kernels/formats.py: the weight formats as values (FLOAT, INT8, INT4 and its variants): round to nearest and
its packing, the round trip through each quantized format within half a step, the shapes and dtypes a format
stores and allocates, what a launch asserts of weights and scales, the scale group rule, and the names of
--quant and of a quantized file's scheme."""
import math

import pytest
import torch

from errors import UserError
from kernels.formats import (AWQ, FLOAT, INT4, INT8, awq_variant, dequantize_int4, format_of_scheme, int4_group,
                             int4_variant, pack_int4, quant_format, rtn_int4, rtn_int8, unpack_int4)


def test_rtn_int8_rounds_to_nearest_per_output_channel():
    w = torch.randn(50, 30) * torch.rand(30) * 3  # columns of different scales
    w[:, 7] = 0  # an all-zero column stays zero
    q, scale = rtn_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (30,) and scale.dtype == torch.float32
    assert q.abs().max() <= 127 and (q.abs().amax(0)[torch.arange(30) != 7] == 127).all()
    assert ((q.float() * scale - w).abs() <= scale / 2 * (1 + 1e-6)).all()
    assert not q[:, 7].any()


def test_rtn_int4_packs_and_rounds_per_group():
    """Eight 4-bit weights to a word (column 8c + i in bits 4i..4i+3), a float16 scale and offset per group of
    inputs and output channel; the dequantized weights sit within half a step of the originals, zero stays
    exactly representable, and groups of different ranges get their own scales."""
    q = torch.randint(0, 16, (3, 16))
    words = pack_int4(q)
    assert words.dtype == torch.int32 and words.shape == (3, 2)
    assert torch.equal(dequantize_int4(words, torch.stack([torch.ones(1, 16), torch.zeros(1, 16)]).half()), q.float())
    w = torch.randn(96, 40) * torch.rand(40) * 3
    w[32:64] *= 10  # the second group of inputs has a ten times wider range
    w[:, 5] = 0
    words, scale = rtn_int4(w, 32)
    assert words.shape == (96, 5) and scale.shape == (2, 3, 40) and scale.dtype == torch.float16
    s = scale[0].float().repeat_interleave(32, 0)
    back = dequantize_int4(words, scale)
    assert ((back - w).abs() <= s / 2 * (1 + 1e-3) + 1e-6).all()
    assert not back[:, 5].any()
    assert (scale[0, 1].float() > 5 * scale[0, 0].float())[torch.arange(40) != 5].all()
    assert int4_group(4096) == 128 and int4_group(576) == 64 and int4_group(96) == 32
    with pytest.raises(UserError, match="divisible by 32"):
        int4_group(100)



def test_format_values():
    assert [(f.code, f.bits, f.storage, f.per_word) for f in (FLOAT, INT8, INT4)] == [
        (0, 16, None, 1), (1, 8, torch.int8, 1), (2, 4, torch.int32, 8)]
    assert not FLOAT.quantized and INT8.quantized and INT4.quantized
    assert FLOAT.quantize is None and FLOAT.scale_dtype() is None
    assert INT8.scale_dtype() == torch.float32 and INT4.scale_dtype() == torch.float16
    assert AWQ.code == INT4.code and AWQ.calibrated and not INT4.calibrated


def half_step(fmt, scale, K):
    """[N] or [K, N]: half the quantization step of each weight, and the rounding of the step: int8's w / s is
    rounded in float32 (up to 127 steps, 2^-24 relative); int4's scale s and offset m (|m| <= 15 s) are rounded to
    float16 (2^-11 relative), which moves the grid's far end by up to (15 s + |m|) 2^-11."""
    if fmt is INT8:
        return scale * (0.5 + 127 * 2 ** -23)
    s, m = scale.float().repeat_interleave(K // scale.shape[1], 1)
    return s / 2 + (15 * s + m.abs()) * 2 ** -11 + 1e-7


@pytest.mark.parametrize("fmt", [INT8, INT4], ids=["int8", "int4"])
@pytest.mark.parametrize("K,N", [(128, 48), (576, 40)])
def test_round_trip_within_half_a_step(fmt, K, N):
    """quantize_weight then dequantize gives each weight back within half its step (see half_step); the stored
    weights and scales have the shapes and dtypes the format names (and `empty` allocates), and pass what a launch
    asserts."""
    w = torch.randn(K, N) * torch.rand(N) * 2
    q, scale = fmt.quantize_weight(w)
    back = fmt.dequantize(q, scale)
    assert back.shape == (K, N) and back.dtype == torch.float32
    assert ((back - w).abs() <= half_step(fmt, scale, K)).all()
    assert tuple(q.shape) == fmt.stored_shape(K, N) and q.dtype == fmt.storage
    assert tuple(scale.shape) == fmt.scale_shape(K, N) and scale.dtype == fmt.scale_dtype()
    assert fmt.scale_bytes(K, N) == scale.numel() * scale.element_size()
    assert fmt.group_of(q, scale) == fmt.group(K)
    e_q, e_s = fmt.empty(K, N, "cpu")
    assert (e_q.shape, e_q.dtype, e_s.shape, e_s.dtype) == (q.shape, q.dtype, scale.shape, scale.dtype)
    fmt.check(q, scale)


def test_shapes_of_each_format():
    assert FLOAT.stored_shape(100, 40) == (100, 40) and FLOAT.scale_shape(100, 40) is None
    assert FLOAT.scale_bytes(100, 40) == 0 and FLOAT.group(100) == 0
    assert INT8.stored_shape(100, 40) == (100, 40) and INT8.scale_shape(100, 40) == (40,)
    assert INT8.scale_bytes(100, 40) == 40 * 4 and INT8.group(100) == 0
    assert INT4.stored_shape(4096, 11008) == (4096, 1376) and INT4.scale_shape(4096, 11008) == (2, 32, 11008)
    assert INT4.scale_bytes(4096, 11008) == math.prod((2, 32, 11008)) * 2


def test_check_rejects_wrong_scales():
    q8, s8 = rtn_int8(torch.randn(64, 24))
    INT8.check(q8, s8)
    for bad in (torch.ones(25), torch.ones(24, dtype=torch.float16), None):  # wrong shape, dtype, missing
        with pytest.raises(AssertionError):
            INT8.check(q8, bad)
    q4, s4 = rtn_int4(torch.randn(64, 24), 32)
    INT4.check(q4, s4)
    for bad in (s4[:, :, :16].contiguous(), s4[:1].contiguous(), torch.ones(2, 3, 24, dtype=torch.float16),
                s4.float(), s4.transpose(1, 2).contiguous().transpose(1, 2)):
        with pytest.raises(AssertionError):
            INT4.check(q4, bad)
    FLOAT.check(torch.randn(64, 24), None)
    with pytest.raises(AssertionError):  # float weights have no scales
        FLOAT.check(torch.randn(64, 24), torch.ones(24))


def test_group_rule():
    """int4 groups: the preferred size (128, or a variant's), else the largest of 64 and 32 that divides K."""
    assert [INT4.group(K) for K in (4096, 11008, 576, 96, 160)] == [128, 128, 64, 32, 32]
    assert int4_variant(64).group(4096) == 64 and int4_variant(32).group(4096) == 32 and int4_variant(64).group(96) == 32
    for fmt in (INT4, int4_variant(32)):
        with pytest.raises(UserError, match="divisible by 32"):
            fmt.group(100)
    with pytest.raises(UserError, match="divisible by 8"):  # outputs fill whole words
        rtn_int4(torch.randn(64, 20), 32)
    with pytest.raises(UserError, match="groups of 128, 64 or 32"):
        int4_variant(16)


def test_pack_and_unpack_are_inverse():
    q = torch.randint(0, 16, (5, 40))
    q[0, 7] = 15  # the top nibble of a word: the int32 sign bit
    assert torch.equal(unpack_int4(pack_int4(q)), q.int())


def test_names_and_schemes():
    assert quant_format(None) is FLOAT
    assert [quant_format(n) for n in ("int8", "int4", "awq")] == [INT8, INT4, AWQ]
    with pytest.raises(UserError, match="unknown quantization"):
        quant_format("int3")
    assert awq_variant(128) == AWQ and awq_variant(32).calibrated and awq_variant(32).group(4096) == 32
    for fmt in (INT8, INT4, AWQ, int4_variant(64), int4_variant(32, "awq"), awq_variant(64), awq_variant(32)):
        assert format_of_scheme(fmt.scheme) == fmt
    with pytest.raises(UserError, match="re-run quantize.py"):
        format_of_scheme("int8-rtn-channel")  # an earlier scheme
