"""What the pipeline's tasks run: one :class:`PhaseTask` per job-array task, reusing the stages'
own code (workers of :mod:`ffn.inference.batch`, :mod:`ffn.stitch.stitch`, :mod:`ffn.reseg.cli`;
the ``ffn consensus`` / ``ffn reseg`` / ``ffn dvid`` commands; :mod:`ffn.inference.export`'s
writers; :func:`ffn.pipeline.report.write_report`).

A task reads ``<run_dir>/plan.json``, builds its phase's worker and complete work list
(:data:`PHASES`), takes its share -- ``ffn.blockwise.balance(all items, tasks)[index]``, the same
split in every task and on every re-run, items already done skipped by the worker -- and runs it
through :class:`ffn.blockwise.ArrayTask` (status file ``stages/<name>/g<N>/_<phase>/tasks/``,
heartbeat, SIGTERM -> state saved, USR2 -> requeue). Single-process phases are one item whose
done-marker is written after the work. A task that finds its stage's last phase complete writes
the stage's ``stage.json`` as ``done`` with its counters and outputs; a failing task marks it
``failed``. ``stage.json`` is rewritten atomically under an exclusive ``flock``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import submitit

from ffn.axes import BoundingBox, xyz_to_zyx
from ffn.blockwise import ArrayTask, WorkItem, Worker, balance
from ffn.errors import FFNError
from ffn.io.atomic import write_text_atomic

_log = logging.getLogger(__name__)

STAGE_JSON = "stage.json"


# ------------------------------------------------------------------------------ stage.json

def read_json(path: str | os.PathLike) -> dict[str, Any] | None:
  try:
    return json.loads(Path(path).read_text())
  except (OSError, ValueError):
    return None


@contextmanager
def _locked(run_dir: str | os.PathLike, name: str) -> Iterator[Path]:
  path = Path(run_dir) / "stages" / name / STAGE_JSON
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path.parent / ".lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield path
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def empty_stage(name: str) -> dict[str, Any]:
  return {"name": name, "state": "pending", "started": None, "finished": None, "elapsed_s": None,
          "job_ids": [], "tasks": {"done": 0, "failed": 0, "total": 0}, "counters": {},
          "outputs": {}}


def update_stage(run_dir: str | os.PathLike, name: str,
                 change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
  """Reads ``stages/<name>/stage.json``, applies ``change`` to it and writes it back (locked)."""
  with _locked(run_dir, name) as path:
    data = read_json(path) or empty_stage(name)
    change(data)
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")
  return data


def task_files(run_dir: str | os.PathLike, stage: dict[str, Any], submission: int,
               phase: str) -> dict[int, dict[str, Any]]:
  """Task index -> status file of ``phase`` in ``submission`` of a stage (plan.json entry)."""
  from ffn.pipeline.plan import stage_dir
  folder = stage_dir(run_dir, stage["name"], stage["generation"]) / f"_{phase}" / "tasks"
  out = {}
  for path in folder.glob(f"{submission:04d}_*.json"):
    data = read_json(path)
    if data is not None:
      out[int(path.stem.split("_")[1])] = data
  return out


def _count_tasks(run_dir: str, stage: dict[str, Any], submission: int) -> dict[str, int]:
  done = failed = 0
  for phase in stage["phases"]:
    for data in task_files(run_dir, stage, submission, phase["name"]).values():
      done += data.get("state") == "finished"
      failed += data.get("state") in ("failed", "interrupted")
  return {"done": done, "failed": failed, "total": sum(p["tasks"] for p in stage["phases"])}


# -------------------------------------------------------------------------------- context

class Context:
  """A run as a task sees it: the plan, the resolved config, the stages' folders and outputs."""

  def __init__(self, run_dir: str | os.PathLike):
    self.run_dir = Path(run_dir)
    plan = read_json(self.run_dir / "plan.json")
    if plan is None:
      raise FFNError(f"{self.run_dir}/plan.json: missing or unreadable (not a pipeline run)")
    self.plan = plan
    self.config: dict[str, Any] = plan["config"]
    self.stages = {s["name"]: s for s in plan["stages"]}

  def dir(self, name: str) -> Path:
    from ffn.pipeline.plan import stage_dir
    return stage_dir(self.run_dir, name, self.stages[name]["generation"])

  def outputs(self, name: str) -> dict[str, Any]:
    return self.stages[name]["outputs"]

  @property
  def region(self) -> BoundingBox:
    return BoundingBox(self.config["region"]["start"], self.config["region"]["size"])

  def xyz(self, values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _cli(argv: list[str]) -> None:
  """Runs an ``ffn`` command in this process; a non-zero status is an error."""
  from ffn.cli import main
  status = main(argv)
  if status != 0:
    raise FFNError(f"`ffn {' '.join(argv[:2])} ...` exited with status {status} (see this log)")


# ------------------------------------------------------------------------- single workers

class StepWorker(Worker):
  """A single-process phase as one work item: ``step(ctx)`` runs, then a done marker is written
  (``<folder>/done.json``, holding what the step returned)."""

  def __init__(self, run_dir: str, folder: str, step: str):
    self.run_dir, self.folder, self.step = run_dir, folder, step

  def marker(self) -> Path:
    return Path(self.folder) / "done.json"

  def is_done(self, item: WorkItem) -> bool:
    return self.marker().exists()

  def process(self, item: WorkItem) -> None:
    result = STEPS[self.step](Context(self.run_dir)) or {}
    write_text_atomic(self.marker(), json.dumps(result) + "\n")


class NothingWorker(Worker):
  """A phase with nothing left to do (e.g. its stage's output is already complete)."""

  def is_done(self, item: WorkItem) -> bool:
    return True


def _step(ctx: Context, stage: str, phase: str, step: str) -> tuple[Worker, list[WorkItem]]:
  folder = ctx.dir(stage) / f"_{phase}"
  item = WorkItem(phase, ctx.region, ctx.region, 1)
  return StepWorker(str(ctx.run_dir), str(folder), step), [item]


# ------------------------------------------------------------------------------ inference

def inference_requests(ctx: Context) -> list[str]:
  """The forward request (the config's request with the image, model and output folder of this
  run) and, with ``inference.reverse``, the reverse one (PolicyInvertOrigins of the forward run)."""
  from google.protobuf import text_format
  from ffn.inference.request import parse_request
  c = ctx.config
  request = parse_request(c["inference"]["request_text"], "inference.request")
  request.image.hdf5 = c["image"]["spec"]
  request.image_mean = c["image"]["mean"]
  request.image_stddev = c["image"]["stddev"]
  request.model_checkpoint_path = c["model"]["checkpoint"]
  request.model_name = c["model"]["model_name"]
  request.model_args = c["model"]["model_args"]
  g = ctx.dir("inference")
  request.segmentation_output_dir = str(g / "forward")
  texts = [text_format.MessageToString(request)]
  if c["inference"]["reverse"]:
    request.seed_policy = "PolicyInvertOrigins"
    request.seed_policy_args = json.dumps({"segmentation_dir": str(g / "forward")})
    request.segmentation_output_dir = str(g / "reverse")
    texts.append(text_format.MessageToString(request))
  return texts


def _inference(ctx: Context) -> tuple[Worker, list[WorkItem]]:
  from ffn.inference import batch
  from ffn.inference.request import format_bounding_box
  c = ctx.config
  args = argparse.Namespace(
      inference_request=inference_requests(ctx), inference_requests=None,
      bounding_box=format_bounding_box(ctx.region),
      subvolume_size=ctx.xyz(c["chunking"]["subvolume_size"]),
      overlap=ctx.xyz(c["chunking"]["overlap"]), chunks_per_task=1, num_tasks=None,
      batch_size=c["inference"]["batch_size"],
      concurrent_requests=c["inference"]["concurrent_requests"],
      compute_dtype=c["inference"]["compute_dtype"], jit_compile=False)
  _, worker, items, manifest = batch.prepare(args)
  batch.write_manifests(worker, items, manifest)
  return worker, items


def _consensus(ctx: Context) -> dict[str, Any]:
  c = ctx.config
  g = ctx.dir("inference")
  out = ctx.dir("consensus") / "consensus"
  from ffn.inference.request import format_bounding_box
  request = (f'segmentation1 {{ directory: "{g / "forward"}" }} '
             f'segmentation2 {{ directory: "{g / "reverse"}" }} '
             f'segmentation_output_dir: "{out}" type: CONSENSUS_SPLIT '
             f'split_min_size: {c["inference"]["split_min_size"]}')
  _cli(["consensus", "--consensus_request", request, "--bounding_box",
        format_bounding_box(ctx.region), "--subvolume_size", ctx.xyz(c["chunking"]["subvolume_size"]),
        "--overlap", ctx.xyz(c["chunking"]["overlap"])])
  return {}


# --------------------------------------------------------------------------------- stitch

def _stitch_output(ctx: Context):
  from ffn.io.tensorstore_volumes import parse_labels_spec
  return parse_labels_spec(ctx.outputs("stitch")["segmentation"])


def _stitched(ctx: Context) -> bool:
  """The stitch's output and summary are complete (its finalise phase ran)."""
  from ffn.io.tensorstore_volumes import labels_exist
  return labels_exist(_stitch_output(ctx)) and Path(
      ctx.outputs("stitch")["files"]["stitch summary"]).exists()


def stitch_plan(ctx: Context):
  """The stitch's checked plan (:func:`ffn.stitch.stitch.make_plan`), its work folders made."""
  from ffn.blockwise import check_manifest
  from ffn.stitch import stitch as st
  c = ctx.config
  s = c["stitch"]
  params = st.Params(s["min_agreement"], s["min_overlap"], tuple(xyz_to_zyx(s["block_size"])),
                     tuple(xyz_to_zyx(s["chunk_size"])), tuple(c["export"]["resolution"]), False)
  output = _stitch_output(ctx)
  if "consensus" in ctx.stages:
    plan = st.make_plan(ctx.outputs("consensus")["chunks_dir"], output, None, params,
                        subvolume_size_xyz=c["chunking"]["subvolume_size"],
                        overlap_xyz=c["chunking"]["overlap"], bounding_box=ctx.region)
  else:
    plan = st.make_plan(str(ctx.dir("inference") / "forward"), output, None, params)
  work = plan.work_dir
  for sub in ("chunks", "pairs", "global", "blocks"):
    (work / sub).mkdir(parents=True, exist_ok=True)
  if not (work / st.PLAN).exists():
    write_text_atomic(work / st.PLAN, json.dumps(plan.manifest(), indent=1) + "\n")
  for name, items in (("extract", st.chunk_items(plan)), ("match", st.match_items(plan)),
                      ("write", st.block_items(plan))):
    check_manifest(work / name, plan.manifest(), items)
  return plan


def _stitch_array(phase: str) -> Callable[[Context], tuple[Worker, list[WorkItem]]]:
  def build(ctx: Context) -> tuple[Worker, list[WorkItem]]:
    from ffn.stitch import stitch as st
    if _stitched(ctx):
      return NothingWorker(), []
    plan = stitch_plan(ctx)
    if phase == "extract":
      return st.ExtractWorker(plan.work_dir, plan.tiling, plan.source), st.chunk_items(plan)
    if phase == "match":
      s = ctx.config["stitch"]
      return (st.MatchWorker(plan.work_dir, plan.tiling, s["min_agreement"], s["min_overlap"]),
              st.match_items(plan))
    return st.WriteWorker(plan.work_dir, plan.tiling, plan.staging()), st.block_items(plan)
  return build


def _stitch_resolve(ctx: Context) -> dict[str, Any]:
  from ffn.io.tensorstore_volumes import create_labels
  from ffn.stitch import stitch as st
  if _stitched(ctx):
    return {}
  plan = stitch_plan(ctx)
  st.resolve(plan)
  staging = plan.staging()
  if not os.path.exists(staging.path):
    create_labels(staging, plan.layout())
  return {}


def _stitch_finalise(ctx: Context) -> dict[str, Any]:
  """``ffn.stitch.stitch.stitch`` on the finished phases: nothing left to submit, it resolves
  again (ids only), writes the summary and puts the output in place."""
  from ffn.stitch import stitch as st
  from slurm.executor import SlurmOptions
  if not _stitched(ctx):
    st.stitch(stitch_plan(ctx), st.JobControl(SlurmOptions(cluster="debug"), 1, 1, False))
  return {}


# ---------------------------------------------------------------------------------- reseg

def _base_segmentation(ctx: Context) -> str:
  """The segmentation resegmentation starts from: the stitched volume."""
  return ctx.outputs("stitch")["segmentation"]


def _reseg_pairs(ctx: Context) -> dict[str, Any]:
  """Pairs of touching segments, then the ResegmentationRequest (``request.pbtxt``)."""
  from google.protobuf import text_format
  from ffn.reseg.cli import request_from_args
  c, r = ctx.config, ctx.config["reseg"]
  g = ctx.dir("reseg_pairs")
  g.mkdir(parents=True, exist_ok=True)
  seg, corner = _base_segmentation(ctx), ctx.xyz(c["region"]["start"])
  pairs = str(g / "pairs.csv")
  _cli(["reseg", "pairs", "--segmentation", seg, "--corner", corner, "--output", pairs,
        "--min_size", str(r["min_size"]), "--min_area", str(r["min_area"])])
  inference = g / "inference.pbtxt"
  write_text_atomic(inference, inference_requests(ctx)[0])
  args = argparse.Namespace(
      resegmentation_request=None, pairs=pairs, inference_request=str(inference),
      output_directory=str(g), radius=ctx.xyz(r["radius"]), exclusion_radius="0,0,0",
      init_exclusion_radius=None, analysis_radius=ctx.xyz(r["analysis_radius"]),
      max_retry_iters=r["max_retry_iters"], segment_recovery_fraction=r["segment_recovery_fraction"],
      terminate_early=False, subdir_digits=0, segmentation=seg, corner=corner)
  request = request_from_args(args)
  write_text_atomic(g / "request.pbtxt", text_format.MessageToString(request))
  return {"pairs": len(request.points)}


def reseg_request(ctx: Context):
  """reseg_pairs' request with this run's reseg_run folder as its output directory."""
  from ffn.inference import inference_pb2
  from ffn.io.textproto import read_text_proto
  request = read_text_proto(str(ctx.dir("reseg_pairs") / "request.pbtxt"),
                            inference_pb2.ResegmentationRequest(), "reseg_pairs request",
                            "resegmentation request")
  request.output_directory = str(ctx.dir("reseg_run") / "points")
  return request


def _reseg_run(ctx: Context) -> tuple[Worker, list[WorkItem]]:
  import ffn
  from google.protobuf import text_format
  from ffn.blockwise import check_manifest
  from ffn.reseg.cli import ResegWorker, point_items
  c, r = ctx.config, ctx.config["reseg"]
  request = reseg_request(ctx)
  out = Path(request.output_directory)
  out.mkdir(parents=True, exist_ok=True)
  text = text_format.MessageToString(request)
  if not (out / "request.pbtxt").exists():
    write_text_atomic(out / "request.pbtxt", text)
  voxel_size = list(xyz_to_zyx(r["voxel_size"]))
  items = point_items(request, r["points_per_item"])
  check_manifest(out / "run", {"stage": "reseg_run", "ffn_version": ffn.__version__,
                               "request": text, "compute_dtype": r["compute_dtype"],
                               "voxel_size_zyx": voxel_size}, items)
  return ResegWorker(text, r["compute_dtype"], voxel_size, c["inference"]["batch_size"], 1), items


def _reseg_analyze(ctx: Context) -> dict[str, Any]:
  c, r = ctx.config, ctx.config["reseg"]
  g = ctx.dir("reseg_analyze")
  g.mkdir(parents=True, exist_ok=True)
  argv = ["reseg", "analyze", "--resegmentation_request",
          str(ctx.dir("reseg_run") / "points" / "request.pbtxt"),
          "--output", str(g / "affinities.csv"), "--analysis_radius", ctx.xyz(r["analysis_radius"]),
          "--voxel_size", ctx.xyz(r["voxel_size"]), "--threshold", str(r["threshold"])]
  if c["groundtruth"] is not None:
    argv += ["--groundtruth", c["groundtruth"]["spec"]]
  _cli(argv)
  return {}


def _agglomerate(ctx: Context) -> dict[str, Any]:
  from ffn.inference.request import format_bounding_box
  from ffn.io.volumes import read_volume, write_h5
  c, a = ctx.config, ctx.config["agglomerate"]
  g = ctx.dir("agglomerate")
  argv = ["reseg", "agglomerate", "--affinities", str(ctx.dir("reseg_analyze") / "affinities.csv"),
          "--resegmentation_request", str(ctx.dir("reseg_run") / "points" / "request.pbtxt"),
          "--output_dir", str(g), "--iou_threshold", str(a["iou_threshold"]),
          "--consistency_threshold", str(a["consistency_threshold"]),
          "--deleted_threshold", str(a["deleted_threshold"])]
  if a["score_threshold"] is not None:
    argv += ["--score_threshold", str(a["score_threshold"])]
  if c["groundtruth"] is not None:
    argv += ["--groundtruth", c["groundtruth"]["spec"], "--evaluate_box",
             format_bounding_box(ctx.region)]
  _cli(argv)
  # The agglomerated volume is image-sized (the base segmentation placed in the image); the
  # stage's output is its region, like every other stage's.
  region = read_volume(f"{g / 'agglomerated.h5'}:seg", ctx.region, dtype_kinds="ui")
  write_h5(str(g / "agglomerated_region.h5"), "seg", region)
  return {}


# --------------------------------------------------------------------------------- export

def final_segmentation(ctx: Context) -> str:
  """The last segmentation of the run: agglomerated when resegmentation ran, else stitched."""
  return ctx.outputs("agglomerate" if "agglomerate" in ctx.stages else "stitch")["segmentation"]


def _export(ctx: Context) -> dict[str, Any]:
  from PIL import Image
  from ffn.inference.export import annotated_preview, write_precomputed
  from ffn.io.atomic import atomic_path
  from ffn.io.volumes import Volume, read_volume, write_spec
  c = ctx.config
  g = ctx.dir("export")
  g.mkdir(parents=True, exist_ok=True)
  labels = read_volume(final_segmentation(ctx), dtype_kinds="ui")
  with Volume(c["image"]["spec"]) as vol:
    image = vol.read_box(ctx.region)
  resolution = c["export"]["resolution"]
  outputs = ctx.outputs("export")
  if c["export"]["h5"]:
    write_spec(outputs["files"]["segmentation (HDF5)"], labels)
  if c["export"]["precomputed"]:
    write_precomputed(outputs["neuroglancer"], labels, image, ctx.region.start, resolution)
  if c["export"]["preview"]:
    figure = annotated_preview(image, labels, ctx.region.start, resolution)
    with atomic_path(outputs["files"]["preview"], suffix=".png") as tmp:
      Image.fromarray(figure).save(tmp, format="PNG")
  return {}


def _dvid(ctx: Context) -> dict[str, Any]:
  """Uploads the stitched supervoxels and posts the agglomeration's merges with ``apply = true``;
  otherwise only records what it would do (dry run)."""
  d = ctx.config["dvid"]
  target = ["--server", d["server"], "--uuid", d["uuid"], "--instance", d["instance"]]
  steps = []
  if d["upload"]:
    steps.append(["dvid", "upload", *target, "--input", _base_segmentation(ctx), "--offset",
                  ctx.xyz(ctx.config["region"]["start"]), "--cluster", "debug",
                  "--run_dir", str(ctx.dir("dvid") / "upload")])
  if "agglomerate" in ctx.stages:
    steps.append(["dvid", "post-merges", *target, "--input",
                  ctx.outputs("agglomerate")["files"]["mapping"], "--log",
                  str(ctx.dir("dvid") / "merges.jsonl")] + (["--apply"] if d["apply"] else []))
  if d["apply"]:
    for argv in steps:
      _cli(argv)
  record = {"applied": d["apply"], "commands": [" ".join(["ffn", *a]) for a in steps]}
  write_text_atomic(ctx.outputs("dvid")["files"]["dvid log"], json.dumps(record, indent=1) + "\n")
  return record


def _report(ctx: Context) -> dict[str, Any]:
  from ffn.pipeline.report import write_report
  result = write_report(ctx.run_dir)
  return {"html": str(result.get("html")), "md": str(result.get("md"))}


STEPS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "consensus": _consensus, "stitch_resolve": _stitch_resolve,
    "stitch_finalise": _stitch_finalise, "reseg_pairs": _reseg_pairs,
    "reseg_analyze": _reseg_analyze, "agglomerate": _agglomerate, "export": _export,
    "dvid": _dvid, "report": _report,
}


def _single(stage: str, phase: str, step: str) -> Callable[[Context], tuple[Worker, list[WorkItem]]]:
  return lambda ctx: _step(ctx, stage, phase, step)


PHASES: dict[tuple[str, str], Callable[[Context], tuple[Worker, list[WorkItem]]]] = {
    ("inference", "segment"): _inference,
    ("consensus", "split"): _single("consensus", "split", "consensus"),
    ("stitch", "extract"): _stitch_array("extract"),
    ("stitch", "match"): _stitch_array("match"),
    ("stitch", "resolve"): _single("stitch", "resolve", "stitch_resolve"),
    ("stitch", "write"): _stitch_array("write"),
    ("stitch", "finalise"): _single("stitch", "finalise", "stitch_finalise"),
    ("reseg_pairs", "pairs"): _single("reseg_pairs", "pairs", "reseg_pairs"),
    ("reseg_run", "points"): _reseg_run,
    ("reseg_analyze", "analyze"): _single("reseg_analyze", "analyze", "reseg_analyze"),
    ("agglomerate", "agglomerate"): _single("agglomerate", "agglomerate", "agglomerate"),
    ("export", "export"): _single("export", "export", "export"),
    ("dvid", "dvid"): _single("dvid", "dvid", "dvid"),
    ("report", "report"): _single("report", "report", "report"),
}


def _counters(ctx: Context, name: str, items: int) -> dict[str, Any]:
  """Stage-specific counters for stage.json, read from the stage's outputs."""
  if name == "inference":
    return {"chunks": items}
  if name == "stitch":
    summary = read_json(ctx.outputs("stitch")["files"]["stitch summary"]) or {}
    return {k: summary[k] for k in ("chunks", "objects", "objects_merged_across_seams",
                                    "output_blocks") if k in summary}
  if name == "reseg_pairs":
    return read_json(ctx.dir(name) / "_pairs" / "done.json") or {}
  if name == "reseg_run":
    return {"point_groups": items}
  if name == "agglomerate":
    summary = read_json(ctx.dir(name) / "summary.json") or {}
    return {k: summary[k] for k in ("pairs", "merges", "supervoxels", "bodies") if k in summary}
  return {}


# ----------------------------------------------------------------------------------- task

class PhaseTask(submitit.helpers.Checkpointable):
  """The callable of every task of one phase's array: ``task(index)`` (see the module doc)."""

  def __init__(self, run_dir: str, stage: str, phase: str, submission: int, tasks: int):
    self.run_dir, self.stage, self.phase = str(run_dir), stage, phase
    self.submission, self.tasks = submission, tasks
    self._inner: ArrayTask | None = None

  def __getstate__(self) -> dict[str, Any]:
    return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._inner = None

  def __call__(self, index: int) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    ctx = Context(self.run_dir)
    entry = ctx.stages[self.stage]
    now = time.time()

    def running(data: dict[str, Any]) -> None:
      if data["state"] in ("pending", "queued"):  # a failed task of this submission stays failed
        data["state"] = "running"
      data["started"] = min(data["started"] or now, now)

    update_stage(self.run_dir, self.stage, running)
    try:
      worker, items = PHASES[(self.stage, self.phase)](ctx)
      groups = balance(items, self.tasks) if items else []
      share = groups[index] if index < len(groups) else []
      self._inner = ArrayTask(str(ctx.dir(self.stage) / f"_{self.phase}"), worker)
      self._inner(self.submission, index, [item.to_json() for item in share])
    except BaseException as e:
      lines = str(e).strip().splitlines()
      error = f"{self.phase} task {index}: {type(e).__name__}: {lines[0] if lines else ''}"

      def failed(data: dict[str, Any]) -> None:
        data.update(state="failed", error=error,
                    tasks=_count_tasks(self.run_dir, entry, self.submission))
      update_stage(self.run_dir, self.stage, failed)
      raise
    last = entry["phases"][-1]["name"] == self.phase
    complete = last and all(worker.is_done(item) for item in items)
    counters = _counters(ctx, self.stage, len(items)) if complete else {}

    def finished(data: dict[str, Any]) -> None:
      data["tasks"] = _count_tasks(self.run_dir, entry, self.submission)
      if complete and data["state"] != "done":
        end = time.time()
        data.update(state="done", finished=end, counters=counters, outputs=entry["outputs"],
                    elapsed_s=round(end - (data["started"] or end), 3))
        data.pop("error", None)

    update_stage(self.run_dir, self.stage, finished)
    if complete:
      _drop_old_generations(ctx, self.stage)
    return len(share)

  def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
    """Slurm's preemption/time-limit signal: the inner task saves its state, then requeued."""
    if self._inner is not None:
      self._inner.checkpoint(*args, **kwargs)
    return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _drop_old_generations(ctx: Context, name: str) -> None:
  """Once a stage's new generation is complete, the outputs of its earlier ones go."""
  current = ctx.dir(name)
  for folder in current.parent.glob("g*"):
    if folder != current and folder.is_dir() and folder.name[1:].isdigit():
      shutil.rmtree(folder, ignore_errors=True)


def run_phase_here(run_dir: str, stage: str, phase: str, submission: int, tasks: int) -> None:
  """Runs every task of a phase in this process, in order (``cluster = "debug"``)."""
  for index in range(tasks):
    PhaseTask(run_dir, stage, phase, submission, tasks)(index)

