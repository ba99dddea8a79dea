"""Affinities from resegmentation results (google/ffn's ``evaluate_pair_resegmentation``).

For each point of the request, inside the *analysis box* (``analysis_radius`` around the point,
default: the resegmentation ``radius``; it must fit in the canvas):

* ``seg_a``/``seg_b``: the base segment masks; ``num_voxels_a``/``num_voxels_b`` their voxels,
  ``max_edt_a``/``max_edt_b`` the maxima of their Euclidean distance transforms (``voxel_size``);
* ``reseg_a``/``reseg_b``: the reconstructions from ``a`` and from ``b`` (saved probability
  >= ``threshold``, default 0.5; unvisited voxels count as 0);
* ``iou`` = |reseg_a & reseg_b| / |reseg_a | reseg_b| (0 when both are empty);
* per reconstruction ``r`` in (a, b): ``r_num_voxels``, ``r_consistency_a`` = |reseg_r & seg_a| /
  |seg_a|, ``r_consistency_b`` likewise, ``r_deleted_voxels`` = deleted voxels of the FoV steps
  whose centre lies in the analysis box, ``r_deleted_fraction`` = deleted / num_voxels,
  ``r_max_edt`` and ``r_origin_x/y/z`` (global x,y,z of the last seed).

``score`` is the IoU (what the SLURM fork and neuclease merge tables carry). A row whose file is
missing, unreadable, or holds no finished pair (``out_of_volume``, ``segment_absent``, fewer than
two reconstructions) has ``status`` != ``ok`` and a ``reason``; it never aborts the analysis.

With ground truth: each base segment's body is its majority ground-truth label (voxels with
ground truth 0 ignored); a pair is a *true merge* when both segments have the same body. The
precision / recall of merging the ``ok`` pairs with ``score >= t`` is reported for a sweep of
``t`` (CSV and a PNG), and for the manual rule (:mod:`ffn.reseg.agglomerate`).
"""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from ffn.axes import BoundingBox
from ffn.errors import FFNError
from ffn.inference import storage
from ffn.io.atomic import write_text_atomic
from ffn.reseg.run import radius_zyx, target_path

RUN_COLUMNS = ("num_voxels", "consistency_a", "consistency_b", "deleted_voxels",
               "deleted_fraction", "max_edt", "origin_x", "origin_y", "origin_z")
COLUMNS = (("id_a", "id_b", "x", "y", "z", "status", "reason", "score", "iou", "num_voxels_a",
            "num_voxels_b", "max_edt_a", "max_edt_b")
           + tuple(f"a_{c}" for c in RUN_COLUMNS) + tuple(f"b_{c}" for c in RUN_COLUMNS))
INT_COLUMNS = {"id_a", "id_b", "x", "y", "z", "num_voxels_a", "num_voxels_b", "a_num_voxels",
               "b_num_voxels", "a_deleted_voxels", "b_deleted_voxels", "a_origin_x", "a_origin_y",
               "a_origin_z", "b_origin_x", "b_origin_y", "b_origin_z"}


def iou(reseg_a: np.ndarray, reseg_b: np.ndarray) -> float:
  """Jaccard index of two boolean masks (0 when both are empty)."""
  union = int(np.sum(reseg_a | reseg_b))
  return float(np.sum(reseg_a & reseg_b)) / union if union else 0.0


def _run_measures(reseg: np.ndarray, dels: np.ndarray, moves: np.ndarray, delta: np.ndarray,
                  analysis_r: np.ndarray, seg_a: np.ndarray, seg_b: np.ndarray,
                  voxel_size: Sequence[float]) -> dict:
  """google's ``evaluate_segmentation_result`` for one reconstruction (analysis-box arrays)."""
  out = {"max_edt": float(ndimage.distance_transform_edt(reseg, sampling=voxel_size).max())
         if reseg.any() else 0.0}
  moves = np.asarray(moves, np.int64).reshape(-1, 3)
  dels = np.asarray(dels, np.int64).reshape(-1)
  deleted = 0
  if moves.size:
    inside = np.all((moves >= delta) & (moves <= delta + 2 * analysis_r), axis=1)
    deleted = int(np.sum(dels[inside]))
  out["deleted_voxels"] = deleted
  out["num_voxels"] = int(np.sum(reseg))
  out["deleted_fraction"] = deleted / out["num_voxels"] if out["num_voxels"] else math.nan
  out["consistency_a"] = float(np.sum(reseg[seg_a])) / int(np.sum(seg_a))
  out["consistency_b"] = float(np.sum(reseg[seg_b])) / int(np.sum(seg_b))
  return out


def evaluate_pair(path: str, id_a: int, id_b: int, point_xyz: Sequence[int],
                  read_base: Callable[[BoundingBox], np.ndarray], radius: Sequence[int],
                  analysis_radius: Sequence[int], voxel_size: Sequence[float] = (1, 1, 1),
                  threshold: float = 0.5) -> dict:
  """One row (see the module docstring). ``radius``/``analysis_radius``/``voxel_size``: z,y,x;
  ``read_base(box)``: the base segmentation in an x,y,z box, as z,y,x."""
  x, y, z = (int(v) for v in point_xyz)
  row: dict = {"id_a": int(id_a), "id_b": int(id_b), "x": x, "y": y, "z": z}
  radius = np.asarray(radius, np.int64)
  analysis_r = np.asarray(analysis_radius, np.int64)

  def bad(status: str, reason: str) -> dict:
    return {**row, "status": status, "reason": reason}

  if not os.path.exists(path):
    return bad("missing", f"{path}: no result file")
  try:
    with np.load(path, allow_pickle=True) as data:
      status = str(data["status"]) if "status" in data else "ok"
      if status != "ok":
        return bad(status, str(data["reason"]) if "reason" in data else status)
      qprob = np.asarray(data["probs"])
      dels, moves, starts = data["deletes"], data["histories"], data["start_points"]
  except Exception as e:  # noqa: BLE001 - any unreadable file is a row with its reason
    first = str(e).splitlines()[0] if str(e) else ""
    return bad("unreadable", f"{path}: {type(e).__name__}: {first}")
  if qprob.ndim != 4 or qprob.shape[0] != 2:
    return bad("incomplete", f"{qprob.shape[0] if qprob.ndim else 0} of 2 reconstructions "
                             "(a seed failed or terminate_early stopped)")
  if np.any(analysis_r > radius):
    raise FFNError(f"analysis_radius {analysis_r[::-1].tolist()} (x,y,z) exceeds the "
                   f"resegmentation radius {radius[::-1].tolist()}")
  if tuple(qprob.shape[1:]) != tuple(int(v) for v in 2 * radius + 1):
    return bad("unreadable", f"{path}: probability maps of shape {qprob.shape[1:]} (z,y,x), "
                             f"expected {tuple((2 * radius + 1).tolist())}")
  corner_xyz = np.array([x, y, z]) - radius[::-1]
  box = BoundingBox(tuple(int(v) for v in np.array([x, y, z]) - analysis_r[::-1]),
                    tuple(int(v) for v in 2 * analysis_r[::-1] + 1))
  base = read_base(box)
  seg_a, seg_b = base == id_a, base == id_b
  row["num_voxels_a"], row["num_voxels_b"] = int(seg_a.sum()), int(seg_b.sum())
  if not row["num_voxels_a"] or not row["num_voxels_b"]:
    return bad("invalid_base", "segment a or b has no voxel in the analysis box of the base "
                               "segmentation")
  row["max_edt_a"] = float(ndimage.distance_transform_edt(seg_a, sampling=voxel_size).max())
  row["max_edt_b"] = float(ndimage.distance_transform_edt(seg_b, sampling=voxel_size).max())
  delta = radius - analysis_r
  crop = tuple(slice(int(d), int(d + 2 * r + 1)) for d, r in zip(delta, analysis_r))
  prob = np.nan_to_num(storage.dequantize_probability(qprob))
  reseg = prob[(slice(None),) + crop] >= threshold
  row["iou"] = iou(reseg[0], reseg[1])
  for k, name in enumerate("ab"):
    measures = _run_measures(reseg[k], dels[k], moves[k], delta, analysis_r, seg_a, seg_b,
                             voxel_size)
    origin = np.asarray(starts[k], np.int64).reshape(-1, 3)[-1] + corner_xyz
    measures.update(origin_x=int(origin[0]), origin_y=int(origin[1]), origin_z=int(origin[2]))
    row.update({f"{name}_{c}": v for c, v in measures.items()})
  row["score"] = row["iou"]
  return {**row, "status": "ok", "reason": ""}


def analyze_request(request, read_base: Callable[[BoundingBox], np.ndarray],
                    voxel_size: Sequence[float] = (1, 1, 1), threshold: float = 0.5) -> list[dict]:
  """One row per point of a ``ResegmentationRequest``, in request order."""
  radius = radius_zyx(request.radius)
  analysis = radius_zyx(request.analysis_radius) if request.HasField("analysis_radius") else radius
  rows = []
  for i, point in enumerate(request.points):
    p = point.point
    rows.append(evaluate_pair(target_path(request, i), point.id_a, point.id_b, (p.x, p.y, p.z),
                              read_base, radius, analysis, voxel_size, threshold))
  return rows


def _format(value) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return "" if math.isnan(value) else f"{value:.6g}"
  text = str(value)
  return '"' + text.replace('"', "'") + '"' if ("," in text or '"' in text) else text


def write_rows(rows: Sequence[dict], path: str, columns: Sequence[str] = COLUMNS) -> None:
  lines = [",".join(columns)] + [",".join(_format(r.get(c)) for c in columns) for r in rows]
  write_text_atomic(path, "\n".join(lines) + "\n")


def _split_csv_line(line: str) -> list[str]:
  out, field, quoted = [], [], False
  for ch in line:
    if ch == '"':
      quoted = not quoted
    elif ch == "," and not quoted:
      out.append("".join(field))
      field = []
    else:
      field.append(ch)
  out.append("".join(field))
  return out


def read_rows(path: str) -> list[dict]:
  """An affinity table back (numbers parsed; empty fields -> None)."""
  try:
    with open(path) as f:
      lines = [line.rstrip("\n") for line in f if line.strip()]
  except OSError as e:
    raise FFNError(f"{path}: cannot read the affinity table ({e.strerror})") from None
  if not lines:
    raise FFNError(f"{path}: empty affinity table")
  header = lines[0].split(",")
  for needed in ("id_a", "id_b", "status", "score"):
    if needed not in header:
      raise FFNError(f"{path}: not an affinity table (no column {needed!r})")
  rows = []
  for n, line in enumerate(lines[1:], start=2):
    fields = _split_csv_line(line)
    if len(fields) != len(header):
      raise FFNError(f"{path}: line {n}: {len(fields)} fields, expected {len(header)}")
    row: dict = {}
    for key, text in zip(header, fields):
      if text == "":
        row[key] = None
      elif key in INT_COLUMNS:
        try:
          row[key] = int(text)
        except ValueError:
          raise FFNError(f"{path}: line {n}: {key} {text!r} is not an integer") from None
      elif key in ("status", "reason"):
        row[key] = text
      else:
        try:
          row[key] = float(text)
        except ValueError:
          raise FFNError(f"{path}: line {n}: {key} {text!r} is not a number") from None
    rows.append(row)
  return rows


# ---------------------------------------------------------------------------- ground truth

def majority_bodies(segmentation: np.ndarray, groundtruth: np.ndarray) -> dict[int, int]:
  """Segment id -> its majority ground-truth label (ground truth 0 ignored; ties: the smaller
  label); segments without labelled voxels are absent."""
  if segmentation.shape != groundtruth.shape:
    raise FFNError(f"--groundtruth: shape {groundtruth.shape} (z,y,x) differs from the base "
                   f"segmentation's {segmentation.shape}")
  keep = (groundtruth != 0) & (segmentation != 0)
  seg = segmentation[keep].astype(np.uint64)
  gt = groundtruth[keep].astype(np.uint64)
  pairs, counts = np.unique(np.stack([seg, gt], 1), axis=0, return_counts=True)
  order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))
  pairs = pairs[order]
  first = np.ones(len(pairs), bool)
  first[1:] = pairs[1:, 0] != pairs[:-1, 0]
  return {int(s): int(g) for s, g in pairs[first]}


def precision_recall(rows: Sequence[dict], bodies: dict[int, int],
                     decide: Callable[[dict], bool]) -> dict:
  """Merge precision/recall of ``decide`` over the ``ok`` rows whose segments have a body."""
  tp = fp = fn = 0
  for row in rows:
    if row.get("status") != "ok":
      continue
    a, b = bodies.get(row["id_a"]), bodies.get(row["id_b"])
    if a is None or b is None:
      continue
    truth, merge = a == b, decide(row)
    tp += truth and merge
    fp += merge and not truth
    fn += truth and not merge
  return {"tp": tp, "fp": fp, "fn": fn,
          "precision": tp / (tp + fp) if tp + fp else math.nan,
          "recall": tp / (tp + fn) if tp + fn else math.nan}


def threshold_sweep(rows: Sequence[dict], bodies: dict[int, int],
                    thresholds: Sequence[float]) -> list[dict]:
  return [{"threshold": float(t), **precision_recall(rows, bodies,
                                                      lambda r, t=t: r["score"] >= t)}
          for t in thresholds]


def plot_precision_recall(sweep: Sequence[dict], path: str, rule: dict | None = None,
                          size: int = 360) -> None:
  """A PNG of precision and recall against the score threshold (Pillow only), atomically."""
  from PIL import Image, ImageDraw
  from ffn.io.atomic import atomic_path
  pad = 40
  image = Image.new("RGB", (size + 2 * pad, size + 2 * pad), "white")
  draw = ImageDraw.Draw(image)
  draw.rectangle([pad, pad, pad + size, pad + size], outline="black")

  def xy(t: float, v: float) -> tuple[float, float]:
    return pad + t * size, pad + (1 - v) * size

  for k in range(0, 11, 2):
    draw.text((pad + k * size / 10 - 8, pad + size + 6), f"{k / 10:.1f}", fill="black")
    draw.text((4, pad + (1 - k / 10) * size - 6), f"{k / 10:.1f}", fill="black")
  draw.text((pad + size / 2 - 40, pad + size + 22), "score threshold", fill="black")
  for key, colour in (("precision", "blue"), ("recall", "red")):
    points = [xy(s["threshold"], s[key]) for s in sweep if not math.isnan(s[key])]
    if len(points) > 1:
      draw.line(points, fill=colour, width=2)
    draw.text((pad + 6, pad + (6 if key == "precision" else 20)), key, fill=colour)
  if rule is not None and not math.isnan(rule["precision"]):
    draw.text((pad + 6, pad + 34), f"manual rule: P {rule['precision']:.2f} R "
                                   f"{rule['recall']:.2f}", fill="black")
  with atomic_path(path, suffix=".png") as tmp:
    image.save(tmp, format="PNG")
