"""How many CPUs this process may really use, and torch's thread count set from it.

torch defaults to one thread per core it sees, which ignores a container's CPU quota and the other jobs of a shared
machine; oversubscribed, a CPU pretraining ran 15-25x slower than with one thread. `available_cpus` reads the
affinity mask and the cgroup quota; `use_threads` sets torch's intra-op threads from it or from the user's choice.
"""

import math
import os
from pathlib import Path

import torch

from trajrep.errors import TrajrepError

CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def cgroup_cpu_limit(v2: Path = CGROUP_V2, v1: tuple[Path, Path] = CGROUP_V1) -> int | None:
    """CPUs the cgroup quota allows (rounded up), None without a quota."""
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
        if v1[0].is_file() and v1[1].is_file():
            quota, period = (int(path.read_text()) for path in v1)
            return None if quota <= 0 else max(1, math.ceil(quota / period))
    except (OSError, ValueError):
        return None
    return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return min(cpus, limit) if limit else cpus


def use_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to `threads`, or to the available CPUs when None; returns the number set."""
    if threads is not None and threads < 1:
        raise TrajrepError(f"threads must be >= 1 (or unset for the {available_cpus()} CPUs available), got {threads}")
    chosen = threads or available_cpus()
    torch.set_num_threads(chosen)
    return chosen


def default_workers() -> int:
    """Loader workers for datasets decoded from files: the CPUs left besides the main process, at most 4."""
    return max(0, min(4, available_cpus() - 1))
