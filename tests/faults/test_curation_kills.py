"""kill -9 the curation runner at seeded random points of match, balance and pack; rerun; the output equals
an uninterrupted run: the same shard files byte for byte, the same records (multiset by uid), none lost or
duplicated, no temporary file left."""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import os
import signal
import subprocess
import time

import pytest

from curation.config import from_dict
from curation.pack import iter_records, read_manifest
from curation.runner import run
from tests.curation_pools import make_rows, write_metadata, write_tar
from tests.faults import trials
from tests.test_curation_resume import _start

pytestmark = pytest.mark.faults

N_SHARDS = 8
# (stage, marker files that show the stage is under way): one kill inside each stage, in order
STAGES = [("match", "match/*.done.json"), ("balance", "balance/*.sel.npy"), ("pack", "pack/*.done.json")]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Input tars, the config, and the uninterrupted reference output (in-process, one worker)."""
    root = tmp_path_factory.mktemp("curation_kills")
    meta = write_metadata(str(root / "meta.json"))
    for k in range(N_SHARDS):
        write_tar(str(root / f"{k:05d}.tar"), make_rows(30, seed=200 + k, with_images=True))
    base = {"inputs": [str(root / "*.tar")], "metadata": meta, "progress": False,
            "balance": {"t": 20, "mode": "per_image", "seed": 3}}
    run(from_dict({**base, "workdir": str(root / "ref"), "workers": 1}).validate(), until="pack")
    return root, base


def _kill_after(proc: subprocess.Popen, pattern: str, n: int, extra_s: float, timeout: float = 120) -> bool:
    """SIGKILL the run's process group ``extra_s`` seconds after ``pattern`` matches >= n files.
    False when the run ended first."""
    t0 = time.monotonic()
    while len(glob.glob(pattern)) < n:
        if proc.poll() is not None:
            return False
        if time.monotonic() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"timed out waiting for {n} x {pattern}")
        time.sleep(0.01)
    time.sleep(extra_s)
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _records(out: str) -> collections.Counter:
    return collections.Counter(
        (r.uid, tuple(r.texts), tuple(map(tuple, r.entry_ids)), tuple(r.keep_prob),
         hashlib.sha256(r.image).hexdigest()) for r in iter_records(out))


@pytest.mark.parametrize("seed", trials.seeds((0, 1, 2)))
def test_kill9_at_random_points_then_rerun_equals_uninterrupted(pool, tmp_path, seed):
    root, base = pool
    rng = trials.rng(seed, "curation-kill")
    wd = tmp_path / "wd"
    cfg_path = str(tmp_path / "cfg.json")
    with open(cfg_path, "w") as f:
        json.dump({**base, "workdir": str(wd), "workers": 2}, f)
    kills = []
    for stage, pattern in STAGES:
        n, extra = rng.randint(1, N_SHARDS - 2), round(rng.uniform(0.0, 0.3), 3)
        if _kill_after(_start(cfg_path), str(wd / pattern), n, extra):
            kills.append({"stage": stage, "after_files": n, "extra_s": extra})
    assert kills and kills[0]["stage"] == "match", kills  # at least the kill during matching landed
    p = _start(cfg_path)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()[-3000:]

    ref_out, out = str(root / "ref" / "out"), str(wd / "out")
    want, got = _records(ref_out), _records(out)
    lost = sum((want - got).values())
    duplicated = sum((got - want).values())
    uids = [k[0] for k in got.elements()]
    m, mref = read_manifest(out), read_manifest(ref_out)
    files_equal = [_sha(os.path.join(out, s["file"])) == _sha(os.path.join(ref_out, s["file"]))
                   for s in mref["shards"]]
    leftovers = glob.glob(str(wd / "**" / ".*tmp-*"), recursive=True)
    ok = (lost == 0 and duplicated == 0 and all(files_equal) and m["shards"] == mref["shards"]
          and m["counts"] == mref["counts"] and not leftovers and len(set(uids)) == len(uids))
    for k in kills:
        trials.record("curation", f"kill9-{k['stage']}-seed{seed}", fault=f"SIGKILL during {k['stage']}",
                      survived=ok, records_lost=lost, records_duplicated=duplicated, **k)
    assert lost == 0 and duplicated == 0, (lost, duplicated)
    assert len(set(uids)) == len(uids) == sum(want.values()) > 0  # per_image: one record per uid
    assert all(files_equal), files_equal
    assert m["shards"] == mref["shards"] and m["counts"] == mref["counts"]
    assert not leftovers, leftovers
