"""How many torch threads r4b runs with, chosen by the CLI (never at import time).

Decoding on a CPU is a chain of matrix-vector products that wait on memory; extra threads on SMT
siblings or on cores another process is using only add barrier waits (a preempted OpenMP thread
stalls every parallel region until it is scheduled again). The choice, first match wins:

    1. ``--threads N`` on the command line
    2. ``OMP_NUM_THREADS`` in the environment (torch already read it; r4b keeps it)
    3. the physical cores this process may run on (CPU affinity, one per core, SMT siblings not counted)

``configure_threads`` applies the choice with ``torch.set_num_threads`` and says where it came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

THREADS_ENV = "OMP_NUM_THREADS"
_SYS_CPU = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class ThreadChoice:
    """The number of torch threads and where it came from: '--threads', 'OMP_NUM_THREADS' or 'physical cores'."""

    threads: int
    source: str


def _usable_cpus() -> list[int]:
    """The logical CPUs this process may run on (its affinity mask; all CPUs where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int] | None = None, sys_cpu: Path = _SYS_CPU) -> int:
    """Distinct physical cores among ``cpus`` (default: this process's affinity), from the kernel's
    topology files (package id, core id); the logical count where those files are missing."""
    cpus = _usable_cpus() if cpus is None else cpus
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:  # no sysfs (not Linux, a sandbox): count logical CPUs
            return max(len(cpus), 1)
    return max(len(cores), 1)


def choose_threads(requested: int | None = None, environ: dict[str, str] | None = None) -> ThreadChoice:
    """The thread count to use (see the module docstring); no side effects.

    A ``requested`` count below 1, or an ``OMP_NUM_THREADS`` that is not a whole number of at least 1,
    is a ValueError naming the value.
    """
    environ = os.environ if environ is None else environ
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be at least 1, got {requested}.")
        return ThreadChoice(requested, "--threads")
    raw = environ.get(THREADS_ENV, "").strip()
    if raw:
        # OpenMP allows a list ("4,2") for nested levels; the first entry is this level's
        first = raw.split(",")[0].strip()
        if not first.isdigit() or int(first) < 1:
            raise ValueError(f"{THREADS_ENV}={raw!r} is not a thread count; set it to a whole number such as 2, "
                             "or unset it and pass --threads N.")
        return ThreadChoice(int(first), THREADS_ENV)
    return ThreadChoice(physical_cores(), "physical cores")


def configure_threads(requested: int | None = None) -> ThreadChoice:
    """Choose the thread count and apply it to torch's intra-op pool; returns the choice."""
    import torch

    choice = choose_threads(requested)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    return choice
