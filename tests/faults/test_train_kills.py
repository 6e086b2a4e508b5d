"""``python -m train`` under faults, in subprocesses sharing test_train_loop's compilation cache and its
uninterrupted reference run (no extra reference run):

- one seeded chain per seed: SIGKILL at a random step -> resume -> SIGTERM at a random step (saves, exits 0)
  -> resume -> SIGKILL right after an async checkpoint's temporary folder appears (mid-write) -> resume to
  the end: final state bitwise equal to the reference; then flip a byte in the newest checkpoint's array
  data and rerun: it falls back to the previous checkpoint with a message and ends bitwise equal again;
- a NaN injected at a random step: exit 1 with a message, nothing saved at or after it, and the last good
  checkpoint restores with its fingerprint verified.
"""

from __future__ import annotations

import glob
import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from tests.faults import trials
from tests.test_checkpoint import _flip, _largest
from tests.test_train_loop import (  # the env / reference fixtures come through conftest.py
    ARGS,
    SLOW,
    TOTAL,
    _assert_bitwise_equal,
    _finish,
    _run,
    _start,
    _state,
    _steps,
    _wait_for_checkpoint,
)

pytestmark = pytest.mark.faults


def _wait_for_text(proc, text: str, timeout: float = 240) -> None:
    t0 = time.time()
    while text not in Path(proc.log_path).read_text():
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) before {text!r}:\n"
                                 + Path(proc.log_path).read_text()[-3000:])
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"no {text!r} after {timeout}s")
        time.sleep(0.02)


def _last_step_logged(proc) -> int:
    """The last step the run reported (metric rows every 2 steps; saves every 2 steps)."""
    out = Path(proc.log_path).read_text()
    steps = [int(line.split("saving step ")[1].split()[0])
             for line in out.splitlines() if "saving step " in line]
    return max(steps, default=0)


def _tmp_dirs(workdir: Path) -> list[str]:
    return glob.glob(str(workdir / "checkpoints" / "*.orbax-checkpoint-tmp*"))


def _bitwise(ref: Path, workdir: Path) -> bool:
    try:
        _assert_bitwise_equal(_state(ref, TOTAL), _state(workdir, TOTAL))
        return True
    except AssertionError:
        return False


@pytest.mark.parametrize("seed", trials.seeds((0,)))
def test_kill_sigterm_async_write_and_damage_chain(reference, env, tmp_path, seed):
    rng = trials.rng(seed, "train-chain")
    wd = tmp_path
    faults = []

    # 1) SIGKILL at a random step: after checkpoint 2, a random 0-0.9 s (0-3 steps of 0.3 s) later
    proc = _start(wd, env, *SLOW)
    _wait_for_checkpoint(proc, wd, 2)
    time.sleep(rng.uniform(0.0, 0.9))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    faults.append({"fault": "SIGKILL at a random step", "after_step": _last_step_logged(proc)})
    assert _steps(wd)[-1] < TOTAL

    # 2) resume, SIGTERM at a random step: saves that step, exits 0
    proc = _start(wd, env, *SLOW)
    _wait_for_text(proc, "resume: step")
    time.sleep(rng.uniform(0.0, 0.6))
    proc.send_signal(signal.SIGTERM)
    rc, out = _finish(proc)
    assert rc == 0, out[-4000:]
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["stop_reason"] == "preempted", summary
    assert _steps(wd)[-1] == summary["step"]
    faults.append({"fault": "SIGTERM at a random step", "at_step": summary["step"]})

    # 3) resume, SIGKILL as soon as an async checkpoint's temporary folder appears (the write in flight)
    proc = _start(wd, env, *SLOW, "--config.checkpoint.async_save=true")
    t0 = time.time()
    while not _tmp_dirs(wd) and proc.poll() is None and time.time() - t0 < 240:
        time.sleep(0.002)
    caught = _tmp_dirs(wd)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert caught, "no checkpoint temporary folder was seen before the run ended"
    faults.append({"fault": "SIGKILL during an async checkpoint write", "tmp_dir": Path(caught[0]).name,
                   "tmp_left_behind": bool(_tmp_dirs(wd))})

    # 4) resume to the end: temporary folders cleaned, bitwise equal to the uninterrupted run
    rc, out = _run(wd, env)
    assert rc == 0, out[-4000:]
    assert "resume: step" in out and not _tmp_dirs(wd)
    exact = _bitwise(reference, wd)
    for f in faults:
        trials.record("train", f"{f['fault']}-seed{seed}", survived=exact, **f)
    assert exact, "final state differs from the uninterrupted run"

    # 5) damage the newest checkpoint (a flipped byte in compressed array data), rerun: falls back
    _flip(_largest(f"{wd}/checkpoints/{TOTAL}/state/ocdbt.process_0/d/*"))
    rc, out = _run(wd, env)
    assert rc == 0, out[-4000:]
    fell_back = f"checkpoint at step {TOTAL} is damaged" in out and f"resume: step {TOTAL - 2}" in out
    exact = _bitwise(reference, wd)
    trials.record("train", f"damaged-newest-checkpoint-e2e-seed{seed}", fault="flipped byte in newest "
                  "checkpoint, rerun", survived=fell_back and exact)
    assert fell_back, out[-4000:]
    assert exact and len(list((wd / "checkpoints.damaged").iterdir())) == 1


@pytest.mark.parametrize("seed", trials.seeds((0,)))
def test_nan_stops_and_last_good_checkpoint_restores(env, tmp_path, seed):
    import jax

    from metaclip_jax.config_schema import load_config
    from metaclip_jax.sharding import make_mesh
    from train.checkpoint import Checkpointer
    from train.state import abstract_train_state

    nan_at = trials.rng(seed, "train-nan").randint(3, TOTAL)
    rc, out = _run(tmp_path, env, f"--config.debug_nan_at_step={nan_at}")
    stopped = rc == 1 and "non-finite loss" in out and f"at step {nan_at}" in out
    steps = _steps(tmp_path)
    good = [s for s in range(2, TOTAL + 1, 2) if s < nan_at]
    config = load_config("configs/tiny.py", [a for a in ARGS if a.startswith("--config.")])
    mesh = make_mesh(data=1, devices=jax.devices()[:1])
    abstract, _ = abstract_train_state(config, mesh)
    ckpt = Checkpointer(str(tmp_path), every_steps=0)
    restored = ckpt.restore_latest(abstract)  # verifies the saved fingerprint; raises nothing on success
    ckpt.close()
    finite = restored is not None and all(np.isfinite(np.asarray(x)).all()
                                          for x in jax.tree.leaves(restored.state.params))
    intact = restored is not None and restored.step == good[-1] and finite
    trials.record("train", f"nan-at-step-{nan_at}-seed{seed}", fault="NaN injected into the loss",
                  survived=stopped and intact and steps == good[-3:], nan_step=nan_at)
    assert stopped, out[-3000:]
    assert steps == good[-3:], (steps, nan_at)  # keep=3; nothing at or after the bad step
    assert intact, restored
    assert not (tmp_path / "checkpoints.damaged").exists()
