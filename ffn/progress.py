"""Progress reporting for long steps: a tqdm bar on a terminal, periodic log lines elsewhere.

In a SLURM job's log file a redrawn bar is noise, so when stderr is not a terminal the same
progress is written as log lines with count, rate and ETA every ``log_every_s`` seconds.

By default the ETA assumes the remaining items cost what the finished ones did. Where that is not
true (e.g. inference seeds: most late seeds are skipped at once), pass ``estimate``: a callable
returning (ETA in seconds or None, detail text); it replaces the ETA (None keeps the count-based
one) and its text is added to the report. It is called at most every ``refresh_every_s`` seconds
on a terminal, and before each log line otherwise. :meth:`Progress.tick` reports without counting,
so that an item that takes minutes (one large object) still shows progress through the estimate's
text.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")
_log = logging.getLogger("ffn.progress")
Estimate = Callable[[], "tuple[float | None, str]"]


def format_eta(seconds: float) -> str:
  if seconds != seconds or seconds == float("inf"):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
  """Counts work done out of ``total`` and reports rate and ETA.

  Use :meth:`update` from a loop, or :func:`track` to wrap an iterable. ``initial``: work already
  done before this run (e.g. restored from a checkpoint); it counts towards the total but not
  towards the rate. ``estimate``: see the module docstring.
  """

  def __init__(self, total: int | None, desc: str, unit: str = "it", log_every_s: float = 10.0,
               initial: int = 0, estimate: Estimate | None = None, refresh_every_s: float = 2.0,
               bar: bool | None = None):
    self.total, self.desc, self.unit = total, desc, unit
    self.count = int(initial)
    self._initial = int(initial)
    self.start = time.monotonic()
    self._last_log = self.start
    self._log_every_s = log_every_s
    self._estimate = estimate
    self._refresh_every_s = refresh_every_s
    self._last_refresh = -float("inf")
    self._eta: float | None = None
    self.detail = ""
    self._bar = None
    if bar is None:
      bar = sys.stderr.isatty()
    if bar:
      bar_format = None
      if estimate is not None:  # tqdm's own remaining-time field would be the count-based one
        bar_format = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"
      self._bar = tqdm(total=total, desc=desc, unit=unit, mininterval=0.5, initial=self.count,
                       bar_format=bar_format)

  def refresh_estimate(self) -> None:
    """Calls ``estimate`` now (if given) and stores its ETA and detail text."""
    if self._estimate is None:
      return
    self._last_refresh = time.monotonic()
    self._eta, self.detail = self._estimate()
    if self._bar is not None:
      self._bar.set_postfix_str(f"ETA {format_eta(self.eta())}, {self.detail}", refresh=False)

  def update(self, n: int = 1) -> None:
    self.count += n
    now = time.monotonic()
    if self._bar is not None:
      if self._estimate is not None and now - self._last_refresh >= self._refresh_every_s:
        self.refresh_estimate()
      self._bar.update(n)
      return
    self._maybe_log(now)

  def tick(self) -> None:
    """Reports without counting: for long items, so that progress inside one still shows (the
    estimate's detail text at most every ``refresh_every_s`` on a terminal, a log line every
    ``log_every_s`` otherwise)."""
    now = time.monotonic()
    if self._bar is None:
      self._maybe_log(now)
    elif self._estimate is not None and now - self._last_refresh >= self._refresh_every_s:
      self.refresh_estimate()
      self._bar.refresh()

  def _maybe_log(self, now: float) -> None:
    if now - self._last_log >= self._log_every_s:
      self._last_log = now
      self.refresh_estimate()
      _log.info("%s", self.status_line())

  def rate(self) -> float:
    """Items per second in this run."""
    return (self.count - self._initial) / max(time.monotonic() - self.start, 1e-9)

  def eta(self) -> float:
    """Seconds left: the estimate's if it gave one, else from the count and rate (inf if unknown)."""
    if self._eta is not None:
      return self._eta
    rate = self.rate()
    if not self.total:
      return float("inf")
    return (self.total - self.count) / rate if rate > 0 else float("inf")

  def status_line(self) -> str:
    rate = self.rate()
    detail = f", {self.detail}" if self.detail else ""
    if self.total:
      return (f"{self.desc}: {self.count}/{self.total} {self.unit} "
              f"({100.0 * self.count / self.total:.1f}%), {rate:.2f} {self.unit}/s, "
              f"ETA {format_eta(self.eta())}{detail}")
    return f"{self.desc}: {self.count} {self.unit}, {rate:.2f} {self.unit}/s{detail}"

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    else:
      self.refresh_estimate()
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
