"""Inference checkpoints of several canvases at once: peak memory and time of the saves.

  .venv/bin/python benchmarks/bench_checkpoint.py                 # 4 canvases of 200^3
  .venv/bin/python benchmarks/bench_checkpoint.py --canvases 4 --size 250 --logits 200

``--canvases`` canvases of ``--size``^3 voxels (z,y,x) each hold a mid-run state: segmentation
with ~20^3-voxel objects over half the box, logits (float32, incompressible random values) in a
``--logits``^3 region (default 64^3: one object's reach) and NaN elsewhere, the quantised
probability. All of them save a checkpoint at the
same moment, one thread each, in two ways, each in its own process:

* ``before``: the previous code -- the whole archive compressed into memory (``io.BytesIO``), then
  written, no lock;
* ``now``: ``Canvas.save_checkpoint`` -- streamed into the temporary file, one save at a time
  (the process-wide checkpoint lock).

Reported: the peak of memory allocated during the saves above what the canvases already hold
(``tracemalloc``, which sees numpy's buffers), the wall time until every save is on disk, and
the checkpoint size. Prints one JSON line per mode.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _canvas(size: int, logits: int, seed: int):
  from ffn.inference import inference_pb2
  from ffn.inference.canvas import Canvas
  opts = inference_pb2.InferenceOptions(init_activation=0.95, pad_value=0.05, move_threshold=0.9,
                                        segment_threshold=0.6, min_segment_size=10)
  image = np.zeros((size,) * 3, np.float32)
  canvas = Canvas(image, opts, lambda x: x, (33, 33, 33), (8, 8, 8))
  rng = np.random.default_rng(seed)
  z, y, x = np.indices((size,) * 3, sparse=True)
  seg = ((z // 20) * 10000 + (y // 20) * 100 + (x // 20) + 1).astype(np.int32)
  seg[size // 2:] = 0
  canvas.segmentation[:] = seg
  canvas.seg_prob[seg > 0] = 200
  canvas.seed[:logits, :logits, :logits] = rng.normal(0, 3, (logits,) * 3).astype(np.float32)
  canvas.origins = {int(i): None for i in np.unique(seg)[1:]}
  return canvas


def _save_before(canvas, path: str) -> None:
  from ffn.inference.canvas import _boxed, movement_state_array
  from ffn.io.atomic import write_bytes_atomic
  buf = io.BytesIO()
  np.savez_compressed(buf, movement_policy=movement_state_array(canvas.movement_policy.get_state()),
                      segmentation=canvas.segmentation, seed=canvas.seed,
                      seg_qprob=canvas.seg_prob, origins=_boxed(canvas.origins),
                      overlaps=_boxed(canvas.overlaps), counters=canvas.counters.dumps())
  write_bytes_atomic(path, buf.getvalue())


def _one_mode(mode: str, canvases: int, size: int, logits: int) -> dict:
  work = tempfile.mkdtemp(prefix="bench_checkpoint.")
  states = [_canvas(size, logits, i) for i in range(canvases)]
  paths = [f"{work}/c{i}.cpoint" for i in range(canvases)]
  tracemalloc.start()
  base = tracemalloc.get_traced_memory()[0]
  start = time.perf_counter()
  save = _save_before if mode == "before" else (lambda c, p: c.save_checkpoint(p, 0))
  threads = [threading.Thread(target=save, args=(c, p)) for c, p in zip(states, paths)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - start
  peak = tracemalloc.get_traced_memory()[1] - base
  tracemalloc.stop()
  state_mb = sum(c.segmentation.nbytes + c.seed.nbytes + c.seg_prob.nbytes for c in states) / 2**20
  return {"mode": mode, "canvases": canvases, "size": size, "logits": logits,
          "state_MiB": round(state_mb, 1),
          "peak_extra_MiB": round(peak / 2**20, 1), "wall_s": round(wall, 2),
          "checkpoint_MiB": round(Path(paths[0]).stat().st_size / 2**20, 1)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--canvases", type=int, default=4)
  parser.add_argument("--size", type=int, default=200)
  parser.add_argument("--logits", type=int, default=64)
  parser.add_argument("--mode", choices=("before", "now"), default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.mode:
    print(json.dumps(_one_mode(args.mode, args.canvases, args.size, args.logits)))
    return
  for mode in ("before", "now"):
    subprocess.run([sys.executable, __file__, "--mode", mode, "--canvases", str(args.canvases),
                    "--size", str(args.size), "--logits", str(args.logits)], check=True)


if __name__ == "__main__":
  main()
