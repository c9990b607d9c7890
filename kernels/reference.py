"""Plain-PyTorch references of the input-sparse GEMV family (sparse_gemv.py, sparse_gemv_batch.py, sparse_mlp.py):
what each kernel computes, rounded where the kernels round. The model's reference path (CPU, prefill, batches over
MAX_ROWS) runs these too.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.formats import FLOAT, QuantFormat


def sparsify(x: Tensor, t: Tensor, active: Optional[Tensor] = None) -> Tensor:
    """x [..., S, K] with entries |x_i| <= t_i set to zero; rows where `active` [S] is False stay dense."""
    keep = x.abs() > t
    if active is not None:
        keep = keep | ~active[:, None]
    return x * keep


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm in fp32, rounded to x's dtype, then scaled (the model's RMSNorm)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def matmul_ref(x: Tensor, w: Tensor, fmt: QuantFormat = FLOAT, scale: Optional[Tensor] = None) -> Tensor:
    """x @ w of weights in format `fmt`: quantized ones are dequantized (int8: (x @ q) * scale, the same sum), summed
    in float32 and rounded once, as the kernels do."""
    if not fmt.quantized:
        return x @ w
    if fmt.code == 1:  # per-column scales: applied to the sums, as the kernels do
        return ((x.float() @ w.float()) * scale).to(x.dtype)
    return (x.float() @ fmt.dequantize(w, scale)).to(x.dtype)


def sparse_gemv_ref(x: Tensor, w: Tensor, t: Optional[Tensor], sizes, glu: bool = False,
                    residual: Optional[Tensor] = None, active: Optional[Tensor] = None,
                    norm_weight: Optional[Tensor] = None, eps: float = 1e-5, fmt: QuantFormat = FLOAT,
                    scale: Optional[Tensor] = None) -> Tensor:
    """Plain-PyTorch reference. x [..., K], w [K, N], t [len(sizes), K] or None (dense); with norm_weight
    the input is RMS-normalised first. Quantized weights (fmt, kernels/formats.py) come with their scales."""
    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, eps)
    if t is None:
        y = matmul_ref(x, w, fmt, scale)
    else:
        parts = w.split([s // fmt.per_word for s in sizes], dim=1)
        scales = scale.split(list(sizes), dim=-1) if scale is not None else [None] * len(parts)
        y = torch.cat([matmul_ref(sparsify(x, t[j], active), p, fmt, scales[j]) for j, p in enumerate(parts)], dim=-1)
    if glu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    if residual is not None:
        y = residual + y
    return y


def sparse_mlp_ref(x: Tensor, w: Tensor, t: Tensor, w_down: Tensor, t_down: Tensor,
                   norm_weight: Optional[Tensor] = None, eps: float = 1e-5, fmt: QuantFormat = FLOAT,
                   scale: Optional[Tensor] = None, scale_down: Optional[Tensor] = None) -> Tensor:
    """x + down(silu(gate) * up) of the (RMS-normalised) input, all three projections input-sparse: what
    sparse_mlp computes. x [.., D], w [D, 2I], t [2, D], w_down [I, D], t_down [1, I]."""
    I = w_down.shape[0]
    xn = rms_norm_ref(x, norm_weight, eps) if norm_weight is not None else x
    h = sparse_gemv_ref(xn, w, t, (I, I), glu=True, fmt=fmt, scale=scale)
    return sparse_gemv_ref(h, w_down, t_down, (w_down.shape[1],), residual=x, fmt=fmt, scale=scale_down)


def sum_squares_ref(y: Tensor, block_n: int) -> Tensor:
    """y [M, N] -> [M, cdiv(N, block_n)] fp32 sums of squares over column tiles (what `ss_out` holds)."""
    return torch.stack([c.float().pow(2).sum(-1) for c in y.split(block_n, dim=1)], dim=1)


def parts_ref(parts: Tensor, glu: bool, dtype: torch.dtype) -> Tensor:
    """What a consumer makes of partials [P, H, M, N]: the sums rounded to dtype (silu(gate) * up with glu)."""
    total = parts.sum(0)
    if not glu:
        return total[0].to(dtype)
    gate, up = total[0].to(dtype).float(), total[1].to(dtype).float()
    return (F.silu(gate).to(dtype).float() * up).to(dtype)
