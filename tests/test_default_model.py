"""default_model.py: the shipped calibration is copied into the default checkpoint whole, and a copy cut short is
replaced (files only: the model itself is covered by test_convert.py and test_tokenizer.py)."""
import os

from default_model import with_shipped_calibration
from sparsity import CALIB_FILE


def test_shipped_calibration_copied_whole_and_replaced_when_cut_short(tmp_path):
    shipped = tmp_path / "shipped.safetensors"
    shipped.write_bytes(os.urandom(4096))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    target = ckpt / CALIB_FILE
    assert with_shipped_calibration(ckpt, shipped) == ckpt
    assert target.read_bytes() == shipped.read_bytes()
    target.write_bytes(shipped.read_bytes()[:1000])  # an interrupted copy: newer than the shipped file, shorter
    with_shipped_calibration(ckpt, shipped)
    assert target.read_bytes() == shipped.read_bytes()
    assert sorted(p.name for p in ckpt.iterdir()) == [CALIB_FILE]  # no temporary file left behind
    shipped.write_bytes(os.urandom(4096))  # a newer shipped file of the same size
    os.utime(shipped, (target.stat().st_mtime + 10,) * 2)
    with_shipped_calibration(ckpt, shipped)
    assert target.read_bytes() == shipped.read_bytes()
    with_shipped_calibration(ckpt, tmp_path / "missing.safetensors")  # nothing shipped: nothing changes
    assert target.read_bytes() == shipped.read_bytes()
