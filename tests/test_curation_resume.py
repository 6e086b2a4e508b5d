"""Kill -9 the runner mid-run (twice, in different stages), rerun, and compare with an uninterrupted run."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

from curation.config import from_dict
from curation.pack import iter_records, read_array_record, read_manifest
from curation.runner import run
from tests.curation_pools import make_rows, write_metadata, write_tar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_SHARDS = 10


def _start(cfg_path: str) -> subprocess.Popen:
    env = {**os.environ, "METACLIP_CURATION_SHARD_DELAY_S": "0.25"}
    return subprocess.Popen([sys.executable, "-m", "curation", "run", "--config", cfg_path, "--no-progress"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # own process group: the kill reaches its workers too


def _kill_when(proc: subprocess.Popen, pattern: str, n: int, timeout: float = 120) -> bool:
    """SIGKILL the run's process group once ``pattern`` matches >= n files. False if it ended first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if len(glob.glob(pattern)) >= n:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise AssertionError(f"timed out waiting for {n} x {pattern}")


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    meta = write_metadata(str(tmp_path / "meta.json"))
    for k in range(N_SHARDS):
        write_tar(str(tmp_path / f"{k:05d}.tar"), make_rows(40, seed=100 + k, with_images=True))
    base = {"inputs": [str(tmp_path / "*.tar")], "metadata": meta, "progress": False,
            "balance": {"t": 20, "mode": "per_text", "seed": 5}}

    # reference: uninterrupted, in-process, one worker
    ref = from_dict({**base, "workdir": str(tmp_path / "ref"), "workers": 1}).validate()
    run(ref, until="pack")

    cfg_path = str(tmp_path / "cfg.json")
    with open(cfg_path, "w") as f:
        json.dump({**base, "workdir": str(tmp_path / "wd"), "workers": 2}, f)
    wd = tmp_path / "wd"
    # 1) killed during match, after some shard outputs exist
    killed_match = _kill_when(_start(cfg_path), str(wd / "match" / "*.done.json"), 3)
    assert killed_match
    n_match = len(glob.glob(str(wd / "match" / "*.done.json")))
    assert 3 <= n_match < N_SHARDS
    # 2) rerun, killed during pack
    killed_pack = _kill_when(_start(cfg_path), str(wd / "pack" / "*.done.json"), 2)
    assert killed_pack
    assert not os.path.exists(wd / "out" / "manifest.json")
    # 3) rerun to the end
    p = _start(cfg_path)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()
    log = err.decode()
    assert f"match: {N_SHARDS} shards, {N_SHARDS} already done" in log
    assert "0 shards done" not in log.split("pack:")[1]  # pack resumed, not restarted

    ref_out, out = tmp_path / "ref" / "out", wd / "out"
    got, want = list(iter_records(str(out))), list(iter_records(str(ref_out)))
    assert len(got) == len(want) > 0
    assert [(r.uid, r.texts, r.entry_ids, r.image) for r in got] == \
           [(r.uid, r.texts, r.entry_ids, r.image) for r in want]  # no duplicate, no loss, same order
    m, mref = read_manifest(str(out)), read_manifest(str(ref_out))
    assert m["counts"] == mref["counts"] and m["shards"] == mref["shards"]
    for s in m["shards"]:
        assert read_array_record(str(out / s["file"])) == read_array_record(str(ref_out / s["file"]))
    leftovers = [f for f in glob.glob(str(tmp_path / "**" / ".*tmp-*"), recursive=True)]
    assert leftovers == []
