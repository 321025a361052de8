"""The one progress reporter every long stage uses.

A bar on an interactive terminal (tqdm), otherwise a line every ``every`` seconds with
the count, the rate and the ETA (what a job log or a CI log can show), and nothing at
all when disabled (``--no-progress``). Lines go to the ``lcam.progress`` logger, which
the CLI sends to stderr.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger("lcam.progress")


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (pytest, notebooks swap it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it; the property wins
        pass


# Progress is what a user asked for by not passing --no-progress: shown without any logging
# setup (a notebook, a script), at INFO, unless the application configured "lcam" itself.
_lcam_log = logging.getLogger("lcam")
if not _lcam_log.handlers:
    _lcam_log.addHandler(StderrHandler())
    _lcam_log.setLevel(logging.INFO)
    _lcam_log.propagate = False


def say(line: str, enabled: bool = True) -> None:
    """A stage's one-off status line (what it is about to do, what it did), beside its progress."""
    if enabled:
        logging.getLogger("lcam").info(line)


class Progress:
    """Count done units of one stage and report them; ``close()`` prints the final rate."""

    def __init__(
        self,
        total: int | None,
        enabled: bool = True,
        *,
        what: str = "progress",
        unit: str = "images",
        every: float = 5.0,
        initial: int = 0,
        bar: bool | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.total, self.enabled, self.every = total, enabled, every
        self.what, self.unit = what, unit
        self.done = self.start = initial
        self.clock = clock
        self.t0 = self.last = clock()
        # The first update ends the start-up (Ray, actors loading models): the ETA counts from
        # there, or a stage whose first shard takes 10 s of start-up promises 5x its real time.
        self.first: tuple[float, int] | None = None
        self.postfix = ""
        self.bar: Any = None
        if bar is None:
            bar = sys.stderr.isatty()
        if enabled and bar:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=what,
                unit=unit,
                file=sys.stderr,
                mininterval=1.0,
                dynamic_ncols=True,
                leave=False,
                smoothing=0.1,
            )

    @property
    def rate(self) -> float:
        return (self.done - self.start) / max(self.clock() - self.t0, 1e-9)

    @property
    def steady_rate(self) -> float:
        """Units per second since the first update (the start-up left out); the overall rate before a second one."""
        if self.first is None or self.done <= self.first[1]:
            return self.rate
        return (self.done - self.first[1]) / max(self.clock() - self.first[0], 1e-9)

    def line(self) -> str:
        """``what: done/total unit, rate unit/s, ETA Ns[, postfix]``."""
        steady = self.steady_rate
        of = f"/{self.total}" if self.total else ""
        eta = ""
        if self.total and steady > 0 and self.done < self.total:
            eta = f", ETA {math.ceil((self.total - self.done) / steady)}s"
        extra = f", {self.postfix}" if self.postfix else ""
        return f"{self.what}: {self.done}{of} {self.unit}, {steady:.2f} {self.unit}/s{eta}{extra}"

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.done += n
        if self.first is None and self.done > self.start:
            self.first = (self.clock(), self.done)
        if postfix is not None:
            self.postfix = postfix
        if not self.enabled:
            return
        if self.bar is not None:
            if postfix is not None:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last >= self.every or (self.total and self.done >= self.total):
            self.last = now
            log.info(self.line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled and self.done > self.start:
            log.info(f"{self.what}: {self.done} {self.unit} done, {self.rate:.2f} {self.unit}/s")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def skipped_lines(
    skipped: Sequence[Mapping[str, Any]],
    what: str,
    where: str,
    shown: int = 20,
    name: Callable[[Mapping[str, Any]], str] = lambda s: f"{s.get('shard', '')}/{s['key']}",
) -> list[str]:
    """The one summary of what a stage skipped: the count of ``what`` by reason, the first
    ``shown`` (``name``: how to name one), and ``where`` the rest is recorded."""
    if not skipped:
        return []
    reasons = Counter(s["reason"].split(":")[0] for s in skipped)
    out = [f"skipped {len(skipped)} {what}: " + ", ".join(f"{r} x{n}" for r, n in reasons.most_common())]
    out += [f"  {name(s)}: {s['reason']}" for s in skipped[:shown]]
    if len(skipped) > shown:
        out.append(f"  ... and {len(skipped) - shown} more ({where})")
    return out
