"""engine.py: the Generator's prefill of a continuation onto a cache that already holds the tokens before it; the
weight bytes a decode step reads."""
import copy

import pytest
import torch

from engine import Generator, bytes_per_token
from kernels.formats import INT4, INT8
from loading import random_model
from model import ModelArgs
from quantization import quantize_model


def test_continuation_prefill_matches_a_whole_prefill():
    """Prefilling only the new tokens at positions start.. (a chat's next turn, the earlier ones cached) gives the
    tokens a prefill of the whole sequence gives, whatever later positions of the cache held before."""
    args = ModelArgs(dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=96, vocab_size=101, max_seq_len=64)
    gen = Generator(random_model(args, "cpu", torch.float32, seed=0))
    gen.setup(1, 64)
    first, turn = torch.randint(0, 101, (1, 13)), torch.randint(0, 101, (1, 7))
    whole, st = gen.generate(torch.cat([first, turn], 1), 8)
    assert st.prompt_tokens == 20
    gen.generate(first, 5)  # positions 13..16 now hold this run's tokens
    cont, st = gen.generate(turn, 8, start=13)
    assert st.prompt_tokens == 7 and torch.equal(cont, whole)


def weight_bytes(model) -> int:
    """The bytes a dense decode step reads, counted from the model's tensors: every parameter and quantization
    scale, but not the embedding table (one row of it is read) unless it doubles as the LM head."""
    emb = model.tok_embeddings.weight
    scales = [b for n, b in model.named_buffers() if n.endswith(".scale")]
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *scales))
    return total - (0 if model.output.weight is emb else emb.numel() * emb.element_size())


@pytest.mark.parametrize("tied", [False, True])
def test_bytes_per_token_counts_what_a_dense_step_reads(tied):
    """The roofline's bytes (bench.py) and generate.py's "GB/s of weights read": at zero sparsity, the bytes of the
    model's tensors, 16-bit and int8
    (int8 linears and LM head with their scales; a tied embedding table is read only while it is the head) and int4
    (linears packed eight to a word with two float16 per group and column, the head int8)."""
    args = ModelArgs(dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=96, vocab_size=300,
                     tie_embeddings=tied)
    model = random_model(args, "cpu", torch.bfloat16)
    assert bytes_per_token(args, {}) == weight_bytes(model)
    assert bytes_per_token(args, {}, fmt=INT4) == weight_bytes(quantize_model(copy.deepcopy(model), INT4))
    assert bytes_per_token(args, {}, fmt=INT8) == weight_bytes(quantize_model(model, INT8))
    q_bytes = args.dim * args.n_head * args.head_dim * 2
    assert bytes_per_token(args, {(0, "q"): 0.5}) == bytes_per_token(args, {}) - q_bytes / 2  # half of q's rows

