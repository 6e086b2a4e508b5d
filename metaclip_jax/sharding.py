"""Sharding by rules: logical axis names on every parameter, one table maps them to mesh axes.

Parameters are created with logical names (``embed``, ``mlp``, ``heads``, ...) stored as variable
metadata under ``LOGICAL_AXES_KEY``. Nothing is sharded eagerly: the train state is initialised under
``jax.jit`` with ``out_shardings`` computed from these names and a rules table, so FSDP versus tensor
parallelism is a config change (the rules), not a code change.

We deliberately keep the names in our own metadata key rather than Flax's ``out_sharding`` (renamed
four times across Flax releases, and eager-sharding when set): one local function reads them.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

LOGICAL_AXES_KEY = "logical_axes"
MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
# FSDP: shard the model width over ``fsdp``; tensor parallelism: heads / mlp / vocab over ``tensor``.
# The batch goes over every data-parallel axis.
DEFAULT_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",          # model width (vision W or text T)
    "joint_embed": None,      # CLIP joint embedding dim E (small)
    "mlp": "tensor",
    "heads": "tensor",
    "kv": None,               # head_dim
    "qkv": None,              # the 3 of a fused qkv kernel
    "vocab": "tensor",
    "layers": None,           # stacked layer axis of scanned blocks
    "patch": None,            # patch pixels (P * P * 3)
    "tokens": None,           # sequence / positional rows
    "mixture": None,          # Llip mixture tokens K
}


def logical_to_spec(axes: Sequence[str | None] | None, rules: Mapping[str, Any] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
    """Map a tuple of logical names to a PartitionSpec.

    A mesh axis is used at most once per array (first logical axis wins) and mesh axes of size 1
    are dropped, so the same rules work on any mesh shape.
    """
    if axes is None:
        return PartitionSpec()
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for name in axes:
        target = rules.get(name) if name is not None else None
        if target is None:
            spec.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        keep = []
        for t in targets:
            if t in used:
                continue
            if mesh is not None and (t not in mesh.shape or mesh.shape[t] == 1):
                continue
            keep.append(t)
            used.add(t)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _divisible(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes from dims they do not divide (small test models on big meshes)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if entry is None:
            out.append(None)
            continue
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        size = int(np.prod([mesh.shape[n] for n in names]))
        out.append(entry if dim % size == 0 else None)
    return PartitionSpec(*out)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh with Auto axes; ``-1`` takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices are not divisible by fsdp*tensor = {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
                         f"{int(np.prod(sizes))} devices, have {len(devices)}")
    arr = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def variable_logical_axes(variable: Any) -> tuple[str | None, ...] | None:
    """The logical axis names stored on an nnx.Variable (or None)."""
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    return meta.get(LOGICAL_AXES_KEY)


def tree_logical_axes(state: Any) -> Any:
    """Map an nnx.State of Variables to a pytree (same structure) of logical-axes tuples."""
    from flax import nnx

    return jax.tree.map(
        lambda v: variable_logical_axes(v) if isinstance(v, nnx.Variable) else None,
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def tree_shardings(abstract_state: Any, mesh: Mesh, rules: Mapping[str, Any] | None = None) -> Any:
    """NamedShardings for a (possibly abstract) nnx.State, from its logical-axes metadata."""
    from flax import nnx

    def one(v: Any) -> NamedSharding:
        if isinstance(v, nnx.Variable):
            axes = variable_logical_axes(v)
            shape = v.get_value().shape if hasattr(v, "get_value") else v.value.shape
        else:
            axes, shape = None, np.shape(v)
        spec = logical_to_spec(axes, rules, mesh)
        return NamedSharding(mesh, _divisible(shape, spec, mesh))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int, rules: Mapping[str, Any] | None = None) -> NamedSharding:
    """Sharding for a batch-major array: leading axis over the batch axes, the rest replicated."""
    spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh)
    return NamedSharding(mesh, spec)


def replicated_fraction(shardings: Any, shapes: Any, itemsize: int = 4) -> float:
    """Fraction of parameter bytes that are fully replicated (for the "mostly replicated" warning)."""
    total = replicated = 0
    for sh, shape in zip(jax.tree.leaves(shardings), jax.tree.leaves(shapes)):
        n = int(np.prod(getattr(shape, "shape", shape))) * itemsize
        total += n
        if all(p is None for p in sh.spec):
            replicated += n
    return replicated / max(total, 1)


# ----------------------------------------------------------------------------------------------
# Activation sharding: model code marks activations with logical names (``constrain(x, ("batch", None,
# None))``); inside ``activation_sharding(mesh, rules)`` (entered by the train step while it traces) that
# becomes a ``with_sharding_constraint``, elsewhere (eager use, evaluation, tests) a no-op. Without these
# marks GSPMD may resolve an einsum whose batch and contracting dims share a mesh axis (FSDP: batch over
# ``fsdp``, weights' width over ``fsdp``) by gathering the activations instead of the weights.

_ACTIVATION_CTX: contextvars.ContextVar[tuple[Mesh, Mapping[str, Any]] | None] = contextvars.ContextVar(
    "metaclip_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Within this context, ``constrain`` pins activations to ``rules`` on ``mesh``."""
    token = _ACTIVATION_CTX.set((mesh, DEFAULT_RULES if rules is None else rules))
    try:
        yield
    finally:
        _ACTIVATION_CTX.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical axis names inside ``activation_sharding``; else ``x``."""
    ctx = _ACTIVATION_CTX.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = _divisible(x.shape, logical_to_spec(tuple(axes), rules, mesh), mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
