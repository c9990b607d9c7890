"""Triton kernels for sparse decode, one kernel per file, on shared building blocks:
common.py (batch limits, input and output stages), stream.py (the batch-1 kept-row stream), formats.py (weight
formats), configs.py (launch configs as data), reference.py (plain-PyTorch references of the GEMV family);
sparse_gemv.py, sparse_gemv_batch.py, sparse_mlp.py, gate_up_rows.py and decode_attention.py each hold one kernel
with its launch and op. docs/design.md maps them."""
