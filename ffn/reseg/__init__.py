"""FFN-guided resegmentation: touching supervoxel pairs, per-pair FFN runs, their analysis,
agglomeration and a proofreading queue (``ffn reseg pairs|run|analyze|agglomerate|queue``)."""
