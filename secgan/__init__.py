"""Segmentation-enhanced CycleGAN (SECGAN; Januszewski & Jain, bioRxiv 548081) in TensorFlow 2.

A generator F maps a new (unlabeled) volume's appearance onto the one an FFN was trained on
(labeled), so that the FFN segments the new volume. Modules: :mod:`secgan.networks` (generators,
discriminators), :mod:`secgan.losses` (LSGAN, cycle L1), :mod:`secgan.pool` (fake pools),
:mod:`secgan.normalization` (the uint8 <-> unit-space mapping shared by training and transfer),
:mod:`secgan.model` (config, the training step), :mod:`secgan.data` (random crops),
:mod:`secgan.train` (loop, checkpoints, signals, TensorBoard), :mod:`secgan.transfer` (tiled,
blockwise transfer), :mod:`secgan.cli` (``ffn secgan train|transfer|slurm_train``) and
:mod:`secgan.slurm` (the Slurm launcher).
"""
