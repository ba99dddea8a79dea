"""SECGAN losses: least-squares GAN (Mao et al. 2017) and cycle L1 (Zhu et al. 2017).

Discriminators output unbounded scores; LSGAN targets are :data:`REAL` = 1 and :data:`FAKE` = 0:

* discriminator: ``0.5 * (mean((D(real) - 1)^2) + mean(D(fake)^2))``;
* generator (adversarial term): ``mean((D(G(x)) - 1)^2)``;
* cycle: ``mean(|x - F(G(x))|)`` over the voxels of the centre crop, in unit space.

Weights (the SLURM fork's defaults): cycle 2.5 for labeled -> unlabeled -> labeled and 0.5 for
unlabeled -> labeled -> unlabeled, adversarial terms 1, segmentation term (D_S, on F only) 1.
"""

from __future__ import annotations

import tensorflow as tf

REAL = 1.0
FAKE = 0.0


def lsgan_discriminator(d_real: tf.Tensor, d_fake: tf.Tensor) -> tf.Tensor:
  """Least-squares discriminator loss (scalar) of real and fake scores."""
  return 0.5 * (tf.reduce_mean(tf.square(d_real - REAL)) + tf.reduce_mean(tf.square(d_fake - FAKE)))


def lsgan_generator(d_fake: tf.Tensor) -> tf.Tensor:
  """Least-squares generator loss (scalar): fakes scored as real."""
  return tf.reduce_mean(tf.square(d_fake - REAL))


def cycle_l1(x: tf.Tensor, x_cycled: tf.Tensor) -> tf.Tensor:
  """Mean absolute difference (scalar) of a volume and its reconstruction (same shape)."""
  return tf.reduce_mean(tf.abs(x - x_cycled))
