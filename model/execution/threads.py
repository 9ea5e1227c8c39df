"""How many CPU threads torch gets by default (the server's --threads and
`python -m scheduler.generate --threads`). Standard library only: argument parsing reads it
without importing torch."""

from __future__ import annotations

import math
import os
from pathlib import Path

# --threads, the server's and `python -m scheduler.generate`'s. torch's own default is one thread
# per core, all of them, and its threads wait for each other at every operation, so a core taken
# by anything else (the server's event loop, another process) stalls them all. Measured on a
# 2-vCPU machine, greedy decoding (BENCHMARKS.md): 1 thread against torch's 2 was as fast or
# faster when idle (stories260K 317 vs 245 tok/s, SmolLM2 9.1 vs 7.5), 2.3-3.7x faster with a busy
# loop on one core and up to 14x with another job running. So by default one CPU is left free:
# the CPUs this process may use less one, at most one per physical core (as torch), at least 1;
# OMP_NUM_THREADS, where set, as torch takes it.
CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
CPU_TOPOLOGY = Path("/sys/devices/system/cpu")


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, and the cgroup's CPU quota (a container's --cpus)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def _cgroup_cpu_quota() -> float | None:
    try:
        if CGROUP_V2_CPU_MAX.exists():
            quota, period = CGROUP_V2_CPU_MAX.read_text().split()[:2]
        else:
            quota = (CGROUP_V1_CPU / "cpu.cfs_quota_us").read_text().strip()
            period = (CGROUP_V1_CPU / "cpu.cfs_period_us").read_text().strip()
        if quota == "max" or int(quota) <= 0:
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None


def physical_cores() -> int | None:
    """Physical cores among the CPUs this process may use (hyperthreads of one core count once), or None
    where the topology cannot be read."""
    try:
        cpus = os.sched_getaffinity(0)
        return len({((CPU_TOPOLOGY / f"cpu{cpu}/topology/physical_package_id").read_text().strip(),
                     (CPU_TOPOLOGY / f"cpu{cpu}/topology/core_id").read_text().strip()) for cpu in cpus}) or None
    except (AttributeError, OSError):
        return None


def default_threads() -> int:
    """torch CPU threads by default (see above): OMP_NUM_THREADS where set, else the usable CPUs less
    one, at most one per physical core, at least 1."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    cpus = usable_cpus()
    return max(1, min(cpus - 1, physical_cores() or cpus))


THREADS_HELP = ("torch CPU threads; 0: torch's choice, one per core (default: %(default)s, the CPUs this process "
                "may use less one, at most one per physical core; $OMP_NUM_THREADS where set)")
