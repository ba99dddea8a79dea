"""PolicyPeaks set-up: time per step on a large subvolume, and how soon a stop request is seen.

  .venv/bin/python benchmarks/bench_seed_policies.py                # 256^3, 6 stop requests
  .venv/bin/python benchmarks/bench_seed_policies.py --size 384 --stops 10

The image is the shipped FIB-25 crop (150^3) tiled (reflected) to ``--size``^3 and normalised
with 128/33, as the demo does. Part 1 times google's steps as ``PolicyPeaks`` runs them (Sobel
edges + adaptive threshold, masks, distance transform, peaks: skimage's ``peak_local_max`` with
google's noise) and, for comparison, the hand-written maximum-filter peak finder this toolkit used
before (same peaks on a tie-free image: checked). Part 2 runs the set-up in a thread and sets the
canvas' ``stop_requested`` (what SIGTERM does through ``Runner.request_stop``) at ``--stops``
evenly spread moments of one set-up's duration, and reports the delay until
``InferenceInterrupted`` (the latency is the rest of the step in progress: steps are single
C calls). Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ffn.inference import inference_pb2, seed  # noqa: E402
from ffn.inference.canvas import Canvas, InferenceInterrupted  # noqa: E402


def _image(size: int) -> np.ndarray:
  with h5py.File(REPO / "sample_data" / "fib25" / "training_sample2_crop.h5", "r") as f:
    raw = f["raw"][:]
  reps = -(-size // raw.shape[0])
  tiled = np.pad(raw, [(0, (reps - 1) * n) for n in raw.shape], mode="reflect")[:size, :size, :size]
  return (tiled.astype(np.float32) - 128) / 33


def _hand_written_peaks(image: np.ndarray, min_distance: int) -> np.ndarray:
  """The maximum-filter peak finder used before skimage (value > 0, border min_distance)."""
  size = 2 * min_distance + 1
  mask = (image == ndimage.maximum_filter(image, size=size, mode="nearest")) & (image > 0)
  for axis in range(3):
    index = [slice(None)] * 3
    index[axis] = slice(0, min_distance)
    mask[tuple(index)] = False
    index[axis] = slice(image.shape[axis] - min_distance, None)
    mask[tuple(index)] = False
  return np.argwhere(mask)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--stops", type=int, default=6)
  args = parser.parse_args()
  image = _image(args.size)
  opts = inference_pb2.InferenceOptions(init_activation=0.95, pad_value=0.05, move_threshold=0.9,
                                        segment_threshold=0.6)
  canvas = Canvas(image, opts, lambda x: x, (33, 33, 33), (8, 8, 8))
  times = {}
  t = time.perf_counter()
  is_edge = seed._edges(image)
  times["edges"] = time.perf_counter() - t
  t = time.perf_counter()
  dist = ndimage.distance_transform_edt(~is_edge).astype(np.float32)
  times["distance_transform"] = time.perf_counter() - t
  noisy = dist + np.random.RandomState(42).random_sample(dist.shape) * 1e-4
  t = time.perf_counter()
  skimage_peaks = seed.find_peaks(dist, min_distance=3, threshold_abs=0, threshold_rel=0)
  times["peaks_skimage"] = time.perf_counter() - t
  t = time.perf_counter()
  hand = _hand_written_peaks(noisy, 3)
  times["peaks_hand_written"] = time.perf_counter() - t
  same = np.array_equal(seed._sorted(skimage_peaks), seed._sorted(hand))
  t = time.perf_counter()
  seed.POLICIES["PolicyPeaks"](canvas).init_coords()
  times["PolicyPeaks_total"] = time.perf_counter() - t
  print(json.dumps({"size": args.size, "seconds": {k: round(v, 3) for k, v in times.items()},
                    "candidates": len(skimage_peaks), "same_peaks": bool(same)}), flush=True)
  total = times["PolicyPeaks_total"]
  delays = []
  for i in range(args.stops):
    at = total * (i + 0.5) / args.stops
    stop_canvas = Canvas(image, opts, lambda x: x, (33, 33, 33), (8, 8, 8))
    policy = seed.POLICIES["PolicyPeaks"](stop_canvas)
    done = {}

    def work():
      try:
        policy.init_coords()
        done["result"] = "finished"
      except InferenceInterrupted:
        done["result"] = "interrupted"
      done["at"] = time.perf_counter()

    thread = threading.Thread(target=work)
    thread.start()
    time.sleep(at)
    asked = time.perf_counter()
    stop_canvas.stop_requested = True
    thread.join()
    delay = done["at"] - asked
    if done["result"] == "interrupted":  # else it finished before the request (load varies)
      delays.append(delay)
    print(json.dumps({"stop_at_s": round(at, 2), "result": done["result"],
                      "delay_s": round(delay, 3)}), flush=True)
  print(json.dumps({"size": args.size, "setup_s": round(total, 2), "interrupted": len(delays),
                    "max_delay_s": round(max(delays, default=float("nan")), 3),
                    "median_delay_s": round(float(np.median(delays)) if delays else float("nan"), 3)}))


if __name__ == "__main__":
  main()
