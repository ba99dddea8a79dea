"""DVID: upload a segmentation as the supervoxels of a ``labelmap`` instance, post merges.

* :mod:`ffn.dvid.client` -- a small client of DVID's HTTP API over ``requests`` (retries, DVID's
  plain-text errors as one line, ``u=``/``app=`` query parameters);
* :mod:`ffn.dvid.upload` -- a label volume as block-aligned uint64 ``raw`` POSTs, one job array of
  chunks (:mod:`ffn.blockwise`), then a wait until DVID's label index answers for every label;
* :mod:`ffn.dvid.merges` -- a merge table or supervoxel -> body mapping as one merge per body:
  dry run by default, idempotent, every MutationID in a JSONL log written as it goes;
* :mod:`ffn.dvid.cli` -- ``ffn dvid <step>``.

Coordinates sent to DVID are x,y,z; arrays here are z,y,x (:mod:`ffn.axes`).
"""
