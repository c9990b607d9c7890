"""scripts/profile_phases.py without a GPU: its patches still fit the kernel files, and the phase arithmetic."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import profile_phases as pp  # noqa: E402
from errors import UserError  # noqa: E402


def test_instrumented_kernels_load(tmp_path):
    gemv, att = pp.load_instrumented(tmp_path)
    assert gemv.PROF == [None] and att.PROF == [None]
    assert "prof_ptr" in gemv._sparse_gemv_kernel.arg_names and "prof_ptr" in att._decode_attention_kernel.arg_names
    src = (tmp_path / "sparse_gemv_phases.py").read_text()
    for slot in (0, 2, 4, 6, 8, 10, 16, 18, 20, 22):
        assert src.count(f"_stamp(prof, {slot},") == 1
    assert '"teal::' not in src  # registered beside the real ops, not over them


def test_a_changed_kernel_file_is_reported(tmp_path):
    f = tmp_path / "sparse_gemv.py"
    f.write_text((Path(pp._path.ROOT) / "kernels" / "sparse_gemv.py").read_text().replace("MAX_ROWS = 8\n", ""))
    with pytest.raises(UserError, match="anchor 'MAX_ROWS = 8' occurs 0 times"):
        pp.instrumented_source(f, pp.GEMV_PATCHES)


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
