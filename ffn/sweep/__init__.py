"""Checkpoint-selection sweeps (``ffn sweep``): every checkpoint of a training run segments the
evaluation boxes as one job array, the results are scored and the best checkpoint is chosen.

``checkpoints`` (which ones, their model settings), ``worker`` (one evaluation per (checkpoint,
box): segment, optional reverse + consensus, score), ``report`` (rows, ranking, results files,
plot, TensorBoard scalars), ``cli`` (the command, resume and ``--watch``).
"""
