"""Tensor parallelism over torch.distributed (NCCL on GPUs, gloo on CPUs), as gpt-fast splits a Llama.

Column-parallel: q/k/v (each rank its query heads and their KV heads, GQA-aware) and gate/up (a slice of the
intermediate channels) see the whole input, so every rank skips the same input rows. Row-parallel: o and down hold
a slice of their input channels (and of their per-channel thresholds), skip within it, and their partial outputs
are summed by one all-reduce each (the residual added on rank 0 only). The LM head is split by vocabulary (padded
to a multiple of the ranks) and its logits gathered. Embeddings and norms are replicated. Each rank reads only its
slices of the safetensors file (read_shard); quantized weights shard along the same axes, group scales included.

    torchrun --nproc-per-node N generate.py --checkpoint CKPT --sparsity 0.5
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from safetensors import safe_open
from torch import Tensor

from errors import UserError

# NVLink multicast (NVLS / symmetric-memory multicast) stays off on the lent machines: set here, before the process
# group exists, and never left to the environment
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # the older name on torch 2.11


@dataclass(frozen=True)
class TP:
    rank: int
    world: int
    group: object  # the ProcessGroup
    device: torch.device  # where its collectives run (a GPU for NCCL)
    control: object = None  # a gloo group over the same ranks for host messages (the server's commands)

    def part(self, n: int) -> slice:
        """This rank's slice of n channels split evenly."""
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    def all_reduce(self, x: Tensor) -> Tensor:
        return funcol.all_reduce(x, "sum", self.group)

    def sum_values(self, values: list) -> list:
        """Host numbers summed over the ranks (eager, outside compiled code)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def gather_last(self, x: Tensor) -> Tensor:
        """x [..., n] of every rank -> [..., world * n], rank order."""
        g = _gather(x.movedim(-1, 0).contiguous(), 0, self.group)  # [world * n, ...]
        return g.movedim(0, -1)

    def broadcast(self, obj=None):
        """Rank 0's picklable `obj` on every rank, over the host group: no GPU stream is touched, so a decode step
        already queued keeps running."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control or self.group)
        return box[0]

    def agree(self, flag: bool = False) -> bool:
        """Rank 0's flag on every rank (a cheaper broadcast of one bool, once per decoded token)."""
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.broadcast(t, src=0, group=self.control or self.group)
        return bool(t.item())


def from_env(device_type: str) -> Optional[TP]:
    """The TP group of a process started by torchrun (WORLD_SIZE > 1), else None. Sets the multicast switches
    first; on CUDA each rank takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    os.environ.update(NO_MULTICAST)
    device = torch.device(device_type)
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    control = dist.new_group(backend="gloo") if device_type == "cuda" else None  # on CPUs WORLD is gloo already
    return TP(dist.get_rank(), dist.get_world_size(), dist.group.WORLD, device, control)


def close(tp: Optional[TP]):
    """Ends the process group of a torchrun process (all ranks together, after their last collective). The process
    itself then ends through cli.end_rank, without Python's finalization, which gloo's threads can abort."""
    if tp is not None and dist.is_initialized():
        dist.barrier(group=tp.group)
        dist.destroy_process_group()


def check_split(args, world: int, fmt=None):
    """One line for a model that does not split over `world` ranks (fmt: the weights' format; int4 splits o's and
    down's inputs at whole scale groups)."""
    a = args
    if a.n_kv_head % world:
        raise UserError(f"{world} ranks do not divide the model's {a.n_kv_head} KV heads (grouped-query attention "
                        f"splits whole KV heads with their {a.n_head // a.n_kv_head} query heads each): use a "
                        "divisor of the KV heads")
    if a.n_head % world or a.intermediate_size % world:
        raise UserError(f"{world} ranks do not divide the model's {a.n_head} heads and {a.intermediate_size} MLP "
                        "channels")
    for name, k in (("o", a.n_head * a.head_dim), ("down", a.intermediate_size)):
        group = fmt.group(k) if fmt is not None and fmt.code == 2 else 0
        if group and (k // world) % group:
            raise UserError(f"{world} ranks split {name}'s {k} inputs into {k // world}, not whole int4 scale groups "
                            f"of {group}")


def share(tp: Optional[TP], n: int) -> int:
    """How many of n channels split evenly a rank holds (all of them without tensor parallelism)."""
    return n // tp.world if tp is not None else n


def head_rows(vocab: int, world: int) -> int:
    """Vocabulary entries per rank (the last rank's padded with zero rows)."""
    return -(-vocab // world)


def file_slices(name: str, shape: tuple, args, tp: TP) -> Optional[tuple]:
    """How rank tp.rank reads tensor `name` [shape] of a checkpoint file: (dim, [(begin, end), ...]) concatenated
    along dim, or None for all of it. Column ranges of a packed int4 weight are in words."""
    a = args
    parts = name.split(".")
    leaf, owner = parts[-1], parts[-2] if len(parts) > 1 else ""
    cols = shape[-1]

    def columns(segments, n_full):  # column ranges of the full width n_full, in the stored tensor's units
        per = n_full // cols
        return len(shape) - 1, [(s.start // per, s.stop // per) for s in segments]

    if owner in ("wqkv", "w13") and leaf in ("weight", "scale"):
        q, kv, i = a.n_head * a.head_dim, a.n_kv_head * a.head_dim, a.intermediate_size
        sizes = (q, kv, kv) if owner == "wqkv" else (i, i)
        offsets = [sum(sizes[:j]) for j in range(len(sizes))]
        return columns([slice(o + tp.part(n).start, o + tp.part(n).stop) for o, n in zip(offsets, sizes)], sum(sizes))
    if owner in ("wo", "w2"):
        k = a.n_head * a.head_dim if owner == "wo" else a.intermediate_size
        if leaf in ("weight", "input_scale"):  # [K, ...], [K]
            p = tp.part(k)
            return 0, [(p.start, p.stop)]
        if leaf == "scale" and len(shape) == 3:  # int4 [2, K / group, N]: whole groups of the rank's rows
            per = k // shape[1]
            p = tp.part(k)
            return 1, [(p.start // per, p.stop // per)]
        return None  # int8 scales are per output channel
    if name in ("output.weight", "output.scale"):  # a float head [vocab, dim]; the int8 one [dim, vocab], [vocab]
        rows = head_rows(a.vocab_size, tp.world)
        dim = 1 if len(shape) == 2 and shape[0] == a.dim and shape[1] != a.dim else 0
        return dim, [(min(tp.rank * rows, a.vocab_size), min((tp.rank + 1) * rows, a.vocab_size))]
    return None


def read_shard(path: Path, args, tp: TP, device, head_from: Optional[str] = None) -> dict:
    """name -> this rank's slice of each tensor of a safetensors file (file_slices), on `device`: slices of the
    memory-mapped file, never the whole tensor. head_from: the LM head's slice taken from this tensor (a head tied to
    the embedding). The head's slice is padded with zeros to head_rows."""
    out = {}
    with safe_open(str(path), "pt", device="cpu") as f:
        names = list(f.keys())
        if head_from is not None:
            names.append("output.weight")
        for name in names:
            src = head_from if name == "output.weight" and head_from is not None else name
            t = f.get_slice(src)
            shape = tuple(t.get_shape())
            how = file_slices(name, shape, args, tp)
            if how is None:
                out[name] = t[:].to(device)
                continue
            dim, ranges = how
            pieces = [t[tuple([slice(None)] * dim + [slice(b, e)])] for b, e in ranges]
            x = torch.cat(pieces, dim) if len(pieces) > 1 else pieces[0]
            if name.startswith("output.") and x.shape[dim] < head_rows(args.vocab_size, tp.world):
                pad = list(x.shape)
                pad[dim] = head_rows(args.vocab_size, tp.world) - x.shape[dim]
                x = torch.cat([x, x.new_zeros(pad)], dim)
            out[name] = x.to(device)
    return out
