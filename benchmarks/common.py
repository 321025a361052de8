"""Shared pieces of the benchmark scripts: the interleaved comparison harness, sample data,
memory sampling, target lines.

Every script that compares the speed of two or more sides runs them through :func:`compare`:
the arms alternate A B (C) A B (C) ... ``reps`` times after one uncounted warm-up round, the
load average is recorded before every call, and a target is judged on the median of the
per-repetition ratios, printed with its min-max and the load beside it
(:func:`target_ratio`). :func:`target` stays the one printer of ``TARGET`` lines.

Where the spread between repetitions comes from (what the harness does about each):

* **The machine's drift.** This 2-core VM's speed moves by 10-30% from one minute to the
  next, and other engineers' jobs come and go (load 1 to 45 within a session). Run one side
  after the other and the drift lands on one side only: the old sequential extract.py put
  the DataLoader arm at 0.90x of the pipeline; the same code interleaved gave 0.62x, the
  comparison arms running 1.4-1.5x faster when alternated than after the pipeline in one
  sequence. Interleaving puts both sides of a ratio into the same minute, and the median of
  the per-repetition ratios drops one disturbed round; the per-call load printed beside
  every figure says which rounds were disturbed. A ratio measured at load > ~2x the cores
  is not a measurement of the code (see RESULTS.md, extraction under load 32-45).
* **First-run effects.** The first call of an arm pays for things later calls do not:
  Ray's worker processes starting and importing torch (~3 s each), the first DataLoader
  workers' fork, oneDNN building its kernels for a new input shape and memory layout (the
  first channels-last batch), lazily opened Zarr shards, Python's own imports inside the
  arm. The warm-up round (``warmup=True``) runs every arm once uncounted; its figures are
  kept in :attr:`Comparison.warmup` and printed in the report, so the size of the effect is
  visible on every run rather than mixed into the median. (For the model's forward alone
  the probe under *Thread settings* saw no first-call cost above the load's noise: 3.4 s
  for the first call, 4.0-10.4 s for the next four; Ray's worker start-up is the large one.)
* **Thread settings.** torch's thread count is process-wide and sticky: an arm that sets
  it changes the next arm's too, and a Ray actor sets its own in its process. With 2
  OpenMP threads on an oversubscribed 2-core machine, small per-step operations spin on
  each other (a 5 MB ``mul_`` took 12 ms with 2 threads, 0.2 ms with 1; RESULTS.md,
  training), while large convolutions suffer less: a ratio between a small-op arm and a
  conv-heavy arm swings with the load. Measured here for this harness (2026-11-29 16:55 UTC,
  load 13-15 from another engineer's benchmark): EfficientNet-Lite0's forward on a batch of
  8, channels-last, five calls in a row: 1 thread 1.0-1.5 s a call; 2 threads 3.4-10.4 s,
  then 7.3-16.4 s after switching back: under load an OpenMP team waits at every barrier
  for its descheduled second thread, so the 2-thread figures are 3-10x slower AND spread
  2x from call to call. A ratio between arms with different thread counts measured under
  load says more about the load than the code. So every arm sets the thread count it is meant to
  run with at its start (``torch.set_num_threads`` inside the arm), never relying on what
  the previous arm left. Ray's workers also run at nice 15 (``worker_niceness``): under
  load they starve first, which widens the pipeline arm's spread far more than the
  in-process arms' (RESULTS.md, extraction under load).
* **Disk cache.** The first read of the sample's JPEGs, the shards or a Zarr cache comes
  from disk, later ones from the page cache (the 800-image sample, its shards and the
  feature caches, a few hundred MB, fit in memory). The warm-up round reads everything
  once, so every counted call reads from memory; a benchmark that means to include cold
  reads must drop the cache itself (root only), which none here does.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

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


def work_folder(path: str, fresh: bool) -> Path:
    """A benchmark's work folder (kept between runs so that a rerun reuses its parts; ``fresh``: emptied first)."""
    import shutil

    work = Path(path)
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    return work


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


# ---- the interleaved comparison harness -----------------------------------------------------

Arm = Callable[[], "float | None"]


@dataclass(frozen=True)
class Ratio:
    """One ratio over the repetitions: ``median`` of the per-repetition values, their
    ``lo``-``hi``, and the load averages read before the calls it was computed from."""

    values: tuple[float, ...]
    loads: tuple[float, ...] = ()

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)


@dataclass
class Comparison:
    """What :func:`compare` measured: per arm, the seconds of every counted call (in round
    order) and the 1-minute load average read just before each call; the warm-up round's
    seconds apart."""

    seconds: dict[str, list[float]]
    loads: dict[str, list[float]]
    warmup: dict[str, float] = field(default_factory=dict)
    unit: str = "s"

    @property
    def arms(self) -> list[str]:
        return list(self.seconds)

    @property
    def reps(self) -> int:
        return len(next(iter(self.seconds.values()), []))

    def median(self, arm: str) -> float:
        return statistics.median(self.seconds[arm])

    def ratio(self, a: str, b: str) -> Ratio:
        """How many times faster ``a`` is than ``b`` (a's rate over b's), per repetition: b's
        seconds over a's seconds in the same round. The arms must measure the same unit of
        work (seconds per image, per epoch, per step), which each script's arms arrange."""
        values = tuple(tb / ta for ta, tb in zip(self.seconds[a], self.seconds[b], strict=True))
        return Ratio(values, tuple(self.loads[a]) + tuple(self.loads[b]))

    def report(self, title: str = "", rate: str | None = None) -> None:
        """One table, an arm a row: median, min-max, the warm-up call, and the load before its
        calls. ``rate`` (e.g. "images/s") adds the median's reciprocal in that unit."""
        head = f"{'arm':<24} {'median ' + self.unit:>14} {'min-max':>19} {'warm-up':>10}"
        head += f" {rate:>12}" if rate else ""
        print(f"\n{title}{' ' if title else ''}({self.reps} interleaved repetitions)\n{head}   load", flush=True)
        for arm in self.arms:
            v, ld = self.seconds[arm], self.loads[arm]
            w = f"{self.warmup[arm]:10.4g}" if arm in self.warmup else f"{'-':>10}"
            line = f"{arm:<24} {self.median(arm):14.4g} {min(v):9.4g}-{max(v):<9.4g} {w}"
            line += f" {1 / self.median(arm):12.4g}" if rate else ""
            print(f"{line}   {min(ld):.1f}-{max(ld):.1f}", flush=True)


def load_average() -> float:
    """The 1-minute load average (what ``uptime`` shows first)."""
    return os.getloadavg()[0]


def compare(
    arms: Mapping[str, Arm],
    reps: int = 3,
    warmup: bool | Mapping[str, Arm] = True,
    unit: str = "s",
    clock: Callable[[], float] = time.perf_counter,
) -> Comparison:
    """Run ``arms`` interleaved: one warm-up round (not counted), then A B (C) ... ``reps`` times.

    An arm returns its own measured seconds (e.g. a steady-state time that leaves out its
    start-up) or None to be timed around the call with ``clock``. ``warmup``: True runs every
    arm once uncounted first; a mapping gives some arms a cheaper warm-up of their own (an
    arm it does not name runs itself); False skips the round. Each call's figure is printed
    as it comes, with the load read just before it.
    """
    if reps < 1:
        raise ValueError("reps must be >= 1")
    names = list(arms)
    out = Comparison({a: [] for a in names}, {a: [] for a in names}, unit=unit)

    def call(fn: Arm) -> float:
        t0 = clock()
        measured = fn()
        return clock() - t0 if measured is None else float(measured)

    if warmup:
        own = warmup if isinstance(warmup, Mapping) else {}
        for a in names:
            load = load_average()
            out.warmup[a] = call(own.get(a, arms[a]))
            print(f"warm-up  {a}: {out.warmup[a]:.4g} {unit} (load {load:.1f}; not counted)", flush=True)
    for rep in range(reps):
        for a in names:
            load = load_average()
            seconds = call(arms[a])
            out.seconds[a].append(seconds)
            out.loads[a].append(load)
            print(f"rep {rep}    {a}: {seconds:.4g} {unit} (load {load:.1f})", flush=True)
    return out


def target_ratio(name: str, ratio: Ratio, op: str, goal: float, fmt: str = "{:.2f}") -> bool:
    """The spread line (median, min-max, load while measured), then :func:`target`'s TARGET
    line on the ratio's median."""
    spread = (
        f"{name}: median {fmt.format(ratio.median)} of {len(ratio.values)} repetitions "
        f"({', '.join(fmt.format(v) for v in ratio.values)}), spread {fmt.format(ratio.lo)}-{fmt.format(ratio.hi)}"
    )
    if ratio.loads:
        spread += f", load {min(ratio.loads):.1f}-{max(ratio.loads):.1f}"
    print(spread, flush=True)
    return target(name, ratio.median, op, goal, fmt)
