"""Segmentation quality against ground truth: variation of information and adjusted Rand error."""

from ffn.metrics.scores import (adapted_rand_error, adjusted_rand_error, contingency, evaluate,
                                variation_of_information)

__all__ = ["adapted_rand_error", "adjusted_rand_error", "contingency", "evaluate",
           "variation_of_information"]
