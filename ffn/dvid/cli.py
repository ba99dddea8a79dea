"""``ffn dvid <step>``: a DVID labelmap instance from a segmentation, and an agglomeration's merges.

  ffn dvid info        --server host:8000 --uuid 3f8c --instance segmentation
  ffn dvid new-repo    --server host:8000 --alias fib25          # prints the root UUID
  ffn dvid create      --server host:8000 --uuid 3f8c --instance segmentation [--block_size 64]
  ffn dvid upload      ... --input results/fib25/stitched.h5:seg [--offset x,y,z] [--cluster ...]
  ffn dvid post-merges ... --input merges.csv            # dry run: prints what it would post
  ffn dvid post-merges ... --input merges.csv --apply    # posts; JSONL log of MutationIDs
  ffn dvid mutations | commit --note TEXT | newversion --note TEXT

``--server``, ``--uuid`` and ``--instance`` default to the environment variables ``DVID_SERVER``,
``DVID_UUID`` and ``DVID_INSTANCE``; ``--user`` (``DVID_USER``, else the login name) and ``--app``
go with every request as DVID's ``u=`` and ``app=``. Exit status 0 on success, 2 on bad input or
a refusal by DVID (one line), 1 when an upload's chunks failed.

``run_resegmentation.py post`` and other scripts reuse :func:`add_post_merges_arguments` and
:func:`run_post_merges`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from ffn.errors import FFNError


def _add_connection(parser: argparse.ArgumentParser, instance: bool = True) -> None:
  group = parser.add_argument_group("DVID")
  group.add_argument("--server", default=os.environ.get("DVID_SERVER"),
                     help="host:port or http://host:port (default: $DVID_SERVER)")
  group.add_argument("--uuid", default=os.environ.get("DVID_UUID"),
                     help="node UUID or a unique prefix of it (default: $DVID_UUID)")
  if instance:
    group.add_argument("--instance", default=os.environ.get("DVID_INSTANCE"),
                       help="labelmap instance name (default: $DVID_INSTANCE)")
  group.add_argument("--user", default=os.environ.get("DVID_USER"),
                     help="DVID's u= of every request (default: $DVID_USER, else the login name)")
  group.add_argument("--app", default="ffn", help="DVID's app= of every request (default: ffn)")
  group.add_argument("--timeout_s", type=float, default=120.0,
                     help="read timeout of one request in seconds (default: %(default)s)")
  group.add_argument("--retries", type=int, default=4,
                     help="further tries of a repeatable request after a connection error or a "
                          "5xx answer, with exponential backoff (default: %(default)s)")


def _client(args: argparse.Namespace):
  from ffn.dvid.client import DvidClient
  if args.timeout_s <= 0:
    raise FFNError(f"--timeout_s must be positive, got {args.timeout_s}")
  if args.retries < 0:
    raise FFNError(f"--retries must be >= 0, got {args.retries}")
  return DvidClient(args.server, user=args.user, app=args.app, timeout_s=args.timeout_s,
                    retries=args.retries)


def _need(args: argparse.Namespace, *names: str) -> None:
  for name in names:
    if not getattr(args, name):
      raise FFNError(f"no DVID {name}: give --{name} or set DVID_{name.upper()}")


# ---------------------------------------------------------------------------------- steps

def _add_info(parser: argparse.ArgumentParser) -> None:
  _add_connection(parser)


def _run_info(args: argparse.Namespace) -> int:
  client = _client(args)
  out: dict = {"server": client.server, "server_info": client.server_info()}
  if args.uuid:
    full = client.full_uuid(args.uuid)
    out["node"] = {"uuid": full, "locked": client.node_locked(full)}
    if args.instance:
      info = client.instance_info(full, args.instance)
      extended = info.get("Extended", {})
      out["instance"] = {"name": args.instance, "type": info.get("Base", {}).get("TypeName"),
                         **{k: extended[k] for k in ("BlockSize", "VoxelSize", "MinPoint",
                                                     "MaxPoint") if k in extended}}
  print(json.dumps(out, indent=1))
  return 0


def _add_new_repo(parser: argparse.ArgumentParser) -> None:
  _add_connection(parser, instance=False)
  parser.add_argument("--alias", required=True, help="the repo's alias")
  parser.add_argument("--description", default="", help="the repo's description")


def _run_new_repo(args: argparse.Namespace) -> int:
  print(_client(args).create_repo(args.alias, args.description))
  return 0


def _add_create(parser: argparse.ArgumentParser) -> None:
  _add_connection(parser)
  parser.add_argument("--block_size", type=int, default=64,
                      help="cubic block edge in voxels, a multiple of 16 (default: %(default)s)")
  parser.add_argument("--voxel_size", default="8,8,8",
                      help="voxel size x,y,z in --voxel_units (default: %(default)s)")
  parser.add_argument("--voxel_units", default="nanometers", help="(default: %(default)s)")


def _run_create(args: argparse.Namespace) -> int:
  _need(args, "uuid", "instance")
  if args.block_size < 16 or args.block_size % 16:
    raise FFNError(f"--block_size must be a positive multiple of 16, got {args.block_size}")
  try:
    voxel = [float(v) for v in args.voxel_size.split(",")]
  except ValueError:
    voxel = []
  if len(voxel) != 3 or min(voxel) <= 0:
    raise FFNError(f"--voxel_size: expected three positive numbers x,y,z, got {args.voxel_size!r}")
  client = _client(args)
  client.create_labelmap(args.uuid, args.instance, args.block_size, voxel, args.voxel_units)
  print(json.dumps({"created": args.instance, "uuid": client.full_uuid(args.uuid),
                    "block_size": args.block_size}))
  return 0


def _add_upload(parser: argparse.ArgumentParser) -> None:
  from slurm.executor import add_slurm_arguments
  _add_connection(parser)
  parser.add_argument("--input", required=True,
                      help="label volume: path.h5:dataset, zarr://path, precomputed://path, a "
                           "TensorStore spec or a PNG/TIFF stack")
  parser.add_argument("--offset", default=None,
                      help="where the volume's first voxel goes in DVID, x,y,z (default: the "
                           "volume's voxel_offset_xyz, else 0,0,0)")
  parser.add_argument("--chunk_blocks", type=int, default=2,
                      help="blocks per axis in one raw POST (default: %(default)s: 128^3 voxels, "
                           "16 MiB, with 64^3 blocks)")
  parser.add_argument("--run_dir", default=None,
                      help="chunk records and manifest that make a re-run resume (default: "
                           "<input path>.dvid_upload)")
  parser.add_argument("--num_tasks", type=int, default=16,
                      help="most array tasks (default: %(default)s)")
  parser.add_argument("--retry_failed", action="store_true",
                      help="resubmit the chunks of failed tasks")
  parser.add_argument("--index_timeout_s", type=float, default=600.0,
                      help="how long to wait for DVID's label index after the POSTs (default: "
                           "%(default)s)")
  add_slurm_arguments(parser)


def _run_upload(args: argparse.Namespace) -> int:
  from ffn.axes import parse_xyz
  from ffn.dvid.upload import upload
  from slurm.executor import SlurmOptions
  _need(args, "uuid", "instance")
  if args.num_tasks < 1:
    raise FFNError(f"--num_tasks must be at least 1, got {args.num_tasks}")
  options = SlurmOptions.from_args(args)
  offset = parse_xyz(args.offset, "--offset") if args.offset is not None else None
  summary = upload(_client(args), args.uuid, args.instance, args.input, args.run_dir, options,
                   offset, args.chunk_blocks, args.num_tasks, args.retry_failed,
                   args.index_timeout_s)
  print(json.dumps(summary))
  return 0


def add_post_merges_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags of ``ffn dvid post-merges`` (for other commands that post merges)."""
  from ffn.dvid.merges import TARGET_POLICIES
  _add_connection(parser)
  parser.add_argument("--input", required=True,
                      help="merges made (CSV or .npy with id_a,id_b[,...] in neuclease's layout; "
                           "every row is merged, so not a table of all candidate pairs) or a "
                           "supervoxel -> body mapping (columns supervoxel,body or sv,body)")
  parser.add_argument("--apply", action="store_true",
                      help="post the merges (default: a dry run that prints what it would post)")
  parser.add_argument("--target", choices=TARGET_POLICIES, default="largest",
                      help="each merge's target: the largest of the body's current DVID bodies, "
                           "or (table) the input's body id when it is one of them (default: "
                           "%(default)s)")
  parser.add_argument("--log", default=None,
                      help="JSONL log of the posted merges and their MutationIDs, appended "
                           "(default: <input>.merges.jsonl)")
  parser.add_argument("--batch_size", type=int, default=10000,
                      help="labels per mapping / sizes query (default: %(default)s)")
  parser.add_argument("--sample", type=int, default=5,
                      help="merges shown by the dry run (default: %(default)s)")


def run_post_merges(args: argparse.Namespace) -> int:
  """``ffn dvid post-merges`` on parsed :func:`add_post_merges_arguments` flags; 0 on success."""
  from ffn.dvid.merges import apply_merges, describe, plan_merges, read_merges
  _need(args, "uuid", "instance")
  merges = read_merges(args.input)
  client = _client(args)
  plan = plan_merges(client, args.uuid, args.instance, merges, args.target, args.batch_size)
  for line in describe(plan, max(0, args.sample)):
    print(line)
  if not args.apply:
    locked = client.node_locked(plan.uuid)
    note = f"; note: node {plan.uuid} is committed, so --apply would be refused" if locked else ""
    print(f"dry run: nothing posted; add --apply to post the {len(plan.merges)} merges{note}")
    return 0
  log = args.log or f"{args.input}.merges.jsonl"
  summary = apply_merges(client, plan, log, args.batch_size)
  print(json.dumps(summary))
  return 0


def _add_mutations(parser: argparse.ArgumentParser) -> None:
  _add_connection(parser)


def _run_mutations(args: argparse.Namespace) -> int:
  _need(args, "uuid", "instance")
  for record in _client(args).mutations(args.uuid, args.instance):
    print(json.dumps(record))
  return 0


def _add_note(parser: argparse.ArgumentParser) -> None:
  _add_connection(parser, instance=False)
  parser.add_argument("--note", required=True, help="the node's note")


def _run_commit(args: argparse.Namespace) -> int:
  _need(args, "uuid")
  print(_client(args).commit(args.uuid, args.note))
  return 0


def _run_newversion(args: argparse.Namespace) -> int:
  _need(args, "uuid")
  print(_client(args).newversion(args.uuid, args.note))
  return 0


STEPS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                       Callable[[argparse.Namespace], int], str]] = {
    "info": (_add_info, _run_info, "server, node (committed?) and instance info"),
    "new-repo": (_add_new_repo, _run_new_repo, "create a repo; prints its root UUID"),
    "create": (_add_create, _run_create, "create a labelmap instance"),
    "upload": (_add_upload, _run_upload,
               "upload a label volume as supervoxels (block-aligned raw POSTs, resumable job), "
               "then wait for DVID's label index"),
    "post-merges": (add_post_merges_arguments, run_post_merges,
                    "post a merge table / supervoxel->body mapping as one merge per body (dry run "
                    "unless --apply; idempotent; JSONL log of MutationIDs)"),
    "mutations": (_add_mutations, _run_mutations, "the node's mutations of the instance (JSONL)"),
    "commit": (_add_note, _run_commit, "commit (lock) a node"),
    "newversion": (_add_note, _run_newversion, "create an open child of a committed node"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="step", metavar="STEP", required=True)
  for name, (add, _, help_text) in STEPS.items():
    aliases = [name.replace("-", "_")] if "-" in name else []
    add(sub.add_parser(name, aliases=aliases, help=help_text, description=help_text))


def run(args: argparse.Namespace) -> int:
  return STEPS[args.step.replace("_", "-")][1](args)


if __name__ == "__main__":
  from ffn.cli import main
  sys.exit(main(["dvid"] + sys.argv[1:]))
