"""Proofreading queue: the pairs whose score is uncertain, ranked, with Neuroglancer links.

A pair is queued when its row is ``ok`` and ``low <= score <= high`` (the band, default
0.4..0.9 around the IoU threshold 0.8). Rank: distance of the score from ``center`` (default
0.8), closest first (ties: larger contact, i.e. smaller ids first). Each entry links to a
Neuroglancer state centred on the pair's decision point (x,y,z voxels) with both segments
selected in the segmentation layer; layer sources are whatever Neuroglancer reads
(``precomputed://http://host/seg`` as ``ffn export``/``ffn serve`` make, ``zarr://...``).

Outputs: ``queue.csv`` (``rank,id_a,id_b,x,y,z,score,iou,link``) and ``queue.html`` (the same
as a table with clickable links), both atomic.
"""

from __future__ import annotations

import html
import json
import math
import urllib.parse
from typing import Sequence

from ffn.io.atomic import write_text_atomic

NEUROGLANCER_CLIENT = "https://neuroglancer-demo.appspot.com/"
QUEUE_COLUMNS = ("rank", "id_a", "id_b", "x", "y", "z", "score", "iou", "link")


def neuroglancer_state(point_xyz: Sequence[int], ids: Sequence[int], segmentation_source: str,
                       image_source: str | None = None,
                       voxel_size_nm: Sequence[float] = (1.0, 1.0, 1.0)) -> dict:
  """Viewer state: position at the voxel centre of ``point_xyz``, ``ids`` selected."""
  dims = {axis: [float(v) * 1e-9, "m"] for axis, v in zip("xyz", voxel_size_nm)}
  layers = []
  if image_source:
    layers.append({"type": "image", "source": image_source, "name": "image"})
  layers.append({"type": "segmentation", "source": segmentation_source, "name": "segmentation",
                 "segments": [str(int(i)) for i in ids]})
  return {"dimensions": dims, "position": [int(v) + 0.5 for v in point_xyz],
          "crossSectionScale": 1, "layers": layers, "selectedLayer": {"layer": "segmentation"},
          "layout": "4panel"}


def neuroglancer_link(state: dict, client: str = NEUROGLANCER_CLIENT) -> str:
  fragment = urllib.parse.quote(json.dumps(state, separators=(",", ":")), safe="")
  return f"{client}#!{fragment}"


def build_queue(rows: Sequence[dict], low: float = 0.4, high: float = 0.9, center: float = 0.8,
                limit: int | None = None) -> list[dict]:
  """The queued rows, ranked (see the module docstring)."""
  queued = [r for r in rows if r.get("status") == "ok" and r.get("score") is not None
            and not math.isnan(r["score"]) and low <= r["score"] <= high]
  queued.sort(key=lambda r: (abs(r["score"] - center), r["id_a"], r["id_b"]))
  return queued[:limit] if limit is not None else queued


def write_queue(queue: Sequence[dict], csv_path: str, html_path: str, segmentation_source: str,
                image_source: str | None = None, voxel_size_nm: Sequence[float] = (1, 1, 1),
                client: str = NEUROGLANCER_CLIENT) -> None:
  entries = []
  for rank, r in enumerate(queue, start=1):
    point = (r["x"], r["y"], r["z"])
    link = neuroglancer_link(neuroglancer_state(point, (r["id_a"], r["id_b"]),
                                                segmentation_source, image_source, voxel_size_nm),
                             client)
    entries.append({"rank": rank, "id_a": r["id_a"], "id_b": r["id_b"], "x": r["x"], "y": r["y"],
                    "z": r["z"], "score": r["score"], "iou": r.get("iou"), "link": link})

  def cell(v) -> str:
    return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

  lines = [",".join(QUEUE_COLUMNS)] + [",".join(cell(e[c]) for c in QUEUE_COLUMNS)
                                       for e in entries]
  write_text_atomic(csv_path, "\n".join(lines) + "\n")
  rows_html = "\n".join(
      "<tr>" + "".join(f"<td>{html.escape(cell(e[c]))}</td>" for c in QUEUE_COLUMNS[:-1])
      + f'<td><a href="{html.escape(e["link"])}" target="_blank">view</a></td></tr>'
      for e in entries)
  page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>FFN resegmentation: "
          "proofreading queue</title>\n<style>body{font-family:sans-serif}table{border-collapse:"
          "collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style></head>\n"
          f"<body><h1>Proofreading queue ({len(entries)} pairs)</h1>\n<p>Decision points x,y,z in "
          "voxels; score = IoU of the two reconstructions.</p>\n<table><tr>"
          + "".join(f"<th>{c}</th>" for c in QUEUE_COLUMNS) + "</tr>\n" + rows_html
          + "\n</table></body></html>\n")
  write_text_atomic(html_path, page)
