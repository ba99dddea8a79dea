"""Flood-Filling Networks toolkit: training, inference and proofreading of 3D EM segmentations.

Axis convention (see :mod:`ffn.axes`): numpy arrays are indexed z,y,x; configs, flags and
file names give coordinates as x,y,z.
"""

__version__ = "0.1.0"
