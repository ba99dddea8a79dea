"""Shared protobuf messages (vectors, bounding boxes) used by inference requests."""
