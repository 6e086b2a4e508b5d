"""The train step: ``(state, batch) -> (state, metrics)``, pure, jitted once with explicit shardings.

Per step: ``rng = fold_in(state.rng, state.step)``; forward + loss through the model-type registry
(``metaclip_jax.models.registry``: CLIP / SigLIP here, Llip registered by its module); ``value_and_grad``;
optax AdamW update; ``logit_scale`` clamped to [0, ln max]; metrics (float32 scalars, left on device).

Gradient accumulation (``optimizer.grad_accum_steps = A > 1``) is exact, inside one step (one jitted step =
one optimizer update), as open_clip's ``accum_freq``: (1) features of the A micro-batches without gradients,
(2) the loss over all B features (the full-batch contrastive loss, not A small ones) with gradients w.r.t. the
features and the loss's own parameters, (3) per micro-batch, re-run the towers and pull the feature gradients
back with ``jax.vjp``. Activation memory is that of one micro-batch; the cost is one extra forward pass.
Micro-batch k takes rows ``i * A + k``, so each device slices its own rows (no communication).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metaclip_jax import sharding
from metaclip_jax.models import registry
from train.optimizer import clamp_logit_scale, lr_schedule, make_optimizer
from train.state import TrainState, build_model, mesh_rules

Batch = Mapping[str, jax.Array]


def batch_sharding(config: Any, mesh: Mesh) -> NamedSharding:
    """Sharding of every batch array: leading axis over the batch mesh axes (a prefix for any ndim)."""
    return NamedSharding(mesh, sharding.logical_to_spec(("batch",), mesh_rules(config), mesh))


def _global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_loss_and_grad(config: Any, mesh: Mesh, graphdef: nnx.GraphDef
                       ) -> Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array], Any]]:
    """``fn(params, batch, rng) -> (loss, aux_metrics, grads)`` (with exact accumulation when A > 1)."""
    mt = registry.get_model_type(config.model.type)
    accum = int(config.optimizer.grad_accum_steps)
    b_spec = sharding.logical_to_spec(("batch",), mesh_rules(config), mesh)
    b_axes = b_spec[0] if len(b_spec) else None

    def loss_fn(params: Any, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        model = nnx.merge(graphdef, params)
        return registry.model_forward_and_loss(model, batch, config, mesh, rng)

    if accum == 1:
        def single(params: Any, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict, Any]:
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
            return loss, aux, grads

        return single

    micro_sh = NamedSharding(mesh, PartitionSpec(None, b_axes))
    full_sh = NamedSharding(mesh, PartitionSpec(b_axes))

    def split(x: jax.Array) -> jax.Array:     # [B, ...] -> [A, B / A, ...]; row i * A + k -> [k, i]
        y = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(y, micro_sh)

    def unsplit(y: jax.Array) -> jax.Array:   # inverse of split
        x = y.swapaxes(0, 1).reshape(y.shape[0] * y.shape[1], *y.shape[2:])
        return jax.lax.with_sharding_constraint(x, full_sh)

    def encode(params: Any, mb: Batch, rng: jax.Array) -> Any:
        return mt.encode(nnx.merge(graphdef, params), mb, config, rng=rng)

    def accumulated(params: Any, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict, Any]:
        micro = jax.tree.map(split, dict(batch))
        keys = jax.vmap(lambda k: jax.random.fold_in(rng, k))(jnp.arange(accum))
        frozen = jax.lax.stop_gradient(params)
        feats = jax.lax.map(lambda xs: encode(frozen, xs[0], xs[1]), (micro, keys))
        feats = jax.tree.map(unsplit, feats)

        def from_feats(p: Any, f: Any) -> tuple[jax.Array, dict]:
            return mt.loss(nnx.merge(graphdef, p), f, config, mesh)

        (loss, aux), (g_params, g_feats) = jax.value_and_grad(from_feats, argnums=(0, 1), has_aux=True)(
            params, feats)
        g_micro = jax.tree.map(split, g_feats)

        def body(g: Any, xs: tuple) -> tuple[Any, None]:
            mb, gf, key = xs
            _, vjp = jax.vjp(lambda p: encode(p, mb, key), params)
            (gp,) = vjp(gf)
            return jax.tree.map(jnp.add, g, gp), None

        grads, _ = jax.lax.scan(body, g_params, (micro, g_micro, keys))
        return loss, aux, grads

    return accumulated


def make_train_step(config: Any, mesh: Mesh, state_shardings: TrainState
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted step ``(state, batch) -> (state, metrics)``; state donated.

    ``batch``: ``{"image": uint8|float32 [B, S, S, 3], "text": int32 [B, 77]}`` global arrays sharded on the
    batch axes (extra batch-major keys are allowed and passed to the model type's ``encode``).
    ``metrics``: float32 scalars ``loss``, ``lr``, ``logit_scale`` (exp), ``logit_bias`` (if any),
    ``grad_norm`` (before clipping), ``param_norm`` (after the update), plus the loss's own
    (e.g. ``loss_i2t`` / ``loss_t2i``).
    """
    graphdef, abstract = build_model(config)
    tx = make_optimizer(config, abstract)
    o = config.optimizer
    schedule = lr_schedule(o.lr, o.warmup_steps, config.total_steps, o.schedule)
    loss_and_grad = make_loss_and_grad(config, mesh, graphdef)
    rules = mesh_rules(config)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        with sharding.activation_sharding(mesh, rules):   # model activations pinned to the batch axes
            loss, aux, grads = loss_and_grad(state.params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = clamp_logit_scale(params, o.max_logit_scale)
        metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": _global_norm(grads),
                   "param_norm": _global_norm(params)}
        if "logit_scale" in params:
            metrics["logit_scale"] = jnp.exp(params["logit_scale"])
        if "logit_bias" in params:
            metrics["logit_bias"] = params["logit_bias"]
        metrics.update(aux)
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng)
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, in_shardings=(state_shardings, batch_sharding(config, mesh)),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)
