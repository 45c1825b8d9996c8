"""How many CPU threads torch may use, chosen so that a shared machine is not oversubscribed.

torch starts one intra-op thread per core. Every multi-threaded op (an ``argsort`` for N:M selection, a matmul, a
copy) then waits for its slowest thread, so when other jobs keep the cores busy a descheduled thread stalls the op
and the busy-waiting threads take CPU from the other jobs as well: magnitude 2:4 on a 135M model took 3.3 s on an
idle 2-core machine and 40 s while two other torch jobs ran. :func:`default_num_threads` therefore leaves out the
cores that are already busy.

Pruning results may depend on the thread count (the reduction order of float sums), so pass an explicit number
(``hf-sparse ... --threads N``) when runs on different machines must agree.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

#: environment variables that, when set, fix the thread count (the first one wins)
THREAD_ENV_VARS = ("HF_SPARSE_NUM_THREADS", "OMP_NUM_THREADS")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under ``taskset`` or a container limit)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_num_threads() -> int:
    """The thread count used when none is given.

    ``HF_SPARSE_NUM_THREADS`` or ``OMP_NUM_THREADS`` when set; otherwise the CPUs this process may use minus those
    other work keeps busy (the 1-minute load average, rounded), and at least 1. On an idle machine that is every
    core, as torch would choose; on a machine whose cores are all busy it is 1.

    >>> 1 <= default_num_threads() <= max(available_cpus(), int(os.environ.get("OMP_NUM_THREADS", 1)))
    True
    """
    for name in THREAD_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            try:
                count = int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a positive integer") from None
            if count < 1:
                raise ValueError(f"{name}={value!r} is not a positive integer")
            return count
    cpus = available_cpus()
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average (Windows): behave as torch does
        busy = 0
    return max(1, min(cpus, cpus - busy))


def set_num_threads(count: int | None = None) -> int:
    """Set torch's intra-op thread count to ``count`` (default :func:`default_num_threads`); returns it.

    >>> import torch
    >>> previous = torch.get_num_threads()
    >>> set_num_threads(1), torch.get_num_threads()
    (1, 1)
    >>> _ = set_num_threads(previous)
    """
    import torch

    if count is None:
        count = default_num_threads()
    elif isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"the thread count must be a positive integer, got {count!r}")
    torch.set_num_threads(count)
    logger.info("using %d CPU thread(s) (%d CPUs available)", count, available_cpus())
    return count


__all__ = ["THREAD_ENV_VARS", "available_cpus", "default_num_threads", "set_num_threads"]
