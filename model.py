"""A minimal Llama/Mistral decoder for activation-sparse decoding.

Every linear layer takes its input-sparsity thresholds from buffers: x_i -> 0 when |x_i| <= t_i.
Zero thresholds are exactly dense. Weights of sparse linears are stored input-channel-major
([in, out]) so that a skipped input channel skips one contiguous row of the weight.
"""
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from errors import UserError
from kernels import (configs, cuda_attention, cuda_gemv, decode_attention, gate_up_rows, gluon_gemv, gluon_mma,
                     reference, sparse_gemv, sparse_mlp)
from dataclasses import replace as replace_fields
from kernels.decode_attention import apply_rope
from kernels.formats import FLOAT, INT4, INT8, QuantFormat
from plan import REFERENCE, DecodePlan
from tp import TP, head_rows, share


@dataclass
class ModelArgs:
    arch: str = "llama"  # source architecture: "llama" or "mistral"
    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 0  # 0: same as n_head
    head_dim: int = 0  # 0: dim // n_head
    intermediate_size: int = 11008
    vocab_size: int = 32000
    rope_base: float = 10000.0
    # llama3 scaling: {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: Optional[dict] = None
    rope_freq_factors: Optional[list] = None  # per-frequency divisors, as GGUF's rope_freqs tensor
    norm_eps: float = 1e-5
    sliding_window: Optional[int] = None
    tie_embeddings: bool = False
    max_seq_len: int = 4096

    def __post_init__(self):
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_head
        if self.arch not in ARCHS:
            raise UserError(f"unknown architecture {self.arch!r}; supported: {', '.join(ARCHS)}")
        if self.n_head % self.n_kv_head:
            raise UserError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in CONFIGS:
            raise UserError(f"unknown model config {name!r}; known: {', '.join(CONFIGS)}")
        return cls(**CONFIGS[name])

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        """Our own config.json, or a Hugging Face one (told apart by its field names)."""
        if "hidden_size" in d or "architectures" in d or "model_type" in d:
            return cls.from_hf_config(d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"config has unknown fields {unknown}")
        missing = [k for k in REQUIRED_FIELDS if k not in d]
        if missing:  # the defaults are Llama-2-7B's: a model's shape is never taken from them silently
            raise UserError(f"config is missing {', '.join(missing)}")
        return cls(**d)

    @classmethod
    def from_hf_config(cls, c: dict) -> "ModelArgs":
        archs = c.get("architectures") or []
        arch = HF_ARCHS.get(archs[0] if archs else "", None)
        if arch is None:
            arch = {"llama": "llama", "mistral": "mistral"}.get(c.get("model_type", ""))
        if arch is None:
            what = archs[0] if archs else c.get("model_type", "?")
            raise UserError(f"unsupported architecture {what!r}; supported: {', '.join(HF_ARCHS)}")
        if c.get("attention_bias") or c.get("mlp_bias"):
            raise UserError("linear layers with bias are not supported")
        if c.get("hidden_act", "silu") != "silu":
            raise UserError(f"activation {c['hidden_act']!r} is not supported (only silu)")
        rope = c.get("rope_parameters") or {}  # transformers >= 5 moves rope fields here
        scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind != "llama3":
                raise UserError(f"rope scaling {kind!r} is not supported (only llama3)")
            scaling = {k: scaling[k] for k in LLAMA3_ROPE_KEYS}
        window = c.get("sliding_window") if c.get("use_sliding_window", True) else None
        return cls(
            arch=arch,
            dim=c["hidden_size"],
            n_layer=c["num_hidden_layers"],
            n_head=c["num_attention_heads"],
            n_kv_head=c.get("num_key_value_heads") or c["num_attention_heads"],
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            intermediate_size=c["intermediate_size"],
            vocab_size=c["vocab_size"],
            rope_base=float(c.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rope_scaling=scaling,
            norm_eps=c.get("rms_norm_eps", 1e-5),
            sliding_window=window,
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            max_seq_len=c.get("max_position_embeddings", 4096),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def n_params(self, embeddings: bool = False) -> int:
        per_layer = sum(k * n for k, n in self.linear_shapes().values()) + 2 * self.dim
        head = 0 if (self.tie_embeddings and not embeddings) else self.dim * self.vocab_size
        emb = self.dim * self.vocab_size if embeddings else 0
        return self.n_layer * per_layer + self.dim + head + emb

    def linear_shapes(self) -> dict:
        """(in, out) of each projection of one layer, in the order thresholds are stored."""
        q, kv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        d, i = self.dim, self.intermediate_size
        return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, i), "up": (d, i), "down": (i, d)}


ARCHS = ("llama", "mistral")
REQUIRED_FIELDS = ("dim", "n_layer", "n_head", "intermediate_size", "vocab_size")  # of our own config.json
HF_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_L31 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_SMOL = dict(vocab_size=49152, tie_embeddings=True, max_seq_len=8192)

CONFIGS = {
    "llama-2-7b": dict(dim=4096, n_layer=32, n_head=32, intermediate_size=11008),
    "llama-2-13b": dict(dim=5120, n_layer=40, n_head=40, intermediate_size=13824),
    "llama-2-70b": dict(dim=8192, n_layer=80, n_head=64, n_kv_head=8, intermediate_size=28672),
    "codellama-7b": dict(dim=4096, n_layer=32, n_head=32, intermediate_size=11008, vocab_size=32016,
                         rope_base=1e6, max_seq_len=16384),
    "llama-3-8b": dict(dim=4096, n_layer=32, n_head=32, n_kv_head=8, intermediate_size=14336,
                       vocab_size=128256, rope_base=500000.0, max_seq_len=8192),
    "llama-3-70b": dict(dim=8192, n_layer=80, n_head=64, n_kv_head=8, intermediate_size=28672,
                        vocab_size=128256, rope_base=500000.0, max_seq_len=8192),
    "llama-3.1-8b": dict(dim=4096, n_layer=32, n_head=32, n_kv_head=8, intermediate_size=14336,
                         vocab_size=128256, rope_base=500000.0, rope_scaling=_L31, max_seq_len=131072),
    "llama-3.1-70b": dict(dim=8192, n_layer=80, n_head=64, n_kv_head=8, intermediate_size=28672,
                          vocab_size=128256, rope_base=500000.0, rope_scaling=_L31, max_seq_len=131072),
    "mistral-7b-v0.1": dict(arch="mistral", dim=4096, n_layer=32, n_head=32, n_kv_head=8,
                            intermediate_size=14336, sliding_window=4096, max_seq_len=32768),
    "mistral-7b-v0.2": dict(arch="mistral", dim=4096, n_layer=32, n_head=32, n_kv_head=8,
                            intermediate_size=14336, rope_base=1e6, max_seq_len=32768),
    "mistral-7b-v0.3": dict(arch="mistral", dim=4096, n_layer=32, n_head=32, n_kv_head=8,
                            intermediate_size=14336, vocab_size=32768, rope_base=1e6, max_seq_len=32768),
    "smollm2-135m": dict(dim=576, n_layer=30, n_head=9, n_kv_head=3, intermediate_size=1536,
                         rope_base=100000.0, **_SMOL),
    "smollm2-360m": dict(dim=960, n_layer=32, n_head=15, n_kv_head=5, intermediate_size=2560,
                         rope_base=100000.0, **_SMOL),
    "smollm2-1.7b": dict(dim=2048, n_layer=24, n_head=32, n_kv_head=32, intermediate_size=8192,
                         rope_base=130000.0, **_SMOL),
}


class SparseLinear(nn.Module):
    """y = sparsify(x) @ W for one input shared by several projections (q,k,v or gate,up).

    weight [in, sum(sizes)] is input-channel-major; threshold [len(sizes), in] holds one row per
    output segment. With glu=True there are two equal segments and the result is silu(gate) * up.
    """

    def __init__(self, in_features: int, sizes: tuple, glu: bool = False, head: bool = False, parts: bool = False,
                 tp: Optional[TP] = None):
        super().__init__()
        assert not glu or (len(sizes) == 2 and sizes[0] == sizes[1])
        self.sizes, self.glu = tuple(sizes), glu
        self.tp = tp  # row-parallel (tp.py): this rank holds input channels tp.part(K) of K; outputs summed over ranks
        self.head = head  # the int8 LM head (quantize.py): never thresholded, so the kernel streams every row
        self.parts = parts  # hands its split-K partials on (partial_sums) where the plan defers the reduction
        self.weight = nn.Parameter(torch.empty(in_features, sum(sizes)))
        self.register_buffer("threshold", torch.zeros(len(sizes), in_features), persistent=False)
        self.fmt: QuantFormat = FLOAT  # how the weights are stored (kernels/formats.py); see set_quantized
        self.register_buffer("scale", None)  # quantized weights' scales
        self.register_buffer("input_scale", None)  # AWQ (awq.py): the input is x / input_scale of the source model's
        self.kernel_configs: dict = {}  # padded batch rows -> launch config, sized by prepare(plan)
        self.hopper_config = None  # batch-1 int4 on kernels/gluon_gemv.py's launch config (None: not this shape)
        # batch-1 int4 on tensor cores (kernels/gluon_mma.py): the weights are then held with each tile's
        # columns in that kernel's order, the other paths read them with the scales in the same order (order_scale)
        # and put their outputs back in column order (order_inv: each column's position)
        self.mma_config = None
        self.cuda_config = None  # batch-1 16-bit through kernels/cuda_gemv.py (None: not this shape or plan)
        self.register_buffer("order_scale", None, persistent=False)
        self.register_buffer("order_perm", None, persistent=False)  # the column at each position
        self.register_buffer("order_inv", None, persistent=False)

    def set_quantized(self, fmt: QuantFormat, q: Tensor, scale: Tensor):
        """Hold weights q in format `fmt` with their scales (kernels/formats.py); the scales join the state dict."""
        K, N = self.in_features, self.out_features
        assert fmt.quantized and q.shape == fmt.stored_shape(K, N)
        fmt.check(q, scale)
        self.fmt = fmt
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("scale", scale)
        self._in_order(None)  # q is in column order

    def _hold_in_mma_order(self, wb: int):
        self.weight.data = gluon_mma.to_mma_layout(self.weight.data, wb)
        self._in_order(gluon_mma.mma_order(self.out_features, wb, self.weight.device))

    def _in_order(self, perm: Optional[Tensor]):
        """The weights are held with column perm[p] at position p from now on (None: in column order)."""
        self.order_perm = perm
        self.order_scale = None if perm is None else self.scale[..., perm].contiguous()
        self.order_inv = None if perm is None else torch.argsort(perm)
        if perm is None:
            self.mma_config = None

    def _in_column_order(self, y: Tensor) -> Tensor:
        """y [..., n] of a launch or the reference path on the held weights -> its columns in order (n: all
        columns, or one of two GLU halves: tiles never straddle them, so a half's order is the first half's)."""
        return y if self.order_inv is None else y[..., self.order_inv[: y.shape[-1]]]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.mma_config is not None:  # files hold the column order
            destination[prefix + "weight"] = gluon_mma.from_mma_layout(self.weight.detach(), self.mma_config.wb)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._in_order(None)  # loaded weights are in column order

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    def float_weight(self) -> Tensor:
        """The weights as float32 [K, N] in column order (quantized ones dequantized)."""
        if not self.fmt.quantized:
            return self.weight.float()
        w = self.weight if self.mma_config is None else gluon_mma.from_mma_layout(self.weight, self.mma_config.wb)
        return self.fmt.dequantize(w, self.scale)

    @property
    def out_features(self) -> int:
        return sum(self.sizes)

    def prepare(self, plan: DecodePlan):
        """The launch configs (by padded batch rows) and split-K counters of the kernels `plan` runs."""
        if not plan.kernels:
            return
        K = self.in_features
        group = self.fmt.group_of(self.weight, self.scale)
        self.kernel_configs = {m: configs.default_config(m, K, self.sizes, self.glu, plan.n_sm, self.fmt, self.head,
                                                         group) for m in (1, 2, 4, 8)}
        if plan.masked_stream and not group and not self.head:
            self.kernel_configs[1] = self.kernel_configs[1]._replace(masked=1)
        act = self.weight.dtype if not self.fmt.quantized else torch.bfloat16  # (quantized: checked per call)
        on_nvrtc = plan.nvrtc_weights(self.fmt) and not self.head and cuda_gemv.supported(K, self.sizes, act, group)
        if self.fmt.code == INT4.code and not self.head:
            self.hopper_config = gluon_gemv.default_config(K, self.sizes, group, plan.n_sm)
            if on_nvrtc and self.mma_config is not None:  # the NVRTC kernel reads the weights in column order
                self.weight.data = gluon_mma.from_mma_layout(self.weight.data, self.mma_config.wb)
                self._in_order(None)
            elif self.mma_config is not None:  # held in its order since an earlier plan: configs for this one
                self.mma_config = gluon_mma.default_config(K, self.sizes, group, plan.n_sm)
            elif plan.hopper_mma and not on_nvrtc and (plan.defer_reduction or not self.parts):  # (o, down: all)
                self.mma_config = gluon_mma.default_config(K, self.sizes, group, plan.n_sm)
                if self.mma_config is not None:
                    self._hold_in_mma_order(self.mma_config.wb)
        n = max(configs.counters_size(self.sizes, self.glu, c[0]) for c in self.kernel_configs.values())
        if self.hopper_config is not None:
            n = max(n, sum(self.sizes) // self.hopper_config.block_n)
        self.cuda_config = None
        if on_nvrtc:
            self.cuda_config = cuda_gemv.default_config(K, self.sizes, plan.n_sm, plan.nvrtc_arch // 10,
                                                        self.fmt.code == INT8.code, group)
            n = max(n, self.out_features // cuda_gemv.COLS)
        self.register_buffer("counters", torch.zeros(n, dtype=torch.int32, device=self.weight.device),
                             persistent=False)

    def forward(self, x: Tensor, sparse: bool = True, active: Optional[Tensor] = None,
                residual: Optional[Tensor] = None, norm: Optional["RMSNorm"] = None, ss: Optional[Tensor] = None,
                plan: DecodePlan = REFERENCE):
        """x [B, S, K] -> y [B, S, N]. With `norm`, x is the residual stream and is RMS-normalised first:
        inside the kernel when `ss` holds its per-tile sums of squares (from the launch that produced it).
        With a residual, returns (residual + y, its sums of squares [B*S, n_tiles] or None off the kernel path).
        x may also be gate/up partials [P, 2, B*S, K] (`partial_sums` of a glu projection, kernel path only;
        the residual gives B and S). `plan` says how the call runs (kernel, or reference path with or without
        thresholds). Row-parallel (tp): each rank's partial product, the residual added on rank 0 only, summed
        over the ranks (no launch sees the sum: its sums of squares are None)."""
        if self.tp is None or residual is None:
            return self._forward(x, sparse, active, residual, norm, ss, plan)
        part = residual if self.tp.rank == 0 else torch.zeros_like(residual)
        return self.tp.all_reduce(self._forward(x, sparse, active, part, norm, ss, plan)[0]), None

    def _forward(self, x: Tensor, sparse: bool, active: Optional[Tensor], residual: Optional[Tensor],
                 norm: Optional["RMSNorm"], ss: Optional[Tensor], plan: DecodePlan):
        B, S = (residual.shape[:2] if x.dim() == 4 else x.shape[:2])
        K = x.shape[-1]
        if not self.glu and self.on_cuda(plan, B * S, sparse, active, x):
            y = self.cuda(x, sparse, plan, norm=norm, residual=residual)
            return y if residual is None else (y, None)
        route = plan.projection(B * S, sparse, active)
        if route == "kernel":
            cfg = self.kernel_configs[next_pow2(B * S)]
            x = x.view(B * S, K) if x.dim() == 3 else x
            x, nw, ss_in, eps = self._kernel_input(x, norm, ss, plan)
            if residual is None:
                y = sparse_gemv.sparse_gemv(x, self.weight, self.threshold, self.sizes, self.counters, cfg,
                                            glu=self.glu, norm_weight=nw, ss_in=ss_in, eps=eps, fmt=self.fmt,
                                            scale=self.scale if self.order_scale is None else self.order_scale)
                return self._in_column_order(y).view(B, S, -1)
            if self._on_hopper(plan, B * S, residual) and nw is None:
                launch, hcfg = ((gluon_gemv.int4_residual, self.hopper_config) if self.mma_config is None
                                else (gluon_mma.int4_residual, self.mma_config))
                y, ss_out = launch(x, self.weight, self.threshold, self.sizes, hcfg, self.scale, self.counters,
                                   residual.view(1, -1))
                return y.view(B, S, -1), ss_out
            if self.order_inv is not None:  # the residual added in the weights' order, the sums of squares unchanged
                residual = residual[..., self.order_perm]
            y, ss_out = sparse_gemv.sparse_gemv_ss(x, self.weight, self.threshold, self.sizes, self.counters, cfg,
                                                   residual.reshape(B * S, -1), norm_weight=nw, ss_in=ss_in, eps=eps,
                                                   fmt=self.fmt,
                                                   scale=self.scale if self.order_scale is None else self.order_scale)
            return self._in_column_order(y).view(B, S, -1), ss_out
        assert x.dim() == 3, "partial sums exist only on the kernel path"
        if norm is not None:
            x = norm(x)
        if self.order_inv is not None:
            y = reference.sparse_gemv_ref(x, self.weight, self.threshold if route == "sparse" else None, self.sizes,
                                          glu=self.glu, active=active, fmt=self.fmt, scale=self.order_scale)
            y = self._in_column_order(y)
            return y if residual is None else (residual + y, None)
        y = reference.sparse_gemv_ref(x, self.weight, self.threshold if route == "sparse" else None, self.sizes,
                                      glu=self.glu, residual=residual, active=active, fmt=self.fmt, scale=self.scale)
        return y if residual is None else (y, None)

    def partial_sums(self, x: Tensor, norm: Optional["RMSNorm"], ss: Optional[Tensor], plan: DecodePlan) -> Tensor:
        """Kernel path only (plan.defers): x [B, S, K] -> the split-K partial sums [P, 2 if glu else 1, B*S, N]
        float32 for a consuming kernel to add up (no GLU applied yet); `norm` and `ss` as in forward."""
        B, S, K = x.shape
        x, nw, ss_in, eps = self._kernel_input(x.view(B * S, K), norm, ss, plan)
        if self.mma_config is not None and self._on_hopper(plan, B * S, x):
            return gluon_mma.int4_parts(x, self.weight, self.threshold, self.sizes, self.mma_config, self.scale,
                                        glu=self.glu, norm_weight=nw, ss_in=ss_in, eps=eps)
        if self.mma_config is None and self._on_hopper(plan, B * S, x):
            return gluon_gemv.int4_parts(x, self.weight, self.threshold, self.sizes, self.hopper_config, self.scale,
                                         glu=self.glu, norm_weight=nw, ss_in=ss_in, eps=eps)
        parts = sparse_gemv.sparse_gemv_parts(x, self.weight, self.threshold, self.sizes,
                                              self.kernel_configs[next_pow2(B * S)], glu=self.glu, norm_weight=nw,
                                              ss_in=ss_in, eps=eps, fmt=self.fmt,
                                              scale=self.scale if self.order_scale is None else self.order_scale)
        return self._in_column_order(parts)

    def on_cuda(self, plan: DecodePlan, rows: int, sparse: bool, active: Optional[Tensor], x: Tensor) -> bool:
        """Whether a call with input x [B, S, K] runs kernels/cuda_gemv.py (plan.cuda; shapes it takes)."""
        return x.dim() == 3 and self.takes_cuda(plan, rows, sparse, active, x.dtype)

    def takes_cuda(self, plan: DecodePlan, rows: int, sparse: bool, active: Optional[Tensor],
                   dtype: torch.dtype) -> bool:
        """The same for activations of `dtype` (what a step of that dtype runs: bench.py's records name it)."""
        return (self.cuda_config is not None and plan.cuda(rows, sparse, active)
                and (dtype == self.weight.dtype or self.fmt.quantized and dtype.itemsize == 2))

    def cuda(self, x: Tensor, sparse: bool, plan: DecodePlan, norm: Optional["RMSNorm"] = None,
             residual: Optional[Tensor] = None, glu_in: bool = False, trigger: int = 0) -> Tensor:
        """One token through kernels/cuda_gemv.py: x [1, 1, K] (gate/up's outputs [1, 1, 2K] with glu_in: gated in the
        launch), normalised there by `norm`, thresholds applied when `sparse` (and not at level 0: plan.cuda_thresholds)
        -> [1, 1, N] (+ residual). A glu projection returns gate and up un-gated (its consumer gates them). trigger:
        the next launch (under PDL) triggered at this one's start (3) or once its rows are streamed (4)."""
        t = self.threshold if plan.cuda_thresholds(sparse) else None
        cfg = self.cuda_config._replace(pdl=trigger) if trigger else self.cuda_config
        y = cuda_gemv.cuda_gemv(x.reshape(-1), self.weight, t, self.sizes,
                                self.counters, cfg, norm_weight=None if norm is None else norm.weight,
                                eps=1e-5 if norm is None else norm.eps, glu_in=glu_in, scale=self.scale,
                                residual=None if residual is None else residual.reshape(-1))
        return y.view(1, 1, -1)

    def _on_hopper(self, plan: DecodePlan, rows: int, like: Tensor) -> bool:
        """Batch-1 int4 through the Gluon kernels (sm_90: kernels/gluon_mma.py where the weights are held in its order,
        else kernels/gluon_gemv.py), for shapes they take and 16-bit activations (`like`: the input, or the residual
        stream when the input is gate/up's partials)."""
        return (plan.hopper_int4 and rows == 1 and (self.hopper_config, self.mma_config) != (None, None)
                and like.element_size() == 2)

    def _kernel_input(self, x: Tensor, norm: Optional["RMSNorm"], ss: Optional[Tensor], plan: DecodePlan):
        """(x, norm weight, sums of squares, eps) for a launch: the norm runs in the kernel when it can."""
        if norm is not None and (ss is None or not plan.fuse_norm):
            x, norm = norm(x), None
        if norm is None:
            return x, None, None, 1e-5
        return x, norm.weight, ss, norm.eps


class RowSparseUp(nn.Module):
    """CATS-style up projection: only rows whose |silu(gate)| passes the threshold are computed.

    weight [intermediate, dim] is row-major (one output row contiguous); returns silu(gate) * up, zero
    wherever the mask is off, which the down projection then sees as a sparse input.
    """

    def __init__(self, dim: int, intermediate_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(intermediate_size, dim))
        self.register_buffer("threshold", torch.zeros(1, intermediate_size), persistent=False)
        self.kernel_configs: dict = {}

    def prepare(self, plan: DecodePlan):
        if plan.kernels:
            self.kernel_configs = {m: gate_up_rows.default_config(m) for m in (1, 2, 4, 8)}

    def forward(self, x: Tensor, gate: Tensor, sparse: bool = True, active: Optional[Tensor] = None,
                plan: DecodePlan = REFERENCE) -> Tensor:
        B, S, K = x.shape
        if plan.projection(B * S, sparse, active) == "kernel":
            cfg = self.kernel_configs[next_pow2(B * S)]
            h = gate_up_rows.gate_up_rows(x.view(B * S, K), gate.view(B * S, -1), self.weight, self.threshold[0], cfg)
            return h.view(B, S, -1)
        return gate_up_rows.gate_up_rows_ref(x, gate, self.weight, self.threshold[0] if sparse else None, active)


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


class KVCache(nn.Module):
    def __init__(self, batch: int, seq: int, n_kv_head: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch, n_kv_head, seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)
        # per (batch row, kv head) split counters of the decode-attention kernel; it leaves them at zero
        self.register_buffer("counters", torch.zeros(batch * n_kv_head, dtype=torch.int32), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor):
        # input_pos [S]; k, v [B, H_kv, S, D]
        B = k.shape[0]
        self.k[:B, :, input_pos] = k
        self.v[:B, :, input_pos] = v
        return self.k[:B], self.v[:B]


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, tp: Optional[TP] = None):
        super().__init__()
        # each rank its query heads and their KV heads
        self.n_head, self.n_kv_head, self.head_dim = share(tp, a.n_head), share(tp, a.n_kv_head), a.head_dim
        q, kv = self.n_head * a.head_dim, self.n_kv_head * a.head_dim
        self.wqkv = SparseLinear(a.dim, (q, kv, kv), parts=True)
        self.wo = SparseLinear(q, (a.dim,), tp=tp)
        self.kv_cache: Optional[KVCache] = None
        self.window = a.sliding_window

    def takes_nvrtc_attention(self, plan: DecodePlan) -> bool:
        """Whether its one-token steps after an NVRTC q/k/v run kernels/cuda_attention.py: plan.nvrtc_attention, for
        heads that kernel takes (at every measured span it is the shorter launch: docs/perf-notes.md, session 43)."""
        return plan.nvrtc_attention and cuda_attention.supported(self.n_head, self.n_kv_head, self.head_dim)

    def attention_trigger(self, plan: DecodePlan) -> int:
        """The q/k/v launch's PDL trigger (cuda_gemv Config.pdl 3 or 4) before an NVRTC attention launched under PDL,
        which reads its first cached positions while q/k/v streams; 0: both launched plainly. Only after a q/k/v
        launch without global partials (memory it frees could be the attention's before that has finished), and
        where PDL pays for these heads and splits (cuda_attention.pdl_pays)."""
        cfg, T = self.wqkv.cuda_config, self.kv_cache.k.shape[2]
        eligible = (cfg is not None and (cfg.cluster or cfg.split == 1) and self.takes_nvrtc_attention(plan)
                    and cuda_attention.pdl_pays(self.n_head, self.n_kv_head, decode_attention.n_splits(T, self.window)))
        return plan.attention_pdl if eligible else 0

    def forward(self, x: Tensor, ss: Optional[Tensor], norm: "RMSNorm", rope: Tensor, mask: Tensor,
                input_pos: Tensor, sparse: bool, active: Optional[Tensor], plan: DecodePlan) -> tuple:
        """x [B, S, dim] the residual stream (normalised by `norm` inside the q/k/v projection; ss: its sums
        of squares, if known) -> (x + attention, its sums of squares or None)."""
        B, S, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        c = self.kv_cache
        if c is not None and plan.attention(B, S, active):  # one-token steps: kernels/decode_attention.py
            if self.wqkv.on_cuda(plan, B * S, sparse, active, x):
                pdl = self.attention_trigger(plan)
                qkv = self.wqkv.cuda(x, sparse, plan, norm=norm, trigger=pdl).view(B, -1)
                if self.takes_nvrtc_attention(plan):
                    y = cuda_attention.cuda_attention(qkv, rope, c.k, c.v, input_pos, c.counters, H, self.window,
                                                      pdl=pdl > 0)
                    return self.wo(y.view(B, S, H * D), sparse, active, residual=x, plan=plan)
            elif plan.defers(B, sparse, active):
                # the attention kernel sums q/k/v's split-K partials as it loads them: no reduction tail here
                qkv = self.wqkv.partial_sums(x, norm, ss, plan)[:, 0]  # [P, B, (H + 2 Hkv) D] float32
            else:
                qkv = self.wqkv(x, sparse, active, norm=norm, ss=ss, plan=plan).view(B, -1)
            y = decode_attention.decode_attention(qkv, rope, c.k, c.v, input_pos, c.counters, H, self.window)
            return self.wo(y.view(B, S, H * D), sparse, active, residual=x, plan=plan)
        qkv = self.wqkv(x, sparse, active, norm=norm, ss=ss, plan=plan)
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = apply_rope(q.view(B, S, H, D), rope).transpose(1, 2)  # [B, H, S, D]
        k = apply_rope(k.view(B, S, Hkv, D), rope).transpose(1, 2)  # [B, Hkv, S, D]
        v = v.view(B, S, Hkv, D).transpose(1, 2)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # [B, Hkv, T, D]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != Hkv)
        y = y.transpose(1, 2).reshape(B, S, H * D)
        return self.wo(y, sparse, active, residual=x, plan=plan)


class FeedForward(nn.Module):
    """TEAL: gate and up share one input-sparse launch (silu(gate) * up fused), down is input-sparse."""

    def __init__(self, a: ModelArgs, tp: Optional[TP] = None):
        super().__init__()
        i = share(tp, a.intermediate_size)
        self.w13 = SparseLinear(a.dim, (i, i), glu=True, parts=True)
        self.w2 = SparseLinear(i, (a.dim,), tp=tp)
        self.down_config = None

    def prepare(self, plan: DecodePlan):
        """The one-launch MLP's down config and counters (after w13 and w2 have their configs)."""
        if not plan.kernels:
            return
        cfg = self.w13.kernel_configs[1]
        I, D = self.w2.in_features, self.w2.out_features
        self.down_config = configs.default_down_config(D, I, cfg)
        self.register_buffer("counters", torch.zeros(configs.mlp_counters_size(I, cfg), dtype=torch.int32,
                                                     device=self.w2.weight.device), persistent=False)

    def forward(self, h: Tensor, ss: Optional[Tensor], norm: "RMSNorm", sparse: bool, active: Optional[Tensor],
                plan: DecodePlan):
        rows = h.shape[0] * h.shape[1]
        if self.w13.on_cuda(plan, rows, sparse, active, h) and self.w2.cuda_config is not None:  # down gates gate/up
            return self.w2.cuda(self.w13.cuda(h, sparse, plan, norm=norm), sparse, plan, residual=h, glu_in=True), None
        if ss is not None and plan.fused_mlp(rows, sparse, active):
            y, ss_out = sparse_mlp.sparse_mlp(h.view(1, -1), self.w13.weight, self.w13.threshold, self.w2.weight,
                                              self.w2.threshold, self.counters, self.w13.kernel_configs[1],
                                              self.down_config, norm.weight, ss, norm.eps)
            return y.view_as(h), ss_out
        if plan.defers(rows, sparse, active):  # gate/up's partials summed (and gated) by the down kernel
            return self.w2(self.w13.partial_sums(h, norm, ss, plan), sparse, active, residual=h, plan=plan)
        return self.w2(self.w13(h, sparse, active, norm=norm, ss=ss, plan=plan), sparse, active, residual=h, plan=plan)


class CatsFeedForward(nn.Module):
    """CATS: gate dense, up computed only where |silu(gate)| passes, down sees the sparse product.

    Loads the same checkpoint as FeedForward: w13 is split into w1 (input-major) and w3 (row-major).
    """

    def __init__(self, a: ModelArgs, tp: Optional[TP] = None):
        super().__init__()
        self.intermediate_size = i = share(tp, a.intermediate_size)
        self.w1 = SparseLinear(a.dim, (i,))
        self.w3 = RowSparseUp(a.dim, i)
        self.w2 = SparseLinear(i, (a.dim,), tp=tp)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "w13.weight"
        if key in state_dict:
            w13 = state_dict.pop(key)
            state_dict[prefix + "w1.weight"] = w13[:, : self.intermediate_size]
            state_dict[prefix + "w3.weight"] = w13[:, self.intermediate_size:].t().contiguous()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, h: Tensor, ss: Optional[Tensor], norm: "RMSNorm", sparse: bool, active: Optional[Tensor],
                plan: DecodePlan):
        x = norm(h)
        gate = self.w1(x, sparse, active, plan=plan)
        up = self.w3(x, gate, sparse, active, plan=plan)
        return self.w2(up, sparse, active, residual=h, plan=plan)


class Block(nn.Module):
    def __init__(self, a: ModelArgs, mlp: str, tp: Optional[TP] = None):
        super().__init__()
        self.attention = Attention(a, tp)
        self.feed_forward = CatsFeedForward(a, tp) if mlp == "cats" else FeedForward(a, tp)
        self.attention_norm = RMSNorm(a.dim, a.norm_eps)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)

    def forward(self, x, ss, rope, mask, input_pos, sparse, active, plan):
        """-> (new residual stream, its per-tile sums of squares or None): the next norm's input."""
        h, ss = self.attention(x, ss, self.attention_norm, rope, mask, input_pos, sparse, active, plan)
        return self.feed_forward(h, ss, self.ffn_norm, sparse, active, plan)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, mlp: str = "teal", tp: Optional[TP] = None):
        """tp: this process's rank of a tensor-parallel group (tp.py): the layers and the LM head hold its slices."""
        super().__init__()
        if mlp not in ("teal", "cats"):
            raise UserError(f"unknown MLP sparsity mode {mlp!r} (teal or cats)")
        self.args, self.mlp, self.tp = args, mlp, tp
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, mlp, tp) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head_rows = head_rows(args.vocab_size, tp.world) if tp else args.vocab_size  # vocabulary entries held
        self.output = nn.Linear(args.dim, self.head_rows, bias=False)
        if args.tie_embeddings and tp is None:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope", torch.zeros(0), persistent=False)
        self.max_batch_size, self.max_seq_len = 0, 0
        self.fingerprint = ""  # of the checkpoint's weights; calibration files are checked against it
        self.plan = REFERENCE  # how each call runs (plan.py); set_plan

    def setup_caches(self, max_batch_size: int, max_seq_len: int):
        """Static KV cache and RoPE table, sized for the work at hand (attention reads the whole cache)."""
        if max_seq_len > self.args.max_seq_len:
            raise UserError(f"{max_seq_len} tokens exceed the model's context of {self.args.max_seq_len}")
        if self.max_batch_size >= max_batch_size and self.max_seq_len == max_seq_len:
            return
        dtype, device = self.tok_embeddings.weight.dtype, self.tok_embeddings.weight.device
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        a = self.args
        for layer in self.layers:
            att = layer.attention
            att.kv_cache = KVCache(max_batch_size, max_seq_len, att.n_kv_head, a.head_dim, dtype).to(device)
        self.rope = rope_table(a, max_seq_len).to(device)

    def set_plan(self, plan: DecodePlan):
        """Decode with `plan` (plan.decode_plan). Its weight-dependent fields are fixed here (the attention kernel
        only for head shapes it takes; `quantized` from the weights; the NVRTC kernels for 16-bit weights without
        tensor parallelism), and each module sizes its launch configs and
        counters for it, once: a plan that differs only in flags (a sparsity level, an ablation) keeps them, so
        the buffers a captured CUDA graph reads stay where they are."""
        a = self.args
        quantized = any(m.fmt.quantized for m in self.modules() if isinstance(m, SparseLinear) and not m.head)
        att = self.layers[0].attention
        attention = plan.attention_kernel and decode_attention.supported(att.n_head, att.n_kv_head, a.head_dim)
        half = self.tok_embeddings.weight.dtype in (torch.bfloat16, torch.float16)
        plan = replace_fields(plan, quantized=quantized, attention_kernel=attention,
                              nvrtc_arch=plan.nvrtc_arch if half and self.tp is None else 0,  # TP: not measured
                              sparse_decode=plan.sparse_decode or quantized)
        # what the launch configs depend on
        sized_by = lambda p: (p.kernels, p.n_sm, p.masked_stream, p.nvrtc_arch, p.nvrtc_int8, p.nvrtc_int4)  # noqa: E731
        if sized_by(plan) != sized_by(self.plan):
            for m in self.modules():  # projections before the MLPs that read their configs
                if isinstance(m, (SparseLinear, RowSparseUp)):
                    m.prepare(plan)
            for m in self.modules():
                if isinstance(m, FeedForward):
                    m.prepare(plan)
        self.plan = plan

    def forward(self, idx: Tensor, input_pos: Tensor, sparse_from: Optional[int] = 0,
                all_logits: bool = True) -> Tensor:
        """idx [B, S], input_pos [S] -> logits [B, S, V] (or [B, 1, V] for the last token only).

        sparse_from: None keeps every token dense; n sparsifies the tokens at positions >= n.
        """
        assert self.rope.numel(), "call setup_caches() first"
        sparse = sparse_from is not None
        active = input_pos >= sparse_from if sparse and sparse_from > 0 else None
        rope = self.rope[input_pos]  # [S, D/2, 2]
        mask = attention_mask(input_pos, self.max_seq_len, self.args.sliding_window)
        x = self.tok_embeddings(idx)  # [B, S, dim]
        ss = None
        plan = self.plan
        for layer in self.layers:
            x, ss = layer(x, ss, rope, mask, input_pos, sparse, active, plan)
        if not all_logits and x.shape[1] > 1:
            x, ss = x[:, -1:], None
        if isinstance(self.output, SparseLinear):  # int8 head (quantize.py): the final norm fused on the kernel path
            logits = self.output(x, norm=self.norm, ss=ss, plan=plan)
        else:
            logits = self.output(self.norm(x))
        if self.tp is not None:  # each rank's slice of the vocabulary (the last one padded)
            logits = self.tp.gather_last(logits)[..., : self.args.vocab_size]
        return logits

    def sparse_modules(self):
        """(layer index, projection name, module, segment index) for each thresholded projection."""
        for i, layer in enumerate(self.layers):
            att, ff = layer.attention, layer.feed_forward
            yield from ((i, n, att.wqkv, j) for j, n in enumerate(("q", "k", "v")))
            yield i, "o", att.wo, 0
            if self.mlp == "cats":
                yield i, "gate", ff.w1, 0
                yield i, "up", ff.w3, 0  # threshold on |silu(gate)|: the rows of up computed
            else:
                yield from ((i, n, ff.w13, j) for j, n in enumerate(("gate", "up")))
            yield i, "down", ff.w2, 0


def attention_mask(input_pos: Tensor, max_seq_len: int, window: Optional[int]) -> Tensor:
    """[S, T] bool: causal, and within the sliding window when there is one."""
    kv_pos = torch.arange(max_seq_len, device=input_pos.device)
    mask = kv_pos[None, :] <= input_pos[:, None]
    if window is not None:
        mask = mask & (input_pos[:, None] - kv_pos[None, :] < window)
    return mask


def rope_frequencies(a: ModelArgs) -> Tensor:
    """Inverse frequencies [D/2] in float64, with llama3 scaling or explicit factors applied."""
    D = a.head_dim
    inv = 1.0 / (a.rope_base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    if a.rope_freq_factors is not None:
        inv = inv / torch.tensor(a.rope_freq_factors, dtype=torch.float64)
    if a.rope_scaling is not None:
        s = a.rope_scaling
        wavelen = 2 * math.pi / inv
        old = s["original_max_position_embeddings"]
        lo, hi = s["low_freq_factor"], s["high_freq_factor"]
        # long wavelengths are divided by factor, short ones kept, the band between interpolated
        smooth = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)
        inv = (1 - smooth) * inv / s["factor"] + smooth * inv
    return inv


def rope_table(a: ModelArgs, seq_len: int) -> Tensor:
    """[T, D/2, 2] (cos, sin) in float32."""
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), rope_frequencies(a))
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()
