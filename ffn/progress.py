"""Progress reporting for long steps: a tqdm bar on a terminal, periodic log lines elsewhere.

In a SLURM job's log file a redrawn bar is noise, so when stderr is not a terminal the same
progress is written as log lines with count, rate and ETA every ``log_every_s`` seconds.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")
_log = logging.getLogger("ffn.progress")


def format_eta(seconds: float) -> str:
  if seconds != seconds or seconds == float("inf"):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
  """Counts work done out of ``total`` and reports rate and ETA.

  Use :meth:`update` from a loop, or :func:`track` to wrap an iterable.
  """

  def __init__(self, total: int | None, desc: str, unit: str = "it", log_every_s: float = 10.0):
    self.total, self.desc, self.unit = total, desc, unit
    self.count = 0
    self.start = time.monotonic()
    self._last_log = self.start
    self._log_every_s = log_every_s
    self._bar = tqdm(total=total, desc=desc, unit=unit, mininterval=0.5) if sys.stderr.isatty() else None

  def update(self, n: int = 1) -> None:
    self.count += n
    if self._bar is not None:
      self._bar.update(n)
      return
    now = time.monotonic()
    if now - self._last_log >= self._log_every_s:
      self._last_log = now
      _log.info("%s", self.status_line())

  def status_line(self) -> str:
    elapsed = max(time.monotonic() - self.start, 1e-9)
    rate = self.count / elapsed
    if self.total:
      eta = (self.total - self.count) / rate if rate > 0 else float("inf")
      return (f"{self.desc}: {self.count}/{self.total} {self.unit} "
              f"({100.0 * self.count / self.total:.1f}%), {rate:.2f} {self.unit}/s, ETA {format_eta(eta)}")
    return f"{self.desc}: {self.count} {self.unit}, {rate:.2f} {self.unit}/s"

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    else:
      _log.info("%s (done in %s)", self.status_line(), format_eta(time.monotonic() - self.start))

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
  """Iterates ``items`` while reporting progress."""
  if total is None and hasattr(items, "__len__"):
    total = len(items)  # type: ignore[arg-type]
  with Progress(total, desc, unit) as progress:
    for item in items:
      yield item
      progress.update()
