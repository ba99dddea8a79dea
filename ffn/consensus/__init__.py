"""Consensus of two FFN segmentations of one subvolume (google/ffn's ConsensusRequest).

``split`` (pure numpy split rule), ``consensus`` (request parsing, loading through
:mod:`ffn.inference.storage`, saving), ``cli`` (``ffn consensus`` / ``run_consensus.py``).
"""
