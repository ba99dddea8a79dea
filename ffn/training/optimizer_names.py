"""The ``--optimizer`` choices, apart from :mod:`ffn.training.optimizer` so that defining the
command-line flags (``ffn train --help``) does not import TensorFlow."""

OPTIMIZERS = ("sgd", "momentum", "adagrad", "adam", "rmsprop")
