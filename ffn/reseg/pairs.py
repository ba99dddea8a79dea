"""Touching supervoxel pairs of a segmentation: contact point, contact area and sizes per pair.

Definitions (all arrays z,y,x; the table gives points as x,y,z):

* **Touching**: voxels ``u`` and ``v = u + d`` with non-zero, different ids ``a`` and ``b`` and
  ``d`` in the neighbourhood: the 26 neighbours (default), or every offset with Euclidean length
  ``0 < |d| <= max_distance`` voxels (``max_distance`` >= 1; 1 means the 6 face neighbours,
  which bridges nothing, 2 reaches across a one-voxel gap of background).
* **Contact voxels** of the pair: the voxels of either segment that touch the other one.
  ``contact_voxels`` counts them.
* **Area**: the number of voxel faces between ``a`` and ``b`` (6-connected neighbour pairs), in
  face units (one voxel face = 1). Pairs that touch only along edges/corners, or only across a gap
  (``max_distance`` > sqrt(3)), have area 0 but are listed.
* **Contact point**: the contact voxel nearest (Euclidean) to the mean position of the pair's
  contact voxels; ties go to the lowest z, then y, then x. It lies on the contact surface, near
  its centre (google's decision point).
* **Sizes**: voxel counts of ``a`` and ``b`` in the whole segmentation.

Vectorised: one comparison of the volume with its shifted copy per offset (13 for 26-connected
contacts, half of the neighbourhood since ``(a, b)`` at ``d`` is ``(b, a)`` at ``-d``); never a
distance matrix per pair. Large volumes: :func:`block_contacts` works on one block that owns a
write box and reads ``ceil(max_distance)`` voxels of context around it; each voxel and each face
belongs to the block owning it (the voxel, resp. the face's lower voxel), so per-block results add
up exactly (:func:`merge_blocks`). ``ffn reseg pairs --block_size`` runs the blocks as one job
array through :mod:`ffn.blockwise`.

Table (CSV, one row per pair, ``id_a < id_b``, sorted by ``(id_a, id_b)``)::

  id_a,id_b,x,y,z,area,contact_voxels,size_a,size_b
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import fastremap
import numpy as np

from ffn.errors import FFNError
from ffn.io.atomic import write_text_atomic

COLUMNS = ("id_a", "id_b", "x", "y", "z", "area", "contact_voxels", "size_a", "size_b")
FACES = ((0, 0, 1), (0, 1, 0), (1, 0, 0))


def neighbour_offsets(max_distance: float | None = None) -> np.ndarray:
  """Half of the neighbourhood (z,y,x offsets, int64 [n, 3]): the lexicographically positive
  offsets; None -> the 26 neighbours (13 offsets), else ``0 < |d| <= max_distance``."""
  if max_distance is not None and not max_distance >= 1:
    raise FFNError(f"--max_distance must be >= 1 voxel, got {max_distance}")
  r = 1 if max_distance is None else int(math.floor(max_distance))
  grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
  if max_distance is not None:
    grid = grid[np.sum(grid.astype(np.float64) ** 2, axis=1) <= float(max_distance) ** 2 + 1e-9]
  positive = (grid[:, 0] > 0) | ((grid[:, 0] == 0) & (grid[:, 1] > 0)) | (
      (grid[:, 0] == 0) & (grid[:, 1] == 0) & (grid[:, 2] > 0))
  return grid[positive].astype(np.int64)


def context_voxels(max_distance: float | None) -> int:
  """Context a block needs on every side (voxels)."""
  return 1 if max_distance is None else int(math.floor(max_distance))


@dataclasses.dataclass
class BlockContacts:
  """What one block contributes. Pairs are global ids (uint64, ``id_a < id_b``); contact voxels
  are rows of ``contact_pair`` (index into the pairs) and ``contact_zyx`` (global, int32)."""
  id_a: np.ndarray
  id_b: np.ndarray
  area: np.ndarray
  contact_pair: np.ndarray
  contact_zyx: np.ndarray
  ids: np.ndarray
  sizes: np.ndarray

  def save(self, path: str) -> None:
    from ffn.inference.storage import save_npz_atomic
    save_npz_atomic(path, **dataclasses.asdict(self))

  @classmethod
  def load(cls, path: str) -> "BlockContacts":
    with np.load(path) as data:
      return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


def block_contacts(labels: np.ndarray, write_lo_zyx: Sequence[int] = (0, 0, 0),
                   write_hi_zyx: Sequence[int] | None = None, origin_zyx: Sequence[int] = (0, 0, 0),
                   max_distance: float | None = None) -> BlockContacts:
  """Contacts owned by the write region ``[write_lo, write_hi)`` (local z,y,x of ``labels``) of a
  block read at global corner ``origin_zyx``. ``labels``: non-negative integer ids, 0 =
  background. The block must hold ``context_voxels(max_distance)`` voxels of context around the
  write region wherever the volume continues."""
  if labels.dtype.kind not in "ui":
    raise FFNError(f"segmentation: dtype {labels.dtype.name} is not an integer label type")
  if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
    raise FFNError("segmentation: negative ids")
  shape = np.array(labels.shape, np.int64)
  lo = np.array(write_lo_zyx, np.int64)
  hi = shape.copy() if write_hi_zyx is None else np.array(write_hi_zyx, np.int64)
  origin = np.array(origin_zyx, np.int64)
  dense, remap = fastremap.renumber(np.ascontiguousarray(labels), preserve_zero=True,
                                    in_place=False)
  n = int(dense.max()) + 1 if dense.size else 1
  original = np.zeros(n, np.uint64)
  for old, new in remap.items():
    original[int(new)] = int(old)
  order = np.argsort(original, kind="stable")  # dense ids in the order of the original ids
  rank = np.empty(n, np.int64)
  rank[order] = np.arange(n)
  dense, original = rank.astype(np.int32 if n < 2 ** 31 else np.int64)[dense], original[order]

  owned = dense[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]
  counts = np.bincount(owned.reshape(-1), minlength=n)
  present = np.flatnonzero(counts[1:]) + 1
  ids, sizes = original[present], counts[present].astype(np.int64)

  # Pass 1, one comparison per offset over the whole block: each voxel's smallest and largest
  # touching id (other than its own and 0), and the faces between different ids.
  dtype = dense.dtype
  low = np.full(dense.shape, n, dtype)
  high = np.full(dense.shape, -1, dtype)
  face_keys = []
  faces = {tuple(f) for f in FACES}
  offsets = neighbour_offsets(max_distance)
  for d in offsets:
    u_lo = np.maximum(0, -d)
    u_hi = shape - np.maximum(0, d)
    if np.any(u_hi <= u_lo):
      continue
    su = tuple(slice(int(a), int(b)) for a, b in zip(u_lo, u_hi))
    sv = tuple(slice(int(a + o), int(b + o)) for a, b, o in zip(u_lo, u_hi, d))
    a, b = dense[su], dense[sv]
    hit = a != b
    hit &= a != 0
    hit &= b != 0
    if not hit.any():
      continue
    for side, other in ((su, b), (sv, a)):
      np.minimum(low[side], np.where(hit, other, n), out=low[side])
      np.maximum(high[side], np.where(hit, other, -1), out=high[side])
    if tuple(d) in faces:
      where = np.nonzero(hit)
      u = [c.astype(np.int64) + int(o) for c, o in zip(where, u_lo)]
      inside = np.ones(u[0].size, bool)
      for axis in range(3):
        inside &= (u[axis] >= lo[axis]) & (u[axis] < hi[axis])
      av, bv = a[where][inside].astype(np.int64), b[where][inside].astype(np.int64)
      face_keys.append(np.minimum(av, bv) * n + np.maximum(av, bv))
  # Pass 2, only on the write region's contact voxels: one record per voxel that touches one id;
  # voxels touching several ids (junctions) gather their neighbourhood explicitly.
  window = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
  w_low, w_high, w_own = low[window], high[window], dense[window]
  del low, high
  contact = w_low < n
  single = contact & (w_low == w_high)
  own = w_own[single]
  other = w_low[single]
  keys = [np.minimum(own, other).astype(np.int64) * n + np.maximum(own, other)]
  del own, other
  coords = [np.stack([(c + int(o)).astype(np.int32) for c, o in zip(np.nonzero(single), lo)], 1)]
  del single
  multi = np.stack(np.nonzero(contact & (w_low != w_high)), 1).astype(np.int64) + lo
  del contact, w_low, w_high
  if multi.size:
    own = dense[tuple(multi.T)].astype(np.int64)
    index = np.arange(len(multi), dtype=np.int64)
    mk, mi = [], []
    for d in np.concatenate([offsets, -offsets]):
      q = multi + d
      ok = np.all((q >= 0) & (q < shape), axis=1)
      nb = np.zeros(own.size, np.int64)
      nb[ok] = dense[tuple(q[ok].T)]
      hit = (nb != 0) & (nb != own)
      mk.append(np.minimum(own[hit], nb[hit]) * n + np.maximum(own[hit], nb[hit]))
      mi.append(index[hit])
    mkey, mindex = np.concatenate(mk), np.concatenate(mi)
    order = np.lexsort((mindex, mkey))
    mkey, mindex = mkey[order], mindex[order]
    first = np.ones(mkey.size, bool)
    first[1:] = (mkey[1:] != mkey[:-1]) | (mindex[1:] != mindex[:-1])
    keys.append(mkey[first])
    coords.append(multi[mindex[first]].astype(np.int32))
  key = np.concatenate(keys)
  del keys
  pair_keys = _sorted_unique(key)
  contact_pair = np.searchsorted(pair_keys, key)
  del key
  face = np.concatenate(face_keys) if face_keys else np.zeros(0, np.int64)
  area = np.zeros(pair_keys.size, np.int64)
  if face.size:
    area = np.bincount(np.searchsorted(pair_keys, face), minlength=pair_keys.size).astype(np.int64)
  zyx = np.concatenate(coords)
  zyx += origin.astype(np.int32)
  return BlockContacts(original[pair_keys // n], original[pair_keys % n], area,
                       contact_pair.astype(np.int64).reshape(-1), zyx.reshape(-1, 3), ids, sizes)


def _sorted_unique(values: np.ndarray) -> np.ndarray:
  """Sorted distinct values (a sort and a comparison; faster here than ``np.unique``)."""
  values = np.sort(values, kind="stable") if values.size else values
  keep = np.ones(values.size, bool)
  keep[1:] = values[1:] != values[:-1]
  return values[keep]


@dataclasses.dataclass
class PairTable:
  """The merged pairs (columns of :data:`COLUMNS`; ``point_zyx`` [n, 3] global)."""
  id_a: np.ndarray
  id_b: np.ndarray
  point_zyx: np.ndarray
  area: np.ndarray
  contact_voxels: np.ndarray
  size_a: np.ndarray
  size_b: np.ndarray

  def __len__(self) -> int:
    return int(self.id_a.size)

  def rows(self) -> list[tuple[int, ...]]:
    z, y, x = self.point_zyx.T if len(self) else (np.zeros(0, np.int64),) * 3
    return list(zip(*(c.tolist() for c in (self.id_a, self.id_b, x, y, z, self.area,
                                           self.contact_voxels, self.size_a, self.size_b))))


def merge_blocks(blocks: Sequence[BlockContacts]) -> PairTable:
  """One table from the blocks' contributions (see the module docstring)."""
  id_a = np.concatenate([b.id_a for b in blocks]) if blocks else np.zeros(0, np.uint64)
  id_b = np.concatenate([b.id_b for b in blocks]) if blocks else np.zeros(0, np.uint64)
  pairs = np.stack([id_a, id_b], 1).astype(np.uint64)
  unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
  inverse = inverse.reshape(-1)
  area = np.zeros(len(unique), np.int64)
  np.add.at(area, inverse, np.concatenate([b.area for b in blocks]) if blocks else area[:0])
  offset, cp, cz = 0, [], []
  for b in blocks:
    cp.append(inverse[offset + b.contact_pair])
    cz.append(b.contact_zyx)
    offset += b.id_a.size
  contact_pair = np.concatenate(cp) if cp else np.zeros(0, np.int64)
  zyx = np.concatenate(cz) if cz else np.zeros((0, 3), np.int32)
  count = np.bincount(contact_pair, minlength=len(unique)).astype(np.int64)
  # count^2 * squared distance to the mean: integer differences (exact), so ties and the chosen
  # voxel do not depend on how the volume was cut into blocks.
  per_record = count[contact_pair]
  dist2 = np.zeros(contact_pair.size, np.float64)
  for k in range(3):  # one axis at a time: memory of a few vectors, not [n, 3] temporaries
    coord = zyx[:, k].astype(np.int64)
    total_k = np.rint(np.bincount(contact_pair, coord, len(unique))).astype(np.int64)
    diff = coord * per_record - total_k[contact_pair]
    dist2 += diff.astype(np.float64) ** 2
  del per_record
  raster = ((zyx[:, 0].astype(np.int64) << 42) + (zyx[:, 1].astype(np.int64) << 21)
            + zyx[:, 2].astype(np.int64))  # z, y, x order (coordinates < 2^21)
  order = np.lexsort((raster, dist2, contact_pair))
  del raster, dist2
  chosen = contact_pair[order]
  first = np.ones(order.size, bool)
  first[1:] = chosen[1:] != chosen[:-1]
  point = np.zeros((len(unique), 3), np.int64)
  point[chosen[first]] = zyx[order[first]]
  ids = np.concatenate([b.ids for b in blocks]) if blocks else np.zeros(0, np.uint64)
  sizes = np.concatenate([b.sizes for b in blocks]) if blocks else np.zeros(0, np.int64)
  uid, sinv = np.unique(ids, return_inverse=True)
  total = np.bincount(sinv.reshape(-1), sizes, len(uid)).astype(np.int64)

  def size_of(x: np.ndarray) -> np.ndarray:
    return total[np.searchsorted(uid, x)] if x.size else np.zeros(0, np.int64)

  return PairTable(unique[:, 0], unique[:, 1], point, area, count, size_of(unique[:, 0]),
                   size_of(unique[:, 1]))


def find_pairs(labels: np.ndarray, max_distance: float | None = None,
               corner_zyx: Sequence[int] = (0, 0, 0)) -> PairTable:
  """All touching pairs of ``labels`` (z,y,x) in one block; points offset by ``corner_zyx``."""
  return merge_blocks([block_contacts(labels, origin_zyx=corner_zyx, max_distance=max_distance)])


def write_csv(table: PairTable, path: str) -> None:
  """The table as CSV (header :data:`COLUMNS`), atomically."""
  lines = [",".join(COLUMNS)] + [",".join(str(v) for v in row) for row in table.rows()]
  write_text_atomic(path, "\n".join(lines) + "\n")


def read_csv(path: str) -> PairTable:
  """A pairs CSV back; a malformed file -> FFNError naming it and the line."""
  try:
    with open(path) as f:
      header = f.readline().strip().split(",")
      rows = [line.strip().split(",") for line in f if line.strip()]
  except OSError as e:
    raise FFNError(f"{path}: cannot read the pairs table ({e.strerror})") from None
  missing = [c for c in COLUMNS if c not in header]
  if missing:
    raise FFNError(f"{path}: not a pairs table (missing columns {', '.join(missing)})")
  cols = [header.index(c) for c in COLUMNS]
  values = np.zeros((len(rows), len(COLUMNS)), np.uint64)
  for i, row in enumerate(rows):
    try:
      values[i] = [int(row[c]) for c in cols]
    except (ValueError, IndexError):
      raise FFNError(f"{path}: line {i + 2}: expected {len(header)} integer fields") from None
  if np.any(values[:, 0] >= values[:, 1]):
    bad = int(np.flatnonzero(values[:, 0] >= values[:, 1])[0])
    raise FFNError(f"{path}: line {bad + 2}: id_a must be smaller than id_b")
  v = values.astype(np.int64)
  return PairTable(values[:, 0], values[:, 1], v[:, [4, 3, 2]], v[:, 5], v[:, 6], v[:, 7], v[:, 8])


# ------------------------------------------------------------------------------ blockwise

def tile(shape_zyx: Sequence[int], block_xyz: Sequence[int]):
  """Non-overlapping x,y,z boxes of ``block_xyz`` covering a volume (the last ones shorter)."""
  from ffn.axes import BoundingBox
  size = list(reversed([int(s) for s in shape_zyx]))
  block = [int(b) for b in block_xyz]
  if min(block) < 1:
    raise FFNError(f"--block_size must be positive, got {block} (x,y,z)")
  starts = [range(0, s, b) for s, b in zip(size, block)]
  return [BoundingBox((x, y, z), (min(block[0], size[0] - x), min(block[1], size[1] - y),
                                   min(block[2], size[2] - z)))
          for z in starts[2] for y in starts[1] for x in starts[0]]


def block_path(run_dir: str, item_id: str) -> str:
  return os.path.join(run_dir, "blocks", f"{item_id}.npz")
