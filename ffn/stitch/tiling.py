"""The tiling of a chunked run: inferred from the chunks' boxes, checked, and what follows from it.

Pure functions on boxes (z,y,x corners and shapes in voxels; nothing is read here). A set of chunk
boxes *tiles* a region when, along every axis, the chunks' intervals form one sequence
``[s_0, e_0), [s_1, e_1), ...`` with strictly increasing starts and ends in which each interval
overlaps the next (``s_{i+1} < e_i``), every chunk with start ``s_i`` has the extent
``e_i - s_i``, and every combination of the three axes' intervals is a chunk (a full grid). This
is what :func:`ffn.axes.split_box` makes (its last interval along an axis is moved back to end at
the box's end, so that overlap may be larger; a short axis has one interval).

**Ownership** (every output voxel comes from exactly one chunk, never by write order): along each
axis, chunk ``i`` owns ``[m_i, m_{i+1})`` where ``m_0 = s_0``, ``m_n = e_{n-1}`` and
``m_i = (s_i + e_{i-1}) // 2`` splits the overlap of intervals ``i - 1`` and ``i`` in the middle
(for an odd overlap the middle voxel goes to the later chunk). For chunks of one size along the
axis (what ``split_box`` makes) this is the chunk whose centre is nearest, ties to the later one.
Where the owner left a voxel unsegmented (0) and another covering chunk did not, the voxel is
taken from that chunk (:mod:`ffn.stitch.fill`; also a rule on the labels, not on write order).

**Pairs** to match: every two chunks whose boxes share at least one voxel -- face neighbours (a
slab), edge neighbours (a column), corner neighbours (a small cube), and, where ``split_box`` moved
the last chunk back far enough, chunks two apart along an axis. A voxel of an overlap lies in all
chunks that cover it, so every pair that can hold the same object in the same voxels is matched.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np

from ffn.errors import FFNError

Box = tuple[tuple[int, int, int], tuple[int, int, int]]  # (corner z,y,x, shape z,y,x)
_AXES = "zyx"


def _xyz(zyx: Sequence[int]) -> str:
  """A z,y,x triple written as 'x,y,z' for messages."""
  return ",".join(str(int(v)) for v in reversed(list(zyx)))


@dataclasses.dataclass(frozen=True)
class Tiling:
  """A checked grid of chunks.

  ``starts[a]``/``ends[a]``: the intervals along array axis ``a`` (0 = z, 1 = y, 2 = x), sorted.
  Chunks are numbered in raster order of their grid position (z slowest, x fastest), the order of
  ``chunk_corners``. ``owned_lo[a]``/``owned_hi[a]``: the owned interval of each grid position.
  """
  starts: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
  ends: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

  @property
  def grid_shape(self) -> tuple[int, int, int]:
    return tuple(len(s) for s in self.starts)  # type: ignore[return-value]

  @property
  def num_chunks(self) -> int:
    return int(np.prod(self.grid_shape))

  @property
  def region_corner(self) -> tuple[int, int, int]:
    return tuple(s[0] for s in self.starts)  # type: ignore[return-value]

  @property
  def region_shape(self) -> tuple[int, int, int]:
    return tuple(e[-1] - s[0] for s, e in zip(self.starts, self.ends))  # type: ignore[return-value]

  def grid_position(self, index: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.unravel_index(index, self.grid_shape))  # type: ignore[return-value]

  def chunk_index(self, position: Sequence[int]) -> int:
    return int(np.ravel_multi_index(tuple(position), self.grid_shape))

  def chunk_box(self, index: int) -> Box:
    pos = self.grid_position(index)
    corner = tuple(self.starts[a][p] for a, p in enumerate(pos))
    shape = tuple(self.ends[a][p] - self.starts[a][p] for a, p in enumerate(pos))
    return corner, shape  # type: ignore[return-value]

  @property
  def chunk_corners(self) -> list[tuple[int, int, int]]:
    return [self.chunk_box(i)[0] for i in range(self.num_chunks)]

  def owned_bounds(self, axis: int) -> tuple[list[int], list[int]]:
    """(lo, hi) of the owned interval of each grid position along ``axis`` (see module doc)."""
    s, e = self.starts[axis], self.ends[axis]
    cuts = [s[0]] + [(s[i] + e[i - 1]) // 2 for i in range(1, len(s))] + [e[-1]]
    return cuts[:-1], cuts[1:]

  def owned_box(self, index: int) -> Box:
    """The box (absolute z,y,x corner and shape) of the voxels chunk ``index`` owns."""
    pos = self.grid_position(index)
    lo, hi = [], []
    for a, p in enumerate(pos):
      los, his = self.owned_bounds(a)
      lo.append(los[p])
      hi.append(his[p])
    return tuple(lo), tuple(h - l for h, l in zip(hi, lo))  # type: ignore[return-value]

  def pairs(self) -> list[tuple[int, int]]:
    """All (i, j), i < j, of chunks whose boxes share voxels, sorted."""
    near: list[list[list[int]]] = []  # per axis, per position: positions whose interval intersects
    for s, e in zip(self.starts, self.ends):
      near.append([[q for q in range(len(s)) if s[q] < e[p] and s[p] < e[q]] for p in range(len(s))])
    out = []
    for i in range(self.num_chunks):
      pos = self.grid_position(i)
      for other in itertools.product(*(near[a][p] for a, p in enumerate(pos))):
        j = self.chunk_index(other)
        if j > i:
          out.append((i, j))
    return sorted(out)

  def to_json(self) -> dict:
    return {"starts_zyx": [list(s) for s in self.starts], "ends_zyx": [list(e) for e in self.ends]}

  @classmethod
  def from_json(cls, data: dict) -> "Tiling":
    return cls(tuple(tuple(int(v) for v in s) for s in data["starts_zyx"]),  # type: ignore[arg-type]
               tuple(tuple(int(v) for v in e) for e in data["ends_zyx"]))  # type: ignore[arg-type]


def intersect(a: Box, b: Box) -> Box | None:
  """The shared box of two boxes, or None when they share no voxel."""
  lo = [max(ca, cb) for ca, cb in zip(a[0], b[0])]
  hi = [min(ca + sa, cb + sb) for ca, sa, cb, sb in zip(a[0], a[1], b[0], b[1])]
  if any(h <= l for l, h in zip(lo, hi)):
    return None
  return tuple(lo), tuple(h - l for l, h in zip(lo, hi))  # type: ignore[return-value]


def local_slices(box: Box, within: Box) -> tuple[slice, slice, slice]:
  """Slices of ``box`` in the array of ``within`` (both absolute; ``box`` must lie inside)."""
  return tuple(slice(c - w, c - w + s) for c, s, w in zip(box[0], box[1], within[0]))  # type: ignore[return-value]


def infer_tiling(boxes: Sequence[Box], names: Sequence[str]) -> Tiling:
  """The :class:`Tiling` of chunk boxes (z,y,x), or FFNError naming the first problem.

  ``names``: a name per box for messages (e.g. its file). Problems: no chunks, two chunks at one
  corner, chunks with one start along an axis but different extents, a gap or no overlap between
  consecutive intervals, an interval inside another, a missing grid position.
  """
  if not boxes:
    raise FFNError("no chunks")
  by_corner: dict[tuple[int, int, int], str] = {}
  for (corner, _), name in zip(boxes, names):
    if corner in by_corner:
      raise FFNError(f"{name}: a second chunk at corner {_xyz(corner)} (x,y,z), also {by_corner[corner]}")
    by_corner[corner] = name
  starts, ends = [], []
  for a in range(3):
    extent: dict[int, tuple[int, str]] = {}
    for (corner, shape), name in zip(boxes, names):
      if shape[a] <= 0:
        raise FFNError(f"{name}: empty chunk (shape {_xyz(shape)}, x,y,z)")
      seen = extent.setdefault(corner[a], (shape[a], name))
      if seen[0] != shape[a]:
        raise FFNError(f"{name}: size {shape[a]} along {_AXES[a]} differs from {seen[1]}'s "
                       f"{seen[0]} at the same {_AXES[a]} start {corner[a]}: chunks do not tile")
    s = sorted(extent)
    e = [v + extent[v][0] for v in s]
    for i in range(1, len(s)):
      here, before = extent[s[i]][1], extent[s[i - 1]][1]
      if s[i] > e[i - 1]:
        raise FFNError(f"{here}: gap along {_AXES[a]} between {e[i - 1]} (end of {before}) and "
                       f"{s[i]}: chunks do not tile")
      if s[i] == e[i - 1]:
        raise FFNError(f"{here}: no overlap along {_AXES[a]} with {before} (it ends at {e[i - 1]} "
                       f"where this one starts): stitching needs overlapping chunks")
      if e[i] <= e[i - 1]:
        raise FFNError(f"{here}: interval {s[i]}..{e[i]} along {_AXES[a]} lies inside {before}'s "
                       f"{s[i - 1]}..{e[i - 1]}: chunks do not tile")
    starts.append(tuple(s))
    ends.append(tuple(e))
  tiling = Tiling(tuple(starts), tuple(ends))  # type: ignore[arg-type]
  if len(boxes) != tiling.num_chunks:
    for i in range(tiling.num_chunks):
      corner = tiling.chunk_box(i)[0]
      if corner not in by_corner:
        raise FFNError(f"missing chunk at corner {_xyz(corner)} (x,y,z): the chunks' starts form a "
                       f"grid of {'x'.join(str(n) for n in tiling.grid_shape[::-1])} (x,y,z) "
                       f"chunks but only {len(boxes)} are present")
  return tiling


def check_expected(tiling: Tiling, expected: Sequence[Box], where: str) -> None:
  """FFNError unless the tiling's chunks are exactly the ``expected`` boxes (z,y,x).

  ``expected``: e.g. ``split_box(region, subvolume_size, overlap)`` from a batch run's manifest or
  from ``--subvolume_size``/``--overlap``; ``where`` names that source.
  """
  have = {tiling.chunk_box(i) for i in range(tiling.num_chunks)}
  want = {(tuple(c), tuple(s)) for c, s in expected}
  for corner, shape in sorted(want - have):
    near = [b for b in have if b[0] == corner]
    if near:
      raise FFNError(f"chunk at {_xyz(corner)} (x,y,z) has size {_xyz(near[0][1])} but {where} "
                     f"gives {_xyz(shape)} (x,y,z)")
    raise FFNError(f"{where} expects a chunk at {_xyz(corner)} (x,y,z) of size {_xyz(shape)} that the "
                   f"chunks do not have (mismatched overlap or size)")
  for corner, shape in sorted(have - want):
    raise FFNError(f"chunk at {_xyz(corner)} (x,y,z) of size {_xyz(shape)} is not one of the chunks "
                   f"{where} gives (mismatched overlap or size)")


def write_blocks(region_corner: Sequence[int], region_shape: Sequence[int],
                 block_shape: Sequence[int]) -> list[Box]:
  """Output blocks (absolute z,y,x boxes) of ``block_shape`` covering the region, raster order.

  Blocks start at the region corner every ``block_shape`` voxels (no overlap); the last along an
  axis is cut at the region's end. With ``block_shape`` a multiple of the output's storage chunks
  every storage chunk belongs to one block, so blocks can be written by different tasks at once.
  """
  per_axis = []
  for c, n, b in zip(region_corner, region_shape, block_shape):
    per_axis.append([(c + o, min(b, n - o)) for o in range(0, n, b)])
  return [((z[0], y[0], x[0]), (z[1], y[1], x[1])) for z in per_axis[0] for y in per_axis[1]
          for x in per_axis[2]]


def owners_of(tiling: Tiling, box: Box) -> list[tuple[int, Box]]:
  """(chunk index, part of ``box`` it owns) for every chunk that owns voxels of ``box``."""
  per_axis = []
  for a in range(3):
    los, his = tiling.owned_bounds(a)
    lo, hi = box[0][a], box[0][a] + box[1][a]
    per_axis.append([(p, max(lo, l), min(hi, h)) for p, (l, h) in enumerate(zip(los, his))
                     if max(lo, l) < min(hi, h)])
  out = []
  for parts in itertools.product(*per_axis):
    index = tiling.chunk_index([p for p, _, _ in parts])
    out.append((index, (tuple(l for _, l, _ in parts), tuple(h - l for _, l, h in parts))))
  return out  # type: ignore[return-value]
