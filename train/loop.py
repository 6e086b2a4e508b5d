"""The training loop, as a recipe: config -> mesh -> data -> state -> restore -> step -> loop -> save.

``train_and_evaluate(config, workdir)`` runs (or resumes) one experiment. Every section below is one
stage; the helpers they call live in ``train/{state,step,mesh,checkpoint,metrics}.py``.

Resume is exact: a checkpoint holds the TrainState (params, optimizer state, step, rng), the Grain
iterator state and the timing counters, so a run killed at any point and restarted continues with the
same bits as an uninterrupted run (the step is deterministic and the data stream is a pure function of
the seed and the position).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metaclip_jax import config_schema
from train import metrics as metrics_lib
from train.checkpoint import Checkpointer, PreemptionGuard, build_metadata

log = logging.getLogger(__name__)

# Loop knobs that live in this package (added to the schema here, see config_schema.extend_schema).
config_schema.extend_schema("", {
    "peak_flops_per_device": config_schema.Field(
        (float, int), None, optional=True,
        doc="peak FLOP/s of one device for MFU; None = look up the device kind (none on CPU)"),
    "debug_nan_at_step": config_schema.Field(
        (int,), None, optional=True,
        doc="testing: poison the params before this step so its loss is NaN (the run must stop)"),
    "debug_step_delay_s": config_schema.Field(
        (float, int), 0.0, doc="testing: sleep this long after every step (widens kill windows)"),
})


class TrainingStopped(RuntimeError):
    """The run stopped early on purpose (non-finite loss); the message says why."""


def _get(config: Any, key: str, default: Any = None) -> Any:
    node = config
    for part in key.split("."):
        if node is None or not hasattr(node, "get"):
            return default
        node = node.get(part)
    return default if node is None else node


def model_config_of(config: Any) -> Any:
    """The model's config dataclass (``CLIPConfig`` for "clip"), for the checkpoint metadata."""
    from metaclip_jax.models import registry

    mtype = config.model.type
    fn = getattr(registry, f"{mtype}_model_config", None)
    if fn is None:
        mod = registry.get_model_type(mtype).build.__module__
        fn = getattr(__import__(mod, fromlist=["_"]), f"{mtype}_model_config", None)
    if fn is None:
        return {"preset": config.model.preset}
    return fn(config)


def ensure_synthetic_data(config: Any, workdir: str) -> Any:
    """``data.synthetic_examples > 0`` and no paths: write generated records once into the workdir."""
    n = int(_get(config, "data.synthetic_examples", 0))
    if n <= 0 or _get(config, "data.paths"):
        return config
    from input_pipeline import synthetic

    folder = os.path.join(workdir, "data", f"synthetic-{n}-seed{config.data.seed}")
    if not os.path.isdir(folder) and jax.process_index() == 0:
        tmp = f"{folder}.tmp-{os.getpid()}"
        size = int(config_schema.train_data_config(config)["image_size"])
        synthetic.write_shards(tmp, synthetic.synthetic_records(n, width=size * 2, height=size * 3 // 2,
                                                                seed=config.data.seed), num_shards=2)
        os.replace(tmp, folder)
        log.info("data: wrote %d synthetic records to %s", n, folder)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("synthetic_data")
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.paths = (folder,)
    return config


def init_params_from(config: Any, state: Any, shardings: Any) -> Any:
    """``config.init_from``: replace a fresh state's params with a checkpoint's (the optimizer starts fresh).

    Accepts whatever ``metaclip_jax.checkpoint_io.load_params`` reads (params-only export, a training
    workdir / step folder, open_clip files). Tree structure and shapes must match the configured model;
    a differing stored model config (e.g. the activation) is an error.
    """
    from metaclip_jax import checkpoint_io

    loaded = checkpoint_io.load_params(config.init_from)
    ours = model_config_of(config)
    if loaded.model_type != config.model.type:
        raise ValueError(f"init_from {config.init_from}: model_type {loaded.model_type!r} != "
                         f"config.model.type {config.model.type!r}")
    if hasattr(ours, "to_dict") and hasattr(loaded.config, "to_dict"):
        skip = {"dtype", "remat", "attention", "init_logit_scale", "init_logit_bias"}
        a = {k: v for k, v in loaded.config.to_dict().items() if k not in skip}
        b = {k: v for k, v in ours.to_dict().items() if k not in skip}
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            raise ValueError(f"init_from {config.init_from}: model config differs in {diff} "
                             f"(checkpoint {[a.get(k) for k in diff]}, config {[b.get(k) for k in diff]})")
    want = jax.tree_util.tree_structure(state.params)
    got = jax.tree_util.tree_structure(loaded.params)
    if want != got:
        raise ValueError(f"init_from {config.init_from}: parameter tree differs from the model's")
    leaves = jax.tree.leaves(loaded.params)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(state.params), leaves):
        if tuple(x.shape) != tuple(np.shape(y)):
            raise ValueError(f"init_from: {jax.tree_util.keystr(path)} has shape {np.shape(y)}, "
                             f"the model wants {x.shape}")
    params = jax.tree.map(lambda y, x, sh: jax.device_put(np.asarray(y).astype(x.dtype), sh),
                          loaded.params, state.params, shardings.params)
    log.info("init: params from %s (%s); optimizer state fresh", config.init_from, loaded.source)
    return state.replace(params=params)


def _poison(state: Any) -> Any:
    """Testing only: NaN every float parameter, so the next step's loss is NaN."""
    def nan_like(x: Any) -> Any:
        return x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x
    return state.replace(params=jax.tree.map(nan_like, state.params))


def _compile_step(config: Any, train_step: Callable, state: Any, batch: Any
                  ) -> tuple[Callable, float | None]:
    """AOT-compile the step; return a callable that uses the compiled executable and the model FLOPs."""
    try:
        compiled = train_step.lower(state, batch).compile()
    except Exception as e:  # not a jax.jit object: no AOT, no MFU
        log.info("step: AOT compile unavailable (%s); MFU not reported", e)
        return train_step, None
    flops = metrics_lib.model_flops_per_device(config)
    fallback: list[bool] = []

    def run(state: Any, batch: Any) -> Any:
        if not fallback:
            try:
                return compiled(state, batch)
            except (TypeError, ValueError) as e:  # input types / shardings differ (checked before
                # donation, nothing ran): use the jit path, which retraces or reshards as needed
                log.info("step: compiled signature mismatch (%s); using jit dispatch", e)
                fallback.append(True)
        return train_step(state, batch)

    return run, flops


class EvalHook:
    """In-loop evaluation: ``config.eval.evaluators`` built by ``evaluate.registry`` (imported lazily).

    Each entry is a dict with a ``name`` (see ``evaluate/registry.py``); ``config.eval.every_steps`` is the
    default cadence (an entry's own ``every_steps`` wins); every evaluator also runs on the last step.
    Results come back as ``eval/<entry>/<metric>``.
    """

    def __init__(self, evaluators: list[Any], registry: Any, graphdef: Any):
        self.evaluators = evaluators
        self._registry = registry
        self._graphdef = graphdef

    @classmethod
    def build(cls, config: Any, mesh: Any) -> EvalHook | None:
        entries = list(_get(config, "eval.evaluators", ()) or ())
        if not entries:
            log.info("eval: no in-loop evaluators configured (config.eval.evaluators is empty)")
            return None
        try:
            from evaluate import registry
        except ImportError as e:
            log.warning("eval: %d evaluator(s) configured but evaluate.registry is unavailable (%s); "
                        "skipping in-loop evaluation", len(entries), e)
            return None
        from train.state import build_model

        graphdef, _ = build_model(config)
        plain = [e.to_dict() if hasattr(e, "to_dict") else dict(e) for e in entries]
        evaluators = registry.build_evaluators({"eval": plain}, mesh, graphdef=graphdef,
                                               defaults={"every_steps": _get(config, "eval.every_steps")})
        log.info("eval: %s", ", ".join(f"{ev.name} every {ev.every_steps}" for ev in evaluators))
        return cls(evaluators, registry, graphdef)

    def due(self, step: int, last_step: bool) -> bool:
        return any(ev.should_run(step, last_step) for ev in self.evaluators)

    def __call__(self, step: int, params: Any, last_step: bool) -> dict[str, float]:
        res = self._registry.run_evaluators(self.evaluators, params, step, last_step=last_step)
        return {f"eval/{k}": float("nan") if v is None else float(v) for k, v in res.items()}


# --------------------------------------------------------------------------------------------- recipe

def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Train (or resume) ``config`` in ``workdir``; returns a summary dict. Raises ``TrainingStopped``
    on a non-finite loss (after the last good checkpoint has finished writing)."""
    from input_pipeline import make_train_iterator
    from train.mesh import build_mesh, warn_if_replicated
    from train.state import abstract_train_state, create_train_state
    from train.step import make_train_step

    # ---- mesh (first: it starts jax.distributed on multi-host slices) ------------------------------
    mesh = build_mesh(config)
    log.info("mesh: %s over %d devices (%s)", dict(mesh.shape), mesh.devices.size,
             jax.devices()[0].device_kind)

    # ---- config ---------------------------------------------------------------------------------
    primary = jax.process_index() == 0
    # Checkpoints go to ``workdir`` (local or gs://). Metrics, plots and generated data need a local
    # folder: the workdir itself, or for a remote workdir a local mirror named after the run.
    local_dir = workdir if "://" not in workdir else os.path.join(
        os.environ.get("METACLIP_LOCAL_DIR", "runs"), workdir.rstrip("/").rsplit("/", 1)[-1])
    os.makedirs(local_dir, exist_ok=True)
    if local_dir != workdir:
        log.info("workdir %s is remote: metrics, plots and generated data go to %s", workdir, local_dir)
    config = ensure_synthetic_data(config, local_dir)
    total_steps = int(config.total_steps)
    batch_size = int(config.data.global_batch_size)
    log_every = int(config.log_every_steps)
    on_cpu = jax.devices()[0].platform == "cpu"  # pitfall: block on every step (CPU rendezvous)
    nan_step = _get(config, "debug_nan_at_step")
    delay = float(_get(config, "debug_step_delay_s", 0.0))
    if primary:
        _write_json(os.path.join(local_dir, "config.json"), config.to_dict())

    # ---- data -----------------------------------------------------------------------------------
    data_it = make_train_iterator(config_schema.train_data_config(config), mesh)

    # ---- state + restore --------------------------------------------------------------------------
    c = config.checkpoint
    ckpt = Checkpointer(workdir, every_steps=int(c.every_steps), max_to_keep=int(c.keep),
                        async_save=bool(c.async_save))
    guard = PreemptionGuard(ckpt)
    chrono = metrics_lib.Chrono(batch_size, mesh.devices.size, total_steps)
    with jax.set_mesh(mesh):
        abstract, shardings = abstract_train_state(config, mesh)
        restored = ckpt.restore_latest(abstract, data_it)
        if restored is not None:
            state, step = restored.state, restored.step
            chrono.load(restored.counters, step)
            log.info("resume: step %d (%.0f train-seconds, %d examples seen so far)", step,
                     chrono.train_seconds, chrono.examples_seen)
        else:
            state, shardings = create_train_state(config, mesh)
            step = 0
            chrono.load(None, 0)
            log.info("init: fresh state (seed %d)", config.seed)
            if _get(config, "init_from"):
                state = init_params_from(config, state, shardings)
        warn_if_replicated(config, shardings, abstract.params)
    metadata = build_metadata(config, model_config_of(config), model_type=config.model.type,
                              mesh_shape=dict(mesh.shape))

    # ---- step -----------------------------------------------------------------------------------
    train_step = make_train_step(config, mesh, shardings)
    eval_hook = EvalHook.build(config, mesh)
    writer = metrics_lib.MetricWriter(local_dir, enabled=primary, resume_step=step)
    peak = metrics_lib.peak_flops_per_device(_get(config, "peak_flops_per_device"))
    flops: float | None = None
    run_step: Callable | None = None
    pending: list[tuple[int, Any]] = []   # (step, device metrics) not yet fetched and checked
    log_at: int | None = None             # the step whose metrics are logged at the next flush
    log_perf: dict[str, float] = {}       # host-side rates measured when that step was reached

    def flush(upto: int) -> None:
        """Fetch pending metrics up to ``upto``: check every step finite, write the logged one."""
        nonlocal log_at
        ready = [p for p in pending if p[0] <= upto]
        if not ready:
            return
        del pending[:len(ready)]
        host = jax.device_get([p[1] for p in ready])
        for (s, _), m in zip(ready, host):
            metrics_lib.check_finite(s, m)
            if s == log_at:
                row = {**{k: _f(v) for k, v in dict(m).items()}, **log_perf}
                writer.write(s, row)
                if primary:
                    log.info("%s", metrics_lib.console_line(s, total_steps, row))
                log_at = None

    def reached_log_step(s: int) -> None:
        nonlocal log_at, log_perf
        log_at = s
        log_perf = chrono.window(s)
        log_perf.update(metrics_lib.mfu_metrics(flops, log_perf["perf/step_time_s"], peak))
        stats = data_it.stats
        log_perf.update({f"data/{k}": float(v) for k, v in stats.items() if k.startswith("skipped/")})
        log_perf["data/epoch"] = float(stats.get("epoch", 0))

    def save(s: int) -> None:
        flush(s)  # never save a state whose loss was not checked finite
        chrono.pause()
        ckpt.save(s, state, data_it, metadata, chrono.state())
        chrono.resume()

    # ---- loop -----------------------------------------------------------------------------------
    stop_reason = "completed"
    try:
        with jax.set_mesh(mesh):
            if step == 0 and total_steps > 0 and primary:
                log.info("train: %d steps of %d examples", total_steps, batch_size)
            while step < total_steps:
                t0 = time.perf_counter()
                batch = next(data_it)
                chrono.add_data_wait(time.perf_counter() - t0)
                if run_step is None:
                    chrono.pause()
                    run_step, flops = _compile_step(config, train_step, state, batch)
                    log.info("step: compiled (%.3g FLOPs per device per step)", flops or float("nan"))
                    chrono.resume()
                if nan_step is not None and step + 1 == int(nan_step):
                    state = _poison(state)
                with jax.transfer_guard("disallow"):  # spec §6.14: no implicit host<->device copies
                    state, step_metrics = run_step(state, batch)
                step += 1
                if on_cpu:
                    jax.block_until_ready(step_metrics)
                chrono.add_step(batch_size)
                if log_at is not None:          # the previous log step: fetch it now (device runs ahead)
                    flush(log_at)
                pending.append((step, step_metrics))
                if step % log_every == 0 or step == total_steps:
                    reached_log_step(step)
                if delay:
                    time.sleep(delay)

                # ---- eval hook ----
                if eval_hook is not None and eval_hook.due(step, step == total_steps):
                    flush(step)
                    chrono.pause()
                    t_eval = time.perf_counter()
                    results = eval_hook(step, state.params, step == total_steps)
                    results["eval/seconds"] = time.perf_counter() - t_eval
                    writer.write(step, results)
                    log.info("eval step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in results.items()))
                    chrono.resume()

                # ---- save ----
                if guard.should_stop(step):
                    stop_reason = "preempted"
                    save(step)
                    log.warning("preemption (%s): saved step %d; exiting", guard.signal_name or "sync point",
                                step)
                    break
                if ckpt.due(step) and step < total_steps:
                    save(step)
            flush(step)
            # ---- final save ----
            if stop_reason == "completed":
                save(step)
    except metrics_lib.NonFiniteError as e:
        log.error("%s", e)
        stop_reason = "non-finite"
        raise TrainingStopped(str(e)) from e
    finally:
        ckpt.close()  # waits for in-flight saves (the last good checkpoint completes)
        guard.restore_handlers()
        writer.close()
        data_it.close()
        if primary:
            try:
                metrics_lib.plot_curves(local_dir)
            except Exception as e:  # plotting must never fail a run
                log.warning("plot: %s", e)
    summary = {"step": step, "stop_reason": stop_reason, "train_seconds": round(chrono.train_seconds, 3),
               "examples_seen": chrono.examples_seen, "checkpoints": ckpt.all_steps()}
    if primary:
        _write_json(os.path.join(local_dir, "summary.json"), summary)
        if stop_reason == "completed":  # launch.tpu supervise stops re-running once this exists
            from etils import epath

            epath.Path(workdir, "DONE").write_text(json.dumps(summary))
    log.info("done: %s", json.dumps(summary))
    return summary


def _f(v: Any) -> Any:
    a = np.asarray(v)
    return float(a) if a.size == 1 and a.dtype.kind in "biuf" else v


def _write_json(path: str, obj: Mapping[str, Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
