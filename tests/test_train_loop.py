"""``python -m train`` end to end in subprocesses (1 CPU device each): outputs, exact resume after SIGKILL,
SIGTERM preemption (save, exit 0, continue), and a non-finite loss stopping the run.

The runs share a JAX persistent compilation cache, so only the first one compiles.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TOTAL = 10
ARGS = ["--config", "configs/tiny.py", f"--config.total_steps={TOTAL}", "--config.log_every_steps=2",
        "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=3",
        "--config.checkpoint.async_save=true", "--config.data.synthetic_examples=256",
        "--config.optimizer.warmup_steps=3"]
SLOW = ["--config.debug_step_delay_s=0.3"]  # widens the window in which the tests kill the run

pytestmark = pytest.mark.slow


def _shared_root(tmp_path_factory, worker_id: str) -> Path:
    """The session's temp root, shared by pytest-xdist workers (so the reference run happens once)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if worker_id != "master" else base


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def env(tmp_path_factory, worker_id) -> dict[str, str]:
    cache = _shared_root(tmp_path_factory, worker_id) / "train_loop_jax_cache"
    cache.mkdir(exist_ok=True)
    e = dict(os.environ)
    e.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
    return e


def _start(workdir: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / f"run-{time.time_ns()}.log", "w")  # noqa: SIM115 (closed with the process)
    cmd = [sys.executable, "-m", "train", *ARGS, "--workdir", str(workdir), *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log.name  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return rc, Path(proc.log_path).read_text()  # type: ignore[attr-defined]


def _run(workdir: Path, env: dict[str, str], *extra: str) -> tuple[int, str]:
    return _finish(_start(workdir, env, *extra))


def _steps(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _wait_for_checkpoint(proc: subprocess.Popen, workdir: Path, step: int, timeout: float = 240) -> None:
    t0 = time.time()
    while step not in _steps(workdir):
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) before checkpoint {step}:\n"
                                 + Path(proc.log_path).read_text()[-3000:])  # type: ignore[attr-defined]
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"no checkpoint {step} after {timeout}s")
        time.sleep(0.05)


def _state(workdir: Path, step: int) -> dict:
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    import jax

    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert x.tobytes() == y.tobytes(), f"{jax.tree_util.keystr(path)} differs"


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _colour_folder(root: Path) -> str:
    """A 3-class image folder for the in-loop zero-shot evaluator."""
    from PIL import Image

    for name, col in {"red": (220, 30, 30), "green": (30, 190, 30), "blue": (30, 30, 220)}.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.new("RGB", (32 + 4 * i, 32), col).save(root / name / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env, worker_id) -> Path:
    """One uninterrupted run (once per session, shared by xdist workers), with an in-loop zero-shot
    evaluator every 5 steps."""
    root = _shared_root(tmp_path_factory, worker_id)
    workdir = root / "train_loop_reference"
    with _locked(root / "train_loop_reference.lock"):
        if not (workdir / "summary.json").exists():
            folder = _colour_folder(root / "train_loop_colours")
            evals = [{"name": "colours", "type": "zeroshot", "dataset": f"folder:{folder}",
                      "templates": ["{c}"], "batch_size": 2}]
            rc, out = _run(workdir, env, f"--config.eval.evaluators={evals!r}", "--config.eval.every_steps=5")
            assert rc == 0, out[-4000:]
    return workdir


def test_uninterrupted_run_outputs(reference):
    assert _steps(reference)[-1] == TOTAL and len(_steps(reference)) == 3  # keep=3
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["stop_reason"] == "completed" and summary["examples_seen"] == TOTAL * 16
    rows = [r for r in _metrics(reference) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(2, TOTAL + 1, 2))
    evals = [r for r in _metrics(reference) if "eval/colours/top1" in r]
    assert [r["step"] for r in evals] == [5, 10] and 0 <= evals[-1]["eval/colours/top1"] <= 100
    for key in ("loss", "lr", "logit_scale", "grad_norm", "perf/samples_per_s",
                "perf/samples_per_s_per_device", "perf/data_wait_s", "perf/tflops_per_device",
                "perf/examples_seen", "data/skipped/bad_record"):
        assert key in rows[-1], key
    assert rows[-1]["perf/examples_seen"] == TOTAL * 16
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    assert (reference / "training_curves.png").stat().st_size > 1000
    log = next(reference.glob("run-*.log")).read_text()
    assert f"step {TOTAL:>7d}/{TOTAL}" in log and "samples/s" in log and "eta" in log
    meta = json.loads((reference / "checkpoints" / str(TOTAL) / "metadata" / "metadata").read_text())
    assert meta["model_type"] == "clip" and meta["scanned_layers"] is True
    assert meta["model_config"]["vision"]["width"] == 64 and meta["config"]["total_steps"] == TOTAL
    counters = json.loads((reference / "checkpoints" / str(TOTAL) / "counters" / "metadata").read_text())
    assert counters["examples_seen"] == TOTAL * 16 and counters["train_seconds"] > 0


def test_sigkill_then_resume_is_bitwise_exact(reference, env, tmp_path):
    proc = _start(tmp_path, env, *SLOW)
    _wait_for_checkpoint(proc, tmp_path, 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _steps(tmp_path)[-1] < TOTAL, "the run finished before it was killed"
    killed_at = max(r["step"] for r in _metrics(tmp_path))
    rc, out = _run(tmp_path, env)
    assert rc == 0, out[-4000:]
    assert "resume: step" in out
    _assert_bitwise_equal(_state(reference, TOTAL), _state(tmp_path, TOTAL))
    # metrics.jsonl reads as one history (rows past the restored step were rewritten), same losses
    rows, ref = _metrics(tmp_path), [r for r in _metrics(reference) if "loss" in r]
    assert [r["step"] for r in rows] == [r["step"] for r in ref], killed_at
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]
    counters = json.loads((tmp_path / "checkpoints" / str(TOTAL) / "counters" / "metadata").read_text())
    assert counters["examples_seen"] == TOTAL * 16


def test_sigterm_saves_exits_0_and_continues(reference, env, tmp_path):
    proc = _start(tmp_path, env, *SLOW)
    _wait_for_checkpoint(proc, tmp_path, 2)
    proc.send_signal(signal.SIGTERM)
    rc, out = _finish(proc)
    assert rc == 0, out[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stop_reason"] == "preempted" and summary["step"] < TOTAL, summary
    assert "preemption (SIGTERM): saved step" in out
    assert _steps(tmp_path)[-1] == summary["step"]  # saved at the step boundary it stopped at
    rc, out = _run(tmp_path, env)
    assert rc == 0, out[-4000:]
    assert f"resume: step {summary['step']}" in out
    _assert_bitwise_equal(_state(reference, TOTAL), _state(tmp_path, TOTAL))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(env, tmp_path):
    rc, out = _run(tmp_path, env, "--config.debug_nan_at_step=5")
    assert rc == 1, out[-4000:]
    assert "non-finite loss" in out and "at step 5" in out, out[-3000:]
    assert _steps(tmp_path) == [2, 4]  # nothing at or after the bad step
    state = _state(tmp_path, 4)
    assert all(np.isfinite(np.asarray(x)).all() for x in __import__("jax").tree.leaves(state["params"]))
