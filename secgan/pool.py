"""Fake pools (Shrivastava et al. 2017, as in CycleGAN): discriminators see earlier fakes too.

A pool holds up to ``size`` fakes in a ``tf.Variable`` (so checkpoints save it). For each fake of
a batch, in order: while the pool is not full the fake is stored and returned; once full, with
probability 1/2 a random stored fake is returned and replaced by the new one, else the new fake is
returned. The random numbers are stateless, drawn from ``(seed, step)``, so a resumed run makes the
same choices. ``size`` 0 returns the fakes unchanged.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf


class FakePool(tf.Module):
  """``shape``: one fake's shape (z, y, x, c)."""

  def __init__(self, name: str, size: int, shape: Sequence[int]):
    super().__init__(name=name)
    self.size = int(size)
    self.images = tf.Variable(np.zeros((max(self.size, 1),) + tuple(shape), np.float32),
                              trainable=False, name=f"{name}/images")
    self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name=f"{name}/count")

  def query(self, fakes: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Fakes [b, ...] -> as many fakes from the pool; ``seed``: int64 [2] (stateless RNG)."""
    if self.size == 0:
      return fakes
    fakes = tf.stop_gradient(fakes)
    b = fakes.shape[0]
    coins = tf.random.stateless_uniform([b], seed=seed)
    picks = tf.random.stateless_uniform([b], seed=seed + 1, maxval=self.size, dtype=tf.int64)
    out = []
    for i in range(b):
      fake = fakes[i]

      def fill(fake=fake):
        self.images.scatter_nd_update([[self.count]], fake[None])
        with tf.control_dependencies([self.count.assign_add(1)]):
          return tf.identity(fake)

      def swap(fake=fake, i=i):
        def take():
          old = tf.identity(self.images[picks[i]])
          with tf.control_dependencies([old]):
            update = self.images.scatter_nd_update([[picks[i]]], fake[None])
          with tf.control_dependencies([update]):
            return tf.identity(old)
        return tf.cond(coins[i] < 0.5, take, lambda: tf.identity(fake))

      out.append(tf.cond(self.count < self.size, fill, swap))
    return tf.stack(out)
