"""Process titles: a placement group's process says which group it is.

Every group is spawned by :mod:`multiprocessing`, so without a title ``ps`` shows each one as
``python -c from multiprocessing.spawn import spawn_main ...`` and nobody can tell ``decode``
from ``detect`` (to watch one's CPU, or to kill one to try a restart).  With ``setproctitle``
(a base dependency) the whole command line reads ``gamecopilot: GROUP``; without it (a
platform it does not build on) the kernel's short name in ``/proc/self/comm`` is set instead
(15 bytes, what ``ps -o comm``, ``top`` and ``pgrep`` show), which needs no extension module.
"""

from __future__ import annotations

import contextlib

COMM_MAX = 15  # the kernel keeps at most this many bytes of a task's name


def group_title(group: str) -> str:
    return f"gamecopilot: {group}"


def set_process_title(title: str, *, comm: str | None = None) -> None:
    """Set this process's title to ``title``, or at least its short name to ``comm`` (by default
    ``title`` cut to 15 bytes).  Never fails: a title is a convenience, not a reason to stop."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        pass
    else:
        setproctitle(title)
        return
    write_comm(comm or title)


def write_comm(name: str) -> None:
    """The ``prctl(PR_SET_NAME)`` of Linux without ctypes: write the short name to /proc/self/comm."""
    data = name.encode("utf-8", "replace")[:COMM_MAX]
    with contextlib.suppress(OSError), open("/proc/self/comm", "wb") as fh:
        fh.write(data)


def set_group_title(group: str) -> None:
    """``gamecopilot: decode`` on the command line; ``gc:decode`` as the short name."""
    set_process_title(group_title(group), comm=f"gc:{group}")
