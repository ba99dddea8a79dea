"""``run_resegmentation.py post`` (= ``ffn reseg post``): the agglomeration's mapping, in
``ffn reseg agglomerate``'s ``sv,body`` layout, posted to the DVID stand-in through the same code as
``ffn dvid post-merges``: dry run first, then --apply, then a re-run that posts nothing."""

from __future__ import annotations

import subprocess
import sys

from test_dvid import Setup, _check_agglomerated, _groups, _merge_posts, _write_mapping

from conftest import REPO_ROOT


def test_run_resegmentation_post_is_dvid_post_merges(tmp_path):
  setup = Setup(tmp_path)
  try:
    mapping = _write_mapping(tmp_path / "mapping.csv", smallest=True)

    def post(*extra: str) -> subprocess.CompletedProcess:
      return subprocess.run([sys.executable, "run_resegmentation.py", "post", *setup.flags(),
                             "--input", str(mapping), "--log", str(tmp_path / "log.jsonl"), *extra],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)

    before = setup.dvid.snapshot()
    dry = post()
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "dry run: nothing posted" in dry.stdout and setup.dvid.snapshot() == before
    applied = post("--apply")
    assert applied.returncode == 0, applied.stderr[-2000:]
    _check_agglomerated(setup.client, setup.uuid)
    assert _merge_posts(setup.dvid) == sum(1 for m in _groups().values() if len(m) > 1)
    posts = _merge_posts(setup.dvid)
    again = post("--apply")
    assert again.returncode == 0 and _merge_posts(setup.dvid) == posts
  finally:
    setup.close()
