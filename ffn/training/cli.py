"""``ffn train`` / ``train.py``: google/ffn's training flags, single process.

Exit status: 0 when ``--max_steps`` is reached, 3 after a SIGTERM (a checkpoint was saved; run the
same command again to resume), 2 on an input error. SIGUSR1 saves a checkpoint and continues.
"""

from __future__ import annotations

import argparse
import dataclasses

from ffn.errors import FFNError


def _bool(text: str) -> bool:
  if text.lower() in ("1", "true", "yes"):
    return True
  if text.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _axes(text: str) -> tuple[int, ...]:
  axes = tuple(int(a) for a in text.split(",") if a.strip())
  if any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
    raise argparse.ArgumentTypeError(f"expected distinct axes from 0,1,2 (z,y,x), got {text!r}")
  return axes


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from ffn.training.examples import FOV_POLICIES
  from ffn.training.optimizer_names import OPTIMIZERS
  req = parser.add_argument_group("data and model (required)")
  req.add_argument("--train_coords", required=True,
                   help="coordinate TFRecord (GZIP, google format); several: comma-separated files or globs")
  req.add_argument("--data_volumes", required=True, help="name:path.h5:dataset,... image volumes")
  req.add_argument("--label_volumes", required=True, help="name:path.h5:dataset,... label volumes")
  req.add_argument("--model_name", required=True, help="e.g. convstack_3d.ConvStack3DFFNModel")
  req.add_argument("--model_args", required=True,
                   help='JSON, e.g. \'{"depth": 12, "fov_size": [33, 33, 33], "deltas": [8, 8, 8]}\' (x,y,z)')
  req.add_argument("--image_mean", type=float, default=None,
                   help="normalisation (raw - mean) / stddev of volumes not in --image_offset_scale_map")
  req.add_argument("--image_stddev", type=float, default=None)
  parser.add_argument("--train_dir", default="/tmp", help="checkpoints, summaries, train_flags.json")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--max_steps", type=int, default=10000)
  parser.add_argument("--seed_pad", type=float, default=0.05)
  parser.add_argument("--threshold", type=float, default=0.9)
  parser.add_argument("--fov_policy", choices=FOV_POLICIES, default="fixed",
                      help="FOV moves inside an example: 'fixed' tries the 26 +/- deltas shifts "
                           "around the centre; 'max_pred_moves' follows the face maxima of the "
                           "predictions as inference does")
  parser.add_argument("--fov_moves", type=int, default=1,
                      help="FOV moves of deltas each way the loaded example patch holds (one more "
                           "with max_pred_moves; with fixed only the patch grows, as in google); >= 1")
  parser.add_argument("--shuffle_moves", type=_bool, default=True)
  parser.add_argument("--permutable_axes", type=_axes, default=(1, 2), help="of z,y,x = 0,1,2")
  parser.add_argument("--reflectable_axes", type=_axes, default=(0, 1, 2), help="of z,y,x = 0,1,2")
  parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
  parser.add_argument("--learning_rate", type=float, default=0.001)
  parser.add_argument("--momentum", type=float, default=0.9)
  parser.add_argument("--adam_beta1", type=float, default=0.9)
  parser.add_argument("--adam_beta2", type=float, default=0.999)
  parser.add_argument("--epsilon", type=float, default=1e-8)
  parser.add_argument("--rmsprop_decay", type=float, default=0.9)
  parser.add_argument("--max_gradient_entry_mag", type=float, default=0.7,
                      help="clip every gradient element to +/- this (0: off)")
  parser.add_argument("--summary_rate_secs", type=float, default=120.0)
  parser.add_argument("--checkpoint_interval_s", type=float, default=300.0)
  parser.add_argument("--max_to_keep", type=int, default=5)
  parser.add_argument("--keep_checkpoint_every_n_hours", type=float, default=1.0)
  parser.add_argument("--log_every", type=int, default=100, help="console line every N steps")
  parser.add_argument("--compute_dtype", choices=["float32", "bfloat16"], default="float32",
                      help="convolutions in bfloat16 (variables, loss and updates stay float32)")
  parser.add_argument("--seed", type=int, default=0, help="seed of initial weights and data order")
  vols = parser.add_argument_group("several volumes")
  vols.add_argument("--image_offset_scale_map", default=None,
                    help="per-volume normalisation, google syntax: name:offset:scale,... "
                         "(image = (raw - offset) / scale)")
  vols.add_argument("--volume_weights", default=None,
                    help="name:weight,...: each example picks a volume with probability "
                         "weight/sum (default: in proportion to its coordinates)")
  em = parser.add_argument_group("EM augmentations (ffn/training/augment.py; 0 = off)")
  em.add_argument("--rotation_max_deg", type=float, default=0.0,
                  help="rotate about z by an angle uniform in +/- this (degrees; 180: any)")
  em.add_argument("--elastic_alpha", type=float, default=0.0,
                  help="elastic deformation: largest in-plane displacement (voxels)")
  em.add_argument("--elastic_sigma", type=float, default=4.0,
                  help="elastic deformation: Gaussian smoothing of the displacement field (voxels)")
  em.add_argument("--misalign_prob", type=float, default=0.0,
                  help="probability per example of shifting a run of sections in x,y")
  em.add_argument("--misalign_max_shift", type=int, default=0, help="largest such shift (voxels)")
  em.add_argument("--missing_section_prob", type=float, default=0.0,
                  help="probability per section of blanking or duplicating it (image only)")
  em.add_argument("--blur_section_prob", type=float, default=0.0,
                  help="probability per section of an out-of-focus blur (image only)")
  em.add_argument("--blur_max_sigma", type=float, default=2.0,
                  help="largest blur sigma (voxels, uniform in (0, this])")
  em.add_argument("--brightness", type=float, default=0.0,
                  help="add uniform +/- this (units of image_stddev)")
  em.add_argument("--contrast", type=float, default=0.0, help="multiply by uniform 1 +/- this")
  em.add_argument("--gamma", type=float, default=0.0,
                  help="gamma 2**u, u uniform in +/- this, over the patch's intensity range")
  em.add_argument("--noise_stddev", type=float, default=0.0,
                  help="Gaussian noise of stddev uniform in [0, this] (units of image_stddev)")


def config_from_args(args: argparse.Namespace):
  import ffn.models
  from ffn.training.trainer import TrainConfig
  if args.batch_size < 1 or args.max_steps < 0:
    raise FFNError(f"--batch_size must be >= 1 and --max_steps >= 0, got {args.batch_size}, "
                   f"{args.max_steps}")
  names = {f.name for f in dataclasses.fields(TrainConfig)}
  values = {k: v for k, v in vars(args).items() if k in names}
  values["model_args"] = ffn.models.parse_model_args(args.model_args)
  return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
  from ffn.training.trainer import Trainer
  trainer = Trainer(config_from_args(args))
  source = trainer.make_source()  # checks every input before anything is written to train_dir
  trainer.restore_or_init()
  trainer.write_flags()
  trainer.attach_data(source)
  return trainer.run()
