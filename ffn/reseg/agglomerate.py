"""Agglomeration: merge decisions on the affinity table, union-find, merge table, mapping, volume.

Merge rule (defaults: the manual thresholds of the FFN paper's agglomeration): a pair with
``status == ok`` merges when

* ``iou > 0.8`` (``iou_threshold``), and
* both runs reproduce their own segment: ``a_consistency_a > 0.6`` and ``b_consistency_b > 0.6``
  (``consistency_threshold``), and
* both runs deleted little: ``a_deleted_fraction < 0.02`` and ``b_deleted_fraction < 0.02``
  (``deleted_threshold``; a run with no voxels fails it).

With ``score_threshold`` set the rule is only ``score >= score_threshold``. Pairs touching an id
of ``preserve`` never merge. Bodies are the connected components of the merge graph
(:func:`ffn.stitch.ids.equivalence_classes`); a body's id is the smallest supervoxel id in it
(so unmerged supervoxels keep their ids).

Outputs: the merge table in neuclease's layout (``id_a, id_b, xa, ya, za, xb, yb, zb, score``;
``xa..za`` / ``xb..zb`` the seeds of the runs from ``a`` / ``b``, global x,y,z; every scored
pair, as neuclease loads a table of candidate edges) as CSV and as the ``.npy`` record array of
neuclease's dtype; the merges made (``merges.csv``: the same columns, only the merged pairs); the
supervoxel -> body mapping (``mapping.csv``: ``sv,body`` for every supervoxel of the base
segmentation); the agglomerated volume (HDF5 ``path.h5:dataset``, uint64, z,y,x).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import numpy as np

from ffn.io.atomic import atomic_path, write_text_atomic
from ffn.stitch.ids import equivalence_classes

MERGE_TABLE_DTYPE = [("id_a", "<u8"), ("id_b", "<u8"), ("xa", "<u4"), ("ya", "<u4"),
                     ("za", "<u4"), ("xb", "<u4"), ("yb", "<u4"), ("zb", "<u4"), ("score", "<f4")]
MERGE_COLUMNS = tuple(name for name, _ in MERGE_TABLE_DTYPE)


@dataclasses.dataclass(frozen=True)
class MergeRule:
  iou_threshold: float = 0.8
  consistency_threshold: float = 0.6
  deleted_threshold: float = 0.02
  score_threshold: float | None = None

  def merges(self, row: dict) -> bool:
    """Whether the pair of ``row`` (an affinity-table row) merges."""
    if row.get("status") != "ok":
      return False
    if self.score_threshold is not None:
      return row["score"] >= self.score_threshold

    def value(key: str) -> float:
      v = row.get(key)
      return math.nan if v is None else float(v)

    return (value("iou") > self.iou_threshold
            and value("a_consistency_a") > self.consistency_threshold
            and value("b_consistency_b") > self.consistency_threshold
            and value("a_deleted_fraction") < self.deleted_threshold
            and value("b_deleted_fraction") < self.deleted_threshold)


def decide(rows: Sequence[dict], rule: MergeRule, preserve: Iterable[int] = ()) -> list[dict]:
  """The rows that merge (rule, and no id of ``preserve``)."""
  keep = {int(i) for i in preserve}
  return [r for r in rows if rule.merges(r) and r["id_a"] not in keep and r["id_b"] not in keep]


def bodies(supervoxels: np.ndarray, merges: Sequence[tuple[int, int]]) -> np.ndarray:
  """Body (uint64) of each supervoxel id of ``supervoxels`` (sorted, unique, non-zero) given the
  merged pairs: the smallest id of its connected component."""
  supervoxels = np.asarray(supervoxels, np.uint64)
  if not len(merges):
    return supervoxels.copy()
  pairs = np.asarray(merges, np.uint64).reshape(-1, 2)
  ia, ib = np.searchsorted(supervoxels, pairs[:, 0]), np.searchsorted(supervoxels, pairs[:, 1])
  ok = (ia < supervoxels.size) & (ib < supervoxels.size)
  ok[ok] &= (supervoxels[ia[ok]] == pairs[ok, 0]) & (supervoxels[ib[ok]] == pairs[ok, 1])
  classes = equivalence_classes(supervoxels.size, ia[ok].astype(np.int64), ib[ok].astype(np.int64))
  smallest = np.full(int(classes.max()) + 1 if classes.size else 0, np.iinfo(np.uint64).max,
                     np.uint64)
  np.minimum.at(smallest, classes, supervoxels)
  return smallest[classes]


def merge_table(rows: Sequence[dict]) -> np.ndarray:
  """neuclease record array of the ``ok`` rows."""
  ok = [r for r in rows if r.get("status") == "ok"]
  table = np.zeros(len(ok), MERGE_TABLE_DTYPE)
  for i, r in enumerate(ok):
    table[i] = (r["id_a"], r["id_b"], r["a_origin_x"], r["a_origin_y"], r["a_origin_z"],
                r["b_origin_x"], r["b_origin_y"], r["b_origin_z"], r["score"])
  return table


def write_merge_table(table: np.ndarray, csv_path: str, npy_path: str | None = None) -> None:
  lines = [",".join(MERGE_COLUMNS)]
  for rec in table:
    values = [str(int(rec[c])) for c in MERGE_COLUMNS[:-1]] + [f"{float(rec['score']):.6g}"]
    lines.append(",".join(values))
  write_text_atomic(csv_path, "\n".join(lines) + "\n")
  if npy_path is not None:
    with atomic_path(npy_path) as tmp, open(tmp, "wb") as f:
      np.save(f, table)


def write_mapping(supervoxels: np.ndarray, body: np.ndarray, path: str) -> None:
  lines = ["sv,body"] + [f"{int(s)},{int(b)}" for s, b in zip(supervoxels, body)]
  write_text_atomic(path, "\n".join(lines) + "\n")


def relabel(labels: np.ndarray, supervoxels: np.ndarray, body: np.ndarray) -> np.ndarray:
  """``labels`` with every supervoxel replaced by its body (uint64; 0 stays 0)."""
  import fastremap
  table = {int(s): int(b) for s, b in zip(supervoxels.tolist(), body.tolist())}
  table[0] = 0
  return fastremap.remap(labels.astype(np.uint64), table, preserve_missing_labels=True)
