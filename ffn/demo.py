"""End-to-end demo on the shipped FIB-25 sample (``ffn demo``, README command 1): the pipeline.

1. prepare training data (``ffn prepare``: stats, partitions, coordinates);
2. run ``ffn pipeline`` on google/ffn's 100^3 benchmark box with Google's pretrained FIB-25 model
   (Slurm when a controller answers, else local subprocesses -- ``--cluster``): forward inference
   in float32 (one chunk: google's own run of that box), stitch, FFN-guided resegmentation
   (bfloat16, google's radius 24, analysis radius 8) of the pairs touching over at least
   ``RESEG_MIN_AREA`` voxel faces, agglomeration (google's rule), exports, report;
3. score the forward result against the body ground truth (``ffn evaluate``) next to google/ffn's
   own figures for the same box, then the scores of every stage from the report;
4. the README's paths: ``segmentation/`` (the forward result in google's layout),
   ``segmentation.h5`` (the agglomerated segmentation), ``neuroglancer/`` (view it with
   ``ffn serve``), ``preview.png`` -- links into the pipeline's run directory ``pipeline/``.

Every step resumes: finished outputs are kept (a finished pipeline submits no job), an
interrupted inference continues from its checkpoint. All paths printed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from google.protobuf import text_format

from ffn.errors import FFNError
from ffn.io.atomic import write_text_atomic

_log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "sample_data" / "fib25"
REQUEST_TEMPLATE = REPO_ROOT / "configs" / "inference_training_sample2.pbtxt"
# google/ffn's benchmark box: start (75, 75, 75) of the full volume = (25, 25, 25) of the crop.
DEMO_START, DEMO_SIZE = (25, 25, 25), (100, 100, 100)
# google/ffn's own code on that box (same model and options), scored like ours: natural log,
# ground-truth background ignored, unsegmented voxels one label. Its "24 objects" count that
# label too; its Rand error is the adapted one (1 - Rand F-score).
GOOGLE_SCORES = {"vi_split": 0.597, "vi_merge": 0.711, "adapted_rand_error": 0.198,
                 "labels_with_unsegmented": 24, "fraction_unsegmented": 0.237}
# The demo's resegmentation: google's radius, and only the pairs with large contacts (15 of the
# box's 93 pairs) to keep it to a minute or so: a point costs ~5 s in bfloat16 on a 2-core CPU.
# (A radius of 20 costs a quarter of that but merged wrongly: precision 0.55 here.)
RESEG_RADIUS, ANALYSIS_RADIUS, RESEG_MIN_AREA = (24, 24, 24), (8, 8, 8), 500


def _cli(argv: list[str]) -> int:
  from ffn.cli import main
  return main(argv)


def write_sample_request(path: Path, segmentation_output_dir: Path) -> Path:
  """Writes to ``path`` configs/inference_training_sample2.pbtxt with absolute paths to the shipped
  sample and model and results in ``segmentation_output_dir`` (used by the demo, benchmarks, tests)."""
  from ffn.inference.request import load_request
  request = load_request(str(REQUEST_TEMPLATE))
  image_path, dataset = request.image.hdf5.split(":")
  request.image.hdf5 = f"{REPO_ROOT / image_path}:{dataset}"
  request.model_checkpoint_path = str(REPO_ROOT / request.model_checkpoint_path)
  request.segmentation_output_dir = str(segmentation_output_dir)
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  write_text_atomic(path, text_format.MessageToString(request))
  return Path(path)


def write_demo_request(output_dir: Path) -> Path:
  """The demo's request: the sample request with results under ``output_dir/segmentation``."""
  return write_sample_request(output_dir / "request.pbtxt", output_dir / "segmentation")


def normalisation_note(request_path: Path, sample_mean: float, sample_stddev: float) -> str:
  """Why the segmentation does not use the statistics step 1 printed."""
  from ffn.inference.request import load_request
  request = load_request(str(request_path))
  return (f"  normalisation: --image_mean {request.image_mean:g} --image_stddev "
          f"{request.image_stddev:g}, the values Google's model was trained with (a model must be fed "
          f"what it was trained on); this sample's own {sample_mean:.0f}/{sample_stddev:.0f} from "
          f"step 1 are the flags for training a new model on it")


def pipeline_config(out: Path, request_path: Path, args: argparse.Namespace) -> str:
  """The demo's pipeline TOML (absolute paths; run directory ``out/pipeline``)."""
  def q(text: str) -> str:
    return json.dumps(str(text))  # a TOML basic string

  sample = SAMPLE_DIR / "training_sample2_crop.h5"
  lines = [
      "# written by `ffn demo`: google's 100^3 box of the shipped sample through the pipeline",
      "[run]", f"run_dir = {q(out / 'pipeline')}", f"cluster = {q(args.cluster)}",
      f"job_name = {q(args.slurm_job_name)}",
      *([f"account = {q(args.slurm_account)}"] if args.slurm_account else []),
      *([f"qos = {q(args.slurm_qos)}"] if args.slurm_qos else []),
      f"setup = [{', '.join(q(line) for line in args.slurm_setup)}]",
      "[image]", f"spec = {q(f'{sample}:raw')}",
      "[groundtruth]", f"spec = {q(f'{sample}:stack')}",
      "[model]", f"checkpoint = {q(SAMPLE_DIR / 'model' / 'model.ckpt-27465036')}",
      "[region]", f"start = {list(DEMO_START)}", f"size = {list(DEMO_SIZE)}",
      "[inference]", f"request = {q(request_path)}", f"compute_dtype = {q(args.compute_dtype)}",
      "[reseg]", f"radius = {list(RESEG_RADIUS)}", f"analysis_radius = {list(ANALYSIS_RADIUS)}",
      'compute_dtype = "bfloat16"', "points_per_item = 4", f"min_area = {RESEG_MIN_AREA}",
      "[resources.reseg_run]", "num_tasks = 2",
  ]
  for table, cpus in (("gpu", args.slurm_cpus_per_task), ("cpu", 1)):
    lines += [f"[resources.{table}]", f"cpus = {cpus}", f"time_min = {args.slurm_time_min}"]
    if args.slurm_mem_gb is not None:
      lines.append(f"mem_gb = {args.slurm_mem_gb:g}")
    if args.slurm_partition:
      lines.append(f"partition = {q(args.slurm_partition)}")
  return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from slurm.executor import add_slurm_arguments
  parser.add_argument("--output_dir", default="demo_output", help="where everything goes")
  parser.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"),
                      help="forward inference arithmetic (float32: google's figures; bfloat16: "
                           "faster on CPUs with AVX512-BF16/AMX)")
  add_slurm_arguments(parser)
  # TensorFlow uses every core it is given; a laptop has at least two.
  parser.set_defaults(slurm_cpus_per_task=2, slurm_job_name="ffn-demo")


README_LINKS = ("segmentation", "segmentation.h5", "preview.png", "neuroglancer")


def _link(link: Path, target: str) -> Path:
  """``link`` -> ``target`` (a relative symbolic link, replaced when it points elsewhere)."""
  relative = os.path.relpath(target, link.parent)
  if link.is_symlink():
    if os.readlink(link) == relative:
      return link
    link.unlink()
  link.symlink_to(relative)
  return link


def run(args: argparse.Namespace) -> int:
  from ffn.data.prepare import REPO_SAMPLE, prepare
  from ffn.pipeline.run import run_pipeline
  from ffn.pipeline.stages import read_json

  out = Path(args.output_dir).absolute()
  out.mkdir(parents=True, exist_ok=True)
  if not REPO_SAMPLE.exists():
    raise FFNError(f"{REPO_SAMPLE}: the shipped sample is missing (run from a full checkout)")

  for name in README_LINKS:  # before anything runs: an older demo's outputs are in the way
    if (out / name).exists() and not (out / name).is_symlink():
      raise FFNError(f"{out / name}: exists from an older demo (not a link into pipeline/); remove "
                     "it or use another --output_dir")

  print("[1/4] preparing training data from the sample ...", flush=True)
  prepared = prepare(f"{REPO_SAMPLE}:raw", f"{REPO_SAMPLE}:stack", str(out / "prepare"))

  print("[2/4] the pipeline: segment with Google's pretrained FIB-25 model, stitch, resegment, "
        "agglomerate, export, report ...", flush=True)
  request_path = write_demo_request(out)
  print(normalisation_note(request_path, prepared.image_mean, prepared.image_stddev), flush=True)
  config = out / "pipeline.toml"
  write_text_atomic(config, pipeline_config(out, request_path, args))
  if run_pipeline(str(config), wait=True, poll_s=2.0) != 0:
    raise FFNError(f"the pipeline failed: see `ffn pipeline status {out / 'pipeline'}`")
  plan = read_json(out / "pipeline" / "plan.json") or {}
  outputs = {s["name"]: s["outputs"] for s in plan["stages"]}

  print("[3/4] scoring against the ground truth ...", flush=True)
  forward_dir = _link(out / "segmentation", outputs["inference"]["chunks_dir"])
  seg_file = str(forward_dir / "25" / "25" / "seg-25_25_25.npz")
  scores_path = out / "scores.json"
  if _cli(["evaluate", "--segmentation", seg_file, "--groundtruth", f"{REPO_SAMPLE}:stack",
           "--output_json", str(scores_path)]) != 0:
    raise FFNError("evaluation failed")
  scores = json.loads(scores_path.read_text())
  scores["labels_with_unsegmented"] = scores["segments"] + (scores["fraction_unsegmented"] > 0)
  print(f"  forward inference   {'ours':>8s} {'google/ffn':>10s}")
  for key, reference in GOOGLE_SCORES.items():
    ours, fmt = scores[key], ".3f" if isinstance(reference, float) else "d"
    print(f"  {key:24s} {int(ours) if fmt == 'd' else ours:8{fmt}} {reference:10{fmt}}")
  report = read_json(out / "pipeline" / "report.json") or {}
  print(f"  per stage (report): {'VI split':>9s} {'VI merge':>9s} {'adapted RE':>11s} {'objects':>8s}")
  for label, s in report.get("scores", {}).items():
    if isinstance(s, dict) and "adapted_rand_error" in s:
      print(f"  {label:19s} {s['vi_split']:9.3f} {s['vi_merge']:9.3f} "
            f"{s['adapted_rand_error']:11.4f} {s['segments']:8d}")

  print("[4/4] the README's paths ...", flush=True)
  export = outputs["export"]
  seg_h5 = _link(out / "segmentation.h5",
                 export["files"]["segmentation (HDF5)"].rpartition(":")[0])
  preview = _link(out / "preview.png", export["files"]["preview"])
  viewer = _link(out / "neuroglancer", export["neuroglancer"])

  print("\ndemo outputs:")
  for name, path in [("image stats", prepared.stats_json), ("partitions", prepared.partitions),
                     ("coordinates", prepared.coordinates), ("request", request_path),
                     ("pipeline", config), ("segmentation", seg_file),
                     ("agglomerated", f"{seg_h5}:seg"), ("scores", scores_path),
                     ("report", out / "pipeline" / "report.html"), ("preview", preview),
                     ("neuroglancer", viewer), ("job logs", out / "pipeline" / "stages")]:
    print(f"  {name:13s} {path}")
  print(f"\nview it in Neuroglancer: ffn serve {viewer}  (then open the link it prints)")
  return 0
