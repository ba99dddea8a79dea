"""The pipeline's plan: stages, their phases and task counts, fingerprints, outputs.

Stages (fixed names, DAG order; ``consensus`` only with ``inference.reverse``, the three
``reseg_*`` and ``agglomerate`` only with ``reseg.enabled``, ``dvid`` only with a ``[dvid]``
section)::

  inference -> [consensus] -> stitch -> reseg_pairs -> reseg_run -> reseg_analyze -> agglomerate
            -> export -> [dvid] -> report

Each stage has phases, each one job array with a task count fixed here (from the config: chunks,
output blocks, ``[resources.<stage>] num_tasks``); a task computes its stage's work list when it
starts and takes its share (:func:`ffn.blockwise.balance` over all items), so a work list known
only at run time (the resegmentation points) still has a fixed array size.

Fingerprint of a stage: a hash of the config values it depends on (:func:`stage_inputs`, keyed
``section.key``) and of its upstream stages' fingerprints. A finished (or begun) stage whose
fingerprint changed is refused by name of the first differing key, unless ``--force_from`` covers
it. Outputs live under ``<run_dir>/stages/<name>/g<generation>/``; ``--force_from`` starts a new
generation, so the old outputs stay until the new ones are complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import ffn
from ffn.errors import FFNError
from ffn.pipeline.config import STAGE_NAMES, stage_resources

PLAN_FORMAT = 1
DEFAULT_MAX_TASKS = 16  # array size of chunked phases when [resources.<stage>] num_tasks is unset
DEFAULT_RESEG_TASKS = 4


@dataclasses.dataclass
class Phase:
  name: str
  tasks: int
  resources: dict[str, Any]

  def to_json(self) -> dict[str, Any]:
    return {"name": self.name, "tasks": self.tasks, "resources": self.resources}


@dataclasses.dataclass
class Stage:
  name: str
  depends_on: list[str]
  phases: list[Phase]
  inputs: dict[str, Any]
  generation: int = 1
  fingerprint: str = ""
  outputs: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return {"name": self.name, "depends_on": self.depends_on, "fingerprint": self.fingerprint,
            "generation": self.generation, "inputs": self.inputs,
            "phases": [p.to_json() for p in self.phases], "outputs": self.outputs}


def _abs_spec(spec: str) -> str:
  """A volume spec with a relative local path made absolute (URLs and JSON specs unchanged)."""
  from ffn.io.volumes import parse_spec
  parsed = parse_spec(spec)
  if parsed.scheme == "json" or "://" in parsed.path or os.path.isabs(parsed.path):
    return spec
  return str(dataclasses.replace(parsed, path=os.path.abspath(parsed.path)))


def resolve_checkpoint(path: str) -> str:
  """A checkpoint prefix: ``path`` itself, or the prefix a sweep's ``best_checkpoint.txt`` names."""
  if os.path.basename(path) == "best_checkpoint.txt" or (os.path.isfile(path)
                                                           and path.endswith(".txt")):
    try:
      prefix = Path(path).read_text().strip()
    except OSError as e:
      raise FFNError(f"model.checkpoint: {path}: cannot read ({e.strerror})") from None
    path = prefix if os.path.isabs(prefix) else os.path.join(os.path.dirname(path), prefix)
    if not os.path.exists(path + ".index") and os.path.exists(prefix + ".index"):
      path = prefix
  if not os.path.exists(path + ".index"):
    raise FFNError(f"model.checkpoint: {path}: no checkpoint here (no {os.path.basename(path)}.index)")
  return os.path.abspath(path)


def resolve(config: dict[str, Any]) -> dict[str, Any]:
  """The config with every default that depends on the data made explicit: image and ground
  truth specs absolute, the checkpoint prefix, model name/args and image mean/stddev (from the
  request when not given), the region (default: the whole image) checked inside the image, the
  chunk size (default: the region), reseg compute dtype and analysis radius. Reads the image's
  shape and the request; writes nothing."""
  from ffn.axes import BoundingBox
  from ffn.inference.request import load_request
  from ffn.io.volumes import Volume, check_box_inside
  c = json.loads(json.dumps(config))
  c["image"]["spec"] = _abs_spec(c["image"]["spec"])
  if c["groundtruth"] is not None:
    c["groundtruth"]["spec"] = _abs_spec(c["groundtruth"]["spec"])
  request = load_request(c["inference"]["request"])
  c["inference"]["request_text"] = Path(c["inference"]["request"]).read_text() if os.path.isfile(
      c["inference"]["request"]) else c["inference"]["request"]
  m = c["model"]
  m["checkpoint"] = resolve_checkpoint(m["checkpoint"])
  m["model_name"] = m["model_name"] or request.model_name
  m["model_args"] = m["model_args"] or request.model_args
  if not m["model_name"]:
    raise FFNError("model.model_name: not given, and the inference request has none")
  c["image"]["mean"] = c["image"]["mean"] if c["image"]["mean"] is not None else request.image_mean
  c["image"]["stddev"] = (c["image"]["stddev"] if c["image"]["stddev"] is not None
                          else request.image_stddev)
  if not c["image"]["stddev"]:
    raise FFNError("image.stddev: not given, and the inference request has no image_stddev")
  try:
    with Volume(c["image"]["spec"]) as vol:
      shape_zyx = tuple(int(v) for v in vol.shape)
  except FFNError as e:
    raise FFNError(f"image.spec: {e}") from None
  c["image"]["shape_xyz"] = list(shape_zyx[::-1])
  start = c["region"]["start"]
  size = c["region"]["size"] or [n - s for n, s in zip(shape_zyx[::-1], start)]
  try:
    check_box_inside(BoundingBox(start, size), shape_zyx, c["image"]["spec"])
  except FFNError as e:
    raise FFNError(f"region: {e}") from None
  c["region"]["size"] = size
  ch = c["chunking"]
  ch["subvolume_size"] = ch["subvolume_size"] or list(size)
  if any(o >= s for o, s in zip(ch["overlap"], ch["subvolume_size"])):
    raise FFNError(f"chunking.overlap: {ch['overlap']} must be smaller than "
                   f"chunking.subvolume_size {ch['subvolume_size']} (x,y,z)")
  if c["inference"]["split_min_size"] is None:
    c["inference"]["split_min_size"] = int(request.inference_options.min_segment_size)
  r = c["reseg"]
  r["compute_dtype"] = r["compute_dtype"] or c["inference"]["compute_dtype"]
  r["analysis_radius"] = r["analysis_radius"] or list(r["radius"])
  if any(a > b for a, b in zip(r["analysis_radius"], r["radius"])):
    raise FFNError(f"reseg.analysis_radius: {r['analysis_radius']} must be at most reseg.radius "
                   f"{r['radius']} (x,y,z)")
  st = c["stitch"]
  if any(b % k for b, k in zip(st["block_size"], st["chunk_size"])):
    raise FFNError(f"stitch.block_size: {st['block_size']} must be a multiple of stitch.chunk_size "
                   f"{st['chunk_size']} (x,y,z)")
  return c


def chunk_boxes(c: dict[str, Any]) -> list:
  from ffn.axes import BoundingBox, split_box
  return split_box(BoundingBox(c["region"]["start"], c["region"]["size"]),
                   c["chunking"]["subvolume_size"], c["chunking"]["overlap"])


def output_blocks(c: dict[str, Any]) -> int:
  from ffn.stitch.tiling import write_blocks
  return len(write_blocks(c["region"]["start"][::-1], c["region"]["size"][::-1],
                          c["stitch"]["block_size"][::-1]))


def _keys(c: dict[str, Any], section: str, keys: list[str]) -> dict[str, Any]:
  table = c[section] or {}
  return {f"{section}.{k}": table.get(k) for k in keys}


def stage_inputs(c: dict[str, Any], name: str) -> dict[str, Any]:
  """The config values (``section.key`` -> value) that determine a stage's outputs."""
  gt = {"groundtruth.spec": (c["groundtruth"] or {}).get("spec")}
  if name == "inference":
    return {**_keys(c, "image", ["spec", "mean", "stddev"]),
            **_keys(c, "model", ["checkpoint", "model_name", "model_args"]),
            **_keys(c, "region", ["start", "size"]),
            **_keys(c, "chunking", ["subvolume_size", "overlap"]),
            "inference.request": c["inference"]["request_text"],
            **_keys(c, "inference", ["compute_dtype", "batch_size", "concurrent_requests",
                                     "reverse"])}
  if name == "consensus":
    return _keys(c, "inference", ["split_min_size"])
  if name == "stitch":
    return _keys(c, "stitch", ["min_agreement", "min_overlap", "block_size", "chunk_size"])
  if name == "reseg_pairs":
    return _keys(c, "reseg", ["radius", "min_size", "min_area", "max_retry_iters",
                              "segment_recovery_fraction"])
  if name == "reseg_run":
    return _keys(c, "reseg", ["compute_dtype", "points_per_item", "voxel_size"])
  if name == "reseg_analyze":
    return {**_keys(c, "reseg", ["analysis_radius", "voxel_size", "threshold"]), **gt}
  if name == "agglomerate":
    return {**_keys(c, "agglomerate", ["iou_threshold", "consistency_threshold",
                                       "deleted_threshold", "score_threshold"]), **gt}
  if name == "export":
    return _keys(c, "export", ["h5", "precomputed", "preview", "resolution"])
  if name == "dvid":
    return _keys(c, "dvid", ["server", "uuid", "instance", "upload", "apply"])
  if name == "report":
    return gt
  raise AssertionError(name)


def fingerprint(name: str, inputs: dict[str, Any], upstream: list[str]) -> str:
  text = json.dumps({"stage": name, "inputs": inputs, "upstream": upstream}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _res(c: dict[str, Any], stage: str, tasks: int) -> Phase:
  r = stage_resources(c, stage)
  return {"cpus_per_task": r["cpus"], "mem_gb": r["mem_gb"], "gpus_per_task": r["gpus"],
          "time_min": r["time_min"], "partition": r["partition"]}  # type: ignore[return-value]


def _tasks(c: dict[str, Any], stage: str, items: int, default_max: int = DEFAULT_MAX_TASKS) -> int:
  wanted = stage_resources(c, stage)["num_tasks"]
  return max(1, min(items, wanted if wanted is not None else default_max))


def stage_dir(run_dir: str | os.PathLike, name: str, generation: int) -> Path:
  return Path(run_dir) / "stages" / name / f"g{generation}"


def build_stages(c: dict[str, Any], run_dir: str | os.PathLike,
                 generations: dict[str, int] | None = None) -> list[Stage]:
  """The DAG of a resolved config (:func:`resolve`), outputs under ``run_dir``."""
  generations = generations or {}
  chunks = len(chunk_boxes(c))
  blocks = output_blocks(c)
  region = {"start": list(c["region"]["start"]), "size": list(c["region"]["size"])}
  stages: list[Stage] = []

  def add(name: str, depends: list[str], phases: list[tuple[str, int]]) -> Stage:
    stage = Stage(name, depends, [Phase(p, n, _res(c, name, n)) for p, n in phases],
                  stage_inputs(c, name), generations.get(name, 1))
    stages.append(stage)
    return stage

  reverse = c["inference"]["reverse"]
  inference = add("inference", [], [("segment", _tasks(c, "inference", chunks, chunks))])
  g = stage_dir(run_dir, "inference", inference.generation)
  if reverse:
    inference.outputs = {"results": [{"label": "forward", "chunks_dir": str(g / "forward")},
                                     {"label": "reverse", "chunks_dir": str(g / "reverse")}]}
  else:
    inference.outputs = {"chunks_dir": str(g / "forward")}
  last = "inference"
  if reverse:
    consensus = add("consensus", ["inference"], [("split", 1)])
    consensus.outputs = {"chunks_dir": str(stage_dir(run_dir, "consensus", consensus.generation)
                                           / "consensus")}
    last = "consensus"
  n = _tasks(c, "stitch", chunks)
  stitch = add("stitch", [last], [("extract", n), ("match", n), ("resolve", 1),
                                  ("write", _tasks(c, "stitch", blocks)), ("finalise", 1)])
  g = stage_dir(run_dir, "stitch", stitch.generation)
  stitch.outputs = {"segmentation": f"{g / 'stitched.h5'}:seg", "segmentation_box": region,
                    "files": {"stitch summary": str(g / "stitched.h5.stitch" / "summary.json")}}
  last = "stitch"
  if c["reseg"]["enabled"]:
    pairs = add("reseg_pairs", ["stitch"], [("pairs", 1)])
    g = stage_dir(run_dir, "reseg_pairs", pairs.generation)
    pairs.outputs = {"files": {"pairs": str(g / "pairs.csv"), "request": str(g / "request.pbtxt")}}
    run = add("reseg_run", ["reseg_pairs"],
              [("points", stage_resources(c, "reseg_run")["num_tasks"] or DEFAULT_RESEG_TASKS)])
    g = stage_dir(run_dir, "reseg_run", run.generation)
    run.outputs = {"files": {"request": str(g / "points" / "request.pbtxt")}}
    analyze = add("reseg_analyze", ["reseg_run"], [("analyze", 1)])
    g = stage_dir(run_dir, "reseg_analyze", analyze.generation)
    analyze.outputs = {"files": {"affinities": str(g / "affinities.csv")}}
    agg = add("agglomerate", ["reseg_analyze"], [("agglomerate", 1)])
    g = stage_dir(run_dir, "agglomerate", agg.generation)
    agg.outputs = {"segmentation": f"{g / 'agglomerated_region.h5'}:seg",
                   "segmentation_box": region,
                   "files": {"merges": str(g / "merges.csv"), "mapping": str(g / "mapping.csv"),
                             "merge table": str(g / "merge_table.csv"),
                             "agglomeration summary": str(g / "summary.json")}}
    last = "agglomerate"
  export = add("export", [last], [("export", 1)])
  g = stage_dir(run_dir, "export", export.generation)
  e = c["export"]
  export.outputs = {"files": {}}
  if e["h5"]:
    export.outputs["files"]["segmentation (HDF5)"] = f"{g / 'segmentation.h5'}:seg"
  if e["precomputed"]:
    export.outputs["neuroglancer"] = str(g / "neuroglancer")
  if e["preview"]:
    export.outputs["files"]["preview"] = str(g / "preview.png")
  leaves = ["export"]
  if c["dvid"] is not None:
    dvid = add("dvid", ["export"], [("dvid", 1)])
    dvid.outputs = {"files": {"dvid log": str(stage_dir(run_dir, "dvid", dvid.generation)
                                              / "dvid.json")}}
    leaves = ["dvid"]
  report = add("report", leaves, [("report", 1)])
  report.outputs = {"files": {"report (HTML)": str(Path(run_dir) / "report.html"),
                              "report (Markdown)": str(Path(run_dir) / "report.md")}}
  by_name = {s.name: s for s in stages}
  for stage in stages:
    stage.fingerprint = fingerprint(stage.name, stage.inputs,
                                    [by_name[d].fingerprint for d in stage.depends_on])
  assert all(s.name in STAGE_NAMES for s in stages)
  return stages


def downstream(stages: list[Stage], name: str) -> list[str]:
  """``name`` and every stage that depends on it, directly or not (DAG order)."""
  out = {name}
  for stage in stages:
    if any(d in out for d in stage.depends_on):
      out.add(stage.name)
  return [s.name for s in stages if s.name in out]


def plan_json(c: dict[str, Any], stages: list[Stage], created: float | None = None) -> dict[str, Any]:
  """The contents of ``plan.json`` (the contract with the report), plus ``config`` (resolved)."""
  return {"format": PLAN_FORMAT, "toolkit_version": ffn.__version__,
          "created": created if created is not None else time.time(),
          "image": c["image"]["spec"],
          "groundtruth": (c["groundtruth"] or {}).get("spec"),
          "region": {"start": list(c["region"]["start"]), "size": list(c["region"]["size"])},
          "stages": [s.to_json() for s in stages], "config": c}


def first_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
  """The first ``section.key`` whose value differs between two stages' inputs."""
  for key in list(new) + [k for k in old if k not in new]:
    if old.get(key) != new.get(key):
      return key
  return None
