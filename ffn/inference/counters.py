"""Named integer counters, saved as JSON the way google/ffn's ``Counters.dumps`` does."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Iterator


class Counters:
  """A dict of name -> int with google/ffn's counter names and JSON (de)serialisation."""

  def __init__(self) -> None:
    self.values: dict[str, int] = {}

  def increment(self, name: str, amount: float = 1) -> None:
    self.values[name] = self.values.get(name, 0) + int(amount)

  def set(self, name: str, value: int) -> None:
    self.values[name] = int(value)

  def add(self, other: "Counters") -> None:
    """Adds every value of ``other`` to this set of counters."""
    for name, value in other.values.items():
      self.increment(name, value)

  def __getitem__(self, name: str) -> int:
    return self.values.get(name, 0)

  def dumps(self) -> str:
    return json.dumps(self.values)

  def loads(self, text: str) -> None:
    for name, value in json.loads(text).items():
      self.values[name] = int(value)


@contextlib.contextmanager
def timer_counter(counters: Counters, name: str) -> Iterator[None]:
  """Counts calls (``<name>-calls``) and wall time in milliseconds (``<name>-time-ms``)."""
  start = time.time()
  try:
    yield
  finally:
    counters.increment(name + "-calls")
    counters.increment(name + "-time-ms", (time.time() - start) * 1000.0)
