"""Segmentation quality against ground truth: variation of information and adjusted Rand error."""

from ffn.metrics.scores import contingency, evaluate, variation_of_information, adjusted_rand_error

__all__ = ["contingency", "evaluate", "variation_of_information", "adjusted_rand_error"]
