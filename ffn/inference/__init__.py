"""FFN inference: flood-filling a volume from seeds with a trained model (google/ffn compatible).

Modules: :mod:`.request` (InferenceRequest pbtxt), :mod:`.seed` (seed policies), :mod:`.movement`
(FoV movement), :mod:`.canvas` (the flood-fill state machine), :mod:`.storage` (result files),
:mod:`.runner` (request -> saved subvolume), :mod:`.cli` (``ffn run_inference``),
:mod:`.export` (``ffn export``).
"""
