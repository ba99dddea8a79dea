"""ffn reseg run on a synthetic volume through the real Runner / Canvas / BatchExecutor with the
oracle predictor of tests/test_inference_canvas.py (no model): a bright bar cut in two by the base
segmentation is reconstructed whole from either piece (IoU ~1, merged), a neighbouring bar behind
a dark gap is not (IoU 0); out-of-volume and absent segments are recorded; batched == serial;
a stopped run resumes to the same files; google's file naming."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading

import h5py
import numpy as np
import pytest
from scipy import ndimage

from ffn.inference import inference_pb2, storage
from ffn.inference.canvas import InferenceInterrupted
from ffn.inference.request import parse_request
from ffn.reseg import agglomerate as ag
from ffn.reseg import analyze
from ffn.reseg.run import make_processor, process_points, target_path

SHAPE = (30, 30, 40)  # z, y, x


def oracle(x: np.ndarray) -> np.ndarray:
  """Per input of the batch: logit +4 on the bright component under the FoV centre, -4 elsewhere."""
  out = []
  for image in x[..., 0]:
    labels, _ = ndimage.label(image > 0)
    centre = labels[tuple(s // 2 for s in image.shape)]
    out.append(np.where((labels == centre) & (centre > 0), 4.0, -4.0).astype(np.float32))
  return np.stack(out)[..., None]


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
  """Image: bar 1 (z,y 13..17, x 4..35) and bar 2 (y 19..27) behind a dark row y = 18.
  Base segmentation: bar 1 cut at x = 20 into ids 10 and 20; id 30 = bar 2 plus the dark row.
  Bar 1's cross-section (5 voxels) is inside one FoV (9), so every FoV centred in it predicts its
  whole cross-section; FoV centres move in steps of 2 from the seed within x 4..12 of the
  17-voxel canvas (margin 4), so each run covers at least canvas x 1..15 of the bar, which holds
  the analysis box (radius 6: x 2..14): in it, both runs are all of bar 1 (IoU exactly 1)."""
  root = tmp_path_factory.mktemp("reseg")
  image = np.zeros(SHAPE, np.uint8)
  image[13:18, 13:18, 4:36] = 200
  image[13:18, 19:28, 4:36] = 200
  base = np.zeros(SHAPE, np.uint64)
  base[13:18, 13:18, 4:20] = 10
  base[13:18, 13:18, 20:36] = 20
  base[13:18, 18:28, 4:36] = 30
  with h5py.File(root / "data.h5", "w") as f:
    f["raw"] = image
    f["base"] = base
  return root


def request(root, out: str, points, **fields) -> inference_pb2.ResegmentationRequest:
  inference = parse_request(f"""
    image {{ hdf5: "{root}/data.h5:raw" }} image_mean: 100 image_stddev: 100
    model_checkpoint_path: "unused" segmentation_output_dir: "{root}/unused"
    init_segmentation {{ hdf5: "{root}/data.h5:base" }}
    inference_options {{ init_activation: 0.95 pad_value: 0.05 move_threshold: 0.9
      segment_threshold: 0.6 min_segment_size: 10 disco_seed_threshold: 0.5
      min_boundary_dist {{ x: 1 y: 1 z: 1 }} }}""")
  req = inference_pb2.ResegmentationRequest(inference=inference, output_directory=str(out),
                                            **fields)
  req.radius.x = req.radius.y = req.radius.z = 8
  req.analysis_radius.x = req.analysis_radius.y = req.analysis_radius.z = 6
  for a, b, (x, y, z) in points:
    p = req.points.add(id_a=a, id_b=b)
    p.point.x, p.point.y, p.point.z = x, y, z
  return req


POINTS = [(10, 20, (19, 15, 15)), (10, 30, (12, 17, 15)), (20, 30, (28, 17, 15)),
          (10, 20, (3, 15, 15)), (10, 99, (15, 15, 15))]


def processor(req):
  return make_processor(req, predict=oracle, fov_size_xyz=(9, 9, 9), deltas_xyz=(2, 2, 2))


def probs(req) -> list:
  out = []
  for i in range(len(req.points)):
    with np.load(target_path(req, i), allow_pickle=True) as data:
      out.append((str(data["status"]), data["probs"].copy(), [d.tolist() for d in data["deletes"]],
                  [h.tolist() for h in data["histories"]],
                  [s.tolist() for s in data["start_points"]]))
  return out


def test_resegmentation_merges_the_cut_bar_only(volume):
  req = request(volume, volume / "serial", POINTS)
  process_points(processor(req), range(len(POINTS)))
  base = h5py.File(volume / "data.h5")["base"][:]
  rows = analyze.analyze_request(req, lambda box: base[box.to_slices()])
  assert [r["status"] for r in rows] == ["ok", "ok", "ok", "out_of_volume", "segment_absent"]
  assert "leaves the image" in rows[3]["reason"] and "99" in rows[4]["reason"]
  cut, gap_a, gap_b = rows[:3]
  assert cut["iou"] == 1.0 and cut["a_consistency_b"] == 1.0 and cut["b_consistency_a"] == 1.0
  assert cut["a_deleted_voxels"] == 0 and cut["b_deleted_voxels"] == 0
  # The run from 30 starts at its EDT maximum in the canvas (distance 3: y = 20 or 21, z = 15;
  # the first in z,y,x order, y = 20, is bright bar 2) and never crosses the dark row; 30 also
  # holds the dark row, so its run recovers 5 of its 6 rows (y 18..23) in the analysis box.
  for r in (gap_a, gap_b):
    assert r["iou"] == 0.0 and r["a_consistency_b"] == 0.0 and r["b_consistency_a"] == 0.0
    assert r["b_consistency_b"] == pytest.approx(5 / 6)
  merged = ag.decide(rows, ag.MergeRule())
  assert [(r["id_a"], r["id_b"]) for r in merged] == [(10, 20)]
  with np.load(target_path(req, 0), allow_pickle=True) as data:
    assert data["probs"].shape == (2, 17, 17, 17) and data["probs"].dtype == np.uint8
    assert data["corner_zyx"].tolist() == [7, 7, 11]
    one = inference_pb2.ResegmentationRequest.FromString(data["request"].item())
    assert len(one.points) == 1 and one.points[0].id_b == 20
    # every start point is inside segment a/b (canvas x,y,z) and >= 4 (the FoV margin) from faces
    for k, ident in enumerate((10, 20)):
      for x, y, z in data["start_points"][k].tolist():
        assert base[7 + z, 7 + y, 11 + x] == ident and min(x, y, z) >= 4 and max(x, y, z) <= 12


def test_batched_and_stopped_then_resumed_equal_serial(volume):
  serial = request(volume, volume / "serial2", POINTS)
  process_points(processor(serial), range(len(POINTS)))
  req = request(volume, volume / "batched", POINTS)
  first = processor(req)
  calls = {"n": 0}
  predict = first.runner.predict

  def stop_after_some(x):
    calls["n"] += 1
    if calls["n"] == 6:  # a stop request (SIGTERM) while points are in flight
      threading.Thread(target=first.request_stop).start()
    return predict(x)

  first.runner.predict = stop_after_some
  with pytest.raises(InferenceInterrupted):
    process_points(first, range(len(POINTS)), batch_size=3, concurrent=3)
  done = [os.path.exists(target_path(req, i)) for i in range(len(POINTS))]
  assert not all(done)
  process_points(processor(req), range(len(POINTS)), batch_size=3, concurrent=3)
  for (s1, p1, d1, h1, st1), (s2, p2, d2, h2, st2) in zip(probs(serial), probs(req)):
    assert s1 == s2 and np.array_equal(p1, p2) and d1 == d2 and h1 == h2 and st1 == st2


def test_google_file_naming_and_skip_when_done(volume, tmp_path):
  req = request(volume, tmp_path, [(10, 20, (19, 15, 15))], subdir_digits=2)
  digest = hashlib.md5(b"1020").hexdigest()[:2]
  assert target_path(req, 0) == str(tmp_path / digest / "10-20_at_19_15_15.npz")
  req1 = request(volume, tmp_path, [(10, 20, (19, 15, 15))], subdir_digits=1)
  assert target_path(req1, 0) == str(tmp_path / "10-20_at_19_15_15.npz")  # google: > 1 only
  os.makedirs(tmp_path / digest)
  (tmp_path / digest / "10-20_at_19_15_15.npz").write_bytes(b"kept")
  process_points(processor(req), [0])
  assert (tmp_path / digest / "10-20_at_19_15_15.npz").read_bytes() == b"kept"


def test_request_built_from_pairs_and_a_result_npz(volume, tmp_path):
  from ffn.reseg import cli, pairs
  base = h5py.File(volume / "data.h5")["base"][:]
  corner = (4, 6, 8)  # x,y,z of the result in the image
  crop = base[8:28, 6:26, 4:36]
  seg_dir = tmp_path / "seg"
  path = storage.segmentation_path(str(seg_dir), corner[::-1])
  os.makedirs(os.path.dirname(path))
  storage.save_subvolume(crop, {}, path)
  table = pairs.find_pairs(crop, corner_zyx=corner[::-1])
  pairs.write_csv(table, str(tmp_path / "pairs.csv"))
  inference = tmp_path / "inference.pbtxt"
  inference.write_text(f"""image {{ hdf5: "{volume}/data.h5:raw" }} image_mean: 100
    image_stddev: 100 model_checkpoint_path: "unused" segmentation_output_dir: "x"
    inference_options {{ init_activation: 0.95 pad_value: 0.05 move_threshold: 0.9
      segment_threshold: 0.6 }}""")
  args = argparse.Namespace(
      resegmentation_request=None, pairs=str(tmp_path / "pairs.csv"),
      inference_request=str(inference),
      output_directory=str(tmp_path / "out"), radius="8,8,8", exclusion_radius="1,1,1",
      init_exclusion_radius=None, analysis_radius="6,6,6", max_retry_iters=2,
      segment_recovery_fraction=0.5, terminate_early=True, subdir_digits=0,
      segmentation=path, corner=None)
  req = cli.request_from_args(args)
  assert [(p.id_a, p.id_b) for p in req.points] == [(10, 20), (10, 30), (20, 30)]
  assert req.points[0].point.x == int(table.point_zyx[0][2])
  assert (req.analysis_radius.x, req.max_retry_iters, req.terminate_early) == (6, 2, True)
  spec = req.inference.init_segmentation.hdf5
  assert spec == f"{tmp_path}/out/base_segmentation.h5:seg"
  with h5py.File(spec.split(":")[0]) as f:
    placed = f["seg"][:]
  expect = np.zeros_like(base)
  expect[8:28, 6:26, 4:36] = crop
  assert np.array_equal(placed, expect)


def test_analyze_agglomerate_queue_cli(volume, tmp_path, capsys):
  from google.protobuf import text_format
  from ffn.cli import main
  req = request(volume, tmp_path / "r", POINTS)
  process_points(processor(req), range(len(POINTS)))
  (tmp_path / "r" / "request.pbtxt").write_text(text_format.MessageToString(req))
  base = h5py.File(volume / "data.h5")["base"][:]
  gt = np.where(np.isin(base, (10, 20)), 1, np.where(base == 30, 2, 0)).astype(np.uint16)
  gt[:, 18] = 0  # the dark row is no body
  with h5py.File(tmp_path / "gt.h5", "w") as f:
    f["gt"] = gt
  aff = str(tmp_path / "r" / "affinities.csv")
  assert main(["reseg", "analyze", "--resegmentation_request", str(tmp_path / "r"), "--output", aff,
               "--groundtruth", f"{tmp_path}/gt.h5:gt"]) == 0
  out = capsys.readouterr().out
  assert "5 pairs" in out and "3 ok" in out and "precision 1.000, recall 1.000" in out
  assert (tmp_path / "r" / "affinities_pr.png").read_bytes()[:4] == b"\x89PNG"
  sweep = (tmp_path / "r" / "affinities_pr.csv").read_text().splitlines()
  assert sweep[0] == "threshold,tp,fp,fn,precision,recall" and sweep[1] == "0,1,2,0,0.333333,1"
  agg = tmp_path / "agg"
  assert main(["reseg", "agglomerate", "--affinities", aff, "--resegmentation_request",
               str(tmp_path / "r"), "--output_dir", str(agg), "--groundtruth",
               f"{tmp_path}/gt.h5:gt"]) == 0
  assert (agg / "mapping.csv").read_text() == "sv,body\n10,10\n20,10\n30,30\n"
  assert (agg / "merges.csv").read_text().splitlines()[1].startswith("10,20,")
  assert len((agg / "merge_table.csv").read_text().splitlines()) == 1 + 3
  with h5py.File(agg / "agglomerated.h5") as f:
    assert np.array_equal(f["seg"][:], np.where(base == 20, 10, base))
  summary = json.loads((agg / "summary.json").read_text())
  assert summary["merges"] == 1 and summary["agglomerated_scores"]["vi_split"] < \
      summary["base_scores"]["vi_split"]
  assert main(["reseg", "agglomerate", "--affinities", aff, "--resegmentation_request",
               str(tmp_path / "r"), "--output_dir", str(tmp_path / "kept"),
               "--preserve", "20"]) == 0
  assert (tmp_path / "kept" / "mapping.csv").read_text() == "sv,body\n10,10\n20,20\n30,30\n"
  assert main(["reseg", "queue", "--affinities", aff, "--output_dir", str(tmp_path / "q"),
               "--segmentation_source", "precomputed://http://h/seg", "--band", "0,1"]) == 0
  assert len((tmp_path / "q" / "queue.csv").read_text().splitlines()) == 1 + 3
  capsys.readouterr()
  assert main(["reseg", "queue", "--affinities", aff, "--output_dir", str(tmp_path / "q2"),
               "--segmentation_source", "x", "--band", "0.9"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--band" in err[0] and not (tmp_path / "q2").exists()
