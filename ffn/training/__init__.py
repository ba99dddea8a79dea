"""FFN training: examples from coordinates and volumes, TF1-style optimizers, the training loop."""
