"""Which objects of two chunks are the same object: the merge rule on their shared overlap.

Pure numpy. ``a`` and ``b`` are the two chunks' labels (z,y,x, ids >= 0, 0 = background) in the
box both chunks cover. The rule:

1. **Contingency**: for every pair of ids (id_a, id_b), both non-zero, the number of voxels of the
   overlap where chunk A says id_a and chunk B says id_b (``count``); ``size_a`` is the number of
   voxels of id_a in the overlap (whatever B says there), likewise ``size_b``.
2. **Agreement**: a pair is a candidate when ``count / min(size_a, size_b) >= min_agreement`` and
   ``count >= min_overlap``.
3. **One-to-one**: an object is merged with at most one object of the other chunk in one overlap.
   Candidates are taken in decreasing ``count`` (ties: smaller id_a, then smaller id_b) and
   accepted unless one of their two objects was already accepted with another. Where one object
   of A meets several of B (a split in one chunk, a merger in the other), only the largest
   co-occurrence is kept and the others stay separate objects: a missed merge across a seam,
   never a merge that either chunk did not make. The result depends only on the labels, never on
   the order in which chunks or pairs are processed.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Contingency:
  """Co-occurrences of two labellings of one box (all arrays uint64 ids / int64 counts)."""
  ids_a: np.ndarray      # distinct non-zero ids of A in the box, sorted
  sizes_a: np.ndarray    # voxels of each of them in the box
  ids_b: np.ndarray
  sizes_b: np.ndarray
  pair_a: np.ndarray     # (id_a, id_b) pairs, both non-zero, sorted by (id_a, id_b)
  pair_b: np.ndarray
  counts: np.ndarray     # voxels of each pair


@dataclasses.dataclass
class Matches:
  """The accepted pairs of :func:`match_overlap` and what was looked at."""
  ids_a: np.ndarray      # accepted pairs (uint64), in acceptance order
  ids_b: np.ndarray
  counts: np.ndarray     # their co-occurrence (voxels)
  scores: np.ndarray     # count / min(size_a, size_b)
  counters: dict[str, int]


def _group(pa: np.ndarray, pb: np.ndarray, weights: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Distinct (pa, pb) pairs of two flat id arrays, sorted by (pa, pb), and how many elements
  (or, with ``weights``, their summed weight) each has (int64)."""
  ua, ia = np.unique(pa, return_inverse=True)
  ub, ib = np.unique(pb, return_inverse=True)
  codes, inverse = np.unique(ia.reshape(-1).astype(np.int64) * ub.size + ib.reshape(-1),
                             return_inverse=True)
  counts = np.bincount(inverse.reshape(-1), weights=weights, minlength=codes.size)
  return ua[codes // ub.size], ub[codes % ub.size], counts.astype(np.int64)


def _sizes(values: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Distinct non-zero ``values`` (sorted) and the sum of ``counts`` of each."""
  ids, inverse = np.unique(values, return_inverse=True)
  sums = np.bincount(inverse.reshape(-1), weights=counts, minlength=ids.size).astype(np.int64)
  keep = ids != 0
  return ids[keep], sums[keep]


def contingency(a: np.ndarray, b: np.ndarray, piece_voxels: int = 1 << 18) -> Contingency:
  """Counts of co-occurring ids of ``a`` and ``b`` (same shape, z,y,x) and each id's size.

  The voxels are counted ``piece_voxels`` at a time and the per-piece tables summed, so the
  memory beyond ``a`` and ``b`` is O(piece + distinct pairs), whatever the overlap's size.
  """
  if a.shape != b.shape:
    raise ValueError(f"overlap shapes differ: {a.shape} vs {b.shape} (z,y,x)")
  flat_a, flat_b = a.reshape(-1), b.reshape(-1)
  parts = [_group(flat_a[s:s + piece_voxels].astype(np.uint64),
                  flat_b[s:s + piece_voxels].astype(np.uint64))
           for s in range(0, flat_a.size, piece_voxels)]
  if not parts:
    empty = np.zeros(0, np.uint64)
    return Contingency(empty, np.zeros(0, np.int64), empty, np.zeros(0, np.int64), empty, empty,
                       np.zeros(0, np.int64))
  pa, pb, counts = _group(*(np.concatenate(x) for x in zip(*parts)))
  ids_a, sizes_a = _sizes(pa, counts)
  ids_b, sizes_b = _sizes(pb, counts)
  keep = (pa != 0) & (pb != 0)
  return Contingency(ids_a, sizes_a, ids_b, sizes_b, pa[keep], pb[keep], counts[keep])


def match_overlap(a: np.ndarray, b: np.ndarray, min_agreement: float, min_overlap: int) -> Matches:
  """The objects of ``a`` and ``b`` (one box, z,y,x) to merge, by the rule of the module doc.

  ``counters``: ``objects_a``/``objects_b`` (non-zero ids in the overlap), ``pairs`` (co-occurring
  non-zero pairs), ``below_min_overlap``, ``below_min_agreement`` (pairs rejected by a threshold;
  a pair failing both counts as below ``min_overlap``), ``not_one_to_one`` (candidates rejected
  because an object already had a partner), ``merged``.
  """
  table = contingency(a, b)
  size_a = table.sizes_a[np.searchsorted(table.ids_a, table.pair_a)]
  size_b = table.sizes_b[np.searchsorted(table.ids_b, table.pair_b)]
  scores = table.counts / np.minimum(size_a, size_b)
  big = table.counts >= min_overlap
  agree = scores >= min_agreement
  candidate = big & agree
  order = np.lexsort((table.pair_b, table.pair_a, -table.counts))
  order = order[candidate[order]]
  taken_a: set[int] = set()
  taken_b: set[int] = set()
  accepted = []
  for k in order.tolist():
    ida, idb = int(table.pair_a[k]), int(table.pair_b[k])
    if ida in taken_a or idb in taken_b:
      continue
    taken_a.add(ida)
    taken_b.add(idb)
    accepted.append(k)
  sel = np.array(accepted, np.int64)
  counters = {"objects_a": int(table.ids_a.size), "objects_b": int(table.ids_b.size),
              "pairs": int(table.counts.size), "below_min_overlap": int((~big).sum()),
              "below_min_agreement": int((big & ~agree).sum()),
              "not_one_to_one": int(order.size - sel.size), "merged": int(sel.size)}
  return Matches(table.pair_a[sel], table.pair_b[sel], table.counts[sel], scores[sel], counters)
