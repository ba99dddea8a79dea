"""End-to-end demo on the shipped FIB-25 sample (``ffn demo``, README command 1).

1. prepare training data (``ffn prepare``: stats, partitions, coordinates);
2. segment google/ffn's 100^3 benchmark box with Google's pretrained FIB-25 model, as a cluster job
   (Slurm when a controller answers, else a local subprocess -- ``--cluster``);
3. score the result against the body ground truth (``ffn evaluate``) next to google/ffn's own
   figures for the same box;
4. export the segmentation to HDF5 and to a Neuroglancer precomputed folder (view it with
   ``ffn serve``), and write a PNG preview of orthogonal slices with the segmentation overlaid on
   the image (``ffn export``).

Every step resumes: finished outputs are kept (a finished segmentation submits no job), an
interrupted inference continues from its checkpoint. All paths printed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from google.protobuf import text_format

from ffn.errors import FFNError
from ffn.io.atomic import write_text_atomic

_log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "sample_data" / "fib25"
REQUEST_TEMPLATE = REPO_ROOT / "configs" / "inference_training_sample2.pbtxt"
# google/ffn's benchmark box: start (75, 75, 75) of the full volume = (25, 25, 25) of the crop.
DEMO_BOX = "start { x: 25 y: 25 z: 25 } size { x: 100 y: 100 z: 100 }"
# google/ffn's own code on that box (same model and options), scored like ours: natural log,
# ground-truth background ignored, unsegmented voxels one label. Its "24 objects" count that
# label too; its Rand error is the adapted one (1 - Rand F-score).
GOOGLE_SCORES = {"vi_split": 0.597, "vi_merge": 0.711, "adapted_rand_error": 0.198,
                 "labels_with_unsegmented": 24, "fraction_unsegmented": 0.237}


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


def run_inference_job(request_path: str, bounding_box: str, compute_dtype: str) -> int:
  """The cluster job: ``ffn run_inference`` (runs in the job's own process)."""
  status = _cli(["run_inference", "--inference_request", request_path,
                 "--bounding_box", bounding_box, "--compute_dtype", compute_dtype])
  if status != 0:
    raise RuntimeError(f"run_inference exited with status {status}")
  return status


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from slurm.executor import add_slurm_arguments
  parser.add_argument("--output_dir", default="demo_output", help="where everything goes")
  parser.add_argument("--bounding_box", default=DEMO_BOX,
                      help="inference box in sample coordinates, x,y,z (default: google's 100^3 box)")
  parser.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"),
                      help="network arithmetic (bfloat16: faster on CPUs with AVX512-BF16/AMX)")
  add_slurm_arguments(parser)
  # TensorFlow uses every core it is given; a laptop has at least two.
  parser.set_defaults(slurm_cpus_per_task=2, slurm_job_name="ffn-demo")


def run(args: argparse.Namespace) -> int:
  from ffn.data.prepare import REPO_SAMPLE, prepare
  from ffn.inference.request import parse_bounding_box
  from ffn.inference.storage import existing_segmentation_path, segmentation_path
  from slurm.executor import SlurmOptions, make_executor, submit_array, wait_all

  out = Path(args.output_dir).absolute()
  out.mkdir(parents=True, exist_ok=True)
  if not REPO_SAMPLE.exists():
    raise FFNError(f"{REPO_SAMPLE}: the shipped sample is missing (run from a full checkout)")

  print("[1/4] preparing training data from the sample ...", flush=True)
  prepared = prepare(f"{REPO_SAMPLE}:raw", f"{REPO_SAMPLE}:stack", str(out / "prepare"))

  print("[2/4] segmenting with Google's pretrained FIB-25 model ...", flush=True)
  box = parse_bounding_box(args.bounding_box)
  request_path = write_demo_request(out)
  print(normalisation_note(request_path, prepared.image_mean, prepared.image_stddev), flush=True)
  corner_zyx = tuple(reversed(box.start.tolist()))
  seg_file = existing_segmentation_path(str(out / "segmentation"), corner_zyx)
  if seg_file is not None:
    print(f"  {seg_file} exists: not submitting a job (delete it to segment again)", flush=True)
    log_root = out / "jobs" / "logs"
  else:
    executor = make_executor(SlurmOptions.from_args(args), out / "jobs")
    jobs = submit_array(executor, run_inference_job,
                        [(str(request_path), args.bounding_box, args.compute_dtype)])
    wait_all(jobs)
    log_root = executor.log_root
    seg_file = segmentation_path(str(out / "segmentation"), corner_zyx)

  print("[3/4] scoring against the ground truth ...", flush=True)
  scores_path = out / "scores.json"
  if _cli(["evaluate", "--segmentation", seg_file, "--groundtruth", f"{REPO_SAMPLE}:stack",
           "--output_json", str(scores_path)]) != 0:
    raise FFNError("evaluation failed")
  scores = json.loads(scores_path.read_text())
  scores["labels_with_unsegmented"] = scores["segments"] + (scores["fraction_unsegmented"] > 0)
  print(f"  {'':24s} {'ours':>8s} {'google/ffn':>10s}")
  for key, reference in GOOGLE_SCORES.items():
    ours, fmt = scores[key], ".3f" if isinstance(reference, float) else "d"
    print(f"  {key:24s} {int(ours) if fmt == 'd' else ours:8{fmt}} {reference:10{fmt}}")

  print("[4/4] exporting HDF5 and the preview ...", flush=True)
  preview, seg_h5 = out / "preview.png", f"{out / 'segmentation.h5'}:seg"
  viewer = out / "neuroglancer"
  if _cli(["export", "--segmentation", seg_file, "--format", "h5", "--output", seg_h5,
           "--image", f"{REPO_SAMPLE}:raw", "--preview", str(preview)]) != 0 or \
      _cli(["export", "--segmentation", seg_file, "--format", "precomputed", "--output", str(viewer),
            "--image", f"{REPO_SAMPLE}:raw"]) != 0:
    raise FFNError("export failed")

  print("\ndemo outputs:")
  for name, path in [("image stats", prepared.stats_json), ("partitions", prepared.partitions),
                     ("coordinates", prepared.coordinates), ("request", request_path),
                     ("segmentation", seg_file), ("as HDF5", seg_h5), ("scores", scores_path),
                     ("preview", preview), ("neuroglancer", viewer),
                     ("job logs", log_root)]:
    print(f"  {name:13s} {path}")
  print(f"\nview it in Neuroglancer: ffn serve {viewer}  (then open the link it prints)")
  return 0
