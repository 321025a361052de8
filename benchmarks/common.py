"""Shared pieces of the benchmark scripts: sample data, memory sampling, target lines."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = str((ROOT.parent / "shared" / "data" / "imagenet-sample").resolve())


def local_ray_env() -> None:
    """The environment every benchmark's local Ray runs in (set before Ray or torch is imported):
    its own short temp dir, no auth token or usage stats, no progress bars in the timed output."""
    import tempfile

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's Score-CAM bars; eval prints its own progress lines


def target(name: str, measured: float, op: str, goal: float, fmt: str = "{:.2f}") -> bool:
    """Print the one line per target that RESULTS.md and CI readers look for."""
    ok = measured >= goal if op == ">=" else measured <= goal
    print(f"TARGET {name} measured={fmt.format(measured)} goal={op}{goal} {'PASS' if ok else 'MISS'}", flush=True)
    return ok


def _rss_tree(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (from /proc; Ray workers included)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


class PeakMemory:
    """Samples the process tree's resident memory in a thread: ``with PeakMemory() as m: ...; m.peak``."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        self.peak = _rss_tree(os.getpid())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_tree(os.getpid()))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


def sample_images(data: str, limit: int | None = None) -> list[tuple[str, int]]:
    """(path, class index) of the sample's images, in labels.tsv order."""
    rows = [line.split("\t") for line in Path(data, "labels.tsv").read_text().splitlines()[1:] if line.strip()]
    items = [(str(Path(data, r[0])), int(r[1])) for r in rows]
    return items[:limit] if limit else items


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
