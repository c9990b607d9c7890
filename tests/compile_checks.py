"""What torch.compile makes of the decode step, checked without a GPU (run by tests/test_compile_checks.py, in a
process without TRITON_INTERPRET: tracing needs compiled Triton functions, not interpreted ones).

1. The one-token step of a model on the kernel path traces as one graph (no graph break) whose projections and
   attention are the kernel ops, with no SDPA left.
2. Which arguments each kernel launch writes, against what its op declares: the ops are opaque to torch.compile,
   which takes their declared mutations as given, so a kernel storing through an undeclared input would corrupt
   it silently under compilation. torch's own analysis of user kernels (each launch's TTIR, the pointers it
   stores through) finds the written arguments; Triton needs only a target for that, so a Hopper target stands
   in for the CUDA driver (scripts/sm90.py).
3. Every kernel launch that a Llama-2-7B-shaped layer's decode step makes on an H100 (132 SMs: the real configs)
   compiles down to a cubin for sm_90, ptxas included: bf16/fp16/fp32 activations, int8 and int4 weights, the
   CATS MLP too, batch 1 and 3, sparse and dense; and a Llama-3-8B-shaped one's in bf16 with each weight format. Triton's CPU interpreter runs code the compiler refuses (a jit
   function returning a different dtype from each branch of a constexpr `if`, say), so the interpreted kernel
   tests alone would pass a kernel that cannot build on the GPU.
Exits 1 on any failure.
"""
import copy
import logging
import sys
from typing import Optional

import torch
import triton
from torch._higher_order_ops.triton_kernel_wrap import get_mutated_tensors, kernel_side_table

from engine import Generator, opaque_ops
from kernels import configs, decode_attention, sparse_gemv, sparse_gemv_batch, sparse_mlp
from kernels.common import PROFILE_SLOTS
from kernels.formats import INT4, INT8, quant_format
from loading import random_model
from model import ModelArgs
from quantization import quantize_model
from scripts import sm90


class Recorder:
    """Stands in for a launch's `wrap`: keeps each launch's kernel and its arguments by
    name instead of running it."""

    def __init__(self):
        self.launches = []

    def __call__(self, fn):
        recorder = self

        class Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    named = dict(zip(fn.arg_names, args))
                    named.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
                    recorder.launches.append((fn, named))
                return launch
        return Grid()


def declared_mutations(op: str) -> set:
    """The arguments torch.ops.teal.<op> declares it writes (mutates_args)."""
    schema = getattr(torch.ops.teal, op).default._schema
    return {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}


def written(fn, named: dict) -> set:
    tensors = {k: v for k, v in named.items() if isinstance(v, torch.Tensor)}
    consts = {k: v for k, v in named.items() if not isinstance(v, torch.Tensor)}
    return set(get_mutated_tensors(kernel_side_table.add_kernel(fn), kernel_side_table.add_constant_args(consts),
                                   tensors, {}))


def gemv_launches() -> Recorder:
    rec = Recorder()
    K, D = 256, 128
    for M, dtype in ((1, torch.bfloat16), (1, torch.float32), (3, torch.bfloat16)):
        x = torch.randn(M, K, dtype=dtype)
        res = torch.randn(M, D, dtype=dtype)
        g = torch.ones(K, dtype=dtype)
        for sizes, glu in (((128, 64, 64), False), ((96, 96), True), ((D,), False)):
            w = torch.randn(K, sum(sizes), dtype=dtype)
            t = torch.zeros(len(sizes), K)
            n_out = sizes[0] if glu else sum(sizes)
            counters = torch.zeros(64, dtype=torch.int32)
            out = torch.empty(M, n_out, dtype=dtype)
            ss_in = torch.ones(M, 4)
            split = configs.Config(32, 32, 2, 4, 1, 0) if M == 1 else configs.Config(32, 32, 2, 4, 2, 1)
            for cfg in (configs.default_config(M, K, sizes, glu, n_sm=8), split):
                if sizes == (D,):  # a residual projection writing the next norm's sums of squares
                    ss_out = torch.empty(M, configs.counters_size(sizes, glu, cfg.block_n))
                    sparse_gemv.launch(x, w, t, counters, sizes, glu, cfg, res, out, wrap=rec, ss_out=ss_out)
                    # its input the partials of a gate/up launch
                    parts = torch.randn(2, 2, M, K)
                    sparse_gemv.launch(parts, w, t, counters, sizes, glu, cfg, res, out, wrap=rec, ss_out=ss_out)
                else:  # the norm fused in, and plain; unreduced partials out
                    sparse_gemv.launch(x, w, t, counters, sizes, glu, cfg, None, out, wrap=rec, norm_weight=g,
                                       ss_in=ss_in)
                    sparse_gemv.launch(x, w, t, counters, sizes, glu, cfg, None, out, wrap=rec)
                    P = configs.k_layout(K, cfg)[1]
                    sparse_gemv.launch(x, w, t, None, sizes, glu, cfg, None,
                                       torch.empty(P, 2 if glu else 1, M, n_out), wrap=rec, norm_weight=g,
                                       ss_in=ss_in, partial_out=True)
                if glu and M == 1:  # the whole MLP in one launch, one or two programs along K
                    wd = torch.randn(sizes[0], K, dtype=dtype)
                    dcfg = configs.default_down_config(K, sizes[0], cfg)
                    sparse_mlp.launch_mlp(x, w, t, wd, torch.zeros(1, sizes[0]),
                                           torch.zeros(configs.mlp_counters_size(sizes[0], cfg), dtype=torch.int32),
                                           cfg, dcfg, torch.empty(1, K, dtype=dtype), torch.empty(1, dcfg.n_red),
                                           norm_weight=g, ss_in=ss_in, wrap=rec)
    # int8 weights with their scales: plain, residual with sums of squares, partials out, from partials, the MLP
    x, g, ss_in = torch.randn(1, K, dtype=torch.bfloat16), torch.ones(K, dtype=torch.bfloat16), torch.ones(1, 4)
    q, q2 = torch.zeros(K, 192, dtype=torch.int8), torch.zeros(96, K, dtype=torch.int8)
    s, s2, t = torch.ones(192), torch.ones(K), torch.zeros(2, K)
    cfg = configs.default_config(1, K, (96, 96), True, n_sm=8)
    counters = torch.zeros(64, dtype=torch.int32)
    sparse_gemv.launch(x, q, t, counters, (96, 96), True, cfg, None, torch.empty(1, 96, dtype=torch.bfloat16),
                       wrap=rec, norm_weight=g, ss_in=ss_in, fmt=INT8, scale=s)
    P = configs.k_layout(K, cfg)[1]
    sparse_gemv.launch(x, q, t, None, (96, 96), True, cfg, None, torch.empty(P, 2, 1, 96), wrap=rec,
                       partial_out=True, fmt=INT8, scale=s)
    cfg_d = configs.default_config(1, 96, (K,), False, n_sm=8)
    sparse_gemv.launch(torch.randn(P, 2, 1, 96), torch.zeros(96, K, dtype=torch.int8), torch.zeros(1, 96), counters,
                       (K,), False, cfg_d, torch.randn(1, K, dtype=torch.bfloat16),
                       torch.empty(1, K, dtype=torch.bfloat16), wrap=rec,
                       ss_out=torch.empty(1, configs.counters_size((K,), False, cfg_d.block_n)), fmt=INT8, scale=s2)
    dcfg = configs.default_down_config(K, 96, cfg)
    sparse_mlp.launch_mlp(x, q, t, q2, torch.zeros(1, 96), torch.zeros(configs.mlp_counters_size(96, cfg),
                           dtype=torch.int32), cfg, dcfg, torch.empty(1, K, dtype=torch.bfloat16),
                           torch.empty(1, dcfg.n_red), norm_weight=g, ss_in=ss_in, wrap=rec, fmt=INT8, scale=s, scale_down=s2)
    # int4 weights with their group scales: plain (norm fused), partials out, from partials with a residual
    q4, q4d = torch.zeros(K, 24, dtype=torch.int32), torch.zeros(96, K // 8, dtype=torch.int32)
    s4, s4d = torch.ones(2, K // 32, 192, dtype=torch.float16), torch.ones(2, 3, K, dtype=torch.float16)
    cfg = configs.default_config(1, K, (96, 96), True, n_sm=8, group=32)
    sparse_gemv.launch(x, q4, t, counters, (96, 96), True, cfg, None, torch.empty(1, 96, dtype=torch.bfloat16),
                       wrap=rec, norm_weight=g, ss_in=ss_in, fmt=INT4, scale=s4)
    P = configs.k_layout(K, cfg, 32)[1]
    sparse_gemv.launch(x, q4, t, None, (96, 96), True, cfg, None, torch.empty(P, 2, 1, 96), wrap=rec,
                       partial_out=True, fmt=INT4, scale=s4)
    cfg_d = configs.default_config(1, 96, (K,), False, n_sm=8, group=32)
    sparse_gemv.launch(torch.randn(P, 2, 1, 96), q4d, torch.zeros(1, 96), counters, (K,), False, cfg_d,
                       torch.randn(1, K, dtype=torch.bfloat16), torch.empty(1, K, dtype=torch.bfloat16), wrap=rec,
                       ss_out=torch.empty(1, configs.counters_size((K,), False, cfg_d.block_n)), fmt=INT4, scale=s4d)
    return rec


def attention_launches() -> Recorder:
    rec = Recorder()
    for H, Hkv, D, window in ((4, 4, 32, None), (8, 2, 64, 16)):
        qkv = torch.randn(2, (H + 2 * Hkv) * D, dtype=torch.bfloat16)
        k = torch.zeros(2, Hkv, 256, D, dtype=torch.bfloat16)
        v = torch.zeros_like(k)
        rope = torch.zeros(1, D // 2, 2)
        for q in (qkv, torch.randn(3, 2, (H + 2 * Hkv) * D)):  # the projection's output, or its partials
            decode_attention.launch(q, rope, k, v, torch.tensor([100]), torch.zeros(2 * Hkv, dtype=torch.int32), H,
                                    window, torch.empty(2, H * D, dtype=torch.bfloat16), wrap=rec)
    return rec


def trace_decode_step(quant: Optional[str]) -> bool:
    """fullgraph tracing (fake tensors: no kernel runs) of a GQA model's decode step on the kernel path, its weights
    quantized with `quant` or not."""
    args = ModelArgs(dim=128, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=192, vocab_size=101,
                     max_seq_len=128, sliding_window=32)
    model = random_model(args, "cpu", torch.bfloat16)
    if quant:
        quantize_model(model, quant_format(quant))
    model.set_plan(sm90.plan_as_on_gpu(n_sm=4))
    model.setup_caches(1, 64)
    ok = True
    # the sparse step, and the dense one (on sm_90 both take the NVRTC GEMV's op for every projection of 16-bit or
    # int8 weights, and the attention kernel; int4 weights keep the Triton and Gluon kernels when sparse)
    for sparse_from, n_gemv in ((0, args.n_layer), (None, 0)):
        graph = torch._dynamo.export(lambda t, p: model(t, p, sparse_from=sparse_from), aten_graph=False)(
            torch.zeros(1, 1, dtype=torch.long), torch.tensor([5])).graph_module.graph
        ops = [str(n.target) for n in graph.nodes if n.op == "call_function"]
        # 16-bit and int8 weights: q/k/v, o (residual added), gate/up and down (gating them) on the NVRTC op; the
        # LM head of quantized weights streamed by the Triton GEMV
        # (int4 on sm_90: the sparse step's o and down on the Gluon kernel, q/k/v and gate/up partials on Triton: this
        # model's segments, 64 and 192 columns, are not whole tiles of it; its dense step on the Triton GEMV)
        q, hopper = quant is not None, quant == "int4"
        triton = n_gemv if hopper else 0
        want = {"teal.sparse_gemv.default": 1 if q else 0,
                "teal.sparse_gemv_parts.default": triton * 2,
                "teal.sparse_gemv_ss.default": 0 if hopper else triton * 2,
                "teal.int4_residual_sm90.default": triton * 2 if hopper else 0,
                "teal.sparse_mlp.default": 0, "teal.decode_attention.default": args.n_layer,
                "teal.cuda_gemv.default": 0 if hopper else 4 * args.n_layer}
        got = {k: ops.count(k) for k in want}
        sdpa = [o for o in ops if "scaled_dot_product" in o]
        print(f"decode step (sparse_from={sparse_from}, quant={quant}): one graph, kernel ops {got}, "
              f"SDPA calls {len(sdpa)}")
        ok &= got == want and not sdpa
    return ok


def compile_decode_step(quant: str) -> bool:
    """inductor compiles a quantized model's decode step (its launches recorded, not run) without taking the implicit
    fallback path for any kernel op: there torch 2.11 formats the op's arguments, exponential in the graph's depth
    (engine.register_fallbacks). And engine.opaque_ops() names every op of the teal namespace."""
    names = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("teal::")}
    listed = {op.name() for op in opaque_ops()}
    args = ModelArgs(dim=128, n_layer=6, n_head=4, n_kv_head=2, intermediate_size=256, vocab_size=128,
                     max_seq_len=64)
    model = random_model(args, "cpu", torch.bfloat16)
    quantize_model(model, quant_format(quant))
    model.set_plan(sm90.plan_as_on_gpu(n_sm=4))
    model.setup_caches(1, 64)

    class Implicit(logging.Handler):  # counts the records, never formats their arguments
        count = 0

        def emit(self, record):
            Implicit.count += str(record.msg).startswith("Creating implicit fallback")

    log = logging.getLogger("torch._inductor.graph")
    handler, level, propagate = Implicit(), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # torch's own handlers would format the record
    try:
        # a cached graph is not lowered again
        with sm90.recorded_launches(), torch._inductor.config.patch(force_disable_caches=True):
            Generator(model, compile=True).decode_step(torch.zeros(1, 1, dtype=torch.long), torch.tensor([5]))
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
    print(f"compiled {quant} decode step: {Implicit.count} implicit fallbacks; teal ops {sorted(names)}, "
          f"listed by engine.opaque_ops: {sorted(listed)}")
    return Implicit.count == 0 and names == listed


def decode_step_launches() -> list:
    """Every launch of one-layer decode steps of Llama-2-7B and Llama-3-8B shapes as an H100 makes them (sm90.py):
    16/32-bit activations, int8 and int4 weights, the CATS MLP, batch 1 and 3, the sparse and the dense step."""
    seen = []
    # the dense step's launches (the attention kernel after cuBLAS projections) depend on the dtype, not on the MLP
    for dtype, mlp, froms in ((torch.bfloat16, "teal", (0, None)), (torch.float16, "teal", (0, None)),
                              (torch.float32, "teal", (0, None)), (torch.bfloat16, "cats", (0,))):
        seen += sm90.decode_step_launches("llama-2-7b", dtype, None, mlp, batches=(1, 3), sparse_froms=froms)
    # the weight formats, and Llama-3-8B's shapes (GQA, a wider MLP, a 128k vocabulary) in each; a random layer with
    # its whole vocabulary takes seconds to draw, so each quantized format starts from a copy of one
    for name in ("llama-2-7b", "llama-3-8b"):
        if name == "llama-3-8b":
            seen += sm90.decode_step_launches(name, torch.bfloat16, None, batches=(1, 3), sparse_froms=(0, None))
        base = sm90.layer_model(name, torch.bfloat16, quant="int8")
        # a dense step of quantized weights (a short prompt's prefill) runs the layer on the reference path and
        # only the int8 LM head on a kernel: int8's covers int4's (whose dequantizing reference takes seconds)
        for quant, froms in (("int8", (0, None)), ("int4", (0,))):
            seen += sm90.decode_step_launches(name, torch.bfloat16, quant, batches=(1, 3), sparse_froms=froms,
                                              model=copy.deepcopy(base))
    return seen


def profile_launches() -> list:
    """The PROFILE builds scripts/profile_phases.py runs: a batch-1 projection (list path, split-K tail) and the
    decode attention, each stamping into a buffer."""
    K, N = 256, 128
    prof = torch.zeros(64, PROFILE_SLOTS, dtype=torch.int64)
    x, w, t = torch.randn(1, K, dtype=torch.bfloat16), torch.randn(K, N, dtype=torch.bfloat16), torch.zeros(1, K)
    cfg = configs.Config(64, 64, 2, 4, 1, 0)
    with sm90.recorded_launches() as seen:
        sparse_gemv.launch(x, w, t, torch.zeros(8, dtype=torch.int32), (N,), False, cfg, x.new_zeros(1, N),
                           torch.empty(1, N, dtype=torch.bfloat16), prof=prof)
        decode_attention.launch(torch.randn(1, 8 * 64, dtype=torch.bfloat16), torch.zeros(1, 32, 2),
                                torch.zeros(1, 2, 256, 64, dtype=torch.bfloat16),
                                torch.zeros(1, 2, 256, 64, dtype=torch.bfloat16), torch.tensor([100]),
                                torch.zeros(2, dtype=torch.int32), 4, None, torch.empty(1, 4 * 64, dtype=torch.bfloat16),
                                prof=prof)
    return seen


def main():
    ok = trace_decode_step(None) and trace_decode_step("int8") and trace_decode_step("int4")
    triton.runtime.driver.set_active(sm90.HopperTarget())
    built = sm90.build_all(profile_launches())
    stamped = [k for _, k, e in built if e is None and "globaltimer" in k.asm["ptx"]]
    print(f"PROFILE builds: {len(built)}, {len(stamped)} with stamps" + "".join(f"; {e}" for _, _, e in built if e))
    ok &= len(stamped) == len(built) == 2
    n, errors = sm90.compile_for_hopper(decode_step_launches())
    print(f"sm_90 builds of the decode step's launches: {n} distinct, {len(errors)} failed")
    for e in errors:
        print("  " + e)
    ok &= n > 0 and not errors
    # what a launch may store through: what its op allocates (outputs, workspaces, kept-row lists) and, by pointer,
    # the inputs its ops declare mutated
    allocated = {
        sparse_gemv._sparse_gemv_kernel: {"y_ptr", "ws_ptr", "idx_ptr", "ss_out_ptr"},
        sparse_gemv_batch._sparse_gemv_batch_kernel: {"y_ptr", "ws_ptr", "ss_out_ptr"},
        sparse_mlp._sparse_mlp_kernel: {"y_ptr", "ws_ptr", "idx_ptr", "ss_out_ptr", "dp_ptr"},
        decode_attention._decode_attention_kernel: {"y_ptr", "ws_ml_ptr", "ws_acc_ptr"},
    }
    ops = {
        sparse_gemv._sparse_gemv_kernel: ("sparse_gemv", "sparse_gemv_ss"),
        sparse_gemv_batch._sparse_gemv_batch_kernel: ("sparse_gemv", "sparse_gemv_ss"),
        sparse_mlp._sparse_mlp_kernel: ("sparse_mlp",),
        decode_attention._decode_attention_kernel: ("decode_attention",),
    }
    pointer = {"counters": "cnt_ptr", "k_cache": "k_ptr", "v_cache": "v_ptr"}
    allowed = {fn: allocated[fn] | {pointer[a] for op in names for a in declared_mutations(op)}
               for fn, names in ops.items()}
    print("declared mutations: " + ", ".join(f"{op} {sorted(declared_mutations(op))}"
                                              for names in ops.values() for op in names))
    bad = 0
    seen = set()
    for rec in (gemv_launches(), attention_launches()):
        for fn, named in rec.launches:
            seen.add(fn)
            w = written(fn, named)
            extra = w - allowed[fn]
            print(f"{fn.__name__}: writes {sorted(w)}" + (f"  NOT ALLOWED: {sorted(extra)}" if extra else ""))
            bad += bool(extra) or "y_ptr" not in w
    bad += seen != set(allowed)  # every kernel checked
    ok &= compile_decode_step("int4")  # last: inductor's compile leaves nothing behind for the builds above
    sys.exit(1 if bad or not ok else 0)


if __name__ == "__main__":
    main()
