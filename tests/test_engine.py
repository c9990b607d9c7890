"""engine.py: sampling (greedy, temperature, top-k, top-p); the Generator's prefill of a continuation onto a cache
that already holds the tokens before it; the weight bytes a decode step reads."""
import copy
from dataclasses import replace

import pytest
import torch

from engine import SAMPLE_TOP, Generator, bytes_per_token, cache_bytes_per_token, sample, sampling_params
from kernels.formats import INT4, INT8
from loading import random_model
from model import ModelArgs
from quantization import quantize_model


def test_sampling_follows_the_distribution_it_is_given():
    """Each row draws from softmax(logits / T) restricted to its top_k tokens and to the most likely ones holding
    top_p of the mass: frequencies over many rows match those probabilities; greedy is the argmax."""
    n, V = 40000, 6
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])
    logits = base.expand(n, V)
    assert torch.equal(sample(logits, None), torch.full((n, 1), 5))
    assert sampling_params(0.0, 3, 0.5) is None
    for T, k, p in [(1.0, None, 1.0), (0.7, 3, 1.0), (1.3, None, 0.8), (1.0, 4, 0.9), (2.0, 1, 1.0)]:
        probs = torch.softmax(base / T, -1)
        order = probs.argsort(descending=True)
        sorted_p = probs[order]
        keep = torch.zeros(V, dtype=torch.bool)
        keep[order] = (torch.arange(V) < (k or V)) & (sorted_p.cumsum(0) - sorted_p < p)
        want = torch.where(keep, probs, 0.0)
        want /= want.sum()
        got = torch.bincount(sample(logits, sampling_params(T, k, p)).flatten(), minlength=V).double() / n
        assert torch.all(got[~keep] == 0), (T, k, p, got)
        assert (got - want.double()).abs().max() < 0.01, (T, k, p, got, want)


def test_sampling_ranks_a_large_vocabulary_by_its_most_likely_tokens():
    """Past SAMPLE_TOP tokens: top_k and top_p still keep exactly the tokens their rule names, and with neither
    every token of the vocabulary can be drawn."""
    V, n = 3 * SAMPLE_TOP + 5, 4000
    logits = torch.randn(V) * 2
    order = logits.argsort(descending=True)
    for k, p in [(7, 1.0), (None, 0.3), (50, 0.6)]:
        probs = torch.softmax(logits, -1)[order]
        kept = set(order[((torch.arange(V) < (k or V)) & (probs.cumsum(0) - probs < p))].tolist())
        got = set(sample(logits.expand(n, V), sampling_params(1.0, k, p)).flatten().tolist())
        assert got <= kept and len(got) >= min(len(kept), 5), (k, p, len(kept), len(got))
    flat = torch.zeros(V)  # uniform: a draw over the whole vocabulary reaches beyond the first SAMPLE_TOP
    assert sample(flat.expand(n, V), sampling_params(1.0)).max() >= SAMPLE_TOP


def test_sampling_settings_change_without_a_new_generator():
    """set_sampling copies new values into the tensor the steps read; a seed makes a sampled run repeatable."""
    args = ModelArgs(dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=96, vocab_size=101, max_seq_len=64)
    gen = Generator(random_model(args, "cpu", torch.float32, seed=0))
    gen.setup(1, 64)
    prompt = torch.randint(0, 101, (1, 5))
    greedy, _ = gen.generate(prompt, 12)
    gen.set_sampling(1.5, top_k=50, top_p=0.95)
    assert not gen.greedy and gen.params.tolist() == pytest.approx([1.5, 50.0, 0.95])
    torch.manual_seed(7)
    a, _ = gen.generate(prompt, 12)
    torch.manual_seed(7)
    b, _ = gen.generate(prompt, 12)
    assert torch.equal(a, b) and not torch.equal(a, greedy)
    gen.set_sampling(1.5, top_k=1)
    assert torch.equal(gen.generate(prompt, 12)[0], greedy)
    gen.set_sampling(0.0)
    assert gen.greedy and torch.equal(gen.generate(prompt, 12)[0], greedy)


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


def test_cache_bytes_per_token_are_the_caches_read():
    """bench.py's KV-cache bytes a step reads: the caches' bytes per position, times the positions attended (the
    sliding window's at most)."""
    args = ModelArgs(dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=96, vocab_size=300)
    model = random_model(args, "cpu", torch.bfloat16)
    model.setup_caches(1, 40)
    per_position = sum(c.numel() * c.element_size() for layer in model.layers
                       for c in (layer.attention.kv_cache.k, layer.attention.kv_cache.v)) / 40
    assert cache_bytes_per_token(args, 10) == 10 * per_position
    assert cache_bytes_per_token(replace(args, sliding_window=4), 10) == 4 * per_position

