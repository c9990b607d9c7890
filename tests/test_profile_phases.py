"""scripts/profile_phases.py without a GPU: the kernels' profile hooks, and the phase arithmetic."""
import pytest
import torch

from kernels import decode_attention, sparse_gemv
from kernels.common import PROFILE_SLOTS
from scripts import profile_phases as pp


def test_kernels_take_a_profile_buffer():
    """The stamps live in the kernels behind a PROFILE constexpr (tests/compile_checks.py builds them for sm_90)."""
    for kernel in (sparse_gemv._sparse_gemv_kernel, decode_attention._decode_attention_kernel):
        assert {"prof_ptr", "PROFILE"} <= set(kernel.arg_names)
    assert pp.SLOTS == PROFILE_SLOTS


def test_phases_from_stamps():
    ghz = 2.0  # clock ticks per ns
    buf = torch.zeros(3, pp.SLOTS, dtype=torch.int64)  # the third program never ran (zeros)
    for i, (start, scale, kept) in enumerate(((1000, 1, 10), (1200, 2, 30))):
        # globaltimer ns at slots 0, 2, 4, 6, 8, 10; clock64 ticks beside them; 16..22 list-path phases
        ns = {0: 0, 16: 100, 18: 150, 2: 200, 4: 300, 20: 1300, 22: 5300, 6: 5500, 8: 6000, 10: 7000}
        for slot, t in ns.items():
            buf[i, slot] = start + t * scale
            buf[i, slot + 1] = int((start + t * scale) * ghz)
        buf[i, 12] = kept
    r = pp.summarise(buf, ghz, t0=1000, prev_end=-0.5, attention=False)
    assert r["programs"] == 2 and r["kept"] == 20
    assert r["gap"] == 0.5  # the first program starts at t0; the previous launch ended 0.5 us before it
    assert r["loads"] == pytest.approx(0.15, abs=0.01) and r["scan"] == pytest.approx(0.075, abs=0.01)
    assert r["stream"] == pytest.approx(7.5, abs=0.01)  # medians of 1.0, 2.0 (first rows) + of 4.0, 8.0 (loop)
    assert r["end"] == pytest.approx(14.2, abs=0.01)  # program 2 ends at 1200 + 14000 ns
    assert r["span"] == pytest.approx(14.2, abs=0.01)
    assert r["skew"] == pytest.approx(14.2 - (7.0 + 14.2) / 2, abs=0.01)


def test_nvrtc_phases_from_stamps():
    """kernels/cuda_gemv.py's stamps (slots 0 start, 2 kept list ready, 6 rows streamed, 10 written; 12 kept rows,
    13 the SM): prologue, stream, tail, and which of SM or column tile explains the spread of stream times."""
    ghz = 1.0
    buf = torch.zeros(4, pp.SLOTS, dtype=torch.int64)
    # two column tiles x two K ranges (CTA order: tile fastest) on SMs 0, 1, 0, 1; tile 1 streams 2 us longer
    for i in range(4):
        ns = {0: 0, 2: 1000, 6: 1000 + 5000 + 2000 * (i % 2), 10: 7500 + 2000 * (i % 2)}
        for slot, t in ns.items():
            buf[i, slot] = 10_000 + t
            buf[i, slot + 1] = int((10_000 + t) * ghz)
        buf[i, 12], buf[i, 13] = 40 + i, [0, 1, 0, 1][i]
    r = pp.summarise(buf, ghz, t0=10_000, prev_end=None, attention=False, tiles=2)
    assert r["programs"] == 4 and r["gap"] is None and r["kept"] == 41  # median of 40..43, rounded down
    assert r["prologue"] == pytest.approx(1.0) and r["stream"] == pytest.approx(6.0)  # medians of 5, 7
    assert r["tail"] == pytest.approx(1.5) and r["end"] == pytest.approx(9.5)
    # SM and tile coincide here: both explain all of it
    assert r["spread_by_sm"] == 1.0 and r["spread_by_tile"] == 1.0
    buf[:, 13] = torch.tensor([0, 0, 1, 1])  # SMs now across tiles: they explain none of it
    r = pp.summarise(buf, ghz, t0=10_000, prev_end=None, attention=False, tiles=2)
    assert r["spread_by_sm"] == 0.0 and r["spread_by_tile"] == 1.0


def test_explained_share_of_the_spread():
    values = torch.tensor([10.0, 12.0, 10.0, 12.0])
    assert pp.explained(values, torch.tensor([0, 1, 0, 1])) == pytest.approx(1.0)
    assert pp.explained(values, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.0)
    assert pp.explained(torch.tensor([10.0, 11.0, 13.0, 14.0]), torch.tensor([0, 0, 1, 1])) == pytest.approx(9 / 10)
    assert pp.explained(torch.tensor([5.0, 5.0]), torch.tensor([0, 1])) == 0.0
