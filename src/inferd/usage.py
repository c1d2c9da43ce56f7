"""What a process tree uses: CPU-seconds and resident memory, read from ``/proc`` (Linux).

``inferd bench --server-pid`` reads the server's this way, and ``inferd select`` its own.
"""

from __future__ import annotations

import os

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def read_pid(pid: int) -> tuple[float, int]:
    """CPU-seconds and resident bytes of ``pid`` and its descendants (0, 0 once it is gone)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    cpu, rss, todo = 0.0, 0, [pid]
    while todo:
        current = todo.pop()
        found = stats.get(current)
        if found is None:
            continue
        cpu += (int(found[11]) + int(found[12])) * _TICK_S
        rss += int(found[21]) * _PAGE
        todo.extend(children.get(current, ()))
    return cpu, rss
