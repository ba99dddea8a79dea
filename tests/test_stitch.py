"""``ffn stitch``: tiling checks, the merge rule, global ids, the golden test on the shipped ground
truth, bad input, resume, output round trips, and a real Slurm job-array run.

The golden test cuts ``training_sample2_crop.h5:stack`` into overlapping chunks (google's layout,
every chunk with its own random ids) and checks the stitched volume against the *achievable
partition*, computed here without the stitch code: a node is (chunk, ground-truth body); two nodes
of one body are joined when their chunks' boxes share at least ``min_overlap`` voxels of that body
(counted in the ground truth itself, over every pair of chunks); union-find (a Python dict) over
the nodes; each voxel belongs to the chunk whose centre is nearest (ties: the later chunk) and
takes the class of (that chunk, its body). With ground truth in every chunk this is exactly what
stitching can recover: an object whose pieces meet at a seam without sharing enough of an
overlap stays split, everything else is recovered.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from ffn.axes import BoundingBox, split_box
from ffn.cli import main
from ffn.errors import FFNError
from ffn.inference import storage
from ffn.io.tensorstore_volumes import (LabelsLayout, LabelsSpec, LabelsWriter, create_labels,
                                        parse_labels_spec, read_labels, sharding_for)
from ffn.stitch import ids as idlib
from ffn.stitch.fill import UnsegmentedFill, depth_in_box
from ffn.stitch.match import contingency, match_overlap
from ffn.stitch.tiling import check_expected, infer_tiling, owners_of, write_blocks
from slurm_cluster import require_fit, slurm_job_name  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[1]
OFFSET_XYZ = (50, 50, 50)  # the crop's place in training_sample2, so chunk names are not at 0
CHUNK_XYZ = (64, 64, 64)
OVERLAP_XYZ = (16, 16, 16)


# --------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def ground_truth(sample_fib25) -> np.ndarray:
  """The shipped 150^3 body labels (z,y,x) with three bodies set to background (0), so that
  background is stitched too."""
  with h5py.File(sample_fib25 / "training_sample2_crop.h5", "r") as f:
    gt = f["stack"][...]
  ids = np.unique(gt)
  gt[np.isin(gt, ids[[3, 40, 80]])] = 0
  return gt


def chunk_boxes(shape_zyx, size_xyz=CHUNK_XYZ, overlap_xyz=OVERLAP_XYZ, offset_xyz=OFFSET_XYZ):
  """split_box of the region as (corner z,y,x absolute, shape z,y,x)."""
  region = BoundingBox(offset_xyz, tuple(reversed(shape_zyx)))
  return [(tuple(int(v) for v in b.start[::-1]), tuple(int(v) for v in b.size[::-1]))
          for b in split_box(region, size_xyz, overlap_xyz)]


def write_chunks(labels: np.ndarray, directory: Path, boxes, seed: int = 0, blank=None) -> None:
  """Every chunk of ``labels`` (z,y,x, corner at OFFSET_XYZ) saved as a google-layout result with
  its ids replaced by random distinct ids (a different renaming per chunk). ``blank(k, sub)``,
  when given, may set voxels of chunk k's copy to 0 (unsegmented) before it is saved."""
  rng = np.random.default_rng(seed)
  offset = OFFSET_XYZ[::-1]
  for k, (corner, shape) in enumerate(boxes):
    sub = labels[tuple(slice(c - o, c - o + s) for c, o, s in zip(corner, offset, shape))].copy()
    if blank is not None:
      blank(k, sub)
    ids, inverse = np.unique(sub, return_inverse=True)
    new = rng.choice(np.arange(1, 1 << 20), size=ids.size, replace=False)
    new[ids == 0] = 0
    storage.save_subvolume(new[inverse.reshape(sub.shape)], {},
                           storage.segmentation_path(str(directory), corner))


def achievable_partition(gt: np.ndarray, boxes, min_overlap: int) -> tuple[np.ndarray, int]:
  """(labels of the achievable partition, objects made of nodes of two or more chunks); see the
  module docstring. ``boxes`` absolute, ``gt`` at OFFSET_XYZ."""
  offset = np.array(OFFSET_XYZ[::-1])
  rel = [(np.array(c) - offset, np.array(s)) for c, s in boxes]
  parent: dict = {}

  def find(x):
    while parent[x] != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  for k, (c, s) in enumerate(rel):
    for g in np.unique(gt[c[0]:c[0] + s[0], c[1]:c[1] + s[1], c[2]:c[2] + s[2]]):
      if g:
        parent[(k, int(g))] = (k, int(g))
  for k in range(len(rel)):
    for m in range(k + 1, len(rel)):
      lo = np.maximum(rel[k][0], rel[m][0])
      hi = np.minimum(rel[k][0] + rel[k][1], rel[m][0] + rel[m][1])
      if np.any(hi <= lo):
        continue
      values, counts = np.unique(gt[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], return_counts=True)
      for g, n in zip(values, counts):
        if g and n >= min_overlap:
          parent[find((k, int(g)))] = find((m, int(g)))
  # Owner along each axis: nearest interval centre, ties to the later interval.
  owner = []
  for a in range(3):
    intervals = sorted({(int(c[a]), int(c[a] + s[a])) for c, s in rel})
    centres = np.array([(lo + hi) / 2 for lo, hi in intervals])
    dist = np.abs(np.arange(gt.shape[a])[:, None] + 0.5 - centres[None, :])
    owner.append((intervals, len(intervals) - 1 - np.argmin(dist[:, ::-1], axis=1)))
  index = {tuple(int(v) for v in c): k for k, (c, _) in enumerate(rel)}
  out = np.zeros(gt.shape, np.int64)
  numbers: dict = {}
  for iz in range(len(owner[0][0])):
    for iy in range(len(owner[1][0])):
      for ix in range(len(owner[2][0])):
        k = index[(owner[0][0][iz][0], owner[1][0][iy][0], owner[2][0][ix][0])]
        sel = np.ix_(owner[0][1] == iz, owner[1][1] == iy, owner[2][1] == ix)
        sub = gt[sel]
        part = np.zeros(sub.shape, np.int64)
        for g in np.unique(sub):
          if g:
            part[sub == g] = numbers.setdefault(find((k, int(g))), len(numbers) + 1)
        out[sel] = part
  merged = sum(1 for root in numbers if len([n for n in parent if find(n) == root]) > 1)
  return out, merged


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
  """Whether two labellings are equal up to renaming, with background (0) where the other has 0."""
  if not np.array_equal(a == 0, b == 0):
    return False
  pairs = np.unique(np.stack([a.ravel().astype(np.int64), b.ravel().astype(np.int64)]), axis=1)
  return pairs.shape[1] == np.unique(a).size == np.unique(b).size


def stitch_cli(*args: str) -> int:
  return main(["stitch", "--cluster", "debug", *args])


def tree(root: Path) -> dict:
  out = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      st = os.stat(os.path.join(folder, name))
      out[os.path.relpath(os.path.join(folder, name), root)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def chunks(ground_truth, tmp_path_factory):
  """The ground truth cut into 27 chunks of 64^3 with overlap 16 (the last per axis moved back:
  overlap 26), written with random ids; returns (directory, boxes)."""
  directory = tmp_path_factory.mktemp("stitch") / "seg"
  boxes = chunk_boxes(ground_truth.shape)
  write_chunks(ground_truth, directory, boxes)
  return directory, boxes


@pytest.fixture(scope="module")
def golden(chunks, tmp_path_factory):
  """The chunks stitched into HDF5 with --min_overlap 1: (labels, summary, work dir)."""
  directory, _ = chunks
  out = tmp_path_factory.mktemp("golden") / "stitched.h5"
  assert stitch_cli("--segmentation_dir", str(directory), "--output", f"{out}:seg",
                    "--min_overlap", "1") == 0
  with h5py.File(out, "r") as f:
    labels = f["seg"][...]
    assert f["seg"].dtype == np.uint64
    assert f["seg"].compression == "gzip" and f["seg"].chunks == (64, 64, 64)
    assert list(f["seg"].attrs["voxel_offset_xyz"]) == list(OFFSET_XYZ)
  work = Path(f"{out}.stitch")
  return labels, json.loads((work / "summary.json").read_text()), work


# ----------------------------------------------------------------------------- pure parts

def test_tiling_of_split_box_owns_every_voxel_once_and_pairs_all_overlaps():
  # 130 along z with 64/32: starts 0, 32, 64, 66 -- chunks two apart overlap (32..96 and 66..130).
  boxes = chunk_boxes((130, 100, 150), (64, 64, 64), (8, 16, 32), (0, 0, 0))
  tiling = infer_tiling(boxes, [str(b) for b in boxes])
  assert tiling.grid_shape == (4, 2, 3)
  count = np.zeros((130, 100, 150), np.int32)
  for i in range(tiling.num_chunks):
    (oc, os_), (cc, cs) = tiling.owned_box(i), tiling.chunk_box(i)
    assert all(c <= o and o + n <= c + m for o, n, c, m in zip(oc, os_, cc, cs))
    count[tuple(slice(o, o + n) for o, n in zip(oc, os_))] += 1
  assert np.all(count == 1)
  brute = [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes))
           if all(max(boxes[i][0][a], boxes[j][0][a]) <
                  min(boxes[i][0][a] + boxes[i][1][a], boxes[j][0][a] + boxes[j][1][a])
                  for a in range(3))]
  order = {tiling.chunk_box(i)[0]: i for i in range(tiling.num_chunks)}
  expected = sorted(tuple(sorted((order[boxes[i][0]], order[boxes[j][0]]))) for i, j in brute)
  assert tiling.pairs() == expected
  assert any(abs(tiling.grid_position(i)[0] - tiling.grid_position(j)[0]) == 2 for i, j in expected)
  # Blocks x owners cover the region once.
  count[:] = 0
  for block in write_blocks((0, 0, 0), (130, 100, 150), (64, 32, 64)):
    for _, (pc, ps) in owners_of(tiling, block):
      count[tuple(slice(c, c + n) for c, n in zip(pc, ps))] += 1
  assert np.all(count == 1)


@pytest.mark.parametrize("edit,message", [
    # (A missing chunk at a corner of the grid leaves a grid: only an interior one is detectable
    # without a manifest or --subvolume_size.)
    (lambda b: [x for x in b if x[0] != (0, 48, 48)], "missing chunk at corner 48,48,0 (x,y,z)"),
    (lambda b: [x for x in b if x[0][2] != 48], "gap along x between 64"),
    (lambda b: [x if x[0] != (0, 0, 86) else ((0, 0, 86), (64, 64, 60)) for x in b],
     "differs from"),
    (lambda b: [((c[0], c[1], c[2] + 16 if c[2] == 48 else c[2]), s) for c, s in b],
     "no overlap along x"),
    (lambda b: b + b[:1], "a second chunk at corner"),
])
def test_tilings_that_do_not_tile_are_refused(edit, message):
  boxes = edit(chunk_boxes((64, 150, 150), offset_xyz=(0, 0, 0)))
  boxes = [(tuple(c), tuple(s)) for c, s in boxes]
  with pytest.raises(FFNError, match=message.replace("(", r"\(").replace(")", r"\)")):
    infer_tiling(boxes, [f"seg-{c[2]}_{c[1]}_{c[0]}.npz" for c, _ in boxes])


def test_expected_tiling_mismatch_is_named():
  boxes = chunk_boxes((64, 64, 150), offset_xyz=(0, 0, 0))
  tiling = infer_tiling(boxes, [str(b) for b in boxes])
  other = chunk_boxes((64, 64, 150), overlap_xyz=(8, 8, 8), offset_xyz=(0, 0, 0))
  with pytest.raises(FFNError, match="mismatched overlap or size"):
    check_expected(tiling, other, "--subvolume_size 64,64,64 --overlap 8,8,8")
  check_expected(tiling, boxes, "the same")


def _slow_rule(a, b, min_agreement, min_overlap):
  """The merge rule read literally: Python loops over voxels and pairs."""
  counts, size_a, size_b = {}, {}, {}
  for x, y in zip(a.ravel().tolist(), b.ravel().tolist()):
    size_a[x] = size_a.get(x, 0) + 1
    size_b[y] = size_b.get(y, 0) + 1
    if x and y:
      counts[(x, y)] = counts.get((x, y), 0) + 1
  ok = [(n, x, y) for (x, y), n in counts.items()
        if n >= min_overlap and n / min(size_a[x], size_b[y]) >= min_agreement]
  used_a, used_b, out = set(), set(), []
  for n, x, y in sorted(ok, key=lambda t: (-t[0], t[1], t[2])):
    if x not in used_a and y not in used_b:
      used_a.add(x)
      used_b.add(y)
      out.append((x, y, n))
  return out


@pytest.mark.parametrize("seed", range(6))
def test_match_overlap_agrees_with_a_literal_reading_of_the_rule(seed):
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 6, size=(5, 7, 9)) * rng.integers(1, 3, size=(5, 7, 9))
  b = np.where(rng.random(a.shape) < 0.7, a + 10 * (a > 0), rng.integers(0, 15, size=a.shape))
  for min_agreement, min_overlap in ((0.5, 1), (0.3, 5), (0.9, 2)):
    m = match_overlap(a, b, min_agreement, min_overlap)
    got = list(zip(m.ids_a.tolist(), m.ids_b.tolist(), m.counts.tolist()))
    assert got == _slow_rule(a, b, min_agreement, min_overlap)
  table = contingency(a, b)
  assert table.counts.sum() == np.count_nonzero((a != 0) & (b != 0))
  pieces = contingency(a, b, piece_voxels=7)  # counted 7 voxels at a time, then summed
  for field in ("ids_a", "sizes_a", "ids_b", "sizes_b", "pair_a", "pair_b", "counts"):
    np.testing.assert_array_equal(getattr(pieces, field), getattr(table, field))


def test_one_to_many_keeps_the_largest_and_leaves_the_rest_separate():
  # A has one object 1 where B has 7 (40 voxels) and 8 (10 voxels, wholly inside 1).
  a = np.ones((1, 1, 60), np.uint16)
  a[0, 0, 50:] = 2
  b = np.zeros_like(a)
  b[0, 0, :40] = 7
  b[0, 0, 40:50] = 8
  b[0, 0, 50:] = 9
  m = match_overlap(a, b, 0.5, 5)
  assert list(zip(m.ids_a.tolist(), m.ids_b.tolist())) == [(1, 7), (2, 9)]
  assert m.counters["not_one_to_one"] == 1  # (1, 8): score 1.0 but 1 is taken
  m = match_overlap(a, b, 0.5, 11)  # 2-9 shares 10 voxels only
  assert list(zip(m.ids_a.tolist(), m.ids_b.tolist())) == [(1, 7)]
  m = match_overlap(a, b, 0.9, 5)  # 1-7: 40 / min(50, 40) = 1.0; 2-9: 10 / 10
  assert list(zip(m.ids_a.tolist(), m.ids_b.tolist())) == [(1, 7), (2, 9)]


def test_global_ids_are_contiguous_in_first_owner_order():
  classes = idlib.equivalence_classes(6, np.array([0, 4]), np.array([3, 5]))
  owns = np.array([False, True, True, True, False, False])
  # nodes 0-3 one class, 4-5 another (no owner), 1 and 2 alone.
  assert idlib.global_ids(classes, owns).tolist() == [3, 1, 2, 3, 0, 0]
  out = idlib.relabel(np.array([[[0, 9, 4]]], np.uint16), np.array([4, 9], np.uint64),
                      np.array([7, 1 << 40], np.uint64))
  assert out.dtype == np.uint64 and out.tolist() == [[[0, 1 << 40, 7]]]


def test_sharding_makes_aligned_shards():
  spec = sharding_for((3, 5, 8), (2, 2, 2))  # z,y,x chunks; 2^1 per axis per shard
  assert spec["preshift_bits"] + spec["minishard_bits"] == 3
  assert spec["shard_bits"] == 2 + 3 + 3 - 3
  with pytest.raises(FFNError, match="does not fit"):
    sharding_for((8, 8, 8), (2, 1, 1))  # the code's first bit is x's, not z's


def test_a_block_of_one_shard_writes_one_shard_file(tmp_path):
  """Shards are the aligned boxes the writer assumes: writing one shard's box touches one file,
  so blocks written by different tasks never share a shard."""
  spec = LabelsSpec("precomputed", str(tmp_path / "seg"))
  layout = LabelsLayout((32, 32, 32), (3, 5, 7), (8, 8, 8), shard_chunks_zyx=(2, 2, 2))
  create_labels(spec, layout)
  seen: set = set()
  for corner in ((3, 5, 7), (19, 5, 23), (3, 21, 23), (19, 21, 7)):
    LabelsWriter(spec).write(corner, np.full((16, 16, 16), 5, np.uint64))
    files = {p.name for p in (tmp_path / "seg" / "10_10_10").iterdir()}
    assert len(files - seen) == 1
    seen = files


# ------------------------------------------------------------------------------- golden

def test_golden_stitch_equals_the_achievable_partition(golden, chunks, ground_truth):
  labels, summary, work = golden
  _, boxes = chunks
  expected, merged = achievable_partition(ground_truth, boxes, 1)
  assert same_partition(labels, expected)
  n = int(labels.max())
  assert np.array_equal(np.unique(labels), np.arange(0 if (labels == 0).any() else 1, n + 1))
  assert summary["objects"] == n and summary["objects_merged_across_seams"] == merged
  assert summary["chunks"] == 27 and summary["overlapping_pairs"] == 158
  # Bodies split by the crop itself are the only difference to the ground truth here.
  assert np.unique(labels).size >= np.unique(ground_truth).size


def test_fill_rule_agrees_with_a_voxel_by_voxel_reading():
  """UnsegmentedFill against a literal loop: a voxel the owner left 0 takes the label of the
  covering chunk (offered) in which it lies deepest, ties to the lower index; labelled voxels and
  voxels no chunk labels are untouched."""
  rng = np.random.default_rng(3)
  owned_box = ((10, 20, 30), (6, 7, 8))
  owned = rng.integers(0, 3, size=owned_box[1]).astype(np.uint64)  # a third unsegmented
  others = [(2, ((8, 18, 28), (9, 12, 6))), (5, ((12, 20, 31), (10, 10, 10))),
            (7, ((4, 14, 24), (13, 13, 13)))]
  views = []
  fill = UnsegmentedFill(owned, owned_box)
  for chunk, box in others:
    lo = [max(a, b) for a, b in zip(owned_box[0], box[0])]
    hi = [min(a + n, b + m) for a, n, b, m in zip(owned_box[0], owned_box[1], box[0], box[1])]
    region = (tuple(lo), tuple(h - l for h, l in zip(hi, lo)))
    labels = rng.integers(0, 4, size=region[1]).astype(np.uint64) * 100 + chunk
    labels[labels < 100] = 0
    views.append((chunk, box, region, labels))
    fill.offer(chunk, box, region, labels)
  got = fill.result()
  expected = {}
  for flat in range(owned.size):
    z, y, x = np.unravel_index(flat, owned.shape)
    if owned[z, y, x]:
      continue
    p = (z + 10, y + 20, x + 30)
    best = None
    for chunk, box, region, labels in views:
      r = [q - c for q, c in zip(p, region[0])]
      if not all(0 <= v < n for v, n in zip(r, region[1])) or not labels[tuple(r)]:
        continue
      depth = min(min(q - c, c + n - 1 - q) for q, c, n in zip(p, box[0], box[1]))
      if best is None or depth > best[0]:
        best = (depth, chunk, int(labels[tuple(r)]))
    if best is not None:
      expected[flat] = best[1:]
  assert got.index.tolist() == sorted(expected)
  assert [(int(s), int(l)) for s, l in zip(got.source, got.label)] == [expected[f] for f in
                                                                        sorted(expected)]
  assert 0 < len(expected) < (owned == 0).sum()  # some filled, some left at 0
  assert depth_in_box(((0, 0, 0), (1, 1, 3)), ((0, 0, 0), (3, 3, 3))).tolist() == [[[0, 0, 0]]]


def test_seams_left_unsegmented_by_their_owner_are_filled_from_the_neighbour(chunks, golden,
                                                                              ground_truth,
                                                                              tmp_path):
  """Every chunk leaves the 5 voxels of its owned box next to each inner owned face unsegmented
  (as an FFN chunk does where objects stop short of its face); the neighbour labels them from
  further inside. The stitch fills them back: the same partition as the golden run."""
  _, boxes = chunks
  tiling = infer_tiling(boxes, [str(b) for b in boxes])
  index = {tiling.chunk_box(i): i for i in range(tiling.num_chunks)}
  region_lo, region_hi = tiling.region_corner, [c + n for c, n in zip(tiling.region_corner,
                                                                      tiling.region_shape)]

  def blank(k, sub):
    box = boxes[k]
    (lo, shape) = tiling.owned_box(index[(tuple(box[0]), tuple(box[1]))])
    for a in range(3):
      for face, inner in ((lo[a], lo[a] > region_lo[a]),
                          (lo[a] + shape[a] - 5, lo[a] + shape[a] < region_hi[a])):
        if inner:
          sl = [slice(l - c, l - c + n) for l, c, n in zip(lo, box[0], shape)]
          sl[a] = slice(face - box[0][a], face - box[0][a] + 5)
          sub[tuple(sl)] = 0

  directory = tmp_path / "seg"
  write_chunks(ground_truth, directory, boxes, seed=1, blank=blank)
  out = tmp_path / "filled.h5"
  # Blanking lowers the agreement of small pieces in the overlaps (one copy empty in a slab); with
  # ground-truth chunks every co-occurrence is the same body, so any agreement may merge.
  assert stitch_cli("--segmentation_dir", str(directory), "--output", f"{out}:seg",
                    "--min_overlap", "1", "--min_agreement", "0.01") == 0
  with h5py.File(out, "r") as f:
    labels = f["seg"][...]
  summary = json.loads((Path(f"{out}.stitch") / "summary.json").read_text())
  assert summary["voxels_filled_from_other_chunks"] > 0.05 * labels.size
  assert np.array_equal(labels == 0, golden[0] == 0)  # every blanked voxel filled back
  pairs, counts = np.unique(np.stack([labels.ravel(), golden[0].ravel()]), axis=1,
                            return_counts=True)
  assert np.unique(pairs[0]).size == pairs.shape[1]  # no object spans two golden objects
  # A few tiny pieces whose only shared voxels were blanked stay apart (they meet at the seam
  # without sharing the overlap); everything else is the golden partition.
  for body in np.unique(pairs[1]):
    pieces = np.sort(counts[pairs[1] == body])
    assert pieces[:-1].sum() < 50, (body, pieces)
  assert np.unique(labels).size - np.unique(golden[0]).size <= 4


def test_golden_with_a_large_min_overlap_splits_exactly_where_expected(chunks, ground_truth,
                                                                       tmp_path):
  directory, boxes = chunks
  out = tmp_path / "big.h5"
  assert stitch_cli("--segmentation_dir", str(directory), "--output", f"{out}:seg",
                    "--min_overlap", "2000", "--min_agreement", "1.0") == 0
  with h5py.File(out, "r") as f:
    labels = f["seg"][...]
  expected, _ = achievable_partition(ground_truth, boxes, 2000)
  loose, _ = achievable_partition(ground_truth, boxes, 1)
  assert np.unique(expected).size > np.unique(loose).size  # the threshold does split bodies
  assert same_partition(labels, expected)


def test_id_map_maps_each_chunks_ids_to_the_output(golden, chunks):
  labels, _, work = golden
  directory, boxes = chunks
  idmap = np.load(work / "idmap.npz")
  corners = {tuple(c[::-1]): k for k, c in enumerate(idmap["chunk_corners_xyz"].tolist())}
  tiling = infer_tiling(boxes, [str(b) for b in boxes])
  offset = np.array(OFFSET_XYZ[::-1])
  for index in range(tiling.num_chunks):
    (oc, os_), (cc, _) = tiling.owned_box(index), tiling.chunk_box(index)
    local, _ = storage.load_segmentation_file(storage.segmentation_path(str(directory), cc))
    k = corners[cc]
    sel = idmap["chunk"] == k
    table = dict(zip(idmap["local_id"][sel].tolist(), idmap["global_id"][sel].tolist()))
    table[0] = 0
    part = local[tuple(slice(o - c, o - c + n) for o, c, n in zip(oc, cc, os_))]
    want = np.vectorize(table.__getitem__, otypes=[np.uint64])(part)
    got = labels[tuple(slice(o - f, o - f + n) for o, f, n in zip(oc, offset, os_))]
    np.testing.assert_array_equal(got, want)


def test_consensus_of_two_runs_per_chunk_is_stitched(ground_truth, tmp_path, golden):
  """seg1 merges pairs of bodies, seg2 is the ground truth: the split consensus restores the
  bodies, so the stitched consensus is the golden stitch's partition."""
  boxes = chunk_boxes(ground_truth.shape)
  ids = np.unique(ground_truth)
  ids = ids[ids != 0]
  lut = ids.copy()
  lut[1::2] = ids[0:len(ids) - 1:2]  # body 2k+1 takes body 2k's id: half the bodies merged in pairs
  merged = np.where(ground_truth == 0, 0, lut[np.searchsorted(ids, ground_truth)])
  assert np.unique(merged).size < 0.6 * np.unique(ground_truth).size
  write_chunks(merged, tmp_path / "seg1", boxes, seed=1)
  write_chunks(ground_truth, tmp_path / "seg2", boxes, seed=2)
  request = (f'segmentation1 {{ directory: "{tmp_path / "seg1"}" split_cc: false }} '
             f'segmentation2 {{ directory: "{tmp_path / "seg2"}" split_cc: false }} '
             f'segmentation_output_dir: "{tmp_path / "unused"}" type: CONSENSUS_SPLIT')
  assert stitch_cli("--consensus_request", request, "--output", f"{tmp_path / 'c.h5'}:seg",
                    "--min_overlap", "1") == 0
  with h5py.File(tmp_path / "c.h5", "r") as f:
    assert same_partition(f["seg"][...], golden[0])


def test_fork_run_consensus_flags_stitch_the_consensus_of_several_runs(ground_truth, tmp_path,
                                                                      golden):
  """``run_consensus.py --segmentation_dirs "a b" --outspec ...`` (the SLURM fork's flags): run a
  merges bodies (0,1), (2,3)...; run b merges (1,2), (3,4)...; the split of a by b is every body
  alone, stitched: the golden partition. A missing run is one line."""
  boxes = chunk_boxes(ground_truth.shape)
  ids = np.unique(ground_truth)
  ids = ids[ids != 0]
  runs = []
  for first in (0, 1):
    lut = ids.copy()
    lut[first + 1::2] = ids[first:len(ids) - 1:2][:len(lut[first + 1::2])]
    merged = np.where(ground_truth == 0, 0, lut[np.searchsorted(ids, ground_truth)])
    assert np.unique(merged).size < 0.6 * np.unique(ground_truth).size
    write_chunks(merged, tmp_path / f"run{first}", boxes, seed=3 + first)
    runs.append(str(tmp_path / f"run{first}"))
  out = tmp_path / "fork.h5"
  result = subprocess.run([sys.executable, "run_consensus.py", "--segmentation_dirs", " ".join(runs),
                           f"--outspec={out}:seg", "--min_ffn_size", "0", "--min_overlap", "1",
                           "--cluster", "debug"], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  with h5py.File(out, "r") as f:
    assert same_partition(f["seg"][...], golden[0])
  summary = json.loads((Path(f"{out}.stitch") / "summary.json").read_text())
  assert summary["parameters"]["source"]["consensus_dirs"] == runs[1:]
  bad = subprocess.run([sys.executable, "run_consensus.py", "--segmentation_dirs",
                        f"{runs[0]} {tmp_path / 'absent'}", "--outspec", f"{tmp_path / 'b.h5'}:seg"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
  assert bad.returncode == 2 and not (tmp_path / "b.h5").exists()
  assert bad.stderr.strip().splitlines() == [
      f"ffn stitch: error: {tmp_path / 'absent'}: segmentation directory not found"]


# --------------------------------------------------------------------------- round trips

@pytest.fixture(scope="module")
def small(ground_truth, tmp_path_factory):
  """A 100^3 corner of the ground truth in 8 chunks (64^3, overlap 28), stitched to HDF5."""
  directory = tmp_path_factory.mktemp("small")
  gt = ground_truth[:100, :100, :100]
  boxes = chunk_boxes(gt.shape)
  write_chunks(gt, directory / "seg", boxes, seed=3)
  assert stitch_cli("--segmentation_dir", str(directory / "seg"), "--output",
                    f"{directory / 'ref.h5'}:seg", "--min_overlap", "1") == 0
  with h5py.File(directory / "ref.h5", "r") as f:
    ref = f["seg"][...]
  return directory, gt, boxes, ref


@pytest.mark.parametrize("kind,extra", [("zarr", []), ("precomputed", []),
                                        ("precomputed", ["--sharded"])])
def test_output_round_trips_through_tensorstore(small, kind, extra, tmp_path):
  import tensorstore as ts
  directory, gt, boxes, ref = small
  path = tmp_path / "view" / "segmentation"
  assert stitch_cli("--segmentation_dir", str(directory / "seg"), "--output", f"{kind}://{path}",
                    "--min_overlap", "1", "--chunk_size", "32,32,32", "--block_size", "64,64,64",
                    *extra) == 0
  assert same_partition(ref, achievable_partition(gt, boxes, 1)[0])
  if kind == "zarr":
    store = ts.open({"driver": "zarr", "kvstore": f"file://{path}"}).result()
    data = store.read().result()
    assert json.loads((path / ".zattrs").read_text())["voxel_offset_xyz"] == list(OFFSET_XYZ)
  else:
    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{path}"}).result()
    assert list(store.domain.origin[:3]) == list(OFFSET_XYZ)
    data = store.read().result()[..., 0].transpose(2, 1, 0)
    info = json.loads((path / "info").read_text())
    assert info["type"] == "segmentation" and info["data_type"] == "uint64"
    files = sorted(p.name for p in (path / "10_10_10").iterdir())
    if extra:
      assert all(name.endswith(".shard") for name in files) and len(files) == 8
    else:  # chunk files named by absolute voxel ranges
      assert "50-82_50-82_50-82" in files and "146-150_146-150_146-150" in files
  assert store.dtype.name == "uint64"
  np.testing.assert_array_equal(data, ref)
  np.testing.assert_array_equal(read_labels(parse_labels_spec(f"{kind}://{path}"))[0], ref)
  assert not list(path.parent.glob(".*partial"))


def test_label_volume_spec_parsing():
  assert parse_labels_spec("a/b.h5:seg") == LabelsSpec("h5", "a/b.h5", "seg")
  assert parse_labels_spec("zarr://x/y.zarr") == LabelsSpec("zarr", "x/y.zarr")
  assert parse_labels_spec('{"driver": "neuroglancer_precomputed", "kvstore": "file:///v/s"}') == \
      LabelsSpec("precomputed", "/v/s")
  for bad, message in (("s3://bucket/x", "unknown scheme"), ("out.zarr", "expected path.h5"),
                       ('{"driver": "n5", "kvstore": "/x"}', "driver must be"),
                       ('{"driver": "zarr", "kvstore": "gs://b/x"}', "only local file")):
    with pytest.raises(FFNError, match=message):
      parse_labels_spec(bad)


def test_writer_writes_absolute_boxes(tmp_path):
  for kind in ("zarr", "precomputed"):
    spec = LabelsSpec(kind, str(tmp_path / kind))
    create_labels(spec, LabelsLayout((20, 30, 40), (5, 6, 7), (8, 8, 8)))
    data = np.arange(8 * 16 * 8, dtype=np.uint64).reshape(8, 16, 8) + (1 << 40)
    LabelsWriter(spec).write((13, 6, 15), data)
    back, corner = read_labels(spec, (13, 6, 15), (8, 16, 8))
    np.testing.assert_array_equal(back, data)
    whole, corner = read_labels(spec)
    assert corner == (5, 6, 7) and whole.shape == (20, 30, 40) and whole.sum() == data.sum()


# ------------------------------------------------------------------------------- bad input

def run_bad(capsys, tmp_path: Path, *args: str) -> str:
  """``ffn stitch`` expecting bad input: exit 2, exactly one line on stderr, nothing written."""
  before = tree(tmp_path)
  code = stitch_cli(*args)
  captured = capsys.readouterr()
  lines = captured.err.splitlines()
  assert code == 2, captured.err
  assert len(lines) == 1 and lines[0].startswith("ffn stitch: error: "), captured.err
  assert tree(tmp_path) == before
  return lines[0]


@pytest.fixture
def bad_dir(tmp_path, ground_truth):
  """Chunks of a 64 x 150 x 150 (z,y,x) slab: 3 x 3 (x,y) of them."""
  gt = ground_truth[:64]
  boxes = chunk_boxes(gt.shape)
  write_chunks(gt, tmp_path / "seg", boxes)
  return tmp_path, boxes


def _remove(directory: Path, corner_zyx) -> None:
  os.remove(storage.segmentation_path(str(directory), corner_zyx))


def test_bad_missing_chunk(bad_dir, capsys):
  tmp, boxes = bad_dir
  _remove(tmp / "seg", (50, 98, 98))
  line = run_bad(capsys, tmp, "--segmentation_dir", str(tmp / "seg"), "--output",
                 f"{tmp / 'o.h5'}:seg")
  assert "missing chunk at corner 98,98,50 (x,y,z)" in line


def test_bad_missing_edge_chunk_is_found_with_the_tiling_flags(bad_dir, capsys):
  tmp, boxes = bad_dir
  for y in (50, 98, 136):
    _remove(tmp / "seg", (50, y, 136))  # the last column: what is left tiles a smaller region
  line = run_bad(capsys, tmp, "--segmentation_dir", str(tmp / "seg"), "--output",
                 f"{tmp / 'o.h5'}:seg", "--subvolume_size", "64,64,64", "--overlap", "16,16,16",
                 "--bounding_box", "start { x: 50 y: 50 z: 50 } size { x: 150 y: 150 z: 64 }")
  assert "expects a chunk at 136,50,50 (x,y,z) of size 64,64,64" in line


def _batch_manifest(tmp: Path, boxes) -> None:
  """The manifest a batch run leaves in its results directory (``batch/manifest.json``), written
  through ffn.blockwise like ffn batch_inference does."""
  from ffn.blockwise import check_manifest, plan
  from ffn.axes import zyx_to_xyz
  items = plan([BoundingBox(zyx_to_xyz(c), zyx_to_xyz(s)) for c, s in boxes])
  check_manifest(tmp / "seg" / "batch", {"stage": "batch_inference",
                                         "output_dirs": [str(tmp / "seg")]}, items)


def test_batch_manifest_gives_the_tiling(bad_dir, capsys):
  tmp, boxes = bad_dir
  _batch_manifest(tmp, boxes)
  for y in (50, 98, 136):
    _remove(tmp / "seg", (50, y, 136))  # without the manifest: a smaller region, no error
  line = run_bad(capsys, tmp, "--segmentation_dir", str(tmp / "seg"), "--output",
                 f"{tmp / 'o.h5'}:seg")
  assert "the batch run manifest of" in line and "expects a chunk at 136,50,50" in line


def test_batch_manifest_stitches(bad_dir, tmp_path):
  tmp, boxes = bad_dir
  _batch_manifest(tmp, boxes)
  out = tmp_path / "m.h5"
  assert stitch_cli("--segmentation_dir", str(tmp / "seg" / "batch" / "manifest.json"),
                    "--output", f"{out}:seg", "--min_overlap", "1") == 0
  with h5py.File(out, "r") as f:
    assert f["seg"].shape == (64, 150, 150)


def test_bad_gap(bad_dir, capsys):
  tmp, boxes = bad_dir
  for y in (50, 98, 136):
    _remove(tmp / "seg", (50, y, 98))  # the middle column: 50..114 and 136..200 remain along x
  line = run_bad(capsys, tmp, "--segmentation_dir", str(tmp / "seg"), "--output",
                 f"{tmp / 'o.h5'}:seg")
  assert "gap along x between 114" in line and "chunks do not tile" in line


def test_bad_inconsistent_size(bad_dir, capsys):
  tmp, boxes = bad_dir
  path = storage.segmentation_path(str(tmp / "seg"), (50, 98, 136))
  labels, _ = storage.load_segmentation_file(path)
  storage.save_subvolume(labels[:, :, :50], {}, path)  # one chunk of the last column shorter
  line = run_bad(capsys, tmp, "--segmentation_dir", str(tmp / "seg"), "--output",
                 f"{tmp / 'o.h5'}:seg")
  assert "size 50 along x differs from" in line and "chunks do not tile" in line


def test_bad_mismatched_overlap(bad_dir, capsys):
  tmp, _ = bad_dir
  line = run_bad(capsys, tmp, "--segmentation_dir", str(tmp / "seg"), "--output",
                 f"{tmp / 'o.h5'}:seg", "--subvolume_size", "64,64,64", "--overlap", "8,8,8")
  assert "mismatched overlap or size" in line


def test_bad_existing_output(bad_dir, capsys):
  tmp, _ = bad_dir
  with h5py.File(tmp / "o.h5", "w") as f:
    f["seg"] = np.zeros(3)
  line = run_bad(capsys, tmp, "--segmentation_dir", str(tmp / "seg"), "--output",
                 f"{tmp / 'o.h5'}:seg")
  assert "already exists" in line
  (tmp / "o.zarr").mkdir()
  line = run_bad(capsys, tmp, "--segmentation_dir", str(tmp / "seg"), "--output",
                 f"zarr://{tmp / 'o.zarr'}")
  assert "already exists" in line


def test_bad_flags(bad_dir, capsys):
  tmp, _ = bad_dir
  seg = str(tmp / "seg")
  for flags, message in ((["--output", "x.zarr"], "expected path.h5:dataset"),
                         (["--output", f"{tmp}/o.h5:s", "--min_agreement", "0"], "--min_agreement"),
                         (["--output", f"{tmp}/o.h5:s", "--block_size", "100"], "multiple of"),
                         (["--output", f"{tmp}/o.h5:s", "--sharded"], "precomputed:// outputs"),
                         (["--output", f"zarr://{tmp}/z", "--segmentation_dir", f"{tmp}/none"],
                          "not found")):
    args = ["--segmentation_dir", seg] + flags if "--segmentation_dir" not in flags else flags
    assert message in run_bad(capsys, tmp, *args)


# ---------------------------------------------------------------------------------- resume

def _running_tasks(run_dir: Path) -> list[dict]:
  """Status files of the tasks of ``run_dir`` that run and have finished at least two blocks
  but still have at least eight to do."""
  out = []
  for path in (run_dir / "tasks").glob("*.json"):
    data = json.loads(path.read_text())  # written atomically
    if data["state"] == "running" and 2 <= len(data["seconds"]) <= len(data["items"]) - 8:
      out.append(data)
  return out


def test_killed_and_terminated_tasks_resume_to_the_same_output(chunks, golden, tmp_path):
  """The write phase on the local cluster (every task its own process; 125 blocks in 4 tasks):
  one task gets SIGKILL, another SIGTERM, mid-phase. The stitch ends with exit 2 and a line
  naming --retry_failed; the same command with --retry_failed finishes, without redoing the
  finished phases, and the output is bit-identical to the uninterrupted golden run's."""
  directory, _ = chunks
  out = tmp_path / "resumed.h5"
  args = [sys.executable, "-m", "ffn.cli", "stitch", "--cluster", "local",
          "--slurm_array_parallelism", "4", "--segmentation_dir", str(directory), "--output",
          f"{out}:seg", "--min_overlap", "1", "--chunk_size", "16,16,16", "--block_size",
          "32,32,32", "--num_tasks", "4"]
  work = Path(f"{out}.stitch")
  proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          cwd=REPO)
  try:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(_running_tasks(work / "write")) < 2:
      assert proc.poll() is None, "the stitch ended before its tasks could be stopped"
      time.sleep(0.05)
    victims = _running_tasks(work / "write")[:2]
    assert len(victims) == 2, "no two write tasks were running in time"
    os.kill(victims[0]["pid"], signal.SIGKILL)
    os.kill(victims[1]["pid"], signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 2, err[-2000:]
  assert err.strip().splitlines()[-1].startswith("ffn stitch: error: stitch phase write:")
  assert "--retry_failed" in err.strip().splitlines()[-1]
  assert not out.exists() and len(list((work / "blocks").glob("*.json"))) < 125
  states = {json.loads(p.read_text())["pid"]: json.loads(p.read_text())["state"]
            for p in (work / "write" / "tasks").glob("*.json")}
  assert states[victims[1]["pid"]] == "interrupted" and states[victims[0]["pid"]] == "running"
  chunk_mtimes = {p.name: p.stat().st_mtime_ns for p in (work / "chunks").glob("*.npz")}
  assert len(chunk_mtimes) == 27
  result = subprocess.run(args + ["--retry_failed"], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert {p.name: p.stat().st_mtime_ns for p in (work / "chunks").glob("*.npz")} == chunk_mtimes
  with h5py.File(out, "r") as f:
    np.testing.assert_array_equal(f["seg"][...], golden[0])  # bit-identical, other task split


def test_resume_rewrites_a_half_written_block(small, tmp_path):
  """Extract and match done, three blocks written, a fourth cut short (garbage in the staged
  volume, no done file): the re-run keeps the done blocks, writes the rest, and gives the output
  of the uninterrupted run."""
  from ffn.stitch.stitch import (ExtractWorker, JobControl, MatchWorker, Params, WriteWorker,
                                 block_items, chunk_items, make_plan, match_items, resolve, stitch)
  from slurm.executor import SlurmOptions
  directory, _, _, ref = small
  output = parse_labels_spec(f"zarr://{tmp_path / 'out.zarr'}")
  params = Params(min_overlap=1, block_zyx=(32, 32, 32), chunk_zyx=(32, 32, 32))
  plan = make_plan(str(directory / "seg"), output, None, params)
  for sub in ("chunks", "pairs", "global", "blocks"):
    (plan.work_dir / sub).mkdir(parents=True)
  extract = ExtractWorker(plan.work_dir, plan.tiling, plan.source)
  for item in chunk_items(plan):
    extract.process(item)
  match = MatchWorker(plan.work_dir, plan.tiling, 0.5, 1)
  for item in match_items(plan):
    match.process(item)
  resolve(plan)
  staging = plan.staging()
  create_labels(staging, plan.layout())
  blocks = block_items(plan)
  worker = WriteWorker(plan.work_dir, plan.tiling, staging)
  for item in blocks[:3]:
    worker.process(item)
  half = blocks[3]
  LabelsWriter(staging).write(tuple(int(v) for v in half.write_box.start[::-1]),
                              np.full(tuple(int(v) for v in half.write_box.size[::-1]), 12345,
                                      np.uint64))
  done = {p.name: p.stat().st_mtime_ns for p in (plan.work_dir / "blocks").glob("*.json")}
  chunk_files = {p.name: p.stat().st_mtime_ns for p in (plan.work_dir / "chunks").glob("*.npz")}
  assert len(done) == 3 and len(chunk_files) == 8
  stitch(plan, JobControl(SlurmOptions(cluster="debug"), num_tasks=2))
  assert {p.name: p.stat().st_mtime_ns for p in (plan.work_dir / "blocks").glob("*.json")
          if p.name in done} == done
  assert {p.name: p.stat().st_mtime_ns for p in (plan.work_dir / "chunks").glob("*.npz")} == \
      chunk_files
  np.testing.assert_array_equal(read_labels(output)[0], ref)


# ----------------------------------------------------------------------------------- Slurm

@pytest.mark.slurm
def test_stitch_phases_as_real_slurm_job_arrays(small, tmp_path, slurm_job_name):
  from slurm.executor import SlurmOptions
  require_fit(SlurmOptions(cluster="slurm", cpus_per_task=1, time_min=10))
  directory, _, _, ref = small
  out = tmp_path / "slurm.h5"
  code = main(["stitch", "--cluster", "slurm", "--slurm_job_name", slurm_job_name,
               "--slurm_time_min", "10", "--num_tasks", "3", "--segmentation_dir",
               str(directory / "seg"), "--output", f"{out}:seg", "--min_overlap", "1",
               "--block_size", "64,64,64"])
  assert code == 0
  with h5py.File(out, "r") as f:
    np.testing.assert_array_equal(f["seg"][...], ref)
  work = Path(f"{out}.stitch")
  for phase in ("extract", "match", "write"):
    record = json.loads(sorted((work / phase / "submissions").glob("*.json"))[-1].read_text())
    assert record["cluster"] == "slurm" and len(record["job_ids"]) == 3
    assert len({j.split("_")[0] for j in record["job_ids"]}) == 1  # one array per phase
