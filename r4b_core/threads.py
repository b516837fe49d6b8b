"""How many torch threads r4b runs with, chosen by the CLI (never at import time).

Decoding on a CPU is a chain of matrix-vector products that wait on memory; extra threads on SMT
siblings or on cores another process is using only add barrier waits (a preempted OpenMP thread
stalls every parallel region until it is scheduled again). The choice, first match wins:

    1. ``--threads N`` on the command line
    2. ``OMP_NUM_THREADS`` in the environment (torch already read it; r4b keeps it)
    3. the physical cores this process may run on (CPU affinity, one per core, SMT siblings not counted),
       fewer when other processes keep the CPUs busy: the 1-minute load average over ``os.cpu_count()``
       is the busy share of every CPU, and r4b takes no more threads than the CPUs that share leaves idle
       (at least 1), saying so in one line (``ThreadChoice.note``) with the ``--threads`` that overrides it.
       On a 2-core machine with another process decoding, 2 threads ran at 7-19 tokens/s where 1 ran at
       126-136: an OpenMP thread that loses its core stalls every parallel region until it runs again.

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
    note: str | None = None  # one line for stderr when the CPUs' load cut the count, else None


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


def cpu_load() -> tuple[float, int] | None:
    """(1-minute load average, CPUs the kernel counts), or None where the platform has no load average."""
    try:
        return os.getloadavg()[0], os.cpu_count() or 1
    except (AttributeError, OSError):
        return None


def idle_cpu_threads(cores: int, usable_cpus: int, load: tuple[float, int] | None) -> int:
    """At most ``cores`` threads, and no more than the CPUs among ``usable_cpus`` the load leaves idle
    (rounded to the nearest whole CPU, at least 1); ``cores`` when there is no load reading."""
    if load is None:
        return cores
    average, cpus = load
    busy_share = min(max(average / max(cpus, 1), 0.0), 1.0)
    idle = usable_cpus * (1.0 - busy_share)
    return max(1, min(cores, int(idle + 0.5)))


def choose_threads(requested: int | None = None, environ: dict[str, str] | None = None,
                   load: tuple[float, int] | None = None) -> ThreadChoice:
    """The thread count to use (see the module docstring); no side effects.

    ``load``: (1-minute load average, CPU count) as ``cpu_load`` reads it; None: the machine's load is not
    considered (only the default, step 3, ever looks at it). A ``requested`` count below 1, or an
    ``OMP_NUM_THREADS`` that is not a whole number of at least 1, is a ValueError naming the value.
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
    cores = physical_cores()
    threads = idle_cpu_threads(cores, len(_usable_cpus()), load)
    if threads == cores:
        return ThreadChoice(cores, "physical cores")
    average, cpus = load
    note = (f"r4b: other processes keep the CPUs busy (load {average:.1f} on {cpus} CPUs): using {threads} torch "
            f"thread{'s' if threads > 1 else ''}, not {cores}; --threads {cores} uses {cores} anyway.")
    return ThreadChoice(threads, "physical cores, fewer on busy CPUs", note)


def configure_threads(requested: int | None = None) -> ThreadChoice:
    """Choose the thread count (the machine's load considered) and apply it to torch's intra-op pool;
    returns the choice (its ``note``, when set, is for the user: the CLI prints it once)."""
    import torch

    choice = choose_threads(requested, load=cpu_load())
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    return choice
