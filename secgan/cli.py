"""``ffn secgan train|transfer|slurm_train``: SECGAN domain transfer (see :mod:`secgan`).

* ``train``: one process; exit 0 at ``--max_steps``, 3 after SIGTERM (checkpoint saved: run the
  same command again to resume), 2 on an input error. SIGUSR1 saves a checkpoint and continues.
* ``transfer``: F over a whole volume as blocks of one job array (``--cluster debug`` runs them in
  this process), then the output; rerun to resume. Exit 1 if blocks failed.
* ``slurm_train``: ``train`` as one Slurm job (submitit), requeued on preemption (:mod:`secgan.slurm`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from ffn.axes import parse_xyz, xyz_to_zyx
from ffn.errors import FFNError

SUBCOMMANDS = ("train", "transfer", "slurm_train")


def _xyz(text: str) -> tuple[int, int, int]:
  try:
    return parse_xyz(text)
  except FFNError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags of ``ffn secgan train`` (also taken by ``slurm_train``)."""
  from ffn.training.cli import _axes
  from ffn.training.optimizer_names import OPTIMIZERS
  req = parser.add_argument_group("data (required)")
  req.add_argument("--labeled_volume", action="append", required=True, dest="labeled_volumes",
                   help="uint8 volume spec (path.h5:dataset, slices, TIFF) of the appearance the "
                        "FFN knows; repeatable")
  req.add_argument("--unlabeled_volume", action="append", required=True, dest="unlabeled_volumes",
                   help="uint8 volume spec of the new appearance to transfer from; repeatable")
  req.add_argument("--train_dir", required=True, help="checkpoints, summaries, secgan_flags.json")
  ffn = parser.add_argument_group("frozen FFN (segmentation discriminator D_S)")
  ffn.add_argument("--ffn_checkpoint", default=None,
                   help="any checkpoint ffn.models.load reads; omitted: plain CycleGAN (no D_S)")
  ffn.add_argument("--ffn_model_name", default=None, help="default: from its train_flags.json")
  ffn.add_argument("--ffn_model_args", default=None,
                   help='JSON (x,y,z), e.g. \'{"depth": 12, "fov_size": [33, 33, 33], '
                        '"deltas": [8, 8, 8]}\'; default: from its train_flags.json')
  ffn.add_argument("--image_mean", type=float, default=128.0, help="the FFN's (default: 128)")
  ffn.add_argument("--image_stddev", type=float, default=33.0, help="the FFN's (default: 33)")
  net = parser.add_argument_group("networks")
  net.add_argument("--fov_size", type=_xyz, default=(33, 33, 33),
                   help="x,y,z of what discriminators and the FFN see (default: 33,33,33); "
                        "crops read are this + 8 x generator_depth")
  net.add_argument("--generator_depth", type=int, default=8, help="residual modules (default: 8)")
  net.add_argument("--generator_channels", type=int, default=32, help="default: 32")
  net.add_argument("--discriminator", choices=("resnet", "conv"), default="resnet",
                   help="resnet: ResNet-18-style with instance norm; conv: plain (default: resnet)")
  net.add_argument("--discriminator_channels", type=int, default=64,
                   help="channels of the first stage/convolution, doubling after (default: 64)")
  net.add_argument("--discriminator_depth", type=int, default=4,
                   help="resnet: stages of 2 blocks; conv: convolutions (default: 4)")
  loss = parser.add_argument_group("losses")
  loss.add_argument("--cycle_l_lambda", type=float, default=2.5, help="L -> U -> L cycle weight")
  loss.add_argument("--cycle_u_lambda", type=float, default=0.5, help="U -> L -> U cycle weight")
  loss.add_argument("--generator_lambda", type=float, default=1.0, help="adversarial weight")
  loss.add_argument("--seg_lambda", type=float, default=1.0,
                    help="weight of D_S's adversarial term on F (0: CycleGAN)")
  loss.add_argument("--discriminator_lambda", type=float, default=1.0)
  loss.add_argument("--pool_size", type=int, default=16, help="fakes per pool (0: no pool)")
  train = parser.add_argument_group("training")
  train.add_argument("--batch_size", type=int, default=8)
  train.add_argument("--max_steps", type=int, default=10000)
  train.add_argument("--permutable_axes", type=_axes, default=(1, 2), help="of z,y,x = 0,1,2")
  train.add_argument("--reflectable_axes", type=_axes, default=(0, 1, 2), help="of z,y,x = 0,1,2")
  train.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
  train.add_argument("--learning_rate", type=float, default=0.0002)
  train.add_argument("--momentum", type=float, default=0.9)
  train.add_argument("--adam_beta1", type=float, default=0.5)
  train.add_argument("--adam_beta2", type=float, default=0.999)
  train.add_argument("--epsilon", type=float, default=1e-8)
  train.add_argument("--rmsprop_decay", type=float, default=0.9)
  train.add_argument("--max_gradient_entry_mag", type=float, default=0.0,
                     help="clip every gradient element to +/- this (0: off, the default)")
  train.add_argument("--summary_rate_secs", type=float, default=120.0)
  train.add_argument("--checkpoint_interval_s", type=float, default=300.0)
  train.add_argument("--max_to_keep", type=int, default=5)
  train.add_argument("--keep_checkpoint_every_n_hours", type=float, default=1.0)
  train.add_argument("--log_every", type=int, default=100, help="console line every N steps")
  train.add_argument("--compute_dtype", choices=["float32", "bfloat16"], default="float32",
                     help="convolutions (generators, discriminators, FFN) in bfloat16")
  train.add_argument("--seed", type=int, default=0, help="initial weights, crops, pools")


def add_transfer_arguments(parser: argparse.ArgumentParser) -> None:
  from slurm.executor import add_slurm_arguments
  parser.add_argument("--checkpoint", required=True,
                      help="SECGAN training directory (its latest checkpoint) or checkpoint prefix")
  parser.add_argument("--input", required=True, help="uint8 volume spec to transfer")
  parser.add_argument("--output", required=True, help="path.h5:dataset or zarr://path (uint8)")
  parser.add_argument("--block_size", type=_xyz, default=(256, 256, 256),
                      help="x,y,z voxels per array block (default: 256,256,256)")
  parser.add_argument("--tile_size", type=_xyz, default=(64, 64, 64),
                      help="x,y,z output voxels per network call (default: 64,64,64)")
  parser.add_argument("--compute_dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--run_dir", default=None,
                      help="blocks and job state (default: <output path>.secgan_run)")
  parser.add_argument("--num_tasks", type=int, default=None, help="array tasks (default: one per "
                      "--chunks_per_task blocks)")
  parser.add_argument("--chunks_per_task", type=int, default=1, help="blocks per task (default: 1)")
  parser.add_argument("--retry_failed", action="store_true", help="resubmit failed blocks")
  parser.add_argument("--wait", action="store_true",
                      help="wait for the array, then write the output (always with --cluster debug)")
  add_slurm_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from secgan import slurm
  sub = parser.add_subparsers(dest="secgan_command", metavar="SUBCOMMAND", required=True)
  add_train_arguments(sub.add_parser("train", help="train a SECGAN (one process)"))
  add_transfer_arguments(sub.add_parser(
      "transfer", help="transfer a volume with a trained F (tiled, job array, resumable)"))
  slurm.add_arguments(sub.add_parser(
      "slurm_train", help="train as a Slurm job, requeued on preemption"))


def config_from_args(args: argparse.Namespace):
  """A :class:`~secgan.model.SecganConfig` from the train flags (train_dir made absolute)."""
  import ffn.models
  from secgan.model import SecganConfig
  names = {f.name for f in dataclasses.fields(SecganConfig)}
  values = {k: v for k, v in vars(args).items() if k in names}
  if args.ffn_model_args is not None:
    values["ffn_model_args"] = ffn.models.parse_model_args(args.ffn_model_args)
  values["train_dir"] = os.path.abspath(args.train_dir)
  return SecganConfig(**values)


def run_train(args: argparse.Namespace) -> int:
  from secgan.train import train
  return train(config_from_args(args))


def run_transfer(args: argparse.Namespace) -> int:
  from ffn.blockwise import check_manifest, run_array, status_lines
  from ffn.io.volumes import Volume
  from secgan import transfer
  from secgan.normalization import check_volume_dtype
  from slurm.executor import SlurmOptions
  options = SlurmOptions.from_args(args)
  fmt, out_path, _ = transfer.check_output_spec(args.output)
  checkpoint = os.path.abspath(args.checkpoint)
  gen = transfer.load_generator(checkpoint)  # checks the checkpoint before any job starts
  with Volume(args.input) as volume:
    check_volume_dtype(str(volume.spec), volume.dtype)
    transfer.check_volume_shape(volume)
    shape = tuple(volume.shape)
    input_spec = str(volume.spec)
  run_dir = os.path.abspath(args.run_dir or (out_path.rstrip("/") + ".secgan_run"))
  block, tile = xyz_to_zyx(args.block_size), xyz_to_zyx(args.tile_size)
  if min(block) < 1 or min(tile) < 1:
    raise FFNError("--block_size and --tile_size must be positive")
  items = transfer.plan_blocks(shape, block, gen.margin)
  manifest = {"stage": "secgan_transfer", "checkpoint": checkpoint, "input": input_spec,
              "shape_zyx": list(shape), "block_size": list(args.block_size),
              "tile_size": list(args.tile_size), "compute_dtype": args.compute_dtype,
              "margin": gen.margin}
  check_manifest(run_dir, manifest, items)
  worker = transfer.TransferWorker(checkpoint, input_spec, run_dir, tile, args.compute_dtype)
  status = run_array(run_dir, worker, items, options, chunks_per_task=args.chunks_per_task,
                     max_tasks=args.num_tasks, retry_failed=args.retry_failed, wait=args.wait)
  for line in status_lines(status, noun="blocks"):
    print(line)
  if status.count("done") < len(items):
    if status.active:
      print("run the same command again (or with --wait) to write the output once all blocks are done")
    return 1 if status.count("failed") else 0
  transfer.assemble(items, worker, shape, args.output,
                    {"secgan_checkpoint": checkpoint, "source": input_spec})
  print(f"wrote {args.output} ({fmt}, {list(args.block_size)} blocks, margin {gen.margin})")
  return 0


def run(args: argparse.Namespace) -> int:
  if args.secgan_command == "train":
    return run_train(args)
  if args.secgan_command == "transfer":
    return run_transfer(args)
  from secgan import slurm
  return slurm.run(args)
