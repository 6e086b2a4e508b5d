"""Per-trial results of the fault suite, one JSON object per line, aggregated by ``benchmarks/faults.py``.

The file is ``$METACLIP_FAULTS_RESULTS`` (default ``<tmp>/metaclip_faults_results.jsonl``); pytest-xdist
workers append to it concurrently (one ``write`` per line under an exclusive lock).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import tempfile
from typing import Any

RESULTS_ENV = "METACLIP_FAULTS_RESULTS"
SEEDS_ENV = "METACLIP_FAULTS_SEEDS"  # e.g. "0,1,2": the seeds of the randomised kill trials


def results_path() -> str:
    return os.environ.get(RESULTS_ENV) or os.path.join(tempfile.gettempdir(), "metaclip_faults_results.jsonl")


def seeds(default: tuple[int, ...]) -> list[int]:
    raw = os.environ.get(SEEDS_ENV, "")
    return [int(s) for s in raw.split(",") if s.strip()] or list(default)


def rng(seed: int, name: str) -> random.Random:
    """A seeded RNG per (trial family, seed): the random kill points are reproducible."""
    return random.Random(f"{name}:{seed}")


def record(suite: str, trial: str, *, fault: str, survived: bool, records_lost: int = 0,
           bad_inputs_tried: int = 0, bad_inputs_counted: int = 0, **extra: Any) -> dict[str, Any]:
    """Append one trial: ``fault`` injected, ``survived`` = the stage recovered / refused cleanly."""
    row = {"suite": suite, "trial": trial, "fault": fault, "survived": bool(survived),
           "records_lost": int(records_lost), "bad_inputs_tried": int(bad_inputs_tried),
           "bad_inputs_counted": int(bad_inputs_counted), **extra}
    line = (json.dumps(row, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(results_path(), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return row
