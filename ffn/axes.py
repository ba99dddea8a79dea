"""The single home of the axis-order rule.

* numpy arrays (volumes, masks, model inputs) are indexed **z, y, x** (then channels);
* configs, command-line flags, protobuf messages and file names give coordinates as **x, y, z**.

Every conversion between the two goes through the helpers below, so the rule lives in one place.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from ffn.errors import FFNError


def xyz_to_zyx(xyz: Sequence[int]) -> tuple[int, ...]:
  """Reverses an (x, y, z) triple into array (z, y, x) order."""
  if len(xyz) != 3:
    raise FFNError(f"expected 3 values (x,y,z), got {list(xyz)}")
  return tuple(int(v) for v in reversed(list(xyz)))


def zyx_to_xyz(zyx: Sequence[int]) -> tuple[int, ...]:
  """Reverses an array-order (z, y, x) triple into (x, y, z) order."""
  if len(zyx) != 3:
    raise FFNError(f"expected 3 values (z,y,x), got {list(zyx)}")
  return tuple(int(v) for v in reversed(list(zyx)))


def parse_xyz(text: str | Iterable[int], name: str = "value") -> tuple[int, int, int]:
  """Parses 'x,y,z' (or a 3-sequence) into an (x, y, z) int tuple; one int is broadcast."""
  if isinstance(text, str):
    parts = [p for p in text.replace(" ", "").split(",") if p]
  else:
    parts = list(text)
  try:
    values = [int(p) for p in parts]
  except (TypeError, ValueError):
    raise FFNError(f"{name}: expected integers 'x,y,z', got {text!r}") from None
  if len(values) == 1:
    values = values * 3
  if len(values) != 3:
    raise FFNError(f"{name}: expected 3 integers 'x,y,z', got {text!r}")
  return (values[0], values[1], values[2])


class BoundingBox:
  """An axis-aligned box. ``start``/``size`` are stored in **x, y, z** order, like google/ffn.

  Use :meth:`to_slices` to index a z,y,x array.
  """

  def __init__(self, start: Sequence[int], size: Sequence[int]):
    self.start = np.array(start, dtype=np.int64).reshape(3)
    self.size = np.array(size, dtype=np.int64).reshape(3)
    if np.any(self.size <= 0):
      raise FFNError(f"bounding box size must be positive, got size={self.size.tolist()} (x,y,z)")

  @property
  def end(self) -> np.ndarray:
    """Exclusive end, x,y,z."""
    return self.start + self.size

  def to_slices(self) -> tuple[slice, slice, slice]:
    """Slices for a z,y,x array."""
    return tuple(slice(int(s), int(e)) for s, e in zip(reversed(self.start), reversed(self.end)))

  def shape_zyx(self) -> tuple[int, int, int]:
    return xyz_to_zyx(self.size)  # type: ignore[return-value]

  def __eq__(self, other: object) -> bool:
    return (isinstance(other, BoundingBox) and np.array_equal(self.start, other.start)
            and np.array_equal(self.size, other.size))

  def __repr__(self) -> str:
    return f"BoundingBox(start={self.start.tolist()}, size={self.size.tolist()})  # x,y,z"


def split_box(box: BoundingBox, subvolume_size: Sequence[int],
              overlap: Sequence[int] = (0, 0, 0)) -> list[BoundingBox]:
  """Overlapping subvolumes (x,y,z sizes) that together cover ``box``, in x-fastest order.

  Along each axis subvolumes start every ``size - overlap`` voxels; the last one is moved back so
  it ends at the box's end (every subvolume keeps the full size, so neighbours may overlap by
  more than ``overlap`` there). An axis shorter than ``subvolume_size`` gets one subvolume of the
  box's length.
  """
  size = np.array(subvolume_size, dtype=np.int64).reshape(3)
  over = np.array(overlap, dtype=np.int64).reshape(3)
  if np.any(size <= 0):
    raise FFNError(f"subvolume size must be positive, got {size.tolist()} (x,y,z)")
  if np.any(over < 0) or np.any(over >= size):
    raise FFNError(f"overlap must be >= 0 and smaller than the subvolume size {size.tolist()}, "
                   f"got {over.tolist()} (x,y,z)")
  starts_per_axis = []
  for start, length, n, o in zip(box.start, box.size, size, over):
    if length <= n:
      starts_per_axis.append([(int(start), int(length))])
      continue
    starts = list(range(int(start), int(start + length - n) + 1, int(n - o)))
    if starts[-1] + n < start + length:
      starts.append(int(start + length - n))
    starts_per_axis.append([(s, int(n)) for s in starts])
  return [BoundingBox((x[0], y[0], z[0]), (x[1], y[1], z[1]))
          for z in starts_per_axis[2] for y in starts_per_axis[1] for x in starts_per_axis[0]]
