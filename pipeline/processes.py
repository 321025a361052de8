"""Local processes by pid: whether one still runs, which ones a process started.

At the bottom of ``pipeline/``: the store's writer leases (a dead writer's lease on this host
is void) and the Ray kit (which processes a command started, and whether they ended) both
need it, and neither should import the other.
"""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs here; a zombie (ended, not yet reaped) counts as ended."""
    if os.path.isdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    try:  # no /proc (macOS): signal 0 tests existence only
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def descendant_pids(root: int) -> list[int]:
    """Process ids below ``root`` (from /proc; Linux, else none), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    out, stack = [], [root]
    while stack:
        for pid in children.get(stack.pop(), []):
            out.append(pid)
            stack.append(pid)
    return out
