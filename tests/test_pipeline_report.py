"""The pipeline's report (``ffn.pipeline.report``) on a run directory built here as the pipeline
writes it (plan.json, stages/<name>/stage.json): the shipped crop's EM and ground truth, and stage
results derived from the ground truth with known splits and merges.

Oracle: ``ffn.metrics.scores.evaluate`` on the whole arrays; the report reads them blockwise with
a block size that divides none of the boxes, and must give the same numbers to the last bit.
The HTML is opened in real headless Chromium (``tests/browser.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from browser import browser  # noqa: F401 (the fixture)
from conftest import SAMPLE_CROP
from slurm_cluster import require_fit, slurm_job_name  # noqa: F401 (slurm_job_name: the fixture)
from ffn.axes import BoundingBox
from ffn.errors import FFNError
from ffn.inference import storage
from ffn.metrics.scores import evaluate
from ffn.pipeline import report as report_mod
from ffn.pipeline.scores import LabelSource, measure

BLOCK = (40, 32, 48)  # x,y,z: divides none of the boxes below
REGION = BoundingBox((20, 30, 25), (90, 70, 80))  # x,y,z, inside the 150^3 crop
CHUNK_SIZE, CHUNK_STEP = (50, 70, 80), 40  # two chunks along x, overlapping by 10
CONFIG = '[run]\nrun_dir = "x"\n# a <b>tag</b> & "quotes" stay text\n'


def _region(a: np.ndarray, box: BoundingBox = REGION) -> np.ndarray:
  return a[box.to_slices()]


def _resources(tasks: int) -> dict:
  return {"name": "main", "tasks": tasks, "resources": {"cpus_per_task": 1, "mem_gb": 2.0,
                                                      "gpus_per_task": 0, "time_min": 30,
                                                      "partition": None}}


def _stage(run: Path, name: str, state: str, outputs: dict, job_ids=(), elapsed=12.5) -> None:
  folder = run / "stages" / name
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "stage.json").write_text(json.dumps({
      "name": name, "state": state, "started": 1.7e9, "finished": 1.7e9 + elapsed if state == "done"
      else None, "elapsed_s": elapsed if state == "done" else None, "job_ids": list(job_ids),
      "tasks": {"done": 1 if state == "done" else 0, "failed": 0, "total": 1},
      "counters": {"chunks": 2} if name == "inference" else {}, "outputs": outputs}))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> dict:
  """A finished run: forward chunks (one chunk with a split), a stitched volume (a split and a
  merge), an agglomerated volume with a voxel offset (part of one object unsegmented), an export with a
  Neuroglancer folder, a stage still running (its output absent) and the report stage."""
  run = tmp_path_factory.mktemp("run")
  with h5py.File(SAMPLE_CROP) as f:
    raw, truth = f["raw"][:], f["stack"][:]
  gt = truth.copy()
  gt[:, :, 60:64] = 0  # a band of unlabelled voxels: ignored by every score
  data = run / "data.h5"
  with h5py.File(data, "w") as f:
    f["raw"], f["gt"] = raw, gt
  region_gt = _region(gt)
  ids, counts = np.unique(region_gt[region_gt != 0], return_counts=True)
  big = ids[np.argsort(-counts)[:3]]  # the three largest objects of the region

  chunks = run / "stages" / "inference" / "forward"
  truth_chunks = []
  for i in range(2):
    box = BoundingBox((REGION.start[0] + i * CHUNK_STEP, REGION.start[1], REGION.start[2]),
                      CHUNK_SIZE)
    seg = _region(truth, box).astype(np.int64) + 1000 * (i + 1)  # chunk-local ids
    if i == 1:  # a split: the largest object's voxels at z >= its chunk's middle get a new id
      half = seg[seg.shape[0] // 2:]
      half[half == big[0] + 2000] = 7
    x, y, z = box.start.tolist()
    storage.save_subvolume(seg, {}, storage.segmentation_path(str(chunks), (z, y, x)))
    truth_chunks.append((box, seg))

  stitched = _region(truth).astype(np.uint64)
  stitched[stitched == big[1]] = big[2]  # a merge
  stitched[: stitched.shape[0] // 3][stitched[: stitched.shape[0] // 3] == big[0]] = 99  # a split
  with h5py.File(run / "stitched.h5", "w") as f:
    f["seg"] = stitched  # no voxel_offset_xyz: the region's size, so it lies at the region

  pad = 3
  outer = BoundingBox(REGION.start - pad, REGION.size + 2 * pad)
  agglomerated = _region(truth, outer).astype(np.uint32)
  top = agglomerated[: agglomerated.shape[0] // 2]
  top[top == big[0]] = 0  # part of one object left unsegmented: a split, no merge
  with h5py.File(run / "agglomerated.h5", "w") as f:
    f["seg"] = agglomerated
    f["seg"].attrs["voxel_offset_xyz"] = outer.start  # placed by its offset, scored in the region

  from ffn.inference.export import write_precomputed
  write_precomputed(str(run / "stages" / "export" / "neuroglancer"), _region(truth).astype(np.uint64),
                    _region(raw), tuple(REGION.start.tolist()), (8, 8, 8))
  (run / "stages" / "export" / "merges.csv").write_text("a,b\n1,2\n")

  names = ["inference", "stitch", "agglomerate", "reseg_run", "export", "report"]
  plan = {"format": 1, "toolkit_version": "0.1.0", "created": 1.7e9,
          "image": f"{data}:raw", "groundtruth": f"{data}:gt",
          "region": {"start": REGION.start.tolist(), "size": REGION.size.tolist()},
          "resolution_nm": [8, 8, 8],
          "stages": [{"name": n, "depends_on": names[max(i - 1, 0):i], "fingerprint": "f",
                      "phases": [_resources(2 if n == "inference" else 1)], "outputs": {}}
                     for i, n in enumerate(names)]}
  (run / "plan.json").write_text(json.dumps(plan))
  (run / "pipeline.toml").write_text(CONFIG)
  _stage(run, "inference", "done", {"results": [{"label": "forward", "chunks_dir": str(chunks)}]})
  _stage(run, "stitch", "done", {"segmentation": f"{run}/stitched.h5:seg"})
  _stage(run, "agglomerate", "done", {"segmentation": "agglomerated.h5:seg",  # relative to run
                                      "segmentation_box": plan["region"]})
  _stage(run, "reseg_run", "running", {"segmentation": f"{run}/absent.h5:seg"})
  _stage(run, "export", "done", {"neuroglancer": str(run / "stages" / "export" / "neuroglancer"),
                                 "files": {"merge table": str(run / "stages" / "export" / "merges.csv"),
                                           "segmentation (HDF5)": f"{run}/stitched.h5:seg"}})
  _stage(run, "report", "running", {})
  out = report_mod.write_report(run, block_size_xyz=BLOCK)
  return {"run": run, "out": out, "gt": gt, "raw": raw, "stitched": stitched,
          "agglomerated": _region(agglomerated, BoundingBox((pad, pad, pad), REGION.size)),
          "chunks": truth_chunks, "big": big}


def test_blockwise_equals_whole_array_scores(tmp_path):
  """measure() reads blocks of at most BLOCK voxels and gives evaluate()'s dict exactly, for a
  segmentation with splits, merges and unsegmented voxels against ground truth with zeros."""
  rng = np.random.default_rng(3)
  gt = rng.integers(0, 6, size=(37, 29, 45)).astype(np.int64)
  seg = (gt * 3 + rng.integers(0, 2, size=gt.shape)) % 7  # splits, merges, zeros
  with h5py.File(tmp_path / "v.h5", "w") as f:
    f["seg"], f["gt"] = seg.astype(np.uint16), gt
  reads = []

  class Recording(LabelSource):
    def read(self, box):
      reads.append(int(np.prod(box.size)))
      return super().read(box)

  box = BoundingBox((0, 0, 0), (45, 29, 37))
  with Recording(f"{tmp_path}/v.h5:seg") as s, Recording(f"{tmp_path}/v.h5:gt") as g:
    tables = measure(s, g, box, (16, 10, 12))
  assert tables.scores() == evaluate(seg, gt)
  assert max(reads) <= 16 * 10 * 12 and len(reads) == 2 * 3 * 3 * 4
  stats = tables.stats()
  ids, counts = np.unique(seg, return_counts=True)
  sizes = counts[ids != 0]
  assert stats["objects"] == len(sizes) and stats["voxels"] == seg.size
  assert stats["unsegmented_fraction"] == np.mean(seg == 0)
  assert stats["size_voxels"]["median"] == np.median(sizes)
  assert stats["size_voxels"]["p90"] == np.quantile(sizes, 0.9)
  assert stats["largest"][0] == [int(ids[ids != 0][np.argmax(sizes)]), int(sizes.max())]


def test_scores_are_ffn_metrics_on_the_whole_arrays(run_dir):
  scores, gt = run_dir["out"]["scores"], run_dir["gt"]
  assert set(scores) == {"forward", "stitch", "agglomerate"}
  keys = evaluate(np.zeros((1, 1, 1)), np.ones((1, 1, 1))).keys()
  stitch = evaluate(run_dir["stitched"], _region(gt))
  assert {k: scores["stitch"][k] for k in keys} == stitch
  assert stitch["vi_split"] > 0.01 and stitch["vi_merge"] > 0.01  # the split and the merge
  agg = evaluate(run_dir["agglomerated"], _region(gt))
  assert {k: scores["agglomerate"][k] for k in keys} == agg
  assert agg["vi_merge"] == 0 and agg["vi_split"] > 0 and agg["fraction_unsegmented"] > 0
  assert agg["voxels_scored"] == np.count_nonzero(_region(gt))  # the band of gt 0 is ignored
  # chunks: each against the ground truth of its own box, then the mean weighted by scored voxels
  per_chunk = [evaluate(seg, _region(gt, box)) for box, seg in run_dir["chunks"]]
  forward = scores["forward"]
  assert [{k: c[k] for k in keys} for c in forward["chunks"]] == per_chunk
  assert [c["start"] for c in forward["chunks"]] == [box.start.tolist() for box, _ in run_dir["chunks"]]
  assert per_chunk[0]["vi_split"] == 0 and per_chunk[1]["vi_split"] > 0  # the split chunk
  weights = [c["voxels_scored"] for c in per_chunk]
  for key in ("vi_split", "vi_merge", "adapted_rand_error"):
    assert forward[key] == pytest.approx(np.average([c[key] for c in per_chunk], weights=weights),
                                         rel=1e-12, abs=1e-15)
  assert forward["kind"] == "chunks" and scores["stitch"]["kind"] == "volume"


def test_object_statistics(run_dir):
  stats = run_dir["out"]["scores"] and json.loads(Path(run_dir["out"]["json"]).read_text())["stats"]
  for label, seg in (("stitch", run_dir["stitched"]), ("agglomerate", run_dir["agglomerated"])):
    ids, counts = np.unique(seg, return_counts=True)
    sizes = counts[ids != 0]
    s = stats[label]
    assert s["objects"] == len(sizes) and s["voxels"] == seg.size
    assert s["unsegmented_fraction"] == pytest.approx(np.mean(seg == 0), abs=1e-15)
    assert s["size_voxels"]["min"] == sizes.min() and s["size_voxels"]["max"] == sizes.max()
    assert s["size_voxels"]["median"] == np.median(sizes)
  forward = stats["forward"]
  per_chunk = [np.unique(seg) for _, seg in run_dir["chunks"]]
  assert forward["per_chunk"] and forward["chunks"] == 2
  assert forward["objects"] == sum(np.count_nonzero(u) for u in per_chunk)
  assert forward["voxels"] == sum(seg.size for _, seg in run_dir["chunks"])


def test_report_json_and_markdown(run_dir):
  run, out = run_dir["run"], run_dir["out"]
  data = json.loads(Path(out["json"]).read_text())
  assert data["scores"] == json.loads(json.dumps(out["scores"]))
  stages = {s["name"]: s for s in data["stages"]}
  assert list(stages) == ["inference", "stitch", "agglomerate", "reseg_run", "export", "report"]
  assert stages["stitch"]["elapsed_s"] == 12.5 and stages["stitch"]["state"] == "done"
  assert stages["stitch"]["resources"]["source"] == "local"
  assert stages["inference"]["phases"][0]["tasks"] == 2
  assert [(n["result"], n["stage"]) for n in data["not_available"]] == [("reseg_run", "reseg_run")]
  assert data["region"] == {"start": REGION.start.tolist(), "size": REGION.size.tolist()}
  md = Path(out["md"]).read_text()
  pngs = re.findall(r"!\[[\w.-]+\]\((report/[\w.-]+\.png)\)", md)
  assert len(pngs) == 4 and pngs == list(data["previews"].values())
  assert list(data["previews"]) == ["groundtruth", "forward", "stitch", "agglomerate"]
  assert sorted(os.listdir(run / "report")) == sorted(p.split("/")[1] for p in pngs)
  for p in pngs:
    with Image.open(run / p) as im:
      assert im.format == "PNG" and im.width >= 900
  assert "ffn serve " + str(run / "stages" / "export" / "neuroglancer") in md
  assert "https://neuroglancer-demo.appspot.com/#!" in md and "localhost%3A8000" in md
  assert CONFIG.strip() in md
  assert "(stages/export/merges.csv)" in md and f"({run}/stitched.h5:seg)](stitched.h5)" in md
  assert f"| stitch | stitch | {report_mod._num(out['scores']['stitch']['vi_split'])} |" in md


def test_preview_shows_the_centre_planes(run_dir):
  """The stitch preview's xy panel is the region's centre plane: its pixels under the objects
  differ between ids as the labels of that plane do (the tint of each id is constant)."""
  from ffn.inference.export import label_colors
  from ffn.pipeline import previews
  run, stitched = run_dir["run"], run_dir["stitched"]
  with Image.open(run / "report" / "stitch.png") as im:
    rgb = np.asarray(im.convert("RGB")).astype(np.int64)
  nz, ny, nx = stitched.shape
  zoom = -(-900 // (nx + nx + ny + 2 * previews.GAP_VOXELS))
  panel = rgb[previews.HEADER_PX:previews.HEADER_PX + ny * zoom, :nx * zoom]
  plane = stitched[nz // 2]  # z = 25 + 40 = 65
  colours = label_colors(plane).astype(np.int64)
  # boundary pixels show the full colour: check the top-left pixel of every voxel whose right and
  # lower neighbours share its id is tinted towards its colour, i.e. the colour difference R-G
  # follows the label colour's (the grey adds equally to R, G and B)
  inner = np.zeros(plane.shape, bool)
  inner[:-1, :-1] = (plane[:-1, :-1] == plane[1:, :-1]) & (plane[:-1, :-1] == plane[:-1, 1:])
  inner &= plane != 0
  pix = panel[::zoom, ::zoom][inner]
  tint = pix[:, 0] - pix[:, 1]
  expected = 0.4 * (colours[inner][:, 0] - colours[inner][:, 1])
  assert np.corrcoef(tint, expected)[0, 1] > 0.95


def test_done_stage_with_missing_output_is_an_error_and_writes_nothing(tmp_path):
  plan = {"format": 1, "image": None, "groundtruth": None,
          "region": {"start": [0, 0, 0], "size": [4, 4, 4]},
          "stages": [{"name": "stitch", "depends_on": [], "phases": [], "outputs": {}}]}
  (tmp_path / "plan.json").write_text(json.dumps(plan))
  _stage(tmp_path, "stitch", "done", {"segmentation": f"{tmp_path}/gone.h5:seg"})
  with pytest.raises(FFNError, match=r"gone.h5: file not found .*\(stage stitch\)$"):
    report_mod.write_report(tmp_path)
  assert sorted(os.listdir(tmp_path)) == ["plan.json", "stages"]
  with pytest.raises(FFNError, match="plan.json: not found"):
    report_mod.write_report(tmp_path / "stages")


def test_without_sacct_the_report_says_so(tmp_path, monkeypatch, capsys):
  """Slurm job ids but no sacct on PATH: the stage says so, the report is written; without
  ground truth there are no scores but statistics and previews. The CLI entry does the same."""
  seg = np.zeros((6, 5, 4), np.uint8)
  seg[:, :, 2:] = 3
  storage.save_subvolume(seg, {}, storage.segmentation_path(str(tmp_path / "c"), (1, 2, 3)))
  plan = {"format": 1, "image": None, "groundtruth": None,
          "region": {"start": [3, 2, 1], "size": [4, 5, 6]},
          "stages": [{"name": "consensus", "depends_on": [], "phases": [], "outputs": {}}]}
  (tmp_path / "plan.json").write_text(json.dumps(plan))
  _stage(tmp_path, "consensus", "done", {"segmentation": str(tmp_path / "c/3/2/seg-3_2_1.npz")},
         job_ids=["4242"])
  monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
  out = report_mod.write_report(tmp_path)
  data = json.loads(Path(out["json"]).read_text())
  assert data["stages"][0]["resources"] == {
      "source": "unavailable", "note": "sacct not found on PATH: no accounting for jobs 4242"}
  assert out["scores"] == {} and data["stats"]["consensus"]["objects"] == 1
  assert data["stats"]["consensus"]["unsegmented_fraction"] == 0.5
  assert "sacct not found on PATH" in Path(out["html"]).read_text()
  parser = argparse.ArgumentParser()
  report_mod.add_arguments(parser)
  assert report_mod.run(parser.parse_args([str(tmp_path), "--block_size", "3,3,3"])) == 0
  assert capsys.readouterr().out == f"wrote {out['html']}, {out['md']}, {out['json']}\n"
  with pytest.raises(FFNError, match="--block_size: expected 3 integers"):
    report_mod.run(parser.parse_args([str(tmp_path), "--block_size", "3,3"]))


def test_report_in_headless_chromium(browser, run_dir):
  """report.html renders in Chromium from file://: every image decoded, no console error, no
  failed or outside request (only the file itself and data: URIs), the scores in the DOM."""
  out = run_dir["out"]
  browser.events.clear()
  for domain in ("Page", "Runtime", "Log", "Network"):
    browser.call(f"{domain}.enable")
  browser.call("Page.navigate", url=Path(out["html"]).as_uri())
  browser.wait_event("Page.loadEventFired", timeout_s=60)
  images = browser.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
  assert len(images) == 4 and all(done and width >= 900 for done, width in images), images
  text = browser.evaluate("document.body.innerText")
  for label, s in out["scores"].items():
    row = browser.evaluate(f"Array.from(document.querySelectorAll('tr')).map(r => r.innerText)"
                           f".find(t => t.startsWith('{label}\\t'))")
    assert row is not None and report_mod._num(s["vi_split"]) in row, (label, row)
  assert "VI split" in text and "adapted RE" in text
  pre = browser.evaluate("Array.from(document.querySelectorAll('pre')).map(p => p.textContent)")
  assert CONFIG in pre  # the config as text, tags escaped
  assert browser.evaluate("document.querySelectorAll('script, link, iframe, b').length") == 0
  methods = [e["method"] for e in browser.events]
  assert "Network.loadingFailed" not in methods, browser.events
  assert "Runtime.exceptionThrown" not in methods, browser.events
  errors = [e for e in browser.events if (e["method"] == "Runtime.consoleAPICalled" and e["params"][
      "type"] in ("error", "warning")) or (e["method"] == "Log.entryAdded" and e["params"]["entry"][
      "level"] in ("error", "warning"))]
  assert not errors, errors
  urls = [e["params"]["request"]["url"] for e in browser.events
          if e["method"] == "Network.requestWillBeSent"]
  assert urls and all(u.startswith(("file://", "data:")) for u in urls), urls


@pytest.mark.slurm
def test_sacct_times_and_resources_of_a_real_job(tmp_path, slurm_job_name):
  """A real Slurm job (sleep 2) in a stage's job ids: the report's row is sacct's, COMPLETED,
  with an elapsed time of at least 2 s."""
  from slurm.executor import SlurmOptions
  require_fit(SlurmOptions(cpus_per_task=1, mem_gb=0.2))
  job = subprocess.run(["sbatch", "--parsable", f"--job-name={slurm_job_name}", "-c", "1",
                        "--mem=200M", f"--output={tmp_path}/job.log", "--wrap", "sleep 2"],
                       capture_output=True, text=True, timeout=60, check=True).stdout.strip()
  deadline = time.monotonic() + 600
  while True:  # bounded: the job runs at once on an idle cluster (~4 s), minutes behind a queue
    done = subprocess.run(["sacct", "-j", job, "-n", "-X", "--format=State", "--parsable2"],
                          capture_output=True, text=True, timeout=60).stdout.split()
    if done and done[0] not in ("PENDING", "RUNNING", "COMPLETING"):
      break
    assert time.monotonic() < deadline, f"job {job} not finished after 600 s: {done}"
    time.sleep(1)
  plan = {"format": 1, "image": None, "groundtruth": None,
          "region": {"start": [0, 0, 0], "size": [2, 2, 2]},
          "stages": [{"name": "stitch", "depends_on": [], "phases": [], "outputs": {}}]}
  (tmp_path / "plan.json").write_text(json.dumps(plan))
  _stage(tmp_path, "stitch", "done", {}, job_ids=[job])
  data = json.loads(Path(report_mod.write_report(tmp_path)["json"]).read_text())
  res = data["stages"][0]["resources"]
  assert res["source"] == "sacct", res
  (task,) = res["tasks"]
  assert task["JobID"] == job and task["State"] == "COMPLETED" and task["AllocCPUS"].isdigit()
  assert report_mod.parse_elapsed(task["Elapsed"]) >= 2 and res["summary"]["states"] == {"COMPLETED": 1}
  assert task["ReqMem"] and shutil.which("sacct")


def test_slurm_figures_are_parsed():
  """sacct's durations and memory figures, and job ids in submission order (golden values)."""
  assert report_mod.parse_elapsed("00:00:23") == 23 and report_mod.parse_elapsed("05:06") == 306
  assert report_mod.parse_elapsed("1-02:03:04") == 93784 and report_mod.parse_elapsed("") is None
  assert report_mod.parse_memory("886360K") == 886360 * 1024
  assert report_mod.parse_memory("4G") == 4 << 30 and report_mod.parse_memory("1000Mn") == 1000 << 20
  assert report_mod.parse_memory("") is None
  jobs = ["806", "805_[2-3]", "803_10", "805", "802_1", "803_2", "805_1"]
  assert sorted(jobs, key=report_mod._job_key) == ["802_1", "803_2", "803_10", "805", "805_1",
                                                    "805_[2-3]", "806"]
