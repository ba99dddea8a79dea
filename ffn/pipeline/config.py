"""The pipeline's TOML file (``configs/pipeline_example.toml`` documents every key).

:func:`load_config` reads it with the standard library's ``tomllib`` and checks every key against
:data:`SCHEMA`: an unknown section or key, a wrong type or a value out of range is one
:class:`~ffn.errors.FFNError` naming ``<file>: <section>.<key>``. Missing keys take their
defaults. The result is a plain dict ``{section: {key: value}}`` (JSON-able, so it can be
fingerprinted and stored in ``plan.json``); coordinates and sizes stay x,y,z lists as written.
Relative paths are relative to the current directory (like every other ``ffn`` command) and are
made absolute here.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

from ffn.errors import FFNError

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
CLUSTERS = ("auto", "slurm", "local", "debug")


@dataclasses.dataclass(frozen=True)
class Field:
  """One key: ``kind`` is str | path | int | float | bool | xyz (3 ints) | xyzf (3 floats) |
  lines (list of str) | choice; ``minimum`` bounds numbers (and each x,y,z value)."""
  kind: str
  default: Any = None
  minimum: float | None = None
  choices: tuple[str, ...] = ()
  required: bool = False


_RESOURCES = {
    "cpus": Field("int", None, 1), "mem_gb": Field("float", None, 0.001),
    "gpus": Field("int", None, 0), "time_min": Field("int", None, 1),
    "partition": Field("str"), "num_tasks": Field("int", None, 1),
}

SCHEMA: dict[str, dict[str, Field]] = {
    "run": {"run_dir": Field("path", required=True), "cluster": Field("choice", "auto",
                                                                      choices=CLUSTERS),
            "job_name": Field("str", "ffn-pipeline"), "account": Field("str"),
            "qos": Field("str"), "setup": Field("lines", []),
            "array_parallelism": Field("int", None, 1)},
    "image": {"spec": Field("str", required=True), "mean": Field("float"),
              "stddev": Field("float", None, 1e-9)},
    "groundtruth": {"spec": Field("str")},
    "model": {"checkpoint": Field("path", required=True), "model_name": Field("str"),
              "model_args": Field("str")},
    "region": {"start": Field("xyz", [0, 0, 0], 0), "size": Field("xyz", None, 1)},
    "chunking": {"subvolume_size": Field("xyz", None, 1), "overlap": Field("xyz", [0, 0, 0], 0)},
    "inference": {"request": Field("path", required=True),
                  "compute_dtype": Field("choice", "float32", choices=COMPUTE_DTYPES),
                  "batch_size": Field("int", 1, 1), "concurrent_requests": Field("int", 1, 1),
                  "reverse": Field("bool", False), "split_min_size": Field("int", None, 0)},
    "stitch": {"min_agreement": Field("float", 0.5, 1e-9), "min_overlap": Field("int", 100, 1),
               "block_size": Field("xyz", [64, 64, 64], 1),
               "chunk_size": Field("xyz", [64, 64, 64], 1)},
    "reseg": {"enabled": Field("bool", True), "radius": Field("xyz", [24, 24, 24], 1),
              "analysis_radius": Field("xyz", None, 0),
              "compute_dtype": Field("choice", None, choices=COMPUTE_DTYPES),
              "points_per_item": Field("int", 16, 1), "min_size": Field("int", 0, 0),
              "min_area": Field("int", 0, 0), "max_retry_iters": Field("int", 1, 1),
              "segment_recovery_fraction": Field("float", 0.0, 0.0),
              "voxel_size": Field("xyzf", [1.0, 1.0, 1.0], 1e-9),
              "threshold": Field("float", 0.5, 0.0)},
    "agglomerate": {"iou_threshold": Field("float", 0.8, 0.0),
                    "consistency_threshold": Field("float", 0.6, 0.0),
                    "deleted_threshold": Field("float", 0.02, 0.0),
                    "score_threshold": Field("float", None, 0.0)},
    "export": {"h5": Field("bool", True), "precomputed": Field("bool", True),
               "preview": Field("bool", True), "resolution": Field("xyzf", [10.0, 10.0, 10.0], 1e-9)},
    "dvid": {"server": Field("str"), "uuid": Field("str"), "instance": Field("str"),
             "upload": Field("bool", True), "apply": Field("bool", False)},
    "resources": {},  # sub-tables: gpu, cpu, and one per stage (see RESOURCE_TABLES)
}
# [resources.gpu] applies to the GPU stages, [resources.cpu] to the others; [resources.<stage>]
# overrides either for one stage.
GPU_STAGES = ("inference", "reseg_run")
STAGE_NAMES = ("inference", "consensus", "stitch", "reseg_pairs", "reseg_run", "reseg_analyze",
               "agglomerate", "export", "dvid", "report")
RESOURCE_TABLES = ("gpu", "cpu") + STAGE_NAMES
RESOURCE_DEFAULTS = {"gpu": {"cpus": 2, "mem_gb": 4.0, "gpus": 0, "time_min": 120},
                     "cpu": {"cpus": 1, "mem_gb": 2.0, "gpus": 0, "time_min": 60}}


def _type_error(where: str, expected: str, value: Any) -> FFNError:
  return FFNError(f"{where}: expected {expected}, got {value!r}")


def _check(where: str, field: Field, value: Any) -> Any:
  """The checked value of one key (FFNError naming ``where`` otherwise)."""
  kind = field.kind
  if kind in ("str", "path"):
    if not isinstance(value, str) or not value:
      raise _type_error(where, "a non-empty string", value)
    return os.path.abspath(value) if kind == "path" else value
  if kind == "choice":
    if value not in field.choices:
      raise _type_error(where, f"one of {', '.join(field.choices)}", value)
    return value
  if kind == "bool":
    if not isinstance(value, bool):
      raise _type_error(where, "true or false", value)
    return value
  if kind == "lines":
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
      raise _type_error(where, "a list of strings", value)
    return list(value)
  if kind in ("int", "float"):
    ok = isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
      ok = ok or isinstance(value, float)
    if not ok:
      raise _type_error(where, "an integer" if kind == "int" else "a number", value)
    if field.minimum is not None and value < field.minimum:
      raise FFNError(f"{where}: must be >= {field.minimum:g}, got {value!r}")
    return float(value) if kind == "float" else int(value)
  if kind in ("xyz", "xyzf"):
    number = (int,) if kind == "xyz" else (int, float)
    if (not isinstance(value, list) or len(value) != 3
        or not all(isinstance(v, number) and not isinstance(v, bool) for v in value)):
      raise _type_error(where, f"[x, y, z] of three {'integers' if kind == 'xyz' else 'numbers'}",
                        value)
    if field.minimum is not None and min(value) < field.minimum:
      raise FFNError(f"{where}: every value must be >= {field.minimum:g}, got {value!r}")
    return [int(v) if kind == "xyz" else float(v) for v in value]
  raise AssertionError(kind)


def _section(path: str, name: str, table: Any, fields: dict[str, Field]) -> dict[str, Any]:
  if not isinstance(table, dict):
    raise FFNError(f"{path}: [{name}] must be a table, got {table!r}")
  for key in table:
    if key not in fields:
      raise FFNError(f"{path}: {name}.{key}: unknown key (known: {', '.join(fields)})")
  out = {}
  for key, field in fields.items():
    if key in table:
      out[key] = _check(f"{path}: {name}.{key}", field, table[key])
    elif field.required:
      raise FFNError(f"{path}: {name}.{key}: required key missing")
    else:
      out[key] = copy.deepcopy(field.default)
  return out


def check_config(data: dict[str, Any], path: str = "pipeline.toml") -> dict[str, Any]:
  """Checks a parsed TOML document; returns every section with defaults filled in. Sections
  ``groundtruth`` and ``dvid`` are None when absent (``dvid`` needs server, uuid, instance)."""
  for name in data:
    if name not in SCHEMA:
      raise FFNError(f"{path}: [{name}]: unknown section (known: {', '.join(SCHEMA)})")
  config: dict[str, Any] = {}
  for name, fields in SCHEMA.items():
    if name == "resources":
      continue
    if name in ("groundtruth", "dvid") and name not in data:
      config[name] = None
      continue
    config[name] = _section(path, name, data.get(name, {}), fields)
  if config["groundtruth"] is not None and config["groundtruth"]["spec"] is None:
    raise FFNError(f"{path}: groundtruth.spec: required key missing (or drop [groundtruth])")
  if config["dvid"] is not None:
    for key in ("server", "uuid", "instance"):
      if config["dvid"][key] is None:
        raise FFNError(f"{path}: dvid.{key}: required key missing (or drop [dvid])")
  resources = data.get("resources", {})
  if not isinstance(resources, dict):
    raise FFNError(f"{path}: [resources] must be a table of tables, got {resources!r}")
  config["resources"] = {}
  for name, table in resources.items():
    if name not in RESOURCE_TABLES:
      raise FFNError(f"{path}: resources.{name}: unknown table (known: "
                     f"{', '.join(RESOURCE_TABLES)})")
    checked = _section(path, f"resources.{name}", table, _RESOURCES)
    config["resources"][name] = {k: v for k, v in checked.items() if v is not None}
  if name_ := next((k for k in ("gpu", "cpu") if "num_tasks" in config["resources"].get(k, {})),
                   None):
    raise FFNError(f"{path}: resources.{name_}.num_tasks: give num_tasks per stage "
                   "([resources.<stage>])")
  return config


def load_config(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
  """(checked config, the file's text). Raises FFNError for an unreadable or invalid file."""
  path = str(path)
  try:
    text = Path(path).read_text()
  except OSError as e:
    raise FFNError(f"{path}: cannot read the pipeline config ({e.strerror or e})") from None
  try:
    data = tomllib.loads(text)
  except tomllib.TOMLDecodeError as e:
    raise FFNError(f"{path}: not valid TOML ({e})") from None
  return check_config(data, path), text


def stage_resources(config: dict[str, Any], stage: str) -> dict[str, Any]:
  """cpus, mem_gb, gpus, time_min, partition, num_tasks (None: the plan's default) of a stage."""
  kind = "gpu" if stage in GPU_STAGES else "cpu"
  out: dict[str, Any] = {"partition": None, "num_tasks": None, **RESOURCE_DEFAULTS[kind]}
  out.update(config["resources"].get(kind, {}))
  out.update(config["resources"].get(stage, {}))
  return out
