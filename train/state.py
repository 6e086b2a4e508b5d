"""Train state: a pure pytree of arrays, initialised directly sharded.

``TrainState(step, params, opt_state, rng)``:

- ``step``: int32 scalar, the number of optimizer updates applied so far;
- ``params``: the model's ``nnx.Param`` values as a **pure nested dict** of arrays
  (``nnx.State.to_pure_dict()``; e.g. ``params["visual"]["transformer"]["qkv_kernel"]``), float32. Pure dicts
  save and restore with plain Orbax ``PyTreeCheckpointHandler`` / ``StandardSave`` and match the
  ``open_clip_interop`` converters; ``nnx.merge(graphdef, params)`` rebuilds the module;
- ``opt_state``: the optax state over those params (float32; same shardings as the params);
- ``rng``: raw ``uint32[2]`` PRNG key data (``jax.random.PRNGKey``; Orbax-friendly, no typed key). The step
  uses ``fold_in(rng, step)``.

``create_train_state(config, mesh)`` builds everything with ``jax.jit(init, out_shardings=...)`` from
``jax.eval_shape``: no parameter is ever materialised on one device. ``abstract_train_state`` gives the same
tree as ``ShapeDtypeStruct`` s carrying their ``NamedSharding`` on ``mesh`` (the Orbax restore target for any
mesh, and the input of AOT lowering).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metaclip_jax import sharding
from metaclip_jax.models import registry
from train.optimizer import make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def mesh_rules(config: Any) -> dict[str, Any]:
    """DEFAULT_RULES updated with ``config.mesh.rules`` (lists become tuples)."""
    rules = dict(config.mesh.rules or {})
    over = {k: (tuple(v) if isinstance(v, list | tuple) else v) for k, v in rules.items()}
    return {**sharding.DEFAULT_RULES, **over}


def build_model(config: Any) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, abstract_params)`` for ``config.model.type``; the params are an ``nnx.State`` of
    ``nnx.Param`` holding ``ShapeDtypeStruct`` s with their logical-axes metadata. Nothing is allocated."""
    mt = registry.get_model_type(config.model.type)
    abstract_model = nnx.eval_shape(lambda: mt.build(config, nnx.Rngs(config.seed)))
    graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"model type {config.model.type!r} has non-Param state {list(rest.keys())}; "
                         "TrainState only carries nnx.Param")
    return graphdef, params


def param_shardings(config: Any, mesh: Mesh, abstract_params: nnx.State) -> dict[str, Any]:
    """Pure-dict tree of NamedShardings for the params, from their logical axes and the config rules."""
    shards = sharding.tree_shardings(abstract_params, mesh, mesh_rules(config))
    return traverse_util.unflatten_dict(dict(nnx.to_flat_state(shards)))


def _pure_shapes(abstract_params: nnx.State) -> dict[str, Any]:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_params.to_pure_dict())


def state_shardings_for(config: Any, mesh: Mesh, abstract_params: nnx.State,
                        tx: optax.GradientTransformation) -> TrainState:
    """TrainState of NamedShardings: optimizer moments follow their params; everything else replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    p_sh = param_shardings(config, mesh, abstract_params)
    opt_shapes = jax.eval_shape(tx.init, _pure_shapes(abstract_params))
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_shapes, p_sh,
                                   transform_non_params=lambda _: replicated,
                                   is_leaf=lambda x: isinstance(x, NamedSharding))
    return TrainState(step=replicated, params=p_sh, opt_state=opt_sh, rng=replicated)


def _init_fn(config: Any, tx: optax.GradientTransformation) -> Any:
    mt = registry.get_model_type(config.model.type)

    def init() -> TrainState:
        model = mt.build(config, nnx.Rngs(config.seed))
        params = nnx.state(model, nnx.Param).to_pure_dict()
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))

    return init


def create_train_state(config: Any, mesh: Mesh) -> tuple[TrainState, TrainState]:
    """``(state, state_shardings)``: a fresh state initialised directly into its shardings on ``mesh``."""
    graphdef, abstract = build_model(config)
    tx = make_optimizer(config, abstract)
    shardings = state_shardings_for(config, mesh, abstract, tx)
    with jax.set_mesh(mesh):
        state = jax.jit(_init_fn(config, tx), out_shardings=shardings)()
    return state, shardings


def abstract_train_state(config: Any, mesh: Mesh) -> tuple[TrainState, TrainState]:
    """``(abstract_state, state_shardings)``: ShapeDtypeStructs with ``.sharding`` (Orbax targets, AOT)."""
    graphdef, abstract = build_model(config)
    tx = make_optimizer(config, abstract)
    shardings = state_shardings_for(config, mesh, abstract, tx)
    shapes = jax.eval_shape(_init_fn(config, tx))
    abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  shapes, shardings)
    return abstract_state, shardings
