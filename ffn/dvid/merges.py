"""``ffn dvid post-merges``: an agglomeration's merges as DVID ``merge`` requests, safely.

Input (:func:`read_merges`): a CSV with a header, or a ``.npy`` structured array, either
* a merge table in neuclease's layout: columns ``id_a, id_b`` (supervoxel pairs; any further
  columns such as ``xa, ya, za, xb, yb, zb, score`` are ignored): each connected set of
  supervoxels is one body; or
* a supervoxel -> body mapping: columns ``supervoxel, body`` (or ``sv, body``, as ``ffn.reseg``
  and neuclease name them).
Ids are non-negative integers, never 0; a supervoxel given two bodies is an error. Every row of a
merge table is a merge: give the merges made (``ffn.reseg``'s ``merges.csv``) or the mapping, not
a table of all scored candidate pairs.

Plan (:func:`plan_merges`, nothing posted): the current body of every supervoxel involved is read
from DVID (``GET mapping``, in batches). A supervoxel DVID does not know (mapping 0) stops
everything, as does a DVID body that already joins supervoxels of two bodies of the input (merges
cannot separate them). A body whose supervoxels DVID already has as one body is skipped; each
other body is one merge ``[target, others...]`` of its distinct current DVID bodies, the target
being the largest of them (``target="table"``: the input's body id when it is one of them).

Apply (:func:`apply_merges`): refuses a committed (locked) node; posts the merges one by one,
appending a JSONL record per merge (MutationID, target, merged bodies, group, time) and flushing
it to disk before the next; a merge whose answer was lost (connection error, timeout, 5xx) is
looked up in the mapping (and its MutationID in ``GET mutations``) before it is ever posted
again, so a crash or a kill at any point and a re-run of the same command end in the same state
with one merge per body and no duplicate or failed merge. A re-run also logs, from ``GET
mutations``, the merge of a body whose answer it never recorded. Last, the mapping of every
supervoxel is read again and checked against the input.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

import numpy as np

from ffn.dvid.client import DvidClient, DvidError
from ffn.errors import FFNError
from ffn.io.atomic import check_writable_dir
from ffn.progress import Progress

_log = logging.getLogger(__name__)

MERGE_COLUMNS = ("id_a", "id_b")
MAPPING_COLUMNS = ("supervoxel", "body")
ALIASES = {"sv": "supervoxel"}
TARGET_POLICIES = ("largest", "table")
MERGE_ATTEMPTS = 3  # posts of one merge whose answers were lost (each checked first)


@dataclasses.dataclass
class MergeInput:
  """Bodies of an agglomeration: ``groups[i]`` the sorted supervoxels (uint64) of body i,
  ``bodies[i]`` its id in the input (mapping input) or None (merge table)."""
  path: str
  kind: str  # "merge table" | "mapping"
  rows: int
  groups: list[np.ndarray]
  bodies: list[int | None]

  @property
  def supervoxels(self) -> np.ndarray:
    return np.concatenate(self.groups) if self.groups else np.zeros(0, np.uint64)


def _column_arrays(path: str) -> tuple[dict[str, np.ndarray], int]:
  """{column: uint64 array} of the id columns of a CSV or structured .npy, and the row count."""
  wanted = MERGE_COLUMNS + MAPPING_COLUMNS + tuple(ALIASES)
  if path.lower().endswith(".npy"):
    try:
      table = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise FFNError(f"{path}: not a readable .npy array ({e})") from None
    names = table.dtype.names or ()
    columns = {}
    for name in names:
      if name in wanted:
        values = table[name]
        if values.dtype.kind not in "ui":
          raise FFNError(f"{path}: column {name!r} has dtype {values.dtype.name}, expected "
                         "integers")
        if values.size and values.min() < 0:
          raise FFNError(f"{path}: column {name!r} has a negative id ({values.min()})")
        columns[ALIASES.get(name, name)] = values.astype(np.uint64)
    if not names:
      raise FFNError(f"{path}: expected a structured array with fields id_a, id_b or "
                     "supervoxel, body")
    return columns, len(table)
  try:
    handle = open(path, newline="")
  except OSError as e:
    raise FFNError(f"{path}: cannot read the merge table ({e.strerror})") from None
  with handle:
    reader = csv.reader(handle)
    header = next(reader, None)
    if header is None:
      raise FFNError(f"{path}: empty file (expected a header: id_a,id_b or supervoxel,body)")
    header = [ALIASES.get(h.strip(), h.strip()) for h in header]
    index = {name: header.index(name) for name in wanted if name in header}
    if not index:
      raise FFNError(f"{path}: header {','.join(header)!r} has neither id_a,id_b nor "
                     "supervoxel,body")
    values: dict[str, list[int]] = {name: [] for name in index}
    rows = 0
    for line, row in enumerate(reader, start=2):
      if not row or not any(cell.strip() for cell in row):
        continue
      rows += 1
      for name, i in index.items():
        text = row[i].strip() if i < len(row) else ""
        if not text.isdigit():
          raise FFNError(f"{path}: line {line}: column {name!r}: {text!r} is not a "
                         "non-negative integer id")
        values[name].append(int(text))
  try:
    return {name: np.array(v, np.uint64) for name, v in values.items()}, rows
  except OverflowError:
    raise FFNError(f"{path}: an id does not fit in uint64") from None


def read_merges(path: str | os.PathLike) -> MergeInput:
  """Reads a merge table or a supervoxel -> body mapping (module docstring); FFNError naming
  the file and the problem for anything else."""
  path = str(path)
  if not os.path.exists(path):
    raise FFNError(f"{path}: file not found")
  columns, rows = _column_arrays(path)
  if all(c in columns for c in MAPPING_COLUMNS):
    kind, (a, b) = "mapping", (columns["supervoxel"], columns["body"])
  elif all(c in columns for c in MERGE_COLUMNS):
    kind, (a, b) = "merge table", (columns["id_a"], columns["id_b"])
  else:
    raise FFNError(f"{path}: needs columns id_a and id_b (merge table) or supervoxel and body "
                   f"(mapping); found {', '.join(sorted(columns)) or 'neither'}")
  if rows == 0:
    raise FFNError(f"{path}: no rows")
  names = MAPPING_COLUMNS if kind == "mapping" else MERGE_COLUMNS
  for name, values in zip(names, (a, b)):
    zero = np.flatnonzero(values == 0)
    if zero.size:
      raise FFNError(f"{path}: row {zero[0] + 1}: {name} is 0 (the background label is never a "
                     "supervoxel or body)")
  if kind == "mapping":
    order = np.argsort(a, kind="stable")
    sv, body = a[order], b[order]
    same = np.flatnonzero((sv[1:] == sv[:-1]) & (body[1:] != body[:-1]))
    if same.size:
      i = same[0]
      raise FFNError(f"{path}: supervoxel {sv[i]} is given two bodies ({body[i]} and "
                     f"{body[i + 1]})")
    pairs = np.unique(np.stack([body, sv], axis=1), axis=0)
    bodies, starts = np.unique(pairs[:, 0], return_index=True)
    groups = np.split(pairs[:, 1], starts[1:])
    return MergeInput(path, kind, rows, [g.astype(np.uint64) for g in groups],
                      [int(x) for x in bodies])
  from scipy.sparse import coo_matrix
  from scipy.sparse.csgraph import connected_components
  ids, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
  n = len(a)
  graph = coo_matrix((np.ones(n, np.int8), (inverse[:n], inverse[n:])), shape=(len(ids),) * 2)
  _, component = connected_components(graph, directed=False)
  order = np.argsort(component, kind="stable")
  _, starts = np.unique(component[order], return_index=True)
  groups = [np.sort(ids[g]).astype(np.uint64) for g in np.split(order, starts[1:])]
  groups.sort(key=lambda g: int(g[0]))
  return MergeInput(path, kind, rows, groups, [None] * len(groups))


@dataclasses.dataclass
class Merge:
  """One merge: body ``group`` of the input; ``target`` <- ``others`` (DVID bodies now)."""
  group: int
  table_body: int | None
  target: int
  others: list[int]
  supervoxels: np.ndarray
  voxels: int


@dataclasses.dataclass
class Plan:
  input: MergeInput
  server: str
  uuid: str
  instance: str
  merges: list[Merge]
  done_groups: list[tuple[int, int]]  # (group, its one DVID body) for multi-supervoxel groups
  supervoxels: int


def _batched(client_call, values: Sequence[int], batch: int, desc: str | None = None) -> list[int]:
  out: list[int] = []
  progress = Progress(len(values), desc, unit="label") if desc and len(values) > batch else None
  for i in range(0, len(values), batch):
    chunk = [int(v) for v in values[i:i + batch]]
    out.extend(int(v) for v in client_call(chunk))
    if progress is not None:
      progress.update(len(chunk))
  if progress is not None:
    progress.close()
  return out


def plan_merges(client: DvidClient, uuid: str, instance: str, merges: MergeInput,
                target: str = "largest", batch: int = 10000) -> Plan:
  """The merges still to post (module docstring); FFNError when the input does not fit DVID."""
  if target not in TARGET_POLICIES:
    raise FFNError(f"--target {target!r}: expected one of {', '.join(TARGET_POLICIES)}")
  if batch < 1:
    raise FFNError(f"--batch_size must be at least 1, got {batch}")
  client.labelmap_info(uuid, instance)
  full = client.full_uuid(uuid)
  svs = merges.supervoxels
  group_of = np.repeat(np.arange(len(merges.groups)), [len(g) for g in merges.groups])
  current = np.array(_batched(lambda c: client.mapping(full, instance, c), svs, batch,
                              "reading DVID's mapping"), np.uint64)
  absent = np.flatnonzero(current == 0)
  if absent.size:
    shown = ", ".join(str(int(s)) for s in svs[absent[:5]])
    raise FFNError(f"{merges.path}: {absent.size} of {len(svs)} supervoxels are not in DVID "
                   f"{client.server} node {full} instance {instance!r} (mapping 0), e.g. {shown}: "
                   "another node or instance, or an upload whose indexing has not finished")
  pairs = np.unique(np.stack([current, group_of.astype(np.uint64)], axis=1), axis=0)
  split = np.flatnonzero(pairs[1:, 0] == pairs[:-1, 0])
  if split.size:
    body = int(pairs[split[0], 0])
    groups = [int(g) for g in pairs[pairs[:, 0] == body, 1][:2]]
    names = [merges.bodies[g] if merges.bodies[g] is not None else f"#{g}" for g in groups]
    examples = [int(svs[(current == body) & (group_of == g)][0]) for g in groups]
    raise FFNError(f"{merges.path}: DVID body {body} already holds supervoxels of two bodies "
                   f"of the input ({names[0]}: supervoxel {examples[0]}, {names[1]}: supervoxel "
                   f"{examples[1]}); merges cannot separate them (cleave that body in DVID first)")
  bounds = np.cumsum([0] + [len(g) for g in merges.groups])
  todo: list[tuple[int, list[int]]] = []
  done: list[tuple[int, int]] = []
  for i in range(len(merges.groups)):
    bodies = sorted({int(b) for b in current[bounds[i]:bounds[i + 1]]})
    if len(bodies) > 1:
      todo.append((i, bodies))
    elif len(merges.groups[i]) > 1:
      done.append((i, bodies[0]))
  all_bodies = sorted({b for _, bodies in todo for b in bodies})
  size = dict(zip(all_bodies, _batched(lambda c: client.sizes(full, instance, c), all_bodies,
                                       batch, "reading body sizes")))
  planned = []
  for i, bodies in todo:
    table_body = merges.bodies[i]
    if target == "table" and table_body in bodies:
      chosen = int(table_body)
    else:
      chosen = max(bodies, key=lambda b: (size[b], -b))
    planned.append(Merge(i, table_body, chosen, [b for b in bodies if b != chosen],
                         merges.groups[i], int(sum(size[b] for b in bodies))))
  return Plan(merges, client.server, full, instance, planned, done, len(svs))


def describe(plan: Plan, sample: int = 5) -> list[str]:
  """Lines saying what :func:`apply_merges` would post."""
  merges = plan.input
  multi = sum(len(g) > 1 for g in merges.groups)
  lines = [f"{merges.path} ({merges.kind}, {merges.rows} rows): {len(merges.groups)} bodies over "
           f"{plan.supervoxels} supervoxels ({multi} with more than one); DVID {plan.server} node "
           f"{plan.uuid} instance {plan.instance!r}: {len(plan.done_groups)} already one body, "
           f"{len(plan.merges)} merges to post ({sum(len(m.others) for m in plan.merges)} bodies "
           f"into {len(plan.merges)} targets, {sum(m.voxels for m in plan.merges)} voxels)"]
  for m in plan.merges[:sample]:
    name = f"body {m.table_body}" if m.table_body is not None else f"body #{m.group}"
    shown = ", ".join(map(str, m.others[:8])) + (f" and {len(m.others) - 8} more"
                                                 if len(m.others) > 8 else "")
    lines.append(f"  {name}: merge [{m.target}, {shown}] ({len(m.supervoxels)} supervoxels, "
                 f"{m.voxels} voxels)")
  if len(plan.merges) > sample:
    lines.append(f"  ... and {len(plan.merges) - sample} more")
  return lines


class MergeLog:
  """The JSONL log: one record per merge, appended and flushed to disk as it is written."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    check_writable_dir(self.path)
    self._cut = False
    self.records = self._read()
    try:
      self._file: TextIO = open(self.path, "a")
    except OSError as e:
      raise FFNError(f"{self.path}: cannot write the merge log ({e.strerror})") from None
    if self._cut:
      self._file.write("\n")  # the cut-off line stays, ignored, on a line of its own

  def _read(self) -> list[dict[str, Any]]:
    if not self.path.exists():
      return []
    text = self.path.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except ValueError:
        if number == len(lines) and not text.endswith("\n"):  # cut off by a crash: ignored
          _log.warning("%s: last line is incomplete (a crash while writing it); ignored", self.path)
          self._cut = True
          continue
        raise FFNError(f"{self.path}: line {number} is not JSON; is this a merge log?") from None
    return records

  def logged_targets(self, server: str, uuid: str, instance: str) -> set[int]:
    return {int(r["target"]) for r in self.records if r.get("server") == server
            and r.get("uuid") == uuid and r.get("instance") == instance and "target" in r}

  def write(self, record: dict[str, Any]) -> None:
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())
    self.records.append(record)

  def close(self) -> None:
    self._file.close()


def _record(plan: Plan, merge: Merge, mutation_id: int | None,
            recovered: bool) -> dict[str, Any]:
  record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "server": plan.server,
            "uuid": plan.uuid, "instance": plan.instance, "input": plan.input.path,
            "group": merge.group, "table_body": merge.table_body, "target": merge.target,
            "merged": merge.others, "supervoxels": len(merge.supervoxels),
            "voxels": merge.voxels, "mutation_id": mutation_id}
  if recovered:
    record["recovered"] = True  # the answer was lost; the MutationID is from GET mutations
  return record


def _find_mutation(mutations: Iterable[dict[str, Any]], target: int,
                   labels: Iterable[int]) -> dict[str, Any] | None:
  """DVID's record of the latest merge into ``target`` whose merged labels are all in
  ``labels`` (None: no such merge)."""
  allowed = {int(v) for v in labels}
  found = None
  for m in mutations:
    if (m.get("Action") == "merge" and int(m.get("Target", -1)) == target
        and {int(v) for v in m.get("Labels", [])} <= allowed):
      found = m
  return found


def _one_body(client: DvidClient, plan: Plan, merge: Merge, batch: int) -> bool:
  bodies = set(_batched(lambda c: client.mapping(plan.uuid, plan.instance, c), merge.supervoxels,
                        batch))
  return bodies == {merge.target}


def _post(client: DvidClient, plan: Plan, merge: Merge, log: MergeLog, batch: int) -> None:
  """Posts one merge and logs it; a lost answer is resolved from the mapping before any repost."""
  for attempt in range(MERGE_ATTEMPTS):
    try:
      mutation = client.merge(plan.uuid, plan.instance, merge.target, merge.others)
    except DvidError as e:
      if e.status is not None and e.status < 500:
        name = merge.table_body or f"#{merge.group}"
        raise FFNError(f"DVID refused the merge of body {name} [{merge.target}, ...]: {e}; the "
                       f"merges before it are in {log.path}, "
                       "run the same command again to re-plan from DVID's state") from None
      _log.warning("merge into %d: no answer (%s); checking whether DVID applied it",
                   merge.target, e)
      for check in range(2):  # the second look gives a merge still running time to finish
        if check:
          time.sleep(min(30.0, client.backoff_s * 2 ** attempt))
        if _one_body(client, plan, merge, batch):
          found = _find_mutation(client.mutations(plan.uuid, plan.instance), merge.target,
                                 merge.others)
          log.write(_record(plan, merge, None if found is None else int(found["MutationID"]),
                            recovered=True))
          return
      continue
    log.write(_record(plan, merge, mutation, recovered=False))
    return
  raise FFNError(f"DVID {client.server}: the merge into {merge.target} got no answer "
                 f"{MERGE_ATTEMPTS} times and is not applied; the merges before it are in "
                 f"{log.path}; run the same command again when the server answers")


def apply_merges(client: DvidClient, plan: Plan, log_path: str | os.PathLike,
                 batch: int = 10000) -> dict[str, Any]:
  """Posts ``plan``'s merges (module docstring); returns counts. FFNError on a committed node,
  a refused merge, or a final mapping that differs from the input."""
  if client.node_locked(plan.uuid):
    raise FFNError(f"DVID {client.server}: node {plan.uuid} is committed (locked) and takes no "
                   "merges; post them to an open child (`ffn dvid newversion`)")
  log = MergeLog(log_path)
  recovered = 0
  try:
    logged = log.logged_targets(plan.server, plan.uuid, plan.instance)
    unlogged = [(g, body) for g, body in plan.done_groups if body not in logged]
    if unlogged:  # merged by an earlier run whose record was lost (killed before writing it)
      mutations = client.mutations(plan.uuid, plan.instance)
      sizes = dict(zip([b for _, b in unlogged], _batched(
          lambda c: client.sizes(plan.uuid, plan.instance, c), [b for _, b in unlogged], batch)))
      for g, body in unlogged:
        svs = plan.input.groups[g]
        found = _find_mutation(mutations, body, svs)
        if found is not None:
          merge = Merge(g, plan.input.bodies[g], body, [int(v) for v in found["Labels"]], svs,
                        sizes[body])
          log.write(_record(plan, merge, int(found["MutationID"]), recovered=True))
          recovered += 1
    with Progress(len(plan.merges), "merges", unit="merge", log_every_s=10.0) as progress:
      for merge in plan.merges:
        _post(client, plan, merge, log, batch)
        progress.update()
  finally:
    log.close()
  final = np.array(_batched(lambda c: client.mapping(plan.uuid, plan.instance, c),
                            plan.input.supervoxels, batch), np.uint64)
  bounds = np.cumsum([0] + [len(g) for g in plan.input.groups])
  bodies = [set(final[bounds[i]:bounds[i + 1]].tolist()) for i in range(len(plan.input.groups))]
  wrong = [i for i, b in enumerate(bodies) if len(b) != 1 or 0 in b]
  if wrong or len({next(iter(b)) for b in bodies}) != len(bodies):
    raise FFNError(f"DVID {client.server}: after the merges the mapping differs from "
                   f"{plan.input.path} ({len(wrong)} bodies split; or two bodies joined): "
                   "something else changed the node meanwhile")
  return {"posted": len(plan.merges), "already_one_body": len(plan.done_groups),
          "recovered_from_mutations": recovered, "log": str(log.path),
          "verified_supervoxels": int(len(final))}
