"""Launch configs of the input-sparse GEMV family as data: what each projection of a decode step launches with, by
batch, shape and weight format. The numbers come from sweeps on an H100 and an H200 (scripts/tune_gemv.py); the
evidence for each rule is in docs/perf-notes.md ("Launch configs"). Nothing here launches anything.
"""
from typing import NamedTuple

import triton

from kernels.formats import FLOAT, INT8, QuantFormat


class Config(NamedTuple):
    block_n: int
    block_k: int
    split_k: int  # programs along K; the last one of a column tile reduces the partials
    num_warps: int
    num_stages: int
    dot: int  # 1: tensor-core tl.dot over batch rows padded to 16; 0: FMA path (needs M == 1)
    masked: int = 0  # batch 1, 16/8-bit: 1 streams the rows in order with masked loads instead of a kept list


def default_config(M: int, K: int, sizes, glu: bool, n_sm: int = 132, fmt: QuantFormat = FLOAT,
                   head: bool = False, group: int = 0) -> Config:
    """The launch config of a projection: M batch rows, K inputs, output segments `sizes` (gate and up with glu),
    weights in format `fmt` with scale groups of `group` inputs (int4); head: the LM head (a vocabulary of columns,
    never thresholded). Each rule's sweep is in docs/perf-notes.md, "Launch configs"."""
    out = sizes[:1] if glu else sizes
    fits = [b for b in (128, 64, 32) if all(s % b == 0 for s in out)] or [64]
    block_n = fits[0]

    def per_sm(programs: int, block: int, min_k: int) -> int:  # K ranges for `programs` resident per SM
        return max(1, min(round(programs * n_sm / counters_size(sizes, glu, block)), K // min_k))

    if head and M == 1:  # 256-column tiles, a second K range while both fit three programs per SM
        block_n = 256 if sizes[0] % 256 == 0 else block_n
        tiles = counters_size(sizes, glu, block_n)
        return Config(block_n, 128, 2 if 2 * tiles <= 3 * n_sm and K >= 1024 else 1, 4, 1, 0)
    if M > 1:  # tensor cores over the batch padded to 16 rows (~110 registers: 4 programs per SM)
        block_k = min(64, group or 64)
        split = max(1, min(4 * n_sm // counters_size(sizes, glu, block_n), triton.cdiv(K, block_k), 32))
        return Config(block_n, block_k, split, 4, 3, 1)
    # batch 1: each program streams the kept rows of a K range
    if group:  # int4: steps within one scale group; gate/up (twice the registers), o and down two programs per SM
        # (gate/up 128 columns, o 128 columns and 128-row steps, down 256 columns), q/k/v three (256 columns)
        if glu:
            block_n = next((b for b in fits if b <= 128), block_n)
            split = max(1, min(round(2 * n_sm / counters_size(sizes, glu, block_n)), K // 512))
            return Config(block_n, min(64, group), split, 4, 1, 0)
        if len(sizes) == 1 and K <= sizes[0]:
            block_n = next((b for b in fits if b <= 128), block_n)
            return Config(block_n, min(128, group), per_sm(2, block_n, 512), 4, 1, 0)
        block_n = 256 if all(s % 256 == 0 for s in out) else block_n
        return Config(block_n, min(64, group), per_sm(2 if len(sizes) == 1 else 3, block_n, 512), 4, 1, 0)
    if fmt is INT8 and glu:  # half the bytes per row: four K ranges where they stay within three programs per SM
        split = 4 if 4 * counters_size(sizes, glu, block_n) <= 3 * n_sm else 2
        return Config(block_n, 64, max(1, min(split, K // 1024)), 4, 1, 0)
    if len(sizes) == 1 and K <= sizes[0]:  # o: 64 columns; int8 128-row steps, three programs per SM and K ranges
        # of >= 1024 inputs, 16-bit four programs per SM (H200 sweep, session 23) streaming 128-row steps in order
        # with masked loads, no list (session 29: -1.3 us a launch at 50% on an H100)
        block_n = next((b for b in reversed(fits) if b >= 64), block_n)
        if fmt is INT8:
            return Config(block_n, 128, per_sm(3, block_n, 1024), 4, 1, 0)
        return Config(block_n, 128, per_sm(4, block_n, 512), 4, 1, 0, masked=1)
    if glu:  # two programs along K; the narrower tile while two per tile still fit three programs per SM
        block_n = next((b for b in reversed(fits) if b >= 64 and 2 * counters_size(sizes, glu, b) <= 3 * n_sm),
                       block_n)
        return Config(block_n, 64, max(1, min(2, K // 512)), 4, 1, 0)
    return Config(block_n, 64, per_sm(3, block_n, 512), 4, 1, 0)  # three resident programs per SM


def acc_rows(block_n: int, num_warps: int, bits: int = 16) -> int:
    """Rows of a [BK, BN] weight tile that one pass of all threads covers with 16-byte loads along a row, for
    weights of `bits` (QuantFormat.bits)."""
    return max(1, num_warps * 32 * (128 // bits) // block_n)


def counters_size(sizes, glu: bool, block_n: int) -> int:
    out = sizes[:1] if glu else sizes
    return sum(triton.cdiv(s, block_n) for s in out)


def k_layout(K: int, config, group: int = 0) -> tuple:
    """(inputs per program along K, programs along K) for a config: no program is left empty. Weights with scale
    groups (group > 0): K ranges of whole groups."""
    align = max(config[1], group)
    k_split = triton.cdiv(triton.cdiv(K, config[2]), align) * align
    return k_split, triton.cdiv(K, k_split)


class DownConfig(NamedTuple):
    block_d: int  # columns of W_down per work unit
    rows: int  # kept rows per step of a unit
    n_red: int  # reduction units at the end, one slice of the output each


def default_down_config(D: int, I: int, config) -> DownConfig:
    """For gate/up's Config `config` (its column tiles are the P partials): a reduction unit loads all P partials
    of its slice at once, 4096 floats."""
    red_d = max(1, 4096 // triton.next_power_of_2(counters_size((I, I), True, config[0])))
    return DownConfig(min(1024, triton.next_power_of_2(D)), 8, triton.cdiv(D, red_d))


def mlp_counters_size(I: int, config) -> int:
    """Per gate/up column tile a split-K counter and a queue slot, then five shared counters (see _mlp_down)."""
    return 2 * counters_size((I, I), True, config[0]) + 5
