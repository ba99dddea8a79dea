"""Split consensus (``ffn consensus``): the rule on golden arrays, invariants, a slow per-pair
reference, request parsing, result files and the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import ndimage

from ffn.cli import main
from ffn.consensus.consensus import ConsensusRequest, parse_consensus_request
from ffn.consensus.split import kept_origins, split_by_intersection
from ffn.errors import FFNError
from ffn.inference import storage

REPO = Path(__file__).resolve().parents[1]
CORNER = (4, 8, 16)  # z,y,x
BOX = "start { x: 16 y: 8 z: 4 } size { x: 6 y: 2 z: 1 }"

# seg1 object 1 overlaps 7 (3 voxels) and 8 (2); object 2 overlaps 8 (2) and 0 (1); object 3
# overlaps 0 and 9 (1 each: the tie goes to the smaller id, 0).
SEG1 = np.array([[[1, 1, 1, 1, 1, 2],
                  [2, 2, 0, 0, 3, 3]]], np.uint64)
SEG2 = np.array([[[7, 7, 7, 8, 8, 8],
                  [8, 0, 7, 0, 0, 9]]], np.uint64)
# The split of SEG1 by SEG2 worked out by hand, by split_min_size. Pieces (seg1, seg2): voxels are
# (1,7): 3, (1,8): 2, (2,8): 2, (2,0): 1, (3,0): 1, (3,9): 1, and seg1's background. Each object's
# largest piece keeps its id ((3,0) wins the tie); the other kept pieces get 4, 5, ... in order of
# (seg2 id, seg1 id): (2,0) -> 4, (1,8) -> 5, (3,9) -> 6. Pieces under split_min_size become 0 and
# take no id.
GOLDEN = {
    0: np.array([[[1, 1, 1, 5, 5, 2], [2, 4, 0, 0, 3, 6]]], np.uint64),
    2: np.array([[[1, 1, 1, 4, 4, 2], [2, 0, 0, 0, 0, 0]]], np.uint64),
    3: np.array([[[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]], np.uint64),
}


def reference_split(seg1: np.ndarray, seg2: np.ndarray, min_size: int) -> np.ndarray:
  """The split rule written out pair by pair (slow, obviously right)."""
  pairs: dict[tuple[int, int], int] = {}
  for p, q in zip(seg1.ravel().tolist(), seg2.ravel().tolist()):
    pairs[(p, q)] = pairs.get((p, q), 0) + 1
  best: dict[int, tuple[int, int]] = {}
  for (p, q), n in pairs.items():
    if p not in best or (-n, q) < (-best[p][1], best[p][0]):
      best[p] = (q, n)
  next_id = int(seg1.max())
  new = {}
  for q, p in sorted((q, p) for p, q in pairs):
    if p == 0 or pairs[(p, q)] < min_size:
      new[(p, q)] = 0
    elif best[p][0] == q:
      new[(p, q)] = p
    else:
      next_id += 1
      new[(p, q)] = next_id
  out = [new[(p, q)] for p, q in zip(seg1.ravel().tolist(), seg2.ravel().tolist())]
  return np.array(out, np.uint64).reshape(seg1.shape)


@pytest.mark.parametrize("min_size", sorted(GOLDEN))
def test_golden_split(min_size):
  out = split_by_intersection(SEG1, SEG2, min_size)
  assert out.dtype == np.uint64
  np.testing.assert_array_equal(out, GOLDEN[min_size])
  np.testing.assert_array_equal(reference_split(SEG1, SEG2, min_size), GOLDEN[min_size])


def test_largest_piece_keeps_its_id_even_when_cleared():
  seg1 = np.array([[[5, 5, 5, 5]]])
  seg2 = np.array([[[1, 1, 2, 3]]])
  np.testing.assert_array_equal(split_by_intersection(seg1, seg2, 0), [[[5, 5, 6, 7]]])
  np.testing.assert_array_equal(split_by_intersection(seg1, seg2, 3), [[[0, 0, 0, 0]]])


def test_identical_segmentations_unchanged_and_empty():
  seg = np.random.default_rng(0).integers(0, 20, (5, 6, 7)).astype(np.uint32)
  np.testing.assert_array_equal(split_by_intersection(seg, seg), seg)
  assert split_by_intersection(np.zeros((0, 3, 3), int), np.zeros((0, 3, 3), int)).shape == (0, 3, 3)


@pytest.mark.parametrize("seed,offset,min_size", [(0, 0, 0), (1, 0, 3), (2, 2**40, 2), (3, 0, 1)])
def test_matches_pairwise_reference_and_invariants(seed, offset, min_size):
  rng = np.random.default_rng(seed)
  seg1 = rng.integers(0, 12, (6, 7, 8)).astype(np.uint64)
  seg1[seg1 > 0] += np.uint64(offset)  # large ids take the np.unique path
  seg2 = rng.integers(0, 9, (6, 7, 8)).astype(np.uint64)
  out = split_by_intersection(seg1, seg2, min_size)
  np.testing.assert_array_equal(out, reference_split(seg1, seg2, min_size))
  assert not np.any(out[seg1 == 0])
  objects = out != 0
  for other in (seg1, seg2):  # every consensus object lies inside one object of each input
    pairs = np.unique(np.stack([out[objects], other[objects]]), axis=1)
    assert np.unique(pairs[0]).size == pairs.shape[1]
  sizes = np.bincount(np.unique(out[objects], return_inverse=True)[1])
  assert sizes.size == 0 or sizes.min() >= min_size
  assert np.all(np.unique(out[objects & (out != seg1)]) > seg1.max())


def test_signed_inputs_and_bad_inputs():
  np.testing.assert_array_equal(split_by_intersection(SEG1.astype(np.int32), SEG2.astype(np.int64)),
                                GOLDEN[0])
  np.testing.assert_array_equal(split_by_intersection(SEG1.astype(np.uint8), SEG2.astype(np.int16), 2),
                                GOLDEN[2])
  with pytest.raises(FFNError, match="shapes differ"):
    split_by_intersection(SEG1, SEG2[..., :3])
  with pytest.raises(FFNError, match=">= 0"):
    split_by_intersection(-SEG1.astype(np.int64), SEG2)
  with pytest.raises(FFNError, match="integers"):
    split_by_intersection(SEG1.astype(np.float32), SEG2)


def test_kept_origins():
  origins = {1: "o1", 2: "o2", 3: "o3", 4: "stale"}
  assert kept_origins(origins, 3, GOLDEN[2]) == {1: "o1", 2: "o2"}  # 3 is gone, 4 is new
  assert kept_origins(origins, 3, GOLDEN[0]) == {1: "o1", 2: "o2", 3: "o3"}


def _request(tmp_path: Path, extra: str = "", sources: str = "split_cc: false") -> str:
  return (f'segmentation1 {{ directory: "{tmp_path}/fwd" {sources} }} '
          f'segmentation2 {{ directory: "{tmp_path}/rev" {sources} }} '
          f'segmentation_output_dir: "{tmp_path}/out" type: CONSENSUS_SPLIT {extra}')


@pytest.mark.parametrize("text,expect", [
    ("segmentation1 { directory: 'a' ", "malformed ConsensusRequest text proto"),
    ("segmentation1 { directory: 'a' } segmentation2 { directory: 'b' } "
     "segmentation_output_dir: 'c' type: CONSENSUS_MERGE", "has no value named CONSENSUS_MERGE"),
    ("segmentation1 { directory: 'a' } segmentation_output_dir: 'c'",
     "segmentation2 { directory: ... } is not set"),
    ("segmentation1 { directory: 'a' } segmentation2 { directory: 'b' }",
     "segmentation_output_dir is not set"),
    ("segmentation1 { directory: 'a' } segmentation2 { directory: 'b' } segmentation_output_dir: 'a'",
     "must differ from segmentation1.directory"),
    ("segmentation1 { directory: 'a' } segmentation2 { directory: 'b' } segmentation_output_dir: 'c' "
     "split_min_size: -1", "split_min_size must be >= 0"),
])
def test_request_errors_are_one_line(text, expect):
  with pytest.raises(FFNError, match=expect) as info:
    parse_consensus_request(text)
  assert len(str(info.value).splitlines()) == 1


def test_google_field_numbers():
  fields = {f.name: f.number for f in ConsensusRequest.DESCRIPTOR.fields}
  assert fields == {"segmentation1": 1, "segmentation2": 2, "segmentation_output_dir": 3, "type": 4,
                    "split_min_size": 7}
  assert ConsensusRequest.CONSENSUS_SPLIT == 2 and ConsensusRequest().type == 2


def _save(tmp_path: Path, name: str, seg: np.ndarray, origins: dict | None = None) -> str:
  path = storage.segmentation_path(str(tmp_path / name), CORNER)
  storage.save_subvolume(seg, origins or {}, path)
  return path


def _run(capsys, *argv: str) -> tuple[int, str]:
  code = main(["consensus", *argv])
  return code, capsys.readouterr().err.strip()


def test_round_trip_through_saved_results(tmp_path, capsys):
  origin = storage.OriginInfo(start_zyx=(0, 0, 1), iters=3, walltime_sec=0.5)
  _save(tmp_path, "fwd", SEG1, {1: origin, 2: origin, 3: origin})
  _save(tmp_path, "rev", SEG2)
  req = tmp_path / "consensus.pbtxt"
  req.write_text(_request(tmp_path, "split_min_size: 2"))
  code, err = _run(capsys, f"--consensus_request={req}", "--bounding_box", BOX,
                   "--output_h5", f"{tmp_path}/cons.h5:seg")
  assert code == 0, err
  out_path = storage.segmentation_path(str(tmp_path / "out"), CORNER)
  assert out_path.endswith(os.path.join("out", "16", "8", "seg-16_8_4.npz"))
  seg, origins = storage.load_segmentation_file(out_path)
  expected = GOLDEN[2]
  np.testing.assert_array_equal(seg, expected)
  assert set(origins) == {1, 2} and origins[1] == origin
  with np.load(out_path, allow_pickle=True) as data:
    assert data["segmentation"].dtype == np.uint8
    saved = ConsensusRequest.FromString(data["request"].item())
  assert saved.split_min_size == 2 and saved.segmentation1.directory == f"{tmp_path}/fwd"
  with h5py.File(tmp_path / "cons.h5", "r") as f:
    np.testing.assert_array_equal(f["seg"][...], expected)

  # A finished result is kept as it is, even when the inputs change.
  mtime = os.stat(out_path).st_mtime_ns
  _save(tmp_path, "rev", np.zeros_like(SEG2))
  assert _run(capsys, f"--consensus_request={req}", "--bounding_box", BOX) == (0, "")
  assert os.stat(out_path).st_mtime_ns == mtime
  # A missing HDF5 copy is written from the finished result, not recomputed.
  code, _ = _run(capsys, f"--consensus_request={req}", "--bounding_box", BOX,
                 "--output_h5", f"{tmp_path}/cons2.h5:seg")
  assert code == 0 and os.stat(out_path).st_mtime_ns == mtime
  with h5py.File(tmp_path / "cons2.h5", "r") as f:
    np.testing.assert_array_equal(f["seg"][...], expected)


def test_sources_are_cleaned_up_like_google(tmp_path, capsys):
  """split_cc (default on) and min_size of each SegmentationSource apply before the split."""
  seg1 = np.array([[[1, 1, 0, 1, 1, 1]]], np.uint64)
  seg2 = np.array([[[2, 2, 2, 2, 2, 0]]], np.uint64)
  _save(tmp_path, "fwd", seg1)
  _save(tmp_path, "rev", seg2)
  box = "start { x: 16 y: 8 z: 4 } size { x: 6 y: 1 z: 1 }"
  code, err = _run(capsys, "--consensus_request", _request(tmp_path, sources=""), "--bounding_box", box)
  assert code == 0, err
  seg, _ = storage.load_segmentation_file(storage.segmentation_path(str(tmp_path / "out"), CORNER))
  np.testing.assert_array_equal(seg, [[[1, 1, 0, 2, 2, 3]]])


@pytest.mark.parametrize("case,expect", [
    ("no_fwd", "segmentation1: "),
    ("corner", "no segmentation for corner [17, 8, 4] (x,y,z)"),
    ("shape", "differ in shape: [6, 2, 1] vs [5, 2, 1] (x,y,z)"),
    ("box_size", "differs from the bounding box size [6, 3, 1] (x,y,z)"),
    ("type", "has no value named CONSENSUS_MERGE"),
    ("malformed", "malformed ConsensusRequest text proto: 1:"),
    ("missing_file", "consensus request file not found"),
    ("bad_box", "--bounding_box: malformed BoundingBox"),
    ("bad_h5", "--output_h5: expected 'file.h5:dataset'"),
])
def test_bad_input_one_line_exit_2_no_output(tmp_path, capsys, case, expect):
  if case != "no_fwd":
    _save(tmp_path, "fwd", SEG1)
  _save(tmp_path, "rev", SEG2[..., :5] if case == "shape" else SEG2)
  req = tmp_path / "consensus.pbtxt"
  req.write_text({"type": _request(tmp_path).replace("CONSENSUS_SPLIT", "CONSENSUS_MERGE"),
                  "malformed": _request(tmp_path)[:-5]}.get(case, _request(tmp_path)))
  argv = [f"--consensus_request={tmp_path / 'nope.pbtxt' if case == 'missing_file' else req}",
          "--bounding_box", {"corner": BOX.replace("x: 16", "x: 17"),
                             "box_size": BOX.replace("y: 2", "y: 3"),
                             "bad_box": "start { x: 1"}.get(case, BOX)]
  if case == "bad_h5":
    argv += ["--output_h5", str(tmp_path / "cons.h5")]
  code, err = _run(capsys, *argv)
  assert code == 2
  assert expect in err and len(err.splitlines()) == 1, err
  assert err.startswith("ffn consensus: error: ")
  assert not (tmp_path / "out").exists()


def test_existing_h5_dataset_is_not_overwritten(tmp_path, capsys):
  _save(tmp_path, "fwd", SEG1)
  _save(tmp_path, "rev", SEG2)
  with h5py.File(tmp_path / "cons.h5", "w") as f:
    f["seg"] = np.zeros(3)
  code, err = _run(capsys, "--consensus_request", _request(tmp_path), "--bounding_box", BOX,
                   "--output_h5", f"{tmp_path}/cons.h5:seg")
  assert code == 2 and "already exists" in err and not (tmp_path / "out").exists()


def test_forward_reverse_then_consensus(tmp_path, capsys):
  """The typical use: a forward run, a reverse run seeded at its origins, split consensus.

  A deterministic oracle stands in for the network (it fills the bright blob under the FoV
  centre). Both runs split the long blob, at different places; the consensus has both cuts.
  """
  from ffn.inference.request import parse_request
  from ffn.inference.runner import Runner
  img = -np.ones((20, 20, 20), np.float32)
  img[3:17, 3:8, 3:8] = 1
  img[3:17, 12:17, 12:17] = 1

  def oracle(x: np.ndarray) -> np.ndarray:
    image = x[0, ..., 0]
    labels, _ = ndimage.label(image > 0)
    centre = labels[tuple(s // 2 for s in image.shape)]
    return np.where((labels == centre) & (centre > 0), 4.0, -4.0).astype(np.float32)[None, ..., None]

  with h5py.File(tmp_path / "img.h5", "w") as f:
    f["raw"] = ((img + 1) * 100).astype(np.uint8)

  def run(out: str, policy: str, args: str) -> str:
    text = f"""
    image {{ hdf5: "{tmp_path}/img.h5:raw" }} image_mean: 100 image_stddev: 100
    model_checkpoint_path: "unused" segmentation_output_dir: "{tmp_path}/{out}"
    seed_policy: "{policy}" seed_policy_args: '{args}'
    inference_options {{ init_activation: 0.95 pad_value: 0.05 move_threshold: 0.9
      segment_threshold: 0.6 min_segment_size: 10 min_boundary_dist {{ x: 1 y: 1 z: 1 }} }}"""
    return Runner(parse_request(text), predict=oracle, fov_size_xyz=(9, 9, 9),
                  deltas_xyz=(2, 2, 2)).run()

  forward = run("fwd", "PolicyGrid3d", '{"step": 4, "offsets": [2]}')
  run("rev", "PolicyInvertOrigins", f'{{"segmentation_dir": "{tmp_path}/fwd"}}')
  request = (f'segmentation1 {{ directory: "{tmp_path}/fwd" }} '
             f'segmentation2 {{ directory: "{tmp_path}/rev" }} '
             f'segmentation_output_dir: "{tmp_path}/out" type: CONSENSUS_SPLIT split_min_size: 10')
  code, err = _run(capsys, "--consensus_request", request,
                   "--bounding_box", "start { x: 0 y: 0 z: 0 } size { x: 20 y: 20 z: 20 }")
  assert code == 0, err
  seg, origins = storage.load_segmentation_file(storage.segmentation_path(str(tmp_path / "out"),
                                                                          (0, 0, 0)))
  fwd, fwd_origins = storage.load_segmentation(str(tmp_path / "fwd"), (0, 0, 0))
  rev, _ = storage.load_segmentation(str(tmp_path / "rev"), (0, 0, 0))
  assert storage.existing_segmentation_path(str(tmp_path / "fwd"), (0, 0, 0)) == forward
  np.testing.assert_array_equal(seg, reference_split(fwd, rev, 10))
  assert np.unique(fwd).size == np.unique(rev).size == 4 and np.unique(seg).size == 5
  assert origins == fwd_origins


def test_run_consensus_script(tmp_path):
  _save(tmp_path, "fwd", SEG1)
  _save(tmp_path, "rev", SEG2)
  proc = subprocess.run([sys.executable, str(REPO / "run_consensus.py"),
                         f"--consensus_request={_request(tmp_path)}", f"--bounding_box={BOX}"],
                        capture_output=True, text=True, cwd=REPO, check=False)
  assert proc.returncode == 0, proc.stderr
  seg, _ = storage.load_segmentation_file(storage.segmentation_path(str(tmp_path / "out"), CORNER))
  np.testing.assert_array_equal(seg, GOLDEN[0])  # split_min_size unset: 0


def test_subvolumes_each_get_their_consensus(tmp_path, capsys):
  """--subvolume_size/--overlap as given to run_inference: one consensus per subvolume corner."""
  from ffn.axes import BoundingBox, split_box
  rng = np.random.default_rng(5)
  boxes = split_box(BoundingBox((0, 0, 0), (10, 6, 4)), (6, 6, 4), (2, 0, 0))
  assert [b.start.tolist() for b in boxes] == [[0, 0, 0], [4, 0, 0]]
  expected = {}
  for b in boxes:
    corner = tuple(int(v) for v in reversed(b.start.tolist()))
    seg1 = rng.integers(0, 3, (4, 6, 6)).astype(np.uint64)
    seg2 = rng.integers(0, 3, (4, 6, 6)).astype(np.uint64)
    for name, seg in (("fwd", seg1), ("rev", seg2)):
      storage.save_subvolume(seg, {}, storage.segmentation_path(str(tmp_path / name), corner))
    expected[corner] = (seg1, seg2)
  box = "start { x: 0 y: 0 z: 0 } size { x: 10 y: 6 z: 4 }"
  request = _request(tmp_path, "split_min_size: 0")  # sources without split_cc
  code, err = _run(capsys, "--consensus_request", request, "--bounding_box", box,
                   "--subvolume_size", "6,6,4", "--overlap", "2,0,0")
  assert code == 0, err
  for corner, (seg1, seg2) in expected.items():
    seg, _ = storage.load_segmentation_file(storage.segmentation_path(str(tmp_path / "out"), corner))
    np.testing.assert_array_equal(seg, reference_split(seg1, seg2, 0))
  code, err = _run(capsys, "--consensus_request", request, "--bounding_box", box,
                   "--subvolume_size", "6,6,4", "--output_h5", f"{tmp_path}/c.h5:seg")
  assert code == 2 and "cannot be combined with --subvolume_size" in err
