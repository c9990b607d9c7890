"""Triton kernels for sparse decode; each file holds one kernel, its launcher and its PyTorch reference."""
