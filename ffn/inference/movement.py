"""Field-of-view movement: google/ffn's face-maximum policy.

After each network evaluation, the six faces of the cube at +/- ``deltas`` around the FoV centre
are examined; on each face the voxel with the highest logit becomes a candidate new centre if that
logit is at least the move threshold. Candidates are queued (FIFO, best first within one update);
positions whose delta-quantised offset from the object's start was already visited are skipped.
All coordinates are z, y, x.
"""

from __future__ import annotations

import collections
import weakref
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from ffn.errors import FFNError

if TYPE_CHECKING:
  from ffn.inference.canvas import Canvas


def scored_move_offsets(deltas: Sequence[int], logits: np.ndarray,
                        threshold: float) -> list[tuple[np.float32, tuple[int, int, int]]]:
  """Candidate moves (score, z,y,x offset from the centre), one per face maximum >= threshold.

  ``logits``: the prediction around the FoV centre (z,y,x); ``deltas``: move step per axis (z,y,x).
  Duplicates are removed; the order is the face order (axis z,y,x, minus side first).
  """
  center = np.array(logits.shape) // 2
  window = [slice(c - d, c + d + 1) for c, d in zip(center, deltas)]
  out: list = []
  for axis, delta in enumerate(deltas):
    if delta == 0:
      continue
    for offset in (-delta, delta):
      face_sel = list(window)
      face_sel[axis] = center[axis] + offset  # type: ignore[call-overload]
      face = logits[tuple(face_sel)]
      pos = np.unravel_index(int(face.argmax()), face.shape)
      score = face[pos]
      if score < threshold:
        continue
      rel = [int(pos[0]) - face.shape[0] // 2, int(pos[1]) - face.shape[1] // 2]
      rel.insert(axis, offset)
      item = (score, tuple(rel))
      if item not in out:
        out.append(item)
  return out


class FaceMaxMovementPolicy:
  """Queue of candidate FoV centres for the object being segmented (google/ffn semantics)."""

  def __init__(self, canvas: "Canvas", deltas: Sequence[int], score_threshold: float):
    """``deltas``: the move step (z,y,x), at most (fov - 1) // 2 per axis (the faces must lie
    inside the FoV), else FFNError. Holds only a ``weakref.proxy`` of ``canvas`` (as google)."""
    self.canvas = weakref.proxy(canvas)
    self.deltas = np.array(deltas, dtype=np.int64)
    limit = (np.asarray(canvas.fov_size, dtype=np.int64) - 1) // 2
    if self.deltas.shape != (3,) or np.any(self.deltas < 0) or np.any(self.deltas > limit):
      raise FFNError(f"movement deltas {self.deltas.tolist()} (z,y,x) must be 0..(fov_size - 1) // 2 "
                     f"= {limit.tolist()} (z,y,x) per axis")
    self.score_threshold = score_threshold
    self.scored_coords: collections.deque = collections.deque()
    self.done_rounded_coords: set = set()
    self._start_pos = np.zeros(3, np.int64)

  def reset_state(self, start_pos: Sequence[int]) -> None:
    self.scored_coords = collections.deque()
    self.done_rounded_coords = set()
    self._start_pos = np.array(start_pos, dtype=np.int64)

  def get_state(self):
    return (list(self.scored_coords), set(self.done_rounded_coords), self._start_pos.tolist())

  def restore_state(self, state) -> None:
    coords, done, start = state
    self.scored_coords = collections.deque(coords)
    self.done_rounded_coords = set(done)
    self._start_pos = np.array(start, dtype=np.int64)

  def __len__(self) -> int:
    return len(self.scored_coords)

  def append(self, item) -> None:
    self.scored_coords.append(item)

  def __iter__(self) -> Iterator[tuple[int, int, int]]:
    return self

  def __next__(self) -> tuple[int, int, int]:
    while self.scored_coords:
      _, coord = self.scored_coords.popleft()
      coord = tuple(int(c) for c in coord)
      if self.quantize_pos(coord) in self.done_rounded_coords:
        continue
      if self.canvas.is_valid_pos(coord):
        return coord  # type: ignore[return-value]
    raise StopIteration

  def quantize_pos(self, pos: Sequence[int]) -> tuple[int, ...]:
    """Offset from the object's start on a grid of cell size ``deltas``, start at a cell centre."""
    rel = np.array(pos) - self._start_pos
    return tuple(int(v) for v in (rel + self.deltas // 2) // np.maximum(self.deltas, 1))

  def update(self, logits: np.ndarray, position: Sequence[int]) -> None:
    """Marks ``position`` visited and queues the face maxima of ``logits`` (centred there)."""
    self.done_rounded_coords.add(self.quantize_pos(position))
    moves = sorted(scored_move_offsets(self.deltas, logits, self.score_threshold), reverse=True)
    for score, rel in moves:
      self.scored_coords.append((score, [r + int(p) for r, p in zip(rel, position)]))
