"""Training-data preparation: conversions, image statistics, partitions, coordinates."""
