"""In-kernel timeline of one decode layer: every program of every launch stamps the GPU clocks at its phase
boundaries, in instrumented copies of kernels/sparse_gemv.py and kernels/decode_attention.py made at run time.
Needs a CUDA GPU.

    python scripts/profile_phases.py [--model llama-2-7b] [--sparsities 0.5,0.999] [--context 384] [--out DIR]

One layer's five launches (q/k/v partials with the norm fused, attention, o with the residual, gate/up partials,
down) run in a CUDA graph over 4 layer copies, as the decode step makes them with the MLP unfused
(`enable_kernels(fuse_mlp=False)`; the fused MLP launch is not instrumented). Per launch it prints the gap after the
previous launch, the median time of each phase over the launch's programs, the skew (last program's end minus the
median program's end) and the span. GEMV phases: input loads in, list positions known (scan), list stored, first
entries reloaded, weights streamed, partials reduced in registers, split-K counter, tail. Attention: q/k/v in, cache
read, counter, combine.

Each stamp (%globaltimer and %clock64 through inline assembly) waits on the value it marks, so work cannot move
across it; that costs ~0.2 us per stamp, which the phases include (the layer time with and without stamps is
printed). The instrumented kernels must give bit-identical outputs; the script checks that first.
"""
import argparse
import importlib.util
import json
import statistics
import tempfile
from pathlib import Path

import _path  # noqa: F401
import torch

from bench import capture_graph, graph_time_us, replay_time_us, sparse_threshold
from kernels import decode_attention, sparse_gemv
from kernels.sparse_gemv import rms_norm_ref
from errors import UserError, run_cli, sparsity_list
from model import ModelArgs

SLOTS = 32  # int64 words per program: (globaltimer, clock64) pairs at even slots, counts at 12-14
STAMP_HELPERS = '''@triton.jit
def _stamp(prof, slot: tl.constexpr, dep):
    d = tl.full((1,), 0, tl.int32) + dep.to(tl.int32)
    g = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [d], dtype=tl.int64, is_pure=False, pack=1)
    c = tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [d], dtype=tl.int64, is_pure=False, pack=1)
    o = tl.arange(0, 1)
    tl.store(prof + slot + o, g)
    tl.store(prof + slot + 1 + o, c)


@triton.jit
def _smid(dep):
    d = tl.full((1,), 0, tl.int32) + dep.to(tl.int32)
    return tl.sum(tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [d], dtype=tl.int32, is_pure=False, pack=1),
                  axis=0)


'''
_NZ = "(tl.max(tl.max({}, axis=1), axis=0) > 1e30).to(tl.int32)"  # a value that waits on a 2-D tensor


def _after(anchor: str, *lines: str) -> tuple:
    """A patch adding lines after a whole-line anchor, at the indentation of its last line."""
    last = anchor.rstrip("\n").split("\n")[-1]
    pad = last[:len(last) - len(last.lstrip())]
    return anchor, anchor + "".join(pad + line + "\n" for line in lines)


def _before(anchor: str, *lines: str) -> tuple:
    """A patch adding lines before an anchor that starts a line, at its indentation."""
    pad = anchor[:len(anchor) - len(anchor.lstrip())]
    return anchor, "".join(pad + line + "\n" for line in lines) + anchor


GEMV_PATCHES = [  # kernels/sparse_gemv.py; slots: 0 start, 16 inputs in, 18 positions, 2 list stored, 4 entries
    # reloaded, 20 first rows in, 22 loop done, 6 partials reduced, 8 counter, 10 tail; 12 kept, 13 arrival, 14 SM
    ("idx_ptr,\n    M, K, N_OUT,", "idx_ptr, prof_ptr,\n    M, K, N_OUT,"),
    _after("    pid_k = tl.program_id(1)\n", f"prof = prof_ptr + (pid_n * SPLIT_K + pid_k) * {SLOTS}",
           "_stamp(prof, 0, pid_n)", "tl.store(prof + 14, _smid(pid_n).to(tl.int64))"),
    _after("            xf = x.to(tl.float32)\n", "_stamp(prof, 16, (tl.max(xf, axis=0) > 1e30).to(tl.int32))"),
    _after("                pos = n_kept + _inclusive_count(keep.to(tl.int32), COMPACT, 8) - 1\n",
           "_stamp(prof, 18, tl.max(pos, axis=0))"),
    _before("        # 2. software pipeline over groups", "_stamp(prof, 2, n_kept)",
            "tl.store(prof + 12, n_kept.to(tl.int64))"),
    _after("            ea, xa = _entries(scratch, 0, n_kept, K_SPLIT, xdt, BLOCK_K)\n",
           "_stamp(prof, 4, tl.max(ea, axis=0))"),
    _after("            wa, wua = _group_rows(w_cols, ea, stride_wk, N_OUT, col_ok, EVEN_N, GLU)\n",
           f"_stamp(prof, 20, {_NZ.format('wa.to(tl.float32)')})"),
    _before("        part = tl.sum(acc, axis=0)[None, :]", f"    _stamp(prof, 22, {_NZ.format('acc')})"),
    _after("        part_up = tl.sum(acc_up, axis=0)[None, :]\n", f"_stamp(prof, 6, {_NZ.format('part')})"),
    _after('        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")\n',
           "_stamp(prof, 8, arrived)", "tl.store(prof + 13, arrived.to(tl.int64))"),
    _after("            tl.store(cnt_ptr + pid_n, 0)\n", f"_stamp(prof, 10, {_NZ.format('total')})"),
    ("@triton.jit\ndef _entries(", STAMP_HELPERS + "@triton.jit\ndef _entries("),
    ("ss_out if ss_out is not None else t, lists,\n", "ss_out if ss_out is not None else t, lists, PROF[0],\n"),
    _after("MAX_ROWS = 8\n", "PROF = [None]  # the buffer the next launch stamps into"),
]
ATTENTION_PATCHES = [  # kernels/decode_attention.py; slots: 0 start, 2 q/k/v in, 4 cache read, 6 counter, 8 combined
    ("ws_acc_ptr, cnt_ptr,\n", "ws_acc_ptr, cnt_ptr, prof_ptr,\n"),
    _after("    split = tl.program_id(1)\n", f"prof = prof_ptr + (pid * N_SPLITS + split) * {SLOTS}",
           "_stamp(prof, 0, pid)"),
    _before("        vn = _load_qkv(", f"_stamp(prof, 2, {_NZ.format('qr1.to(tl.float32)')})"),
    _before("        y_ptrs = y_ptr +", "_stamp(prof, 4, (tl.max(l, axis=0) > 1e30).to(tl.int32))"),
    _before("            if arrived == last - first:\n", "_stamp(prof, 6, arrived)"),
    _after("                tl.store(cnt_ptr + pid, 0)\n", f"_stamp(prof, 8, {_NZ.format('out')})"),
    ("@triton.jit\ndef _load_qkv(", STAMP_HELPERS + "@triton.jit\ndef _load_qkv("),
    ("ws_ml, ws_acc, counters,\n", "ws_ml, ws_acc, counters, PROF[0],\n"),
    _before("INTERPRETED = ", "PROF = [None]  # the buffer the next launch stamps into"),
]


def instrumented_source(path: Path, patches) -> str:
    """The kernel file with the stamps patched in and its ops renamed (they register beside the real ones)."""
    src = path.read_text()
    for old, new in patches:
        if src.count(old) != 1:
            raise UserError(f"{path.name} changed: the profiler's anchor {old.strip()[:60]!r} occurs "
                            f"{src.count(old)} times (update scripts/profile_phases.py)")
        src = src.replace(old, new)
    return src.replace('"teal::', '"tealphases::')


def load_instrumented(tmp: Path):
    """(sparse_gemv, decode_attention) modules with stamps; Triton reads their source, so they are real files."""
    mods = []
    for name, patches in (("sparse_gemv", GEMV_PATCHES), ("decode_attention", ATTENTION_PATCHES)):
        f = tmp / f"{name}_phases.py"
        f.write_text(instrumented_source(Path(_path.ROOT) / "kernels" / f"{name}.py", patches))
        spec = importlib.util.spec_from_file_location(f"{name}_phases", f)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mods.append(mod)
    return mods


def summarise(buf, ghz: float, t0: int, prev_end: float, attention: bool) -> dict:
    """Phase medians (us) of one launch's programs from their stamps [programs, SLOTS] (int64, zeros unused)."""
    rows = buf[buf[:, 0] > 0]

    def med(i, j):
        v = [(r[j + 1] - r[i + 1]) / ghz / 1e3 for r in rows.tolist() if r[i] and r[j]]
        return round(statistics.median(v), 2) if v else None
    ends = [(max(r[0:12:2]) - t0) / 1e3 for r in rows.tolist()]
    start = (int(rows[:, 0].min()) - t0) / 1e3
    out = {"programs": len(rows), "gap": round(start - prev_end, 2) if prev_end is not None else None}
    if attention:
        out.update(qkv_in=med(0, 2), cache=med(2, 4), counter=med(4, 6), combine=med(6, 8))
    else:
        first_rows, loop = med(4, 20), med(20, 22)
        out.update(loads=med(0, 16), scan=med(16, 18), list_store=med(18, 2), list_reload=med(2, 4),
                   stream=round(first_rows + loop, 2) if first_rows is not None else med(2, 6),  # dense: in order
                   reduce=med(22, 6),
                   counter=med(6, 8), tail=med(8, 10), kept=int(statistics.median(rows[:, 12].tolist())))
    out.update(skew=round(max(ends) - statistics.median(ends), 2), span=round(max(ends) - start, 2), end=max(ends))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-2-7b")
    p.add_argument("--sparsities", default="0.5,0.999")
    p.add_argument("--context", type=int, default=384, help="cache positions the attention reads")
    p.add_argument("--out", type=Path, default=None, help="directory for phases.json")
    a = p.parse_args()
    args = ModelArgs.from_name(a.model)
    sparsities = sparsity_list(a.sparsities, "--sparsities", up_to_one=True)  # 1: the phases with nothing to stream
    if not torch.cuda.is_available():
        raise UserError("profile_phases.py needs a CUDA GPU")
    tmp = Path(tempfile.mkdtemp(prefix="teal-phases-"))
    sg_p, att_p = load_instrumented(tmp)

    dev, dt, L = "cuda", torch.bfloat16, 4
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    H, Hkv, D, dim, inter = args.n_head, args.n_kv_head, args.head_dim, args.dim, args.intermediate_size
    szq = (H * D, Hkv * D, Hkv * D)
    rnd = lambda k, n: (torch.randn(k, n, device=dev) / k ** 0.5).to(dt)  # noqa: E731
    Wq, Wo = [rnd(dim, sum(szq)) for _ in range(L)], [rnd(H * D, dim) for _ in range(L)]
    Wg, Wd = [rnd(dim, 2 * inter) for _ in range(L)], [rnd(inter, dim) for _ in range(L)]
    g1, g2 = torch.ones(dim, device=dev, dtype=dt), torch.ones(dim, device=dev, dtype=dt)
    T = a.context
    caches = [tuple(torch.randn(1, Hkv, T, D, device=dev, dtype=dt) for _ in range(2)) for _ in range(L)]
    rope = torch.randn(1, D // 2, 2, device=dev)
    pos = torch.tensor([T - 2], device=dev)
    att_cnt = torch.zeros(Hkv, dtype=torch.int32, device=dev)
    cnt = torch.zeros(4096, dtype=torch.int32, device=dev)
    h0 = torch.randn(1, dim, device=dev, dtype=dt)
    cfg = dict(q=sparse_gemv.default_config(1, dim, szq, False, n_sm),
               o=sparse_gemv.default_config(1, H * D, (dim,), False, n_sm),
               g=sparse_gemv.default_config(1, dim, (inter, inter), True, n_sm),
               d=sparse_gemv.default_config(1, inter, (dim,), False, n_sm))
    tq, to = torch.zeros(3, dim, device=dev), torch.zeros(1, H * D, device=dev)
    tg, td = torch.zeros(2, dim, device=dev), torch.zeros(1, inter, device=dev)
    ss0 = sparse_gemv.sum_squares_ref(h0, cfg["o"].block_n)
    bufs = {(i, p): torch.zeros(1024, SLOTS, dtype=torch.int64, device=dev) for i in range(L) for p in "qaogd"}

    def layer(i, stamped):
        gemv, att = (sg_p, att_p) if stamped else (sparse_gemv, decode_attention)

        def use(p):
            sg_p.PROF[0] = att_p.PROF[0] = bufs[(i, p)]
        use("q")
        qp = gemv.sparse_gemv_parts(h0, Wq[i], tq, szq, cfg["q"], norm_weight=g1, ss_in=ss0)
        use("a")
        y = att.decode_attention(qp[:, 0], rope, caches[i][0], caches[i][1], pos, att_cnt, H, None)
        use("o")
        h1, ss1 = gemv.sparse_gemv_ss(y, Wo[i], to, (dim,), cnt, cfg["o"], h0, norm_weight=None)
        use("g")
        gp = gemv.sparse_gemv_parts(h1, Wg[i], tg, (inter, inter), cfg["g"], glu=True, norm_weight=g2, ss_in=ss1)
        use("d")
        h2, ss2 = gemv.sparse_gemv_ss(gp, Wd[i], td, (dim,), cnt, cfg["d"], h1)
        return qp, y, h1, gp, h2, ss2

    records = []
    for s in sparsities:
        for t in (tq, to, tg, td):  # thresholds from each stage's input, one stage at a time
            t.zero_()
        tq.fill_(sparse_threshold(rms_norm_ref(h0, g1, 1e-5), s))
        to.fill_(sparse_threshold(layer(0, False)[1], s))
        tg.fill_(sparse_threshold(rms_norm_ref(layer(0, False)[2], g2, 1e-5), s))
        td.fill_(sparse_threshold(sparse_gemv.parts_ref(layer(0, False)[3], True, dt), s))
        if not all(torch.equal(x, y) for x, y in zip(layer(0, False), layer(0, True))):
            raise UserError("the instrumented kernels do not reproduce the kernels' outputs")
        plain = graph_time_us([lambda: [layer(i, False) for i in range(L)]], launches=10) / L
        graph = capture_graph([lambda: [layer(i, True) for i in range(L)]], 1)
        stamped = replay_time_us(graph, L, replays=30)
        for b in bufs.values():
            b.zero_()
        graph.replay()
        torch.cuda.synchronize()
        st = {k: b.cpu() for k, b in bufs.items()}
        spans = [((r[7] - r[1]) / (r[6] - r[0])) for b in st.values() for r in b.tolist() if r[6] - r[0] > 5000]
        ghz = statistics.median(spans) if spans else 1.98
        t0 = int(st[(1, "q")][:, 0][st[(1, "q")][:, 0] > 0].min())  # layer copy 1: copy 0 follows the capture's start
        print(f"\n{a.model}, sparsity {s}, {T} positions: one layer {plain:.1f} us ({stamped:.1f} with stamps), "
              f"SM clock {ghz:.2f} GHz; us, medians over each launch's programs")
        prev = None
        for p, name in zip("qaogd", ("q/k/v", "attention", "o", "gate/up", "down")):
            r = summarise(st[(1, p)], ghz, t0, prev, p == "a")
            prev = r.pop("end")
            records.append({"model": a.model, "sparsity": s, "context": T, "launch": name, "layer_us": round(plain, 2),
                            "layer_us_stamped": round(stamped, 2), **r})
            print(f"  {name:9s} " + "  ".join(f"{k} {v}" for k, v in r.items() if v is not None))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "phases.json").write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    run_cli(main)
