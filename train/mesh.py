"""Mesh from the config, multi-host start-up and the "mostly replicated" warning.

``build_mesh(config)``: initialises ``jax.distributed`` when running as one of several processes (TPU VM
slices set the environment that ``jax.distributed.initialize()`` reads; a plain CPU/GPU single process is left
alone), checks the mesh shape against the device count (``config_schema.mesh_shape``: a ConfigError before
any compile) and returns a ``(data, fsdp, tensor)`` mesh with Auto axes.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
from jax.sharding import Mesh

from metaclip_jax import config_schema, sharding

log = logging.getLogger(__name__)

def _is_multi_process_env() -> bool:
    """TPU VM pod slices (several worker hostnames), multi-slice, SLURM with several tasks, or explicit."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:
        return True
    if os.environ.get("SLURM_NTASKS", "1") not in ("", "1"):
        return True
    return any(os.environ.get(k) for k in ("MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"))


def maybe_initialize_distributed(force: bool | None = None) -> bool:
    """Call ``jax.distributed.initialize()`` once when several processes run the job. Returns whether it did.

    ``force``: True / False overrides the environment check (``None``: decide from the environment).
    Must run before the first use of a jax backend.
    """
    want = _is_multi_process_env() if force is None else force
    if not want:
        return False
    if jax.distributed.is_initialized():
        return True
    jax.distributed.initialize()
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def build_mesh(config: Any, devices: list[jax.Device] | None = None) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh of ``config.mesh`` over ``devices`` (default: all)."""
    if devices is None:
        maybe_initialize_distributed()
        devices = jax.devices()
    data, fsdp, tensor = config_schema.mesh_shape(config, len(devices))
    return sharding.make_mesh(data, fsdp, tensor, devices=devices)


def warn_if_replicated(config: Any, state_shardings: Any, abstract_params: Any) -> float:
    """logging.warning when more than ``config.mesh.replicated_warning`` of the parameter bytes are replicated
    on a mesh with more than one device along fsdp/tensor (pure data parallelism replicates by design).
    Returns the replicated fraction."""
    frac = sharding.replicated_fraction(state_shardings.params, abstract_params)
    mesh = jax.tree.leaves(state_shardings.params)[0].mesh
    model_parallel = mesh.shape.get("fsdp", 1) * mesh.shape.get("tensor", 1)
    if model_parallel > 1 and frac > config.mesh.replicated_warning:
        log.warning("%.0f%% of parameter bytes are replicated on mesh %s (threshold %.0f%%): the rules in "
                    "config.mesh.rules shard little of this model; check them or the axis sizes.",
                    100 * frac, dict(mesh.shape), 100 * config.mesh.replicated_warning)
    return frac
