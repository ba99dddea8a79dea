"""Stitching chunked segmentations into one volume with global ids (``ffn stitch``).

Pure numpy at the core -- :mod:`~ffn.stitch.tiling` (which chunks tile a region, which pairs
overlap, who owns each voxel), :mod:`~ffn.stitch.match` (the merge rule on an overlap) and
:mod:`~ffn.stitch.ids` (union-find, global ids, relabelling) -- and the phases that run them over
a large region as job arrays in :mod:`~ffn.stitch.stitch`; :mod:`~ffn.stitch.cli` is the command.
"""
