"""ffn reseg: pairs (golden volumes, brute-force oracle, blockwise == one block), the analysis
measures against hand-computed values, the merge rule, union-find, the neuclease merge-table
layout, the proofreading queue and the CLI's bad-input handling. Pure numpy, no model."""

from __future__ import annotations

import itertools
import json
import math
import urllib.parse

import h5py
import numpy as np
import pytest

from ffn.cli import main
from ffn.reseg import agglomerate as ag
from ffn.reseg import analyze, pairs, queue
from slurm_cluster import require_fit, slurm_job_name  # noqa: F401 - the fixture


# ----------------------------------------------------------------------------------- pairs

def two_cubes() -> np.ndarray:
  """z4 y6 x8: id 5 at x 0..3, id 9 at x 4..7 (one 4x6 face between them)."""
  lab = np.zeros((4, 6, 8), np.uint64)
  lab[:, :, :4] = 5
  lab[:, :, 4:] = 9
  return lab


def test_pairs_two_cubes_golden():
  table = pairs.find_pairs(two_cubes(), corner_zyx=(100, 200, 300))
  # 24 faces; contact voxels: the planes x=3 and x=4 (48); their mean (z,y,x) = (1.5, 2.5, 3.5):
  # eight voxels at equal distance, the lowest z, y, x wins -> local (1, 2, 3).
  assert table.rows() == [(5, 9, 303, 202, 101, 24, 48, 96, 96)]


def test_pairs_diagonal_contact_has_zero_area_and_max_distance_bridges_gaps():
  lab = np.zeros((3, 3, 3), np.uint8)
  lab[0, 0, 0] = 1
  lab[1, 1, 1] = 2  # corner neighbour of 1: 26-connected, no shared face
  lab[2, 2, 2] = 3  # corner neighbour of 2
  table = pairs.find_pairs(lab)
  assert [(r[0], r[1], r[5], r[6]) for r in table.rows()] == [(1, 2, 0, 2), (2, 3, 0, 2)]
  assert pairs.find_pairs(lab, max_distance=1).rows() == []  # face neighbours only
  gap = np.zeros((1, 1, 5), np.uint8)
  gap[0, 0, 0], gap[0, 0, 3] = 1, 2  # two background voxels between them
  assert pairs.find_pairs(gap, max_distance=2).rows() == []
  assert [r[:2] for r in pairs.find_pairs(gap, max_distance=3).rows()] == [(1, 2)]


def test_neighbour_offsets_are_half_of_the_ball():
  assert len(pairs.neighbour_offsets()) == 13
  assert len(pairs.neighbour_offsets(1)) == 3
  assert len(pairs.neighbour_offsets(math.sqrt(2))) == 9
  assert len(pairs.neighbour_offsets(2)) == (33 - 1) // 2  # |d| <= 2: 33 offsets with 0


def brute_force(lab: np.ndarray, max_d2: int) -> list[tuple[int, ...]]:
  """Independent oracle: python loops over every voxel pair within squared distance max_d2."""
  shape = lab.shape
  r = int(math.isqrt(max_d2))
  offsets = [d for d in itertools.product(range(-r, r + 1), repeat=3)
             if 0 < sum(v * v for v in d) <= max_d2]
  contacts: dict[tuple[int, int], set] = {}
  area: dict[tuple[int, int], int] = {}
  for u in itertools.product(*[range(s) for s in shape]):
    a = int(lab[u])
    if not a:
      continue
    for d in offsets:
      v = tuple(p + q for p, q in zip(u, d))
      if not all(0 <= c < s for c, s in zip(v, shape)):
        continue
      b = int(lab[v])
      if b and b != a:
        key = (min(a, b), max(a, b))
        contacts.setdefault(key, set()).add(u)
        if sum(abs(c) for c in d) == 1:  # a face, seen once from each side
          area[key] = area.get(key, 0) + 1
  sizes = {int(i): int(n) for i, n in zip(*np.unique(lab, return_counts=True))}
  rows = []
  for key in sorted(contacts):
    voxels = sorted(contacts[key])
    mean = np.mean(np.array(voxels, float), axis=0)
    best = min(voxels, key=lambda p: (round(float(np.sum((np.array(p) - mean) ** 2)), 9), p))
    rows.append((key[0], key[1], best[2], best[1], best[0], area.get(key, 0) // 2, len(voxels),
                 sizes[key[0]], sizes[key[1]]))
  return rows


@pytest.mark.parametrize("max_distance", [None, 2.0])
def test_pairs_match_brute_force_and_blocks_add_up(max_distance):
  rng = np.random.default_rng(7)
  lab = rng.integers(0, 5, (7, 8, 9)).astype(np.uint32) * 3  # ids 0,3,6,9,12
  expect = brute_force(lab, 3 if max_distance is None else 4)
  assert pairs.find_pairs(lab, max_distance).rows() == expect
  c = pairs.context_voxels(max_distance)
  blocks = []
  for box in pairs.tile(lab.shape, (4, 3, 5)):
    lo = np.array(box.start[::-1])
    hi = lo + box.size[::-1]
    rlo, rhi = np.maximum(lo - c, 0), np.minimum(hi + c, lab.shape)
    sub = lab[tuple(slice(int(a), int(b)) for a, b in zip(rlo, rhi))]
    blocks.append(pairs.block_contacts(sub, lo - rlo, hi - rlo, rlo, max_distance))
  assert pairs.merge_blocks(blocks).rows() == expect


def test_pairs_csv_round_trip_and_uint64_ids(tmp_path):
  lab = two_cubes()
  lab[lab == 9] = 2 ** 63 + 5
  table = pairs.find_pairs(lab)
  path = str(tmp_path / "pairs.csv")
  pairs.write_csv(table, path)
  assert open(path).readline().strip() == ",".join(pairs.COLUMNS)
  back = pairs.read_csv(path)
  assert back.rows() == table.rows() and int(back.id_b[0]) == 2 ** 63 + 5


def test_pairs_cli_blockwise_on_debug_cluster_equals_one_block(tmp_path, capsys):
  rng = np.random.default_rng(3)
  lab = np.repeat(rng.integers(0, 6, (6, 6, 6)), 3, axis=0).astype(np.uint16)  # 18x6x6
  with h5py.File(tmp_path / "seg.h5", "w") as f:
    f["seg"] = lab
  one, blocked = str(tmp_path / "one.csv"), str(tmp_path / "blocks.csv")
  assert main(["reseg", "pairs", "--segmentation", f"{tmp_path}/seg.h5:seg", "--output", one,
               "--corner", "1,2,3"]) == 0
  assert main(["reseg", "pairs", "--segmentation", f"{tmp_path}/seg.h5:seg", "--output", blocked,
               "--corner", "1,2,3", "--block_size", "4,4,10", "--cluster", "debug",
               "--num_tasks", "1", "--wait"]) == 0
  assert open(one).read() == open(blocked).read()
  table = pairs.read_csv(one)
  assert len(table) > 3 and table.point_zyx[:, 0].min() >= 3  # z offset by the corner


@pytest.mark.slurm
def test_pairs_blocks_on_a_real_slurm_array(tmp_path, slurm_job_name):
  from slurm.executor import SlurmOptions
  require_fit(SlurmOptions(cluster="slurm", cpus_per_task=1, time_min=10))
  rng = np.random.default_rng(5)
  lab = np.repeat(rng.integers(0, 8, (5, 6, 7)), 2, axis=2).astype(np.uint32)  # 5x6x14
  with h5py.File(tmp_path / "seg.h5", "w") as f:
    f["seg"] = lab
  out = tmp_path / "pairs.csv"
  assert main(["reseg", "pairs", "--segmentation", f"{tmp_path}/seg.h5:seg", "--output", str(out),
               "--block_size", "7,3,3", "--num_tasks", "3", "--wait", "--cluster", "slurm",
               "--slurm_job_name", slurm_job_name, "--slurm_time_min", "10"]) == 0
  assert pairs.read_csv(str(out)).rows() == pairs.find_pairs(lab).rows() == brute_force(lab, 3)
  record = json.loads(sorted((tmp_path / "pairs.csv.run" / "submissions").glob("*.json"))[-1]
                      .read_text())
  assert record["cluster"] == "slurm" and len(record["job_ids"]) == 3
  assert len({j.split("_")[0] for j in record["job_ids"]}) == 1  # one array


def test_pairs_cli_bad_input_one_line(tmp_path, capsys):
  with h5py.File(tmp_path / "f.h5", "w") as f:
    f["img"] = np.zeros((4, 4, 4), np.float32)
  out = tmp_path / "p.csv"
  assert main(["reseg", "pairs", "--segmentation", f"{tmp_path}/f.h5:img",
               "--output", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "f.h5:img" in err[0] and "float32" in err[0]
  assert main(["reseg", "pairs", "--segmentation", f"{tmp_path}/nothere.h5:seg",
               "--output", str(out)]) == 2
  assert not out.exists()


# -------------------------------------------------------------------------------- analysis

def write_pair_file(path, probs, dels, moves, starts, status="ok"):
  np.savez(path, status=status, reason="", probs=probs,
           deletes=np.array([np.asarray(d) for d in dels] + [None], dtype=object)[:-1],
           histories=np.array([np.asarray(m).reshape(-1, 3) for m in moves] + [None],
                              dtype=object)[:-1],
           start_points=np.array([np.asarray(s).reshape(-1, 3) for s in starts] + [None],
                                 dtype=object)[:-1])


def test_evaluate_pair_hand_computed(tmp_path):
  # Canvas radius 2 (5^3) around point x,y,z = (10, 10, 10); analysis radius 1 (3^3 box 9..11).
  base = np.zeros((20, 20, 20), np.uint8)
  base[9:12, 9:12, 9] = 1  # a: the x = 9 plane of the analysis box (9 voxels)
  base[9:12, 9:12, 10:12] = 2  # b: x = 10, 11 (18 voxels)
  qprob = np.zeros((2, 5, 5, 5), np.uint8)
  hi, lo = 255, 50  # dequantised ~0.998 and ~0.194
  qprob[0, 1:4, 1:4, 1:3] = hi  # run a: x 9..10 of the box (18 voxels)
  qprob[1, 1:4, 1:4, 2:4] = hi  # run b: x 10..11 (18 voxels)
  qprob[1, 0, 0, 0] = hi  # outside the analysis box: not counted
  qprob[0, 2, 2, 3] = lo  # below 0.5
  path = tmp_path / "1-2_at_10_10_10.npz"
  moves_a = [(2, 2, 2), (0, 0, 0), (3, 3, 3)]  # canvas z,y,x; (0,0,0) is outside the box 1..3
  write_pair_file(path, qprob, [[5, 7, 1], [2]], [moves_a, [(2, 2, 2)]],
                  [[(2, 2, 2)], [(0, 0, 0), (3, 2, 1)]])
  row = analyze.evaluate_pair(str(path), 1, 2, (10, 10, 10), lambda box: base[box.to_slices()],
                              (2, 2, 2), (1, 1, 1))
  assert row["status"] == "ok"
  assert row["iou"] == pytest.approx(9 / 27) == row["score"]  # the x = 10 plane of 27 voxels
  assert (row["num_voxels_a"], row["num_voxels_b"]) == (9, 18)
  assert row["a_num_voxels"] == 18 and row["b_num_voxels"] == 18
  assert row["a_consistency_a"] == 1.0 and row["a_consistency_b"] == pytest.approx(9 / 18)
  assert row["b_consistency_a"] == 0.0 and row["b_consistency_b"] == 1.0
  assert row["a_deleted_voxels"] == 5 + 1 and row["a_deleted_fraction"] == pytest.approx(6 / 18)
  assert row["b_deleted_voxels"] == 2
  # origins: the last start point (x,y,z, canvas) + canvas corner (8, 8, 8)
  assert (row["a_origin_x"], row["a_origin_y"], row["a_origin_z"]) == (10, 10, 10)
  assert (row["b_origin_x"], row["b_origin_y"], row["b_origin_z"]) == (11, 10, 9)
  # EDTs inside the analysis box (its faces are not background): the plate x = 9 is 1 from
  # x = 10; each run's two planes are 2 from the empty third plane.
  assert row["max_edt_a"] == 1.0 and row["max_edt_b"] == 2.0
  assert row["a_max_edt"] == 2.0 and row["b_max_edt"] == 2.0


def test_bad_pair_files_become_rows_with_reasons(tmp_path):
  base = np.ones((20, 20, 20), np.uint8)
  read = lambda box: base[box.to_slices()]  # noqa: E731
  (tmp_path / "garbage.npz").write_bytes(b"not a zip")
  one = np.zeros((1, 5, 5, 5), np.uint8)
  write_pair_file(tmp_path / "one.npz", one, [[0]], [[(2, 2, 2)]], [[(2, 2, 2)]])
  np.savez(tmp_path / "oov.npz", status="out_of_volume", reason="canvas leaves the image")
  args = dict(id_a=1, id_b=2, point_xyz=(10, 10, 10), read_base=read, radius=(2, 2, 2),
              analysis_radius=(1, 1, 1))
  status = {name: analyze.evaluate_pair(str(tmp_path / name), **args)
            for name in ("missing.npz", "garbage.npz", "one.npz", "oov.npz")}
  assert {k: v["status"] for k, v in status.items()} == {
      "missing.npz": "missing", "garbage.npz": "unreadable", "one.npz": "incomplete",
      "oov.npz": "out_of_volume"}
  assert all(v["reason"] for v in status.values())
  rows = list(status.values())
  path = str(tmp_path / "aff.csv")
  analyze.write_rows(rows, path)
  back = analyze.read_rows(path)
  assert [r["status"] for r in back] == [r["status"] for r in rows]
  assert back[0]["score"] is None and back[2]["reason"] == rows[2]["reason"]


def test_majority_bodies_and_precision_recall():
  seg = np.array([1, 1, 2, 2, 3, 3, 4], np.uint64)
  gt = np.array([7, 7, 7, 0, 8, 7, 0], np.uint64)
  bodies = analyze.majority_bodies(seg, gt)
  assert bodies == {1: 7, 2: 7, 3: 7}  # 3: 8 and 7 once each -> the smaller; 4: no body
  rows = [{"status": "ok", "id_a": 1, "id_b": 2, "score": 0.9},
          {"status": "ok", "id_a": 2, "id_b": 3, "score": 0.3},
          {"status": "ok", "id_a": 3, "id_b": 4, "score": 0.95},  # no body for 4: not counted
          {"status": "missing", "id_a": 1, "id_b": 3, "score": None}]
  pr = analyze.precision_recall(rows, bodies, lambda r: r["score"] >= 0.5)
  assert (pr["tp"], pr["fp"], pr["fn"], pr["recall"]) == (1, 0, 1, 0.5)


# ----------------------------------------------------------------------------- agglomerate

def row(a, b, iou=0.9, ca=0.9, cb=0.9, da=0.0, db=0.0, status="ok"):
  return {"status": status, "id_a": a, "id_b": b, "iou": iou, "score": iou, "a_consistency_a": ca,
          "b_consistency_b": cb, "a_deleted_fraction": da, "b_deleted_fraction": db,
          "a_origin_x": a, "a_origin_y": 2, "a_origin_z": 3, "b_origin_x": b, "b_origin_y": 5,
          "b_origin_z": 6}


def test_merge_rule_google_thresholds():
  rule = ag.MergeRule()
  assert rule.merges(row(1, 2))
  assert not rule.merges(row(1, 2, iou=0.8))  # strictly above 0.8
  assert not rule.merges(row(1, 2, ca=0.6)) and not rule.merges(row(1, 2, cb=0.5))
  assert not rule.merges(row(1, 2, da=0.02)) and not rule.merges(row(1, 2, db=0.5))
  assert not rule.merges(row(1, 2, da=None))  # a run with no voxels
  assert not rule.merges(row(1, 2, status="incomplete"))
  only = ag.MergeRule(score_threshold=0.5)
  assert only.merges(row(1, 2, iou=0.5, ca=0.0, da=1.0)) and not only.merges(row(1, 2, iou=0.49))


def test_union_find_bodies_and_preserve():
  rows = [row(1, 2), row(2, 3), row(5, 6), row(7, 8, iou=0.1), row(8, 9)]
  merged = ag.decide(rows, ag.MergeRule(), preserve=[6])
  assert [(r["id_a"], r["id_b"]) for r in merged] == [(1, 2), (2, 3), (8, 9)]
  sv = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9], np.uint64)
  body = ag.bodies(sv, [(r["id_a"], r["id_b"]) for r in merged])
  assert body.tolist() == [1, 1, 1, 4, 5, 6, 7, 8, 8]
  labels = np.array([[0, 3, 9], [6, 2, 8]], np.uint64)
  assert ag.relabel(labels, sv, body).tolist() == [[0, 1, 8], [6, 1, 8]]


def test_merge_table_neuclease_layout(tmp_path):
  rows = [row(1, 2, iou=0.25), row(3, 4, status="missing")]
  table = ag.merge_table(rows)
  assert table.dtype.names == ("id_a", "id_b", "xa", "ya", "za", "xb", "yb", "zb", "score")
  assert [table.dtype[n].str for n in table.dtype.names] == [
      "<u8", "<u8", "<u4", "<u4", "<u4", "<u4", "<u4", "<u4", "<f4"]
  assert table.tolist() == [(1, 2, 1, 2, 3, 2, 5, 6, 0.25)]
  ag.write_merge_table(table, str(tmp_path / "m.csv"), str(tmp_path / "m.npy"))
  assert (tmp_path / "m.csv").read_text() == ("id_a,id_b,xa,ya,za,xb,yb,zb,score\n"
                                              "1,2,1,2,3,2,5,6,0.25\n")
  assert np.load(tmp_path / "m.npy").tolist() == table.tolist()


# ----------------------------------------------------------------------------------- queue

def test_queue_band_rank_and_links(tmp_path):
  rows = [dict(row(1, 2, iou=0.95), x=1, y=2, z=3), dict(row(3, 4, iou=0.7), x=4, y=5, z=6),
          dict(row(5, 6, iou=0.82), x=7, y=8, z=9), dict(row(7, 8, iou=0.1), x=0, y=0, z=0)]
  ranked = queue.build_queue(rows, 0.4, 0.9, 0.8)
  assert [(r["id_a"], r["id_b"]) for r in ranked] == [(5, 6), (3, 4)]
  queue.write_queue(ranked, str(tmp_path / "q.csv"), str(tmp_path / "q.html"),
                    "precomputed://http://host/seg", "precomputed://http://host/img", (8, 8, 8))
  lines = (tmp_path / "q.csv").read_text().splitlines()
  assert lines[0] == "rank,id_a,id_b,x,y,z,score,iou,link" and lines[1].startswith("1,5,6,7,8,9,")
  link = lines[1].split(",")[-1]
  state = json.loads(urllib.parse.unquote(link.split("#!", 1)[1]))
  assert state["position"] == [7.5, 8.5, 9.5]
  assert state["layers"][1]["segments"] == ["5", "6"]
  assert state["layers"][0]["source"] == "precomputed://http://host/img"
  assert state["dimensions"]["x"] == [8e-9, "m"]
  page = (tmp_path / "q.html").read_text()
  assert page.count('target="_blank">view</a>') == 2
