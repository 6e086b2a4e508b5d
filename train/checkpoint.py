"""Native Orbax training checkpoints (spec checkpoints_and_tokenizer.md §11).

Layout under ``<workdir>/checkpoints/`` (local path or ``gs://``; Orbax writes to GCS directly)::

    <step>/
      state/        TrainState (step, params, opt_state, rng): OCDBT + zarr3 arrays, restorable onto any
                    mesh (the target sharding comes from the abstract state built on the concrete mesh)
      data_iter/    Grain iterator state, one JSON per data-loading process (process_<i>-of-<n>.json)
      metadata/     JSON: model_type, model_config (CLIPConfig.to_dict()), the full experiment config,
                    code version, scanned_layers, library versions
      counters/     JSON: train_seconds, examples_seen, data_wait_seconds, and a fingerprint of the state
      _CHECKPOINT_METADATA, commit_success.txt     (Orbax: a step directory appears only once complete)

A step directory exists under its final name only after Orbax has committed it (written to a temporary
name, then renamed, or marked by ``commit_success.txt`` on GCS), so ``all_steps()`` lists only complete
checkpoints. A complete-but-damaged checkpoint (truncated or corrupted files: restore raises, or the
restored state does not match the saved fingerprint) is moved to ``<workdir>/checkpoints.damaged/`` with a
logged message naming the step and the error, and the previous checkpoint is tried.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints.damaged"
ITEMS = ("state", "data_iter", "metadata", "counters")


# --------------------------------------------------------------------------------------- fingerprint

def _leaf_u32(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size == 8:
        x = jax.lax.bitcast_convert_type(x, jnp.uint32)  # adds a trailing axis of 2
    elif size == 4:
        x = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
        x = jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 1: jnp.uint8}[size]).astype(jnp.uint32)
    x = x.reshape(-1)
    idx = jnp.arange(1, x.shape[0] + 1, dtype=jnp.uint32)
    # Integer sums wrap mod 2**32: exact and independent of sharding / reduction order.
    return jnp.stack([jnp.sum(x, dtype=jnp.uint32), jnp.sum(x * idx, dtype=jnp.uint32)])


@jax.jit
def _fingerprint_arrays(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([_leaf_u32(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def fingerprint(tree: Any) -> str:
    """A sharding-independent checksum of every array in ``tree`` (hex string).

    Orbax detects truncated files, but a flipped bit inside a compressed chunk can restore silently;
    the fingerprint, saved with the checkpoint and checked after restore, catches that (and any
    resharding mistake, since it weights every element by its flat index).
    """
    leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
    sums = np.asarray(jax.device_get(_fingerprint_arrays(leaves)), dtype=np.uint64)
    h = 0
    for i, (a, b) in enumerate(sums.tolist()):
        h = (h * 1_000_003 + (i + 1) * a + 7 * b) % (1 << 61)
    return f"{h:016x}-{len(leaves)}"


# ------------------------------------------------------------------------------------------- metadata

def code_version() -> str:
    """``git describe --always --dirty`` of the source tree, else the package version."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here,
                             capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()
    except Exception:
        try:
            from importlib.metadata import version

            return "metaclip-jax " + version("metaclip-jax")
        except Exception:
            return "unknown"


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def build_metadata(config: Any, model_config: Any, model_type: str = "clip", **extra: Any) -> dict[str, Any]:
    """The ``metadata`` item: what export / evaluation need to rebuild the model without the config file."""
    import flax

    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    mc = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    meta = {
        "model_type": model_type,
        "model_config": mc,
        "config": cfg,
        "code_version": code_version(),
        "scanned_layers": True,
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "orbax": _orbax_version()},
        **extra,
    }
    return _jsonable(meta)


def _orbax_version() -> str:
    try:
        from importlib.metadata import version

        return version("orbax-checkpoint")
    except Exception:
        return "unknown"


# ------------------------------------------------------------------------------------ data iterator

class _IteratorAdapter:
    """Presents a ``TrainIterator`` to Grain's Orbax handler (``get_state`` -> bytes).

    On restore the state is only recorded (``restored``): it is applied to the iterator after the whole
    checkpoint has restored and verified, so a damaged checkpoint never half-moves the data stream.
    """

    def __init__(self, iterator: Any):
        self._it = iterator
        self.restored: bytes | None = None

    def get_state(self) -> bytes:
        return json.dumps(self._it.get_state(), sort_keys=True).encode("utf-8")

    def set_state(self, state: bytes) -> None:
        self.restored = bytes(state)

    def start_prefetch(self) -> None:  # called by Grain's handler after set_state
        pass


# ------------------------------------------------------------------------------------------- manager

class CheckpointMismatch(ValueError):
    """A readable checkpoint whose state tree does not fit the configured model / optimizer (not damage:
    such checkpoints are never moved aside)."""


def _tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{"params/visual/...": shape}`` with dict keys, attribute names and indices alike."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        out["/".join(parts)] = tuple(getattr(leaf, "shape", np.shape(leaf)))
    return out


def _structure_difference(saved: dict[str, tuple], want: dict[str, tuple]) -> str | None:
    missing = sorted(set(want) - set(saved))
    extra = sorted(set(saved) - set(want))
    shapes = sorted(k for k in set(saved) & set(want) if saved[k] != want[k])
    if not (missing or extra or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if extra:
        parts.append(f"unexpected {extra[:3]}{' ...' if len(extra) > 3 else ''}")
    if shapes:
        parts.append("shape of " + ", ".join(f"{k} {saved[k]} (config wants {want[k]})" for k in shapes[:3]))
    return "; ".join(parts)

@dataclasses.dataclass
class Restored:
    """What ``Checkpointer.restore_latest`` returns."""

    step: int
    state: Any
    metadata: dict[str, Any]
    counters: dict[str, Any]


class Checkpointer:
    """An Orbax ``CheckpointManager`` over the four items, with our save policy and safe restore.

    Save policy: every ``every_steps`` steps, plus forced saves (end of training, preemption). A step
    already on disk is never re-saved. ``max_to_keep`` newest checkpoints are kept (None: all).
    """

    def __init__(self, workdir: str, *, every_steps: int, max_to_keep: int | None = 3,
                 async_save: bool = True):
        # Orbax needs absolute paths; a relative local workdir is taken from the current directory.
        self.workdir = str(workdir) if "://" in str(workdir) else os.path.abspath(workdir)
        self.directory = epath.Path(self.workdir) / CHECKPOINT_DIR
        self.every_steps = int(every_steps)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(self.every_steps, 1),
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,   # partial saves of a killed run
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.last_save_seconds = 0.0

    # queries --------------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def reached_preemption(self, step: int) -> bool:
        """Orbax/JAX's multi-host preemption sync point (False single-process or without the service)."""
        return bool(self.manager.reached_preemption(step))

    # save -----------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, data_iter: Any, metadata: Mapping[str, Any],
             counters: Mapping[str, Any]) -> bool:
        """Start an async save of all items at ``step`` (returns once arrays are copied off-device)."""
        if step in self.manager.all_steps():
            return False
        t0 = time.perf_counter()
        counters = dict(counters, step=int(step), fingerprint=fingerprint(state),
                        saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        import grain

        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=grain.checkpoint.CheckpointSave(_IteratorAdapter(data_iter)),
            metadata=ocp.args.JsonSave(_jsonable(dict(metadata))),
            counters=ocp.args.JsonSave(_jsonable(counters)),
        )
        saved = self.manager.save(step, args=args, force=True)
        self.last_save_seconds = time.perf_counter() - t0
        if saved:
            log.info("checkpoint: saving step %d (blocking part %.2fs)", step, self.last_save_seconds)
        return bool(saved)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # restore --------------------------------------------------------------------------------------
    def restore_step(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Restored:
        """Restore ``step`` into the shardings of ``abstract_state``; verify it; then set ``data_iter``."""
        import grain

        # Structure first: a checkpoint of another model / optimizer is a config error, not damage.
        meta = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state")
        saved = _tree_shapes(getattr(meta, "item_metadata", meta))
        if not saved:
            raise ValueError("the state item's tree metadata is missing or unreadable")
        diff = _structure_difference(saved, _tree_shapes(abstract_state))
        if diff:
            raise CheckpointMismatch(
                f"checkpoint step {step} in {self.directory} does not match the configured model/optimizer: "
                f"{diff}. Use a new workdir, or config.init_from to start from its params.")
        adapter = _IteratorAdapter(data_iter)
        items: dict[str, Any] = {
            "state": ocp.args.StandardRestore(abstract_state),
            "metadata": ocp.args.JsonRestore(),
            "counters": ocp.args.JsonRestore(),
        }
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(adapter)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        counters = dict(out["counters"] or {})
        expected = counters.get("fingerprint")
        if expected is not None:
            got = fingerprint(out["state"])
            if got != expected:
                raise ValueError(f"state fingerprint mismatch (saved {expected}, restored {got})")
        if data_iter is not None:
            if adapter.restored is None:
                raise ValueError("data iterator state missing")
            data_iter.set_state(json.loads(adapter.restored.decode("utf-8")))
        return Restored(step=step, state=out["state"], metadata=dict(out["metadata"] or {}),
                        counters=counters)

    def restore_latest(self, abstract_state: Any, data_iter: Any | None = None) -> Restored | None:
        """The newest checkpoint that restores and verifies; damaged newer ones are moved aside."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.restore_step(step, abstract_state, data_iter)
            except CheckpointMismatch:
                raise
            except Exception as e:
                msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}"
                log.error("checkpoint at step %d is damaged and cannot be restored (%s); moving it to %s/ "
                          "and falling back to the previous checkpoint", step, msg, DAMAGED_DIR)
                self._quarantine(step)
                continue
            log.info("checkpoint: restored step %d from %s", step, self.directory)
            return restored
        return None

    def _quarantine(self, step: int) -> None:
        src = self.directory / str(step)
        if jax.process_index() == 0 and src.exists():
            dst_root = epath.Path(self.workdir) / DAMAGED_DIR
            dst_root.mkdir(parents=True, exist_ok=True)
            dst = dst_root / f"{step}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
            try:
                src.rename(dst)
            except Exception as e:  # e.g. an object store without rename: delete instead
                log.warning("could not move %s aside (%s); deleting it", src, e)
                src.rmtree()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine_checkpoint_{step}")
        self.manager.reload()


# ---------------------------------------------------------------------------------------- preemption

class PreemptionGuard:
    """SIGTERM -> stop at the next step boundary, after a save.

    Single process: our own SIGTERM handler sets a flag (TPU VMs send SIGTERM before preemption).
    Multi-process: JAX's preemption sync service (``Checkpointer.reached_preemption``) decides, so every
    host stops at the same step; we do not replace its signal handler.
    """

    def __init__(self, checkpointer: Checkpointer | None = None,
                 signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._ckpt = checkpointer
        self._flag = threading.Event()
        self._previous: dict[int, Any] = {}
        self.signal_name: str | None = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        self._flag.set()

    def request(self) -> None:
        """Ask the loop to save and stop (tests, or callers with their own notification)."""
        self._flag.set()

    def should_stop(self, step: int) -> bool:
        if self._flag.is_set():
            return True
        if jax.process_count() > 1 and self._ckpt is not None:
            return self._ckpt.reached_preemption(step)
        return False

    def restore_handlers(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()


def on_main_process(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on process 0 only."""
    return fn() if jax.process_index() == 0 else None
