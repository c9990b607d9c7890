"""Output-sparse (row-major) up projection for CATS-style MLP sparsity, for decode (M <= 8 rows).

h[m, i] = silu(g[m, i]) * (W_up[i, :] . x[m, :]) where |silu(g[m, i])| > t[i], else 0.
W_up is stored row-major [I, K] so each computed output row is one contiguous read; rows masked off
in every batch row are never loaded. The zeros in h make the down projection's input sparse.
"""
from functools import partial
from typing import Optional

import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import custom_op

from kernels.common import MAX_ROWS, direct, skip


def gate_up_rows_ref(x: Tensor, gate: Tensor, w_up: Tensor, t: Optional[Tensor],
                     active: Optional[Tensor] = None) -> Tensor:
    """Plain-PyTorch reference. x [..., K], gate [..., I], w_up [I, K], t [I] or None (dense)."""
    a = F.silu(gate)
    h = a * (x @ w_up.t())
    if t is None:
        return h
    keep = a.abs() > t
    if active is not None:
        keep = keep | ~active[:, None]
    return h * keep


@triton.jit
def _gate_up_rows_kernel(
    x_ptr, g_ptr, w_ptr, t_ptr, h_ptr, M, K, I, stride_xm, stride_gm, stride_wi, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)  # [BM]
    row_ok = rows < M
    outs = pid * BLOCK_I + tl.arange(0, BLOCK_I)  # [BI]
    out_ok = outs < I
    mask = row_ok[:, None] & out_ok[None, :]
    dt = h_ptr.dtype.element_ty
    g = tl.load(g_ptr + rows[:, None] * stride_gm + outs[None, :], mask=mask, other=0.0).to(tl.float32)
    a = (g * tl.sigmoid(g)).to(dt).to(tl.float32)  # [BM, BI]
    t = tl.load(t_ptr + outs, mask=out_ok, other=float("inf"))
    keep = (tl.abs(a) > t[None, :]) & mask
    need = tl.max(keep.to(tl.int32), axis=0) > 0  # [BI]: some batch row needs output row i

    acc = tl.zeros((BLOCK_M, BLOCK_I, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)  # [BM, BK]
        w = tl.load(w_ptr + outs[:, None] * stride_wi + ks[None, :], mask=need[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)  # [BI, BK]
        acc += x[:, None, :] * w[None, :, :]
    up = tl.sum(acc, axis=2).to(dt).to(tl.float32)  # [BM, BI]
    h = tl.where(keep, (a * up).to(dt), 0.0)
    tl.store(h_ptr + rows[:, None] * stride_hm + outs[None, :], h.to(dt), mask=mask)


def default_config(M: int) -> tuple:
    """(BLOCK_I, BLOCK_K, num_warps)."""
    return (16, 256, 4) if M == 1 else (8, 128, 4)


def launch(x: Tensor, gate: Tensor, w_up: Tensor, t: Tensor, config, out: Tensor, wrap=direct):
    M, K = x.shape
    I = w_up.shape[0]
    block_i, block_k, warps = config
    assert 1 <= M <= MAX_ROWS and w_up.shape[1] == K and gate.shape == (M, I) and t.shape == (I,)
    assert x.stride(1) == 1 and gate.stride(1) == 1 and w_up.stride(1) == 1
    wrap(_gate_up_rows_kernel)[(triton.cdiv(I, block_i),)](
        x, gate, w_up, t, out, M, K, I, x.stride(0), gate.stride(0), w_up.stride(0), out.stride(0),
        BLOCK_M=triton.next_power_of_2(M), BLOCK_I=block_i, BLOCK_K=block_k, num_warps=warps,
    )
    return out


def _rows(wrap, x, gate, w_up, t, config):
    return launch(x, gate, w_up, t, config, x.new_empty((x.shape[0], w_up.shape[0])), wrap=wrap)


@custom_op("teal::gate_up_rows", mutates_args=())  # opaque to torch.compile: see sparse_gemv.py
def _gate_up_rows_op(x: Tensor, gate: Tensor, w_up: Tensor, t: Tensor, config: list[int]) -> Tensor:
    return _rows(direct, x, gate, w_up, t, config)


_gate_up_rows_op.register_fake(partial(_rows, skip))


def gate_up_rows(x: Tensor, gate: Tensor, w_up: Tensor, t: Tensor, config) -> Tensor:
    """x [M, K], gate [M, I], w_up [I, K] row-major, t [I] float32 -> h [M, I]."""
    return _gate_up_rows_op(x, gate, w_up, t, list(config))
