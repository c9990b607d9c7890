"""The decode plan: how each call of a forward pass runs, decided once and read by every module.

A plan is a frozen value made from the device, the weights' format and the user's flags (`decode_plan`); the model
holds it (`Transformer.set_plan`, which also sizes each projection's launch configs for it) and every module asks it
instead of keeping flags of its own:
- `projection(rows, sparse, active)`: a projection call runs on the Triton kernels ("kernel"), or on the PyTorch
  reference path with its thresholds ("sparse") or without ("dense": x @ W, cuBLAS on a GPU);
- `attention(rows, seq, active)`: one-token steps through the decode-attention kernel;
- `defers(...)`: q/k/v and gate/up hand their split-K partials to the kernel that reads them;
- `fused_mlp(...)`: the whole MLP of one token in one launch;
- `hopper_int4`: batch-1 int4 projections (all four) run the Gluon kernel (kernels/gluon_gemv.py) on sm_90;
  `hopper_mma`: of them those whose shapes it takes on tensor cores (kernels/gluon_mma.py; their weights are then held
  in its column order, which the other paths read with their scales in the same order);
- `masked_stream`: every batch-1 16/8-bit projection (and the one-launch MLP's gate/up) skips the kept-row list and
  streams its rows in order, loading a row only where its input passes (kernels/stream.py, _masked_stream); off by
  default, where the launch configs take it for 16-bit o alone (docs/perf-notes.md, session 29);
- `nvrtc_arch`: batch-1 16-bit dense decode steps run the CUDA C++ kernel of kernels/cuda_gemv.py, compiled with
  NVRTC for this compute capability (90: sm_90; 0: off), in place of cuBLAS, norms fused, gate/up gated by down's
  launch; `nvrtc_sparse`: sparse steps too, in place of the Triton kernels, `nvrtc_int8`: int8 weights' steps too
  (both with it by default: +3 to +6% end to end at 50% on an H100 and an H200, docs/perf-notes.md session 33);
  at level 0 (`zero_level`) int8 steps, which stay on the sparse route (their weights have no dense one), call it
  without thresholds: its dense mode streams every row without a kept list (+12% over Triton's int8 kernel on an
  H100, session 36); `nvrtc_int4`: int4 weights' steps too (the kernel's tensor-core mode; off by default: slower than
  the Gluon kernels on an H100, 360 against 506 tok/s at 50% for Llama-2-7B, docs/perf-notes.md session 44);
- `sparse_decode`: decode steps apply the thresholds (False: dense decode through the NVRTC kernel or cuBLAS, which
  beat a Triton kernel at zero thresholds for 16-bit weights; quantized weights always take the kernels: Triton's,
  or for int8 on sm_90 the NVRTC one);
- `nvrtc_attention`: one-token attention after an NVRTC q/k/v runs kernels/cuda_attention.py (on with the NVRTC
  projections by default; the model takes it for every head shape `cuda_attention.supported`: +1% end to end at
  50% for GQA models, +1.7% / +4.6% for Llama-2-7B bf16 / int8 on an H100, session 41; +4.5% at long context, 43);
- `attention_pdl`: that attention launched under PDL, the q/k/v launch triggering it (3, the default with it: at
  q/k/v's start; 4: once q/k/v's rows are streamed; `Attention.attention_trigger` applies it where q/k/v's tail
  leaves no global partials and `cuda_attention.pdl_pays`): +0.2–0.9% end to end on an H100, session 42 (GQA over
  a long cache lost 3.4%: plain there, session 43).
Capturing activations (sparsity.input_hooks) runs under `materialised()`, the same plan with every projection's
input and output materialised.
"""
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from errors import UserError
from kernels import cuda_gemv
from kernels.common import INTERPRETED, MAX_ROWS
from kernels.formats import FLOAT, INT4, INT8, QuantFormat


@dataclass(frozen=True)
class DecodePlan:
    kernels: bool = False  # decode-sized projection calls (<= MAX_ROWS token rows) through the Triton kernels
    n_sm: int = 0  # multiprocessors the launch configs are sized for
    fuse_norm: bool = True  # RMSNorm inside the q/k/v and gate/up kernels, from the previous residual add's sums
    attention_kernel: bool = True  # RoPE, cache write and attention of one-token steps in one kernel
    defer_reduction: bool = True  # q/k/v and gate/up leave their split-K partials to the attention and down kernels
    fuse_mlp: bool = True  # batch 1, norm fused, 16-bit weights: gate/up and down in one launch
    sparse_decode: bool = True  # decode steps apply thresholds (False: dense decode, NVRTC kernel or cuBLAS)
    quantized: bool = False  # the sparse linears hold quantized weights (they then always decode on the kernels)
    hopper_int4: bool = False  # batch-1 int4 projections through the Gluon kernel (sm_90 only)
    hopper_mma: bool = False  # ... on tensor cores where the shape allows (kernels/gluon_mma.py)
    masked_stream: bool = False  # every batch-1 16/8-bit projection streams with masked loads, no kept list
    nvrtc_arch: int = 0  # batch-1 16-bit dense projections through kernels/cuda_gemv.py built for this sm (0: off)
    nvrtc_sparse: bool = False  # ... sparse ones too (decode_plan: wherever nvrtc_arch is set, unless told)
    nvrtc_int8: bool = False  # ... and int8 weights' (dense and sparse; the LM head stays on Triton; as nvrtc_sparse)
    nvrtc_int4: bool = False  # ... and int4 weights' (on tensor cores; in place of the Gluon kernels)
    zero_level: bool = False  # decoding at sparsity 0 (at_level): the NVRTC kernel runs without thresholds
    nvrtc_attention: bool = False  # one-token attention after an NVRTC q/k/v through kernels/cuda_attention.py
    attention_pdl: int = 0  # ... under PDL, q/k/v triggering it at its start (3: decode_plan's default) or rows' end (4)

    def projection(self, rows: int, sparse: bool, active: Optional[Tensor]) -> str:
        """"kernel", "sparse" (reference path, thresholds applied) or "dense" (reference path, x @ W) for a call
        with `rows` token rows; `active` marks positions that keep dense inputs (partial prefill sparsity)."""
        if not sparse:
            return "dense"
        return "kernel" if self.kernels and active is None and rows <= MAX_ROWS else "sparse"

    def cuda(self, rows: int, sparse: bool, active: Optional[Tensor]) -> bool:
        """Whether a call of `rows` token rows may run kernels/cuda_gemv.py (its module decides on shape and dtype)."""
        return (self.nvrtc_arch > 0 and rows == 1 and active is None
                and ((self.nvrtc_int8 or self.nvrtc_int4) if self.quantized else self.nvrtc_sparse or not sparse))

    def nvrtc_weights(self, fmt: QuantFormat) -> bool:
        """Whether weights stored in `fmt` may take kernels/cuda_gemv.py on this plan: 16-bit ones wherever
        nvrtc_arch is set, int8 ones with nvrtc_int8, int4 ones with nvrtc_int4 (mma.sync: sm_80 and later)."""
        return self.nvrtc_arch > 0 and {FLOAT.code: True, INT8.code: self.nvrtc_int8,
                                        INT4.code: self.nvrtc_int4 and self.nvrtc_arch >= 80}[fmt.code]

    def cuda_thresholds(self, sparse: bool) -> bool:
        """Whether a call on kernels/cuda_gemv.py applies thresholds: not at level 0, where they are zero (exactly
        dense) and its dense mode streams every row without building a kept list."""
        return sparse and not self.zero_level

    def attention(self, rows: int, seq: int, active: Optional[Tensor]) -> bool:
        return self.kernels and self.attention_kernel and seq == 1 and active is None and rows <= MAX_ROWS

    def defers(self, rows: int, sparse: bool, active: Optional[Tensor]) -> bool:
        return self.defer_reduction and self.projection(rows, sparse, active) == "kernel"

    def fused_mlp(self, rows: int, sparse: bool, active: Optional[Tensor]) -> bool:
        return (self.fuse_mlp and self.fuse_norm and not self.quantized and rows == 1
                and self.projection(rows, sparse, active) == "kernel")

    def materialised(self) -> "DecodePlan":
        """This plan with every projection's input and output materialised (for activation hooks): the same values."""
        return replace(self, defer_reduction=False, fuse_mlp=False)

    def at_level(self, sparsity: float) -> "DecodePlan":
        """The plan for decoding at `sparsity`: dense 16-bit weights decode densely at 0 (the NVRTC kernel or
        cuBLAS), as that is faster there than a sparse kernel at zero thresholds; quantized weights decode on the
        kernels (zero thresholds are exactly dense; the NVRTC kernel then takes none: `cuda_thresholds`)."""
        return replace(self, sparse_decode=sparsity > 0 or self.quantized, zero_level=sparsity <= 0)


REFERENCE = DecodePlan()  # no kernels: the PyTorch reference path (CPU, and every model until set_plan)


def n_sm_of(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # Triton's CPU interpreter (tests): a few "SMs" keep the launch configs small


def decode_plan(device: torch.device, fmt: QuantFormat = FLOAT, sparsity: float = 0.0,
                kernels: Optional[bool] = None, n_sm: Optional[int] = None, **flags) -> DecodePlan:
    """The plan for a model on `device` with weights in `fmt`, decoding at `sparsity`: the Triton kernels on CUDA, the
    reference path elsewhere. `flags`: fuse_norm, attention_kernel, defer_reduction, fuse_mlp, hopper_int4,
    hopper_mma (ablations; all on by default, the last two where the GPU is sm_90), masked_stream (off), nvrtc
    (dense batch-1 16-bit steps through kernels/cuda_gemv.py; default: on sm_90 where libnvrtc is found; True
    insists), nvrtc_sparse (sparse steps too) and nvrtc_int8 (int8 weights' projections) (default: with nvrtc),
    nvrtc_int4 (int4 weights' projections; default off; True insists on the NVRTC kernels),
    nvrtc_attention (one-token attention on kernels/cuda_attention.py after q/k/v on the NVRTC kernel; default:
    with the NVRTC projections; True insists), attention_pdl (that attention under PDL: 3 by default with it, 4, or
    0 for plain launches).
    kernels=True takes the kernels on a CPU
    too: in Triton's CPU interpreter (tests), or, with `n_sm`, to build a GPU's launches without running them
    (scripts/sm90.py). Transformer.set_plan fits the plan to the model's weights and heads."""
    if kernels is None:
        kernels = device.type == "cuda"
    elif kernels and device.type != "cuda" and not INTERPRETED and n_sm is None:
        raise UserError("the Triton kernels need a CUDA device; the reference path serves CPU")
    if "hopper_int4" not in flags:
        flags["hopper_int4"] = kernels and device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
    flags.setdefault("hopper_mma", flags["hopper_int4"])
    nvrtc = flags.pop("nvrtc", None)
    on_gpu = kernels and device.type == "cuda"
    asked = flags.get("nvrtc_sparse") or flags.get("nvrtc_int8") or flags.get("nvrtc_int4")
    usable = nvrtc is not False or asked  # (a trial build, once per process, where asked)
    usable = usable and on_gpu and cuda_gemv.usable(torch.cuda.current_device() if device.index is None
                                                    else device.index)
    if nvrtc is None:
        nvrtc = usable and torch.cuda.get_device_capability(device) == (9, 0)
    for flag in ("nvrtc_sparse", "nvrtc_int8"):  # sparse steps and int8 weights follow the dense route unless told
        if flags.get(flag) is None:
            flags[flag] = bool(nvrtc)
    flags["nvrtc_int4"] = bool(flags.get("nvrtc_int4"))
    if nvrtc or asked:
        if not usable:
            raise UserError("the NVRTC kernels need a CUDA GPU and libnvrtc (it comes with torch's CUDA wheels)")
        major, minor = torch.cuda.get_device_capability(device)
        flags["nvrtc_arch"] = 10 * major + minor
    if flags.get("nvrtc_attention") is None:
        flags["nvrtc_attention"] = flags.get("nvrtc_arch", 0) >= 90
    elif flags["nvrtc_attention"] and flags.get("nvrtc_arch", 0) < 90:
        raise UserError("the NVRTC attention needs the NVRTC projections on an sm_90 GPU (thread-block clusters)")
    if flags.get("attention_pdl") is None:  # measured +0.2 to +0.9% end to end on the H100 (docs/perf-notes.md)
        flags["attention_pdl"] = 3 if flags["nvrtc_attention"] else 0
    elif flags["attention_pdl"] and not flags["nvrtc_attention"]:
        raise UserError("--attention-pdl applies to the NVRTC attention")
    if flags["attention_pdl"] not in (0, 3, 4):
        raise UserError("--attention-pdl takes 3 (q/k/v triggers at its start) or 4 (once its rows are streamed)")
    plan = DecodePlan(kernels=kernels, n_sm=n_sm or (n_sm_of(device) if kernels else 0), quantized=fmt.quantized,
                      **flags)
    return plan.at_level(sparsity)
