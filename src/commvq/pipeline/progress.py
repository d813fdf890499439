"""Progress for people: bars on a terminal; in a log file, a line every ``EVERY`` seconds with the
count, the rate's estimate of what is left, and one line when a bar ends. The main job's stages
each get a start and an end line with the job's elapsed time and an estimate for the whole job.

Lines go through the ``commvq`` logger (``-q`` silences them with everything else at INFO).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("commvq")
EVERY = 30.0  # seconds between a log file's progress lines


def on_terminal() -> bool:
    return sys.stderr.isatty()


def duration(seconds: float) -> str:
    """``41 s``, ``3:12``, ``1:02:05``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class LogBar:
    """What a log file gets instead of a bar: the part of tqdm's interface the pipeline uses."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        leave: bool = True,
        disable: bool | None = False,
        every: float = EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.iterable, self.desc, self.unit, self.leave = iterable, desc, unit, leave
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.initial = total, initial, initial
        # a nested bar (``leave=False``) is a terminal's detail: in a log file the outer bar's lines
        # say how far the work is, so it prints nothing
        self.disable, self.every, self.clock = bool(disable) or not leave, every, clock
        self.start = self.last = clock()
        self.postfix = ""
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LogBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if not self.disable and now - self.last >= self.every:
            self.last = now
            log.info("%s", self.line(now))

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def line(self, now: float) -> str:
        """``desc: 120/400 step (30%), 1:10, about 2:43 left, loss 0.31``."""
        spent = now - self.start
        done = self.n - self.initial
        parts = [f"{self.desc}: {self.n:,}" + (f"/{self.total:,}" if self.total else "")]
        parts[0] += f" {self.unit}" + (f" ({100 * self.n // self.total}%)" if self.total else "")
        parts.append(duration(spent))
        if self.total and done > 0 and self.n < self.total:
            parts.append(f"about {duration((self.total - self.n) * spent / done)} left")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        spent = self.clock() - self.start
        if not self.disable:
            tail = f", {self.postfix}" if self.postfix else ""
            log.info(
                "%s: done, %s %s in %s%s",
                self.desc,
                f"{self.n:,}",
                self.unit,
                duration(spent),
                tail,
            )

    @staticmethod
    def write(text: str) -> None:
        print(text, flush=True)  # stdout, as tqdm.write


def bar(iterable: Iterable | None = None, **kw: Any) -> Any:
    """A tqdm bar on a terminal, a :class:`LogBar` elsewhere; ``kw`` as :class:`LogBar` takes them
    (``disable=None``, tqdm's "only on a terminal", becomes "not disabled")."""
    if on_terminal():
        return tqdm(iterable, **kw)
    return LogBar(iterable, **{**kw, "disable": bool(kw.get("disable"))})


def write(text: str) -> None:
    """A line that does not break a terminal's bars."""
    (tqdm.write if on_terminal() else LogBar.write)(text)


class StageClock:
    """Start and end lines for each of a job's stages, with the job's elapsed time and an estimate
    of what is left: the expected share of each stage (``weights``, measured) scaled by the time
    the stages that ran so far took (stages that had nothing left to do count neither way)."""

    def __init__(
        self, weights: dict[str, float], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.weights, self.clock = dict(weights), clock
        self.start = clock()
        self.ran_weight = self.ran_seconds = 0.0
        self.left = sum(self.weights.values())
        self.index = 0

    def estimate(self) -> float | None:
        """Seconds left for the stages not yet done, or None before any stage has run."""
        if self.ran_weight <= 0:
            return None
        return self.left * self.ran_seconds / self.ran_weight

    @contextlib.contextmanager
    def stage(self, name: str, quick: float = 5.0) -> Iterator[None]:
        """``name`` must be one of ``weights``; a stage done in under ``quick`` seconds (resumed,
        nothing to do) does not feed the estimate."""
        weight = self.weights[name]
        self.index += 1
        head = f"[{self.index}/{len(self.weights)}] {name}"
        log.info("%s: started (job %s)", head, duration(self.clock() - self.start))
        t0 = self.clock()
        yield
        spent = self.clock() - t0
        self.left -= weight
        if spent >= quick:
            self.ran_weight += weight
            self.ran_seconds += spent
        eta = self.estimate()
        tail = f", about {duration(eta)} left" if eta is not None and self.left > 0 else ""
        log.info(
            "%s: done in %s (job %s%s)",
            head,
            duration(spent),
            duration(self.clock() - self.start),
            tail,
        )
