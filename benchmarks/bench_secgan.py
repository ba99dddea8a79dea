"""SECGAN domain transfer, measured: does F bring a shifted volume back to what the FFN knows?

  nice .venv/bin/python benchmarks/bench_secgan.py --work_dir /tmp/bench_secgan            # all
  .venv/bin/python benchmarks/bench_secgan.py --work_dir ... --phase train --max_minutes 40
  .venv/bin/python benchmarks/bench_secgan.py --work_dir ... --phase evaluate

Domains:

* labeled (the appearance Google's fib25 FFN knows): ``training_sample1.h5:raw`` of the shared
  data (FIB-25, 250^3, no ground truth; another cube than the one evaluated);
* unlabeled: the shipped crop ``sample_data/fib25/training_sample2_crop.h5:raw`` (150^3) after
  the documented shift :func:`shift` -- a Gaussian blur of sigma 1 voxel, a gamma of 1.5,
  contrast halved into 64..191, and Gaussian noise of sigma 10 grey levels (seeded), rounded and
  clipped to uint8. (A milder shift without blur and with noise 4 did not hurt the FFN: on the
  64^3 box it scored better than the original, so it could not show a transfer.)

Phases (``--phase``):

1. ``data``: writes ``original.h5:raw`` and ``shifted.h5:raw`` (the crop and its shift).
2. ``train``: ``ffn secgan train`` shifted -> original with the small config of
   :data:`TRAIN_FLAGS` and Google's FFN in D_S (bfloat16), for at most ``--max_minutes`` (then
   SIGTERM: checkpoint, status 3; a rerun resumes) or ``--max_steps``.
3. ``evaluate``: ``ffn secgan transfer`` of the whole shifted crop (``--cluster debug``), then
   ``ffn run_inference`` (Google's request, ``--compute_dtype``, default bfloat16) on the box
   ``--box`` (x,y,z start + size in crop voxels) of the original, the shifted and the transferred
   volume, and adapted Rand error / VI of each against the ground truth ``stack`` and against
   the FFN's result on the original.

Prints a Markdown table and writes everything to ``<work_dir>/results.json``.

Measured (2-core Xeon shared with 7 other workers, load 15-25; ``nice``): 2,121 steps in 40 min
(0.88 steps/s), FFN bfloat16, box 25,25,25 + 100^3:

| volume | adapted RE vs GT | VI split | VI merge | adapted RE vs FFN on original | MAE vs original |
|---|---|---|---|---|---|
| original | 0.2055 | 0.599 | 0.718 | 0 | 0 |
| shifted (no transfer) | 0.4193 | 0.668 | 1.425 | 0.2841 | 24.4 |
| transferred F(shifted) | 0.2434 | 0.668 | 0.864 | 0.0906 | 9.9 |
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ffn.axes import BoundingBox, parse_xyz  # noqa: E402
from ffn.inference import storage  # noqa: E402
from ffn.inference.request import format_bounding_box  # noqa: E402
from ffn.metrics.scores import evaluate  # noqa: E402

CROP = REPO / "sample_data" / "fib25" / "training_sample2_crop.h5"
CKPT = REPO / "sample_data" / "fib25" / "model" / "model.ckpt-27465036"
SHARED = Path(os.environ.get("FFN_SHARED_DATA") or REPO.parent / "shared" / "data")
LABELED = SHARED / "fib25" / "training_sample1.h5"
FFN_ARGS = '{"depth": 12, "fov_size": [33, 33, 33], "deltas": [8, 8, 8]}'

# The small config: 17^3 seen by discriminators and the FFN, generators of 3 residual modules
# (margin 6, crops of 41^3) with 16 channels, plain conv discriminators (8, 16, 32 channels).
TRAIN_FLAGS = ["--fov_size", "17,17,17", "--generator_depth", "3", "--generator_channels", "16",
               "--discriminator", "conv", "--discriminator_channels", "8",
               "--discriminator_depth", "3", "--batch_size", "2", "--pool_size", "16",
               "--learning_rate", "0.0005", "--compute_dtype", "bfloat16",
               "--summary_rate_secs", "60", "--checkpoint_interval_s", "120", "--log_every", "20",
               "--permutable_axes", "0,1,2"]


def shift(raw: np.ndarray, seed: int = 0) -> np.ndarray:
  """The shifted domain (uint8 -> uint8): blur sigma 1, gamma 1.5, contrast halved into
  64..191, noise sigma 10."""
  from scipy.ndimage import gaussian_filter
  v = gaussian_filter(raw.astype(np.float64), 1.0) / 255.0
  v = 64.0 + 127.0 * v ** 1.5
  v += np.random.default_rng(seed).normal(0.0, 10.0, size=v.shape)
  return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def ffn_cmd(*args: str) -> list[str]:
  return [sys.executable, "-m", "ffn.cli", *args]


def phase_data(work: Path) -> None:
  with h5py.File(CROP, "r") as f:
    raw = f["raw"][...]
  for name, data in (("original", raw), ("shifted", shift(raw))):
    path = work / f"{name}.h5"
    if not path.exists():
      with h5py.File(path, "w") as f:
        f.create_dataset("raw", data=data, chunks=True)
  print(f"data: crop mean/std {raw.mean():.1f}/{raw.std():.1f}, shifted "
        f"{shift(raw).mean():.1f}/{shift(raw).std():.1f}", flush=True)


def phase_train(work: Path, max_minutes: float, max_steps: int) -> dict:
  if not LABELED.exists():
    raise SystemExit(f"needs {LABELED} (the shared data; set FFN_SHARED_DATA)")
  cmd = ffn_cmd("secgan", "train", "--labeled_volume", f"{LABELED}:raw",
                "--unlabeled_volume", f"{work / 'shifted.h5'}:raw", "--train_dir", str(work / "train"),
                "--ffn_checkpoint", str(CKPT), "--ffn_model_name", "convstack_3d.ConvStack3DFFNModel",
                "--ffn_model_args", FFN_ARGS, "--max_steps", str(max_steps), *TRAIN_FLAGS)
  print(" ".join(cmd), flush=True)
  start = time.monotonic()
  with open(work / "train.log", "a") as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
      status = proc.wait(timeout=max_minutes * 60)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGTERM)  # checkpoint and stop (status 3)
      status = proc.wait()
  return {"train_status": status, "train_wall_s": time.monotonic() - start}


def segment(work: Path, name: str, box: BoundingBox, dtype: str) -> np.ndarray:
  """The FFN's segmentation of ``box`` of ``<work>/<name>.h5:raw`` (cached in <work>/seg_<name>)."""
  from ffn.demo import write_sample_request
  from ffn.inference.request import load_request
  from google.protobuf import text_format
  out = work / f"seg_{name}_{dtype}"
  corner = tuple(int(v) for v in box.start[::-1])
  path = storage.segmentation_path(str(out), corner)
  if not os.path.exists(path):
    request_path = write_sample_request(work / f"request_{name}.pbtxt", out)
    request = load_request(str(request_path))
    request.image.hdf5 = f"{work / (name + '.h5')}:raw"
    request_path.write_text(text_format.MessageToString(request))
    start = time.monotonic()
    subprocess.run(ffn_cmd("run_inference", "--inference_request", str(request_path),
                           "--bounding_box", format_bounding_box(box), "--compute_dtype", dtype),
                   check=True, cwd=REPO)
    print(f"segmented {name} in {time.monotonic() - start:.0f} s", flush=True)
  labels, _ = storage.load_segmentation_file(path)
  return labels


def phase_evaluate(work: Path, box: BoundingBox, dtype: str) -> dict:
  transferred = work / "transferred.h5"
  if not transferred.exists():
    start = time.monotonic()
    subprocess.run(ffn_cmd("secgan", "transfer", "--checkpoint", str(work / "train"),
                           "--input", f"{work / 'shifted.h5'}:raw", "--output", f"{transferred}:raw",
                           "--cluster", "debug", "--block_size", "150,150,150",
                           "--tile_size", "50,50,50", "--compute_dtype", "float32"),
                   check=True, cwd=REPO)
    print(f"transferred in {time.monotonic() - start:.0f} s", flush=True)
  with h5py.File(CROP, "r") as f:
    gt = f["stack"][box.to_slices()]
    raw = f["raw"][box.to_slices()]
  segs = {name: segment(work, name, box, dtype) for name in ("original", "shifted", "transferred")}
  rows = {}
  for name, seg in segs.items():
    with h5py.File(work / f"{name}.h5", "r") as f:
      image = f["raw"][box.to_slices()].astype(np.float64)
    rows[name] = {"vs_groundtruth": evaluate(seg, gt), "vs_original_result": evaluate(seg, segs["original"]),
                  "image_mean": float(image.mean()), "image_std": float(image.std()),
                  "image_mae_vs_original": float(np.mean(np.abs(image - raw)))}
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--work_dir", default="/tmp/bench_secgan")
  parser.add_argument("--phase", choices=("all", "data", "train", "evaluate"), default="all")
  parser.add_argument("--max_minutes", type=float, default=40.0)
  parser.add_argument("--max_steps", type=int, default=100000)
  parser.add_argument("--box", default="25,25,25,100,100,100",
                      help="x,y,z start and size in crop voxels (default: google's 100^3 box)")
  parser.add_argument("--compute_dtype", default="bfloat16", help="of the FFN inference")
  args = parser.parse_args()
  work = Path(args.work_dir).absolute()
  work.mkdir(parents=True, exist_ok=True)
  values = [int(v) for v in args.box.split(",")]
  box = BoundingBox(parse_xyz(values[:3]), parse_xyz(values[3:]))
  results_path = work / "results.json"
  results = json.loads(results_path.read_text()) if results_path.exists() else {}
  if args.phase in ("all", "data"):
    phase_data(work)
  if args.phase in ("all", "train"):
    results.update(phase_train(work, args.max_minutes, args.max_steps))
  if args.phase in ("all", "evaluate"):
    results["box"] = args.box
    results["ffn_compute_dtype"] = args.compute_dtype
    results["scores"] = phase_evaluate(work, box, args.compute_dtype)
    print("| volume | adapted RE vs GT | VI split | VI merge | adapted RE vs FFN on original | "
          "image mean/std | MAE vs original |")
    print("|---|---|---|---|---|---|---|")
    for name, row in results["scores"].items():
      g, o = row["vs_groundtruth"], row["vs_original_result"]
      print(f"| {name} | {g['adapted_rand_error']:.4f} | {g['vi_split']:.3f} | {g['vi_merge']:.3f} | "
            f"{o['adapted_rand_error']:.4f} | {row['image_mean']:.1f}/{row['image_std']:.1f} | "
            f"{row['image_mae_vs_original']:.1f} |")
  results_path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
  main()
