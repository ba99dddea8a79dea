"""The SECGAN: two generators, three discriminators, a frozen FFN, four optimizers, one step.

Notation (Januszewski & Jain, "Segmentation-Enhanced CycleGAN", bioRxiv 548081): L is the
labeled domain (the appearance the FFN was trained on), U the unlabeled one (the new volume).
G: L -> U, F: U -> L; D_l judges labeled-looking images, D_u unlabeled-looking ones, D_S the FFN's
segmentation of real L against that of F(U).

Shapes. ``fov_size`` S (x,y,z) is what discriminators and the FFN see. A generator loses
``m = 2 * generator_depth`` voxels per side, so both cycles start from crops of S + 4m:
G(L) and F(U) are S + 2m, their centre S crops are the fakes, and F(G(L)), G(F(U)) are S,
compared (cycle L1) with the centre S of L and U.

One training step (:meth:`Secgan.train_step`, one ``tf.function``):

1. forward both cycles once; generator losses
   ``loss_G = adv(D_u(G(L))) + 2.5 |F(G(L)) - L| + 0.5 |G(F(U)) - U|`` and
   ``loss_F = adv(D_l(F(U))) + seg * adv(D_S(S(F(U)))) + the same cycle terms`` (adv: LSGAN,
   :mod:`secgan.losses`; S: the frozen FFN's probability map minus 0.5);
2. G update; 3. D_u update on real U against pooled G(L) (:mod:`secgan.pool`);
4. F update; 5. D_l and D_S update on real L and S(L) against pooled F(U) and S(F(U)).

So the update order is G -> D_u -> F -> D_l + D_S (G -> D -> F -> D); each discriminator is updated
right after the generator it judges, and each generator's gradient comes from the discriminators
before their update in this step. Both generator gradients come from the same forward pass (as in
the SLURM fork's graph and CycleGAN's reference code), which halves the generator cost of a step.
The FFN's variables are never updated (they are in no optimizer); gradients flow through it into F.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow as tf

from ffn.axes import xyz_to_zyx
from ffn.errors import FFNError
from ffn.training.examples import initial_seed
from ffn.training.optimizer import Optimizer
from secgan import losses
from secgan.networks import Generator, center_crop, check_crop, make_discriminator, variables_of
from secgan.normalization import unit_to_ffn
from secgan.pool import FakePool

RESNET_MIN_FOV = 7
LOSS_NAMES = ("G", "F", "D_u", "D_l", "D_S", "cycle_l", "cycle_u", "adv_G", "adv_F", "seg_F")


@dataclasses.dataclass
class SecganConfig:
  """Training settings. Sizes x,y,z; volumes are volume specs (:mod:`ffn.io.volumes`), uint8."""
  labeled_volumes: list
  unlabeled_volumes: list
  train_dir: str
  ffn_checkpoint: str | None = None
  ffn_model_name: str | None = None
  ffn_model_args: dict | None = None
  image_mean: float = 128.0
  image_stddev: float = 33.0
  fov_size: tuple = (33, 33, 33)
  generator_depth: int = 8
  generator_channels: int = 32
  discriminator: str = "resnet"
  discriminator_channels: int = 64
  discriminator_depth: int = 4
  cycle_l_lambda: float = 2.5
  cycle_u_lambda: float = 0.5
  generator_lambda: float = 1.0
  seg_lambda: float = 1.0
  discriminator_lambda: float = 1.0
  pool_size: int = 16
  batch_size: int = 8
  max_steps: int = 10000
  permutable_axes: tuple = (1, 2)
  reflectable_axes: tuple = (0, 1, 2)
  optimizer: str = "adam"
  learning_rate: float = 0.0002
  momentum: float = 0.9
  adam_beta1: float = 0.5
  adam_beta2: float = 0.999
  epsilon: float = 1e-8
  rmsprop_decay: float = 0.9
  max_gradient_entry_mag: float = 0.0
  summary_rate_secs: float = 120.0
  checkpoint_interval_s: float = 300.0
  max_to_keep: int = 5
  keep_checkpoint_every_n_hours: float = 1.0
  log_every: int = 100
  seed: int = 0
  compute_dtype: str = "float32"

  def __post_init__(self) -> None:
    self.fov_size = tuple(int(v) for v in self.fov_size)
    self.permutable_axes = tuple(self.permutable_axes)
    self.reflectable_axes = tuple(self.reflectable_axes)
    if not self.labeled_volumes or not self.unlabeled_volumes:
      raise FFNError("--labeled_volume and --unlabeled_volume: at least one volume each")
    if self.batch_size < 1 or self.max_steps < 0 or self.pool_size < 0:
      raise FFNError(f"--batch_size must be >= 1, --max_steps and --pool_size >= 0, got "
                     f"{self.batch_size}, {self.max_steps}, {self.pool_size}")
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise FFNError(f"--compute_dtype {self.compute_dtype!r}: expected float32 or bfloat16")
    if min(self.fov_size) < 1:
      raise FFNError(f"--fov_size must be positive, got {list(self.fov_size)}")
    if self.discriminator == "resnet" and min(self.fov_size) < RESNET_MIN_FOV:
      # TF 2's CPU conv3d gradient crashed (segfault) on the 7^3 stride-2 stem over 5^3 inputs.
      raise FFNError(f"--fov_size {list(self.fov_size)}: the resnet discriminator needs at least "
                     f"{RESNET_MIN_FOV} voxels along each axis (its 7^3 stem); use --discriminator conv")
    if self.ffn_checkpoint is None and self.seg_lambda:
      self.seg_lambda = 0.0  # no FFN: a plain CycleGAN (no D_S)

  @property
  def margin(self) -> int:
    """Voxels per side that one generator removes."""
    return 2 * int(self.generator_depth)

  @property
  def fov_zyx(self) -> tuple[int, int, int]:
    return xyz_to_zyx(self.fov_size)  # type: ignore[return-value]

  @property
  def input_zyx(self) -> tuple[int, int, int]:
    """Crop size (z,y,x) read from each volume: the FOV plus both generators' margins."""
    return tuple(s + 4 * self.margin for s in self.fov_zyx)  # type: ignore[return-value]

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def load_ffn(cfg: SecganConfig):
  """The frozen FFN (a tf.Module) of ``cfg.ffn_checkpoint``, or None for a plain CycleGAN."""
  if cfg.ffn_checkpoint is None:
    return None
  import ffn.models
  loaded = ffn.models.load(cfg.ffn_checkpoint, cfg.ffn_model_name, cfg.ffn_model_args)
  return loaded.model


class Secgan(tf.Module):
  """Networks, optimizers, pools and the compiled training step of one SECGAN run."""

  def __init__(self, cfg: SecganConfig, ffn_model: tf.Module | None = None):
    super().__init__(name="secgan")
    self.cfg = cfg
    check_crop(cfg.input_zyx, 2 * cfg.margin, "--fov_size plus margins")
    seed = int(cfg.seed)
    self.G = Generator("G", cfg.generator_depth, cfg.generator_channels, seed=seed * 10 + 1)
    self.F = Generator("F", cfg.generator_depth, cfg.generator_channels, seed=seed * 10 + 2)
    self.D_l = make_discriminator(cfg.discriminator, "D_l", cfg.discriminator_channels,
                                  cfg.discriminator_depth, seed * 10 + 3)
    self.D_u = make_discriminator(cfg.discriminator, "D_u", cfg.discriminator_channels,
                                  cfg.discriminator_depth, seed * 10 + 4)
    self.use_seg = ffn_model is not None and cfg.seg_lambda != 0
    self.ffn = ffn_model
    self.D_S = (make_discriminator(cfg.discriminator, "D_S", cfg.discriminator_channels,
                                   cfg.discriminator_depth, seed * 10 + 5) if self.use_seg else None)
    self.vars_G, self.vars_F = variables_of(self.G), variables_of(self.F)
    self.vars_D_u = variables_of(self.D_u)
    self.vars_D_l = variables_of(self.D_l) + (variables_of(self.D_S) if self.use_seg else [])

    def optimizer(variables):
      return Optimizer(cfg.optimizer, variables, cfg.learning_rate, cfg.momentum, cfg.adam_beta1,
                       cfg.adam_beta2, cfg.epsilon, cfg.rmsprop_decay)

    self.opt_G, self.opt_F = optimizer(self.vars_G), optimizer(self.vars_F)
    self.opt_D_u, self.opt_D_l = optimizer(self.vars_D_u), optimizer(self.vars_D_l)
    fov = cfg.fov_zyx
    self.pool_u = FakePool("pool_u", cfg.pool_size, fov + (1,))
    self.pool_l = FakePool("pool_l", cfg.pool_size, fov + (1,))
    self.pool_s = FakePool("pool_s", cfg.pool_size if self.use_seg else 0, fov + (1,))
    self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    self.dtype = tf.as_dtype(cfg.compute_dtype)
    self.ffn_seed = tf.constant(initial_seed(fov)[None, ..., None])
    spec = tf.TensorSpec((cfg.batch_size,) + cfg.input_zyx + (1,), tf.float32)
    self.train_step = tf.function(self._train_step, input_signature=[spec, spec], autograph=False)
    self.losses = tf.function(self._losses, input_signature=[spec, spec], autograph=False)

  def checkpoint(self) -> tf.train.Checkpoint:
    """Everything a resumed run needs: weights, optimizer slots, pools and the step."""
    parts = dict(G=self.G, F=self.F, D_l=self.D_l, D_u=self.D_u, opt_G=self.opt_G,
                 opt_F=self.opt_F, opt_D_u=self.opt_D_u, opt_D_l=self.opt_D_l, pool_u=self.pool_u,
                 pool_l=self.pool_l, pool_s=self.pool_s, step=self.step)
    if self.use_seg:
      parts["D_S"] = self.D_S
    return tf.train.Checkpoint(**parts)

  # -- pieces -----------------------------------------------------------------------------------

  def segment(self, unit: tf.Tensor) -> tf.Tensor:
    """The frozen FFN's probability map minus 0.5 of unit-space images [b, S, 1] (D_S's input)."""
    cfg = self.cfg
    image = unit_to_ffn(unit, cfg.image_mean, cfg.image_stddev)
    seed = tf.repeat(self.ffn_seed, tf.shape(unit)[0], axis=0)
    logits = self.ffn(tf.concat([image, seed], axis=-1), compute_dtype=self.dtype)
    return tf.sigmoid(logits) - 0.5

  def _forward(self, real_l: tf.Tensor, real_u: tf.Tensor) -> dict[str, tf.Tensor]:
    m, d = self.cfg.margin, self.dtype
    g_big = self.G(real_l, d)  # S + 2m
    f_big = self.F(real_u, d)
    out = {"fake_u": center_crop(g_big, m), "fake_l": center_crop(f_big, m),
           "cycled_l": self.F(g_big, d), "cycled_u": self.G(f_big, d),
           "real_l": center_crop(real_l, 2 * m), "real_u": center_crop(real_u, 2 * m)}
    if self.use_seg:
      out["seg_fake"] = self.segment(out["fake_l"])
    return out

  def _generator_losses(self, fw: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    cfg, d = self.cfg, self.dtype
    out = {"cycle_l": losses.cycle_l1(fw["real_l"], fw["cycled_l"]),
           "cycle_u": losses.cycle_l1(fw["real_u"], fw["cycled_u"]),
           "adv_G": losses.lsgan_generator(self.D_u(fw["fake_u"], d)),
           "adv_F": losses.lsgan_generator(self.D_l(fw["fake_l"], d))}
    cycles = cfg.cycle_l_lambda * out["cycle_l"] + cfg.cycle_u_lambda * out["cycle_u"]
    out["G"] = cfg.generator_lambda * out["adv_G"] + cycles
    out["F"] = cfg.generator_lambda * out["adv_F"] + cycles
    if self.use_seg:
      out["seg_F"] = losses.lsgan_generator(self.D_S(fw["seg_fake"], d))
      out["F"] += cfg.seg_lambda * out["seg_F"]
    else:
      out["seg_F"] = tf.constant(0.0)
    return out

  def _d_u_loss(self, real_u: tf.Tensor, fake_u: tf.Tensor) -> tf.Tensor:
    d = self.dtype
    return self.cfg.discriminator_lambda * losses.lsgan_discriminator(self.D_u(real_u, d),
                                                                      self.D_u(fake_u, d))

  def _d_l_losses(self, real_l: tf.Tensor, fake_l: tf.Tensor, seg_real: tf.Tensor | None,
                  seg_fake: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor]:
    d, w = self.dtype, self.cfg.discriminator_lambda
    d_l = w * losses.lsgan_discriminator(self.D_l(real_l, d), self.D_l(fake_l, d))
    if not self.use_seg:
      return d_l, tf.constant(0.0)
    return d_l, w * losses.lsgan_discriminator(self.D_S(seg_real, d), self.D_S(seg_fake, d))

  def _apply(self, optimizer: Optimizer, grads, variables) -> None:
    clip = self.cfg.max_gradient_entry_mag
    if clip > 0:
      grads = [tf.clip_by_value(g, -clip, clip) for g in grads]
    optimizer.apply(grads, variables)

  # -- compiled -----------------------------------------------------------------------------------

  def _losses(self, real_l: tf.Tensor, real_u: tf.Tensor) -> dict[str, tf.Tensor]:
    """Every loss at the current weights on one batch, fakes unpooled (no update)."""
    fw = self._forward(real_l, real_u)
    out = self._generator_losses(fw)
    out["D_u"] = self._d_u_loss(fw["real_u"], fw["fake_u"])
    seg_real = self.segment(fw["real_l"]) if self.use_seg else None
    out["D_l"], out["D_S"] = self._d_l_losses(fw["real_l"], fw["fake_l"], seg_real,
                                              fw.get("seg_fake"))
    return out

  def _train_step(self, real_l: tf.Tensor, real_u: tf.Tensor
                  ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
    """One step (module docstring) on unit-space crops [b, S + 4m, 1]; returns (losses before
    the updates, images: the centre crops of real and fake, cycles)."""
    with tf.GradientTape(persistent=True) as tape:
      fw = self._forward(real_l, real_u)
      out = self._generator_losses(fw)
    grads_G = tape.gradient(out["G"], self.vars_G)
    grads_F = tape.gradient(out["F"], self.vars_F)
    del tape
    seed = tf.stack([tf.constant(int(self.cfg.seed), tf.int64), self.step])
    self._apply(self.opt_G, grads_G, self.vars_G)
    fake_u = self.pool_u.query(fw["fake_u"], seed)
    with tf.GradientTape() as tape:
      out["D_u"] = self._d_u_loss(fw["real_u"], fake_u)
    self._apply(self.opt_D_u, tape.gradient(out["D_u"], self.vars_D_u), self.vars_D_u)
    self._apply(self.opt_F, grads_F, self.vars_F)
    fake_l = self.pool_l.query(fw["fake_l"], seed)
    seg_real = seg_fake = None
    if self.use_seg:
      seg_real = tf.stop_gradient(self.segment(fw["real_l"]))
      seg_fake = self.pool_s.query(fw["seg_fake"], seed)  # same seed: pairs with pool_l
    with tf.GradientTape() as tape:
      out["D_l"], out["D_S"] = self._d_l_losses(fw["real_l"], fake_l, seg_real, seg_fake)
      total = out["D_l"] + out["D_S"]
    self._apply(self.opt_D_l, tape.gradient(total, self.vars_D_l), self.vars_D_l)
    self.step.assign_add(1)
    images = {k: fw[k] for k in ("real_l", "fake_u", "cycled_l", "real_u", "fake_l", "cycled_u")}
    if self.use_seg:
      images["seg_fake"] = fw["seg_fake"]
    return out, images

  def checkpoint_variables(self) -> list[tf.Variable]:
    """Every variable :meth:`checkpoint` holds, in a stable order (for identity checks)."""
    mods = [self.G, self.F, self.D_l, self.D_u, self.opt_G, self.opt_F, self.opt_D_u, self.opt_D_l,
            self.pool_u, self.pool_l, self.pool_s] + ([self.D_S] if self.use_seg else [])
    out = [self.step]
    for mod in mods:
      out += sorted(mod.variables, key=lambda v: v.name)
    return out

