"""Measurements the benchmarks share: a matmul peak to express FLOP/s against, and best-of-n timing."""

import time
from collections.abc import Callable

import torch

from trajrep.checks import cpu_has_bf16


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], repeats: int = 3, device: torch.device = torch.device("cpu")) -> float:
    """The fastest of `repeats` timed calls (after the caller's warm-up): the least disturbed by other load."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak(device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                size: int | None = None) -> float:
    """FLOP/s of a large square matmul on `device`: the ceiling that a step's achieved FLOP/s is compared with.
    A CPU without bf16 instructions emulates bf16 at well under 1 GFLOP/s (a 2048-square took 66 s on an AVX2-only
    EPYC), so there a 512-square measures it."""
    if size is None:
        emulated = device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_bf16()
        size = 8192 if device.type == "cuda" else 512 if emulated else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    return 2 * size ** 3 / best_seconds(lambda: a @ b, repeats=5, device=device)
