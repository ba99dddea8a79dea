"""google/ffn's optimizers (``--optimizer sgd|momentum|adagrad|adam|rmsprop``) as plain tf.Modules.

The update rules are those of the TF1 ``tf.train.*Optimizer`` classes google trained with, with
slot variables held in ``tf.Variable``s so that ``tf.train.Checkpoint`` saves and restores them
and any ``tf.distribute`` strategy can mirror them. No Keras.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from ffn.errors import FFNError
from ffn.training.optimizer_names import OPTIMIZERS


class Optimizer(tf.Module):
  """TF1-style optimizer; ``apply(grads, variables)`` performs one update.

  Slots are created eagerly in the constructor (one per variable and kind), keyed by the variable
  name, so checkpoints are complete from step 0.
  """

  def __init__(self, kind: str, variables: Sequence[tf.Variable], learning_rate: float = 0.001,
               momentum: float = 0.9, adam_beta1: float = 0.9, adam_beta2: float = 0.999,
               epsilon: float = 1e-8, rmsprop_decay: float = 0.9):
    super().__init__(name="optimizer")
    if kind not in OPTIMIZERS:
      raise FFNError(f"--optimizer {kind!r} is not one of {', '.join(OPTIMIZERS)}")
    self.kind = kind
    self.learning_rate = float(learning_rate)
    self.momentum, self.epsilon = float(momentum), float(epsilon)
    self.beta1, self.beta2, self.rmsprop_decay = float(adam_beta1), float(adam_beta2), float(rmsprop_decay)
    self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")

    def slot(init: float) -> dict[str, tf.Variable]:
      return {_key(v): tf.Variable(tf.fill(v.shape, init), trainable=False, name=f"{_key(v)}/slot")
              for v in variables}

    # TF1 initial accumulator values: adagrad 0.1, RMSProp mean square 1.0, the rest 0.
    self.slots: dict[str, dict[str, tf.Variable]] = {}
    if kind == "momentum":
      self.slots["momentum"] = slot(0.0)
    elif kind == "adagrad":
      self.slots["accumulator"] = slot(0.1)
    elif kind == "adam":
      self.slots["m"], self.slots["v"] = slot(0.0), slot(0.0)
    elif kind == "rmsprop":
      self.slots["ms"], self.slots["mom"] = slot(1.0), slot(0.0)

  def apply(self, grads: Sequence[tf.Tensor], variables: Sequence[tf.Variable]) -> None:
    self.iterations.assign_add(1)
    lr = tf.constant(self.learning_rate, tf.float32)
    t = tf.cast(self.iterations, tf.float32)
    for g, v in zip(grads, variables):
      k = _key(v)
      if self.kind == "sgd":
        v.assign_sub(lr * g)
      elif self.kind == "momentum":
        acc = self.slots["momentum"][k]
        acc.assign(acc * self.momentum + g)
        v.assign_sub(lr * acc)
      elif self.kind == "adagrad":
        acc = self.slots["accumulator"][k]
        acc.assign_add(g * g)
        v.assign_sub(lr * g * tf.math.rsqrt(acc))
      elif self.kind == "adam":
        m, s = self.slots["m"][k], self.slots["v"][k]
        lr_t = lr * tf.sqrt(1.0 - self.beta2 ** t) / (1.0 - self.beta1 ** t)
        m.assign(self.beta1 * m + (1.0 - self.beta1) * g)
        s.assign(self.beta2 * s + (1.0 - self.beta2) * g * g)
        v.assign_sub(lr_t * m / (tf.sqrt(s) + self.epsilon))
      else:  # rmsprop
        ms, mom = self.slots["ms"][k], self.slots["mom"][k]
        ms.assign(self.rmsprop_decay * ms + (1.0 - self.rmsprop_decay) * g * g)
        mom.assign(self.momentum * mom + lr * g * tf.math.rsqrt(ms + self.epsilon))
        v.assign_sub(mom)


def _key(v: tf.Variable) -> str:
  """Slot key of a variable: its name without the ':0' suffix, '/' replaced (checkpoint-safe)."""
  return v.name.split(":")[0].replace("/", ".")
