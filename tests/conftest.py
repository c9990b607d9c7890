import os

import pytest
import torch

# Kernels run in Triton's interpreter on machines without a GPU; this must precede their import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
