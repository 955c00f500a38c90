"""The machine's speed right now, for benchmarks on a shared, noisy machine: one fixed matmul.

Benchmarks run it between their interleaved rounds and print it beside their ratios, so a round
measured while another process held the cores can be told apart.
"""

from __future__ import annotations

import time

import torch


def peak_probe() -> float:
    """GFLOP/s of a fixed 512x512 fp32 matmul."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    return 20 * 2 * 512**3 / (time.perf_counter() - t) / 1e9
