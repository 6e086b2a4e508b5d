"""Beam pipeline (DirectRunner) vs the local runner: the same curated subset, byte for byte.

Runs in the separate Beam environment (``.venv-beam``, requirements-beam.txt); the main suite runs this
file there through tests/test_curation_beam.py. Under the main environment it skips: Beam is not
installed there on purpose (its protobuf/pyarrow pins clash with the JAX stack).
"""

from __future__ import annotations

import pytest

beam = pytest.importorskip(
    "apache_beam",
    reason="apache_beam is not importable in this interpreter; it lives in .venv-beam "
           "(python3 -m venv .venv-beam && .venv-beam/bin/pip install -r requirements-beam.txt)")

from curation.beam_pipeline import run_beam  # noqa: E402
from curation.config import from_dict  # noqa: E402
from curation.pack import iter_records, read_array_record, read_manifest  # noqa: E402
from curation.runner import run  # noqa: E402
from tests.curation_pools import make_rows, write_jsonl, write_metadata, write_tar  # noqa: E402


@pytest.mark.parametrize("mode,rng_key", [("per_image", "index"), ("per_text", "uid")])
def test_beam_direct_runner_matches_local_runner(tmp_path, mode, rng_key):
    meta = write_metadata(str(tmp_path / "meta.json"))
    write_tar(str(tmp_path / "a-0.tar"), make_rows(60, seed=1, with_images=True))
    write_tar(str(tmp_path / "a-1.tar"), make_rows(45, seed=2, with_images=True))
    write_jsonl(str(tmp_path / "b-0.jsonl"), make_rows(70, seed=3), bad_lines=1)
    base = {"inputs": [str(tmp_path / "a-*.tar"), str(tmp_path / "b-*.jsonl")], "metadata": meta,
            "workers": 1, "progress": False, "max_error_rate": 0.1,
            "balance": {"t": 15, "mode": mode, "seed": 9, "rng_key": rng_key}}
    local = from_dict({**base, "workdir": str(tmp_path / "local")}).validate()
    beam_cfg = from_dict({**base, "workdir": str(tmp_path / "beam")}).validate()
    run(local, until="pack")
    counts = run_beam(beam_cfg, ["--runner=DirectRunner"])

    lm, bm = read_manifest(local.out_dir), read_manifest(beam_cfg.out_dir)
    assert bm["runner"] == "beam" and lm["runner"] == "local"
    assert counts == lm["counts"] == bm["counts"]
    assert bm["shards"] == lm["shards"]
    assert bm["bad_input"] == lm["bad_input"] and bm["bad_input"]["skipped_rows"] == {"bad_json": 1}
    got, want = list(iter_records(beam_cfg.out_dir)), list(iter_records(local.out_dir))
    assert len(got) == len(want) > 0
    assert [(r.uid, r.texts, r.entry_ids, r.image, r.keep_prob) for r in got] == \
           [(r.uid, r.texts, r.entry_ids, r.image, r.keep_prob) for r in want]
    for s in lm["shards"]:
        assert read_array_record(f"{beam_cfg.out_dir}/{s['file']}") == \
               read_array_record(f"{local.out_dir}/{s['file']}")


def test_beam_fails_past_the_error_rate(tmp_path):
    meta = write_metadata(str(tmp_path / "meta.json"))
    write_jsonl(str(tmp_path / "b-0.jsonl"), make_rows(20, seed=3), bad_lines=10)
    cfg = from_dict({"inputs": [str(tmp_path / "b-0.jsonl")], "metadata": meta,
                     "workdir": str(tmp_path / "w"), "max_error_rate": 0.01}).validate()
    with pytest.raises(Exception, match="exceeds max_error_rate"):
        run_beam(cfg, ["--runner=DirectRunner"])
