"""How many CPU cores are free for decoding right now.

Decoding splits each step over threads that meet at a barrier; if another process keeps one of
those threads' cores busy, every step waits for the descheduled thread and decoding can fall
far below what one thread gives. So before generating, santa counts the cores that other
processes left free: the busy time of the cores this process may run on (``/proc/stat``), less
this process's own CPU time, over the time since the last count (or a short sample). No torch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

SAMPLE = 0.015  # seconds to watch when there is no recent count to compare with
BUSY_MARGIN = 0.3  # others' use of 0.7 of a core or more takes that core
RECENT = 30.0  # a count older than this is not compared against (the load may have changed)


@dataclass(frozen=True)
class _Count:
    at: float  # time.monotonic()
    busy: float  # busy seconds of the allowed cores since boot (all processes)
    own: float  # this process's CPU seconds


def allowed_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _busy_seconds(cores: set[int]) -> float | None:
    """Busy time of ``cores`` since boot (user, nice, system, irq, softirq, steal), or None."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cores:
            continue
        values = [int(v) for v in fields[:8]]
        busy += values[0] + values[1] + values[2] + values[5] + values[6] + values[7]
    return busy / ticks


class CoreMeter:
    """Counts free cores; keep one per process (it remembers the last count)."""

    def __init__(self) -> None:
        self._last: _Count | None = None

    def start(self) -> None:
        """Take a first count now (e.g. while a model loads), so the first :meth:`free` need not
        wait :data:`SAMPLE` to have something to compare with."""
        try:
            self._last = self._count(set(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            self._last = None

    def _count(self, cores: set[int]) -> _Count | None:
        busy = _busy_seconds(cores)
        return None if busy is None else _Count(time.monotonic(), busy, time.process_time())

    def free(self) -> int:
        """Cores this process may use that other processes are not using (at least 1)."""
        try:
            cores = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return os.cpu_count() or 1
        now = self._count(cores)
        if now is None:
            return len(cores)
        before = self._last
        if before is None or now.at - before.at > RECENT or now.at - before.at < SAMPLE / 2:
            before = now
            time.sleep(SAMPLE)
            now = self._count(cores) or now
        self._last = now
        elapsed = now.at - before.at
        if elapsed <= 0:
            return len(cores)
        others = max(0.0, (now.busy - before.busy) - (now.own - before.own)) / elapsed
        # A core counts as taken only when others kept it mostly busy: a client that worked a
        # while and now waits for our answer (an editor, a benchmark) leaves its core free.
        return max(1, min(len(cores), len(cores) - int(others + BUSY_MARGIN)))
