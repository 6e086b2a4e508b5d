"""Damage the newest checkpoint in many ways: restore falls back to the previous complete one, with a message
naming the damaged step, and the data-iterator state comes from the fallback. Builds on the patterns (and the
damage kinds) of tests/test_checkpoint.py."""

from __future__ import annotations

import glob
import logging
import os

import numpy as np
import pytest

from tests.faults import trials
from tests.test_checkpoint import (
    DAMAGE,
    FakeIterator,
    _abstract,
    _flip,
    _small_state,
    _truncate,
    _two_checkpoints,
)
from train.checkpoint import DAMAGED_DIR

pytestmark = pytest.mark.faults


def _each(pattern: str, fn) -> None:
    files = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    assert files, pattern
    for p in files:
        fn(p)


def _zero(path: str) -> None:
    open(path, "wb").close()


def _garbage(path: str) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(max(64, os.path.getsize(path))))


MORE_DAMAGE = {
    "zero-byte-array-files": lambda d: _each(f"{d}/state/ocdbt.process_0/d/*", _zero),
    "deleted-array-files": lambda d: _each(f"{d}/state/ocdbt.process_0/d/*", os.remove),
    "garbage-array-files": lambda d: _each(f"{d}/state/ocdbt.process_0/d/*", _garbage),
    "flipped-byte-every-array-file": lambda d: _each(f"{d}/state/ocdbt.process_0/d/*", _flip),
    "truncated-ocdbt-manifest": lambda d: _each(f"{d}/state/**/manifest.ocdbt", _truncate),
    "garbage-counters-json": lambda d: _garbage(f"{d}/counters/metadata"),
    "deleted-data-iter": lambda d: _each(f"{d}/data_iter/*", os.remove),
    "zero-byte-every-file": lambda d: _each(f"{d}/**/*", _zero),
}
ALL = {**DAMAGE, **MORE_DAMAGE}


@pytest.mark.parametrize("damage", sorted(ALL))
def test_damaged_newest_falls_back_to_previous(tmp_path, caplog, damage):
    workdir = str(tmp_path)
    ckpt = _two_checkpoints(workdir)
    ALL[damage](os.path.join(workdir, "checkpoints", "2"))
    it = FakeIterator()
    with caplog.at_level(logging.ERROR, logger="train.checkpoint"):
        restored = ckpt.restore_latest(_abstract(_small_state(1.0)), it)
    msg = " ".join(r.getMessage() for r in caplog.records)
    ok = (restored is not None and restored.step == 1 and it.position == 10
          and np.array_equal(np.asarray(restored.state["w"]), np.asarray(_small_state(1.0)["w"]))
          and "step 2" in msg and "damaged" in msg and ckpt.all_steps() == [1]
          and len(os.listdir(os.path.join(workdir, DAMAGED_DIR))) == 1)
    ckpt.close()
    trials.record("checkpoint", f"damaged-newest-{damage}", fault=f"newest checkpoint: {damage}", survived=ok)
    assert restored is not None and restored.step == 1, damage
    assert it.position == 10  # the fallback's iterator state, never the damaged one's
    assert "step 2" in msg and "damaged" in msg and "previous checkpoint" in msg, msg
    assert ok
