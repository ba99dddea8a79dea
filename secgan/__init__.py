"""Segmentation-enhanced CycleGAN (SECGAN). Not implemented yet: this package is a placeholder for the
module layout, and contains no code."""
