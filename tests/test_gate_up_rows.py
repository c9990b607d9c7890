"""kernels/gate_up_rows.py: CATS's output-sparse up projection (rows of up computed where |silu(gate)| passes its
threshold, exact zeros elsewhere) against the reference. Interpreted on CPU."""
import pytest
import torch

from kernels import gate_up_rows
from tests.kernel_cases import DEVICE, TOL, grid, poisoned, rel_err

F16, BF16 = torch.float16, torch.bfloat16


@pytest.mark.parametrize("sparsity,M,dtype", grid([0.0, 0.5, 0.95], [1, 3], [F16, BF16], quick=[(0.5, 1, BF16)]))
def test_gate_up_rows_matches_reference(sparsity, M, dtype):
    K, I = 70, 53
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    gate = torch.randn(M, I, dtype=dtype, device=DEVICE)
    w_up = (torch.randn(I, K, device=DEVICE) / K ** 0.5).to(dtype)
    a = torch.nn.functional.silu(gate.float()).abs()
    t = torch.quantile(a.flatten(), sparsity).expand(I).contiguous() if sparsity else torch.zeros(I, device=DEVICE)
    t = t * (torch.rand(I, device=DEVICE) * 0.4 + 0.8)  # per-row thresholds
    ref = gate_up_rows.gate_up_rows_ref(x.float(), gate.float(), w_up.float(), t)
    for config in [(8, 32, 4), (16, 16, 2), gate_up_rows.default_config(M)]:
        out = poisoned((M, I), dtype)
        gate_up_rows.launch(x, gate, w_up, t, config, out)
        assert not out.isnan().any()
        assert rel_err(out, ref) < TOL[dtype]
        kept = ref != 0
        assert torch.equal(out != 0, kept) or sparsity == 0  # exact zeros where the mask is off
    y = gate_up_rows.gate_up_rows(x, gate, w_up, t, gate_up_rows.default_config(M))
    assert rel_err(y, ref) < TOL[dtype]
