"""Global object ids: equivalence classes of (chunk, local id) nodes, numbered 1..N, and relabelling.

Pure numpy/scipy on ids only (never on voxels, except :func:`relabel`).

* **Nodes**: every non-zero local id of every chunk; node ``k`` of chunk ``c`` is
  ``offsets[c] + k`` where ``k`` is the id's rank among the chunk's sorted ids.
* **Union-find**: the merges of all overlaps are edges between nodes; an object of the stitched
  volume is an equivalence class (a connected component of that graph, computed in one pass with
  ``scipy.sparse.csgraph.connected_components`` -- the union-find of google/ffn issue #31).
* **Global ids**: only classes that own at least one output voxel get an id (a class seen only in
  overlaps that other chunks own never appears in the output). They are numbered 1..N, uint64, in
  the order of their first owning node (chunk raster order, then local id), so the numbering
  depends on the labels only. Nodes of classes without output voxels map to 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from ffn import labels as label_ops


def node_offsets(ids_per_chunk: Sequence[np.ndarray]) -> np.ndarray:
  """Index of each chunk's first node (int64, length chunks + 1; the last is the node count)."""
  return np.concatenate([[0], np.cumsum([len(ids) for ids in ids_per_chunk])]).astype(np.int64)


def node_index(ids: np.ndarray, offset: int, local: np.ndarray) -> np.ndarray:
  """Nodes (int64) of the local ids ``local`` of a chunk whose sorted ids are ``ids``."""
  pos = np.searchsorted(ids, local)
  if np.any(pos >= ids.size) or np.any(ids[np.minimum(pos, ids.size - 1)] != local):
    raise ValueError("local ids not among the chunk's ids")
  return offset + pos.astype(np.int64)


def equivalence_classes(num_nodes: int, edges_a: np.ndarray, edges_b: np.ndarray) -> np.ndarray:
  """Class (int64, 0..K-1) of each node given undirected edges between node indices."""
  if num_nodes == 0:
    return np.zeros(0, np.int64)
  graph = sparse.coo_matrix((np.ones(edges_a.size, np.int8), (edges_a, edges_b)),
                            shape=(num_nodes, num_nodes))
  _, labels = csgraph.connected_components(graph, directed=False)
  return labels.astype(np.int64)


def global_ids(classes: np.ndarray, owns_voxels: np.ndarray) -> np.ndarray:
  """uint64 global id per node: classes with an owning node get 1..N (module doc), others 0."""
  out = np.zeros(classes.size, np.uint64)
  if classes.size == 0:
    return out
  owning = np.flatnonzero(owns_voxels)
  first_classes, first = np.unique(classes[owning], return_index=True)  # first owning node per class
  order = np.argsort(owning[first], kind="stable")
  number = np.zeros(int(classes.max()) + 1, np.uint64)
  number[first_classes[order]] = np.arange(1, order.size + 1, dtype=np.uint64)
  return number[classes]


def relabel(labels: np.ndarray, local_ids: np.ndarray, global_of_local: np.ndarray) -> np.ndarray:
  """``labels`` (local ids, z,y,x) mapped through ``local_ids[k] -> global_of_local[k]``; 0 -> 0.

  Every non-zero id of ``labels`` must be in ``local_ids``. Returns uint64.
  """
  table = {int(k): int(v) for k, v in zip(local_ids.tolist(), global_of_local.tolist())}
  table[0] = 0
  return label_ops.remap(labels.astype(np.uint64), table, in_place=True)
