"""``ffn pipeline``: config checks, planning, fingerprints, --dry_run (fast, nothing runs).

The end-to-end runs (the demo's pipeline as dependent Slurm job arrays, the killed task and the
identical re-run) are in ``tests/test_demo.py``, which shares one run among its assertions.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from ffn.cli import main
from ffn.errors import FFNError
from ffn.pipeline import plan as planlib
from ffn.pipeline.config import check_config, load_config
from ffn.pipeline.status import _expand

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "fib25" / "training_sample2_crop.h5"


def _tables(run_dir: Path) -> dict[str, dict]:
  return {
      "run": {"run_dir": str(run_dir), "cluster": "local"},
      "image": {"spec": f"{SAMPLE}:raw"}, "groundtruth": {"spec": f"{SAMPLE}:stack"},
      "model": {"checkpoint": f"{REPO}/sample_data/fib25/model/model.ckpt-27465036"},
      "region": {"start": [25, 25, 25], "size": [96, 64, 64]},
      "chunking": {"subvolume_size": [64, 64, 64], "overlap": [32, 0, 0]},
      "inference": {"request": f"{REPO}/configs/inference_training_sample2.pbtxt",
                    "compute_dtype": "bfloat16"},
      "reseg": {"radius": [20, 20, 20], "analysis_radius": [8, 8, 8]},
      "resources.reseg_run": {"num_tasks": 3}}


def _config(run_dir: Path, changes: dict[str, dict] | None = None, raw: str = "") -> str:
  """TOML text of the test config with ``changes`` ({table: {key: JSON value}}) applied."""
  tables = _tables(run_dir)
  for table, values in (changes or {}).items():
    tables.setdefault(table, {}).update(values)
  return "".join(f"[{t}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in kv.items())
                 for t, kv in tables.items()) + raw


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    status = main(argv)
  return status, stdout.getvalue(), capsys.readouterr().err


@pytest.mark.parametrize("changes, raw, key", [
    ({"regoin": {"start": [0, 0, 0]}}, "", "[regoin]: unknown section"),
    ({"stitch": {"min_overlapp": 3}}, "", "stitch.min_overlapp: unknown key"),
    ({"stitch": {"min_overlap": "100"}}, "", "stitch.min_overlap: expected an integer"),
    ({"stitch": {"min_overlap": 0}}, "", "stitch.min_overlap: must be >= 1"),
    ({"stitch": {"block_size": [64, 64]}}, "", "stitch.block_size: expected [x, y, z]"),
    ({"reseg": {"compute_dtype": "float64"}}, "", "reseg.compute_dtype: expected one of"),
    ({"export": {"h5": 1}}, "", "export.h5: expected true or false"),
    ({"resources.gpus": {"cpus": 2}}, "", "resources.gpus: unknown table"),
    ({"resources.cpu": {"num_tasks": 2}}, "", "resources.cpu.num_tasks: give num_tasks per stage"),
    ({"dvid": {"server": "localhost:8000"}}, "", "dvid.uuid: required key missing"),
    ({"stitch": {"chunk_size": [48, 48, 48]}}, "",
     "stitch.block_size: [64, 64, 64] must be a multiple of stitch.chunk_size"),
    ({"chunking": {"overlap": [64, 0, 0]}}, "", "chunking.overlap: [64, 0, 0] must be smaller"),
    ({"region": {"start": [100, 0, 0]}}, "", "region: "),
    ({"model": {"checkpoint": "/nonexistent/model.ckpt-1"}}, "", "model.checkpoint: "),
    ({}, "x = [", "not valid TOML"),
])
def test_bad_config_is_one_line_naming_the_key_and_writes_nothing(tmp_path, capsys, changes, raw,
                                                                   key):
  path = tmp_path / "pipeline.toml"
  path.write_text(_config(tmp_path / "run", changes, raw))
  status, out, err = _run(["pipeline", "run", str(path), "--dry_run"], capsys)
  assert status == 2, (out, err)
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("ffn pipeline: error: "), err
  assert key in lines[0], lines[0]
  assert not (tmp_path / "run").exists()


def test_missing_required_key_and_defaults():
  with pytest.raises(FFNError, match=r"p\.toml: run\.run_dir: required key missing"):
    check_config({"image": {"spec": "x.h5:raw"}}, "p.toml")
  config = check_config({"run": {"run_dir": "r"}, "image": {"spec": "x.h5:raw"},
                         "model": {"checkpoint": "m"}, "inference": {"request": "q.pbtxt"}})
  assert config["groundtruth"] is None and config["dvid"] is None
  assert config["stitch"] == {"min_agreement": 0.5, "min_overlap": 100,
                              "block_size": [64, 64, 64], "chunk_size": [64, 64, 64]}
  assert config["reseg"]["radius"] == [24, 24, 24] and config["reseg"]["analysis_radius"] is None


def test_example_config_plans(tmp_path, capsys, monkeypatch):
  """configs/pipeline_example.toml (every key documented there) is valid and plans 8 chunks."""
  monkeypatch.chdir(REPO)
  config, _ = load_config(REPO / "configs" / "pipeline_example.toml")
  config["run"]["run_dir"] = str(tmp_path / "run")
  stages = planlib.build_stages(planlib.resolve(config), tmp_path / "run")
  assert [s.name for s in stages] == ["inference", "stitch", "reseg_pairs", "reseg_run",
                                      "reseg_analyze", "agglomerate", "export", "report"]
  assert stages[0].phases[0].tasks == 8  # 150^3 as 99^3 chunks overlapping by 48
  assert [p.name for p in stages[1].phases] == ["extract", "match", "resolve", "write", "finalise"]
  # 150^3 in 64^3 blocks: 27, at most 16 tasks per phase by default
  assert [p.tasks for p in stages[1].phases] == [8, 8, 1, 16, 1]


def _stages(tmp_path: Path, changes: dict[str, dict] | None = None) -> list[planlib.Stage]:
  path = tmp_path / "pipeline.toml"
  path.write_text(_config(tmp_path / "run", changes))
  config, _ = load_config(path)
  return planlib.build_stages(planlib.resolve(config), tmp_path / "run")


def test_fingerprints_cover_the_stage_inputs_and_upstream(tmp_path):
  base = {s.name: s.fingerprint for s in _stages(tmp_path)}
  assert {s.name: s.fingerprint for s in _stages(tmp_path)} == base  # deterministic
  changed = {s.name: s.fingerprint for s in _stages(tmp_path, {"stitch": {"min_overlap": 50}})}
  same = [n for n in base if base[n] == changed[n]]
  assert same == ["inference"]  # stitch and everything after it depend on min_overlap
  changed = {s.name: s.fingerprint for s in
             _stages(tmp_path, {"agglomerate": {"score_threshold": 0.9}})}
  assert [n for n in base if base[n] != changed[n]] == ["agglomerate", "export", "report"]
  # resources are not inputs: a run may move to other nodes without redoing anything
  assert {s.name: s.fingerprint for s in
          _stages(tmp_path, {"resources.inference": {"cpus": 4, "num_tasks": 1}})} == base


def test_downstream_and_inputs_name_keys(tmp_path):
  stages = _stages(tmp_path)
  assert planlib.downstream(stages, "reseg_run") == ["reseg_run", "reseg_analyze", "agglomerate",
                                                     "export", "report"]
  inference = stages[0].inputs
  old = dict(inference, **{"inference.compute_dtype": "float32"})
  assert planlib.first_difference(old, inference) == "inference.compute_dtype"


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
  path = tmp_path / "pipeline.toml"
  path.write_text(_config(tmp_path / "run"))
  status, out, err = _run(["pipeline", "run", str(path), "--dry_run"], capsys)
  assert status == 0, err
  assert out.startswith("dry run: nothing submitted, nothing written\ncluster: local\n")
  assert "inference: to submit; after: -;" in out
  assert "  phase segment: 2 tasks x 2 CPU, 4 GB, 0 GPU, 120 min, partition default; " \
         "dependency: none" in out
  assert "  phase match: 2 tasks x 1 CPU, 2 GB, 0 GPU, 60 min, partition default; " \
         "dependency: afterok stitch/extract" in out
  assert "  phase write: 2 tasks" in out  # 96x64x64 in 64^3 blocks
  assert "reseg_run: to submit; after: reseg_pairs;" in out
  assert "  phase points: 3 tasks x 2 CPU" in out
  assert f'  output segmentation: "{tmp_path}/run/stages/agglomerate/g1/agglomerated_region.h5:seg"' \
         in out
  assert not (tmp_path / "run").exists()
  status, _, err = _run(["pipeline", "run", str(path), "--dry_run", "--force_from", "stich"], capsys)
  assert status == 2 and "--force_from stich: not a stage of this pipeline" in err


def test_array_ids_as_slurm_prints_them():
  assert _expand("123_[0-2,5%2]") == ["123_0", "123_1", "123_2", "123_5"]
  assert _expand("123_4") == ["123_4"]


def test_two_chunk_pipeline_equals_the_commands_run_by_hand(tmp_path, capsys):
  """The pipeline over two overlapping chunks (in process: cluster "debug") stitches exactly what
  ``ffn stitch`` makes of the same chunk results, its export is that volume, and the report's
  scores are ``ffn.metrics`` on it (independent oracles for the wiring of every stage)."""
  import h5py
  import numpy as np

  from ffn.metrics.scores import evaluate

  changes = {"run": {"cluster": "debug"}, "region": {"start": [40, 40, 50], "size": [96, 64, 48]},
             "chunking": {"subvolume_size": [64, 64, 48], "overlap": [32, 0, 0]},
             "reseg": {"enabled": False}, "export": {"precomputed": False, "preview": False}}
  path = tmp_path / "pipeline.toml"
  path.write_text(_config(tmp_path / "run", changes))
  status, out, err = _run(["pipeline", "run", str(path), "--wait"], capsys)
  assert status == 0, err
  stages = tmp_path / "run" / "stages"
  stitch = json.loads((stages / "stitch" / "stage.json").read_text())
  assert stitch["state"] == "done" and stitch["counters"]["chunks"] == 2
  assert stitch["counters"]["objects_merged_across_seams"] >= 1  # the seam is really stitched

  forward = stages / "inference" / "g1" / "forward"
  assert sorted(p.name for p in forward.glob("*/*/seg-*.npz")) == ["seg-40_40_50.npz",
                                                                   "seg-72_40_50.npz"]
  hand = tmp_path / "hand.h5"
  assert main(["stitch", "--segmentation_dir", str(forward), "--output", f"{hand}:seg",
               "--cluster", "debug"]) == 0
  with h5py.File(hand, "r") as f:
    expected = f["seg"][...]
  spec = stitch["outputs"]["segmentation"]
  with h5py.File(spec.rsplit(":", 1)[0], "r") as f:
    stitched = f["seg"][...]
  np.testing.assert_array_equal(stitched, expected)
  export = json.loads((stages / "export" / "stage.json").read_text())
  exported = export["outputs"]["files"]["segmentation (HDF5)"]
  with h5py.File(exported.rsplit(":", 1)[0], "r") as f:
    np.testing.assert_array_equal(f["seg"][...], expected)

  with h5py.File(SAMPLE, "r") as f:  # region x,y,z 40.. 50.. as z,y,x slices
    gt = f["stack"][50:98, 40:104, 40:136]
  scores = json.loads((tmp_path / "run" / "report.json").read_text())["scores"]["stitch"]
  oracle = evaluate(expected, gt)
  for key in ("vi_split", "vi_merge", "adapted_rand_error", "segments"):
    assert scores[key] == oracle[key], key


def test_run_dir_of_other_files_is_refused_and_left_intact(tmp_path, capsys):
  """A run directory that holds files but no pipeline run is never written into."""
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  (run_dir / "report.html").write_text("the user's own file")
  path = tmp_path / "pipeline.toml"
  path.write_text(_config(run_dir))
  for extra in ([], ["--dry_run"]):
    status, out, err = _run(["pipeline", "run", str(path), *extra], capsys)
    assert status == 2 and out == "", (out, err)
    assert err.strip() == (f"ffn pipeline: error: {path}: run.run_dir {run_dir}: exists, is not "
                           "empty and holds no pipeline run (no plan.json); give a new or empty "
                           "directory"), err
    assert [p.name for p in run_dir.iterdir()] == ["report.html"]
    assert (run_dir / "report.html").read_text() == "the user's own file"
