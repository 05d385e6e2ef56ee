"""Progress of long jobs: a bar on a terminal, a plain line every few seconds in a log.

Every job that can run longer than ~10 s reports through :class:`Progress` (or :func:`track` around a
loop): pruning and calibration, LTE conversion, evaluation scoring, lm-eval generation, the scaling-law
bootstrap; training's own bar (``train/metrics.py``) shares :func:`interactive` and :func:`duration`.

- On a terminal (stderr a TTY, no ``CI`` variable set) it is a tqdm bar.
- Otherwise (a log file, a pipe, CI) it writes plain lines to stderr, no ``\\r``, at most one every
  ``QSPARSE_PROGRESS_S`` seconds (default 10), e.g. ``prune sparsegpt 2:4: 12/32 layers, 41 s, ~68 s
  left``, and a last ``... done in 95 s`` line when any was written: a job shorter than the interval
  prints nothing.

Kept free of JAX imports (the bottom layer, next to ``errors``).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

ENV = "QSPARSE_PROGRESS_S"
DEFAULT_INTERVAL = 10.0
T = TypeVar("T")


def interactive(stream=None) -> bool:
    """Whether progress should be a bar: ``stream`` (default stderr) is a terminal and this is not CI."""
    stream = sys.stderr if stream is None else stream
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        tty = False
    return tty and not os.environ.get("CI")


def interval() -> float:
    """Seconds between plain progress lines: ``$QSPARSE_PROGRESS_S`` (a number >= 0), else 10."""
    try:
        v = float(os.environ.get(ENV, DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return v if math.isfinite(v) and v >= 0 else DEFAULT_INTERVAL


def duration(seconds: float) -> str:
    """``41 s``, ``5 min 12 s``, ``2 h 05 min``; ``?`` for a non-finite or negative value."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 100:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """Progress of one job of ``total`` units (None: unknown): ``update(n)`` as units finish, ``close()`` at
    the end (or use it as a context manager). ``enabled=False`` makes it silent (e.g. on hosts other than
    the first, or when a caller turns it off). ``every``: seconds between plain lines (default
    :func:`interval`); ``stream``: where they go (default stderr)."""

    def __init__(self, total: int | None, desc: str, unit: str = "steps", *, enabled: bool = True,
                 every: float | None = None, stream=None, leave: bool = True):
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0
        self.every = interval() if every is None else every
        self.stream = stream
        self.t0 = self.last = time.monotonic()
        self.printed = False
        self.closed = False
        self.bar = None
        self.enabled = enabled
        if enabled and interactive(self._out()):
            from tqdm import tqdm  # third-party; only on a terminal

            self.bar = tqdm(total=total, desc=desc, unit=unit.rstrip("s") or unit, file=self._out(),
                            leave=leave, dynamic_ncols=True)

    def _out(self):
        return sys.stderr if self.stream is None else self.stream

    def line(self, now: float | None = None) -> str:
        """The plain line for the current state, e.g. ``prune: 12/32 layers, 41 s, ~68 s left``."""
        el = (time.monotonic() if now is None else now) - self.t0
        if self.total is None:
            return f"{self.desc}: {self.done} {self.unit}, {duration(el)}"
        left = el * (self.total - self.done) / self.done if self.done else float("nan")
        return f"{self.desc}: {self.done}/{self.total} {self.unit}, {duration(el)}, ~{duration(left)} left"

    def _write(self, text: str):
        out = self._out()
        out.write(text + "\n")
        out.flush()
        self.printed = True

    def update(self, n: int = 1):
        """``n`` more units are done."""
        self.done += n
        if not self.enabled or self.closed:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every and (self.total is None or self.done < self.total):
            self.last = now
            self._write(self.line(now))

    def close(self):
        """The end of the job: the bar closes; in a log, a last line when any line was written."""
        if self.closed:
            return
        self.closed = True
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        elif self.printed or time.monotonic() - self.t0 >= self.every:
            total = f"/{self.total}" if self.total is not None else ""
            self._write(f"{self.desc}: {self.done}{total} {self.unit}, done in {duration(time.monotonic() - self.t0)}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc):
        self.close()


def track(items: Iterable[T], desc: str, *, total: int | None = None, unit: str = "steps",
          enabled: bool = True, every: float | None = None, stream=None) -> Iterator[T]:
    """``items`` one by one, with a :class:`Progress` of ``total`` (default ``len(items)``) updated after each."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with Progress(total, desc, unit, enabled=enabled, every=every, stream=stream) as p:
        for x in items:
            yield x
            p.update()
