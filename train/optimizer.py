"""AdamW with open_clip's weight-decay exclusions, warmup + cosine schedule, optional clipping.

Spec metaclip.md §6.3 / §6.4: AdamW (b1 0.9, b2 0.98, eps 1e-6, decoupled weight decay 0.2 scaled by the
lr like torch.optim.AdamW); no decay for parameters with ndim < 2 or whose name contains ``bn``, ``ln``,
``bias``, ``logit_scale`` or ``norm``. The rule is evaluated on the open_clip-*equivalent* tensor: our
transformer blocks are stacked along a leading ``layers`` axis (a stacked LayerNorm scale is [L, W] here but
[W] per block in torch) and CLIP's ``class_embedding`` is [1, W] here but [W] in torch, so a leading
``layers`` axis and a size-1 ``mixture`` axis (logical names, see ``metaclip_jax.sharding``) do not count
towards ndim. Llip's [K, W] mixture tokens (K > 1) stay 2-D and are decayed (llip.md §7).

Schedule (per optimizer step s, 0-based): ``base * (s + 1) / warmup`` for s < warmup, then
``base * 0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))`` (progress clipped to [0, 1], so the lr stays
0 past ``total``). ``logit_scale`` is clamped to [0, ln max_logit_scale] after every update
(``clamp_logit_scale``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util

from metaclip_jax.sharding import variable_logical_axes

NO_DECAY_SUBSTRINGS = ("bn", "ln", "bias", "logit_scale", "norm")


def lr_schedule(base_lr: float, warmup_steps: int, total_steps: int, kind: str = "cosine"
                ) -> Callable[[jax.Array], jax.Array]:
    """Linear warmup ``base * (step + 1) / warmup`` then cosine to 0 (or constant)."""
    if kind not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {kind!r}")
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = base_lr * (step + 1.0) / max(warmup_steps, 1)
        if kind == "constant":
            after = jnp.asarray(base_lr, jnp.float32)
        else:
            progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
            # 0.5 (1 + cos(pi p)) as cos^2(pi p / 2): the same value, no float32 cancellation near p = 1.
            after = base_lr * jnp.square(jnp.cos(0.5 * math.pi * progress))
        return jnp.where(step < warmup_steps, warm, after).astype(jnp.float32)

    return schedule


def open_clip_ndim(shape: tuple[int, ...], logical_axes: tuple[str | None, ...] | None) -> int:
    """ndim of the torch tensor(s) a parameter corresponds to: a leading ``layers`` axis (stacked blocks)
    and a size-1 ``mixture`` axis (CLIP's single class token) are not counted."""
    ndim = len(shape)
    axes = tuple(logical_axes or ())
    if axes and axes[0] == "layers":
        ndim -= 1
    for ax, n in zip(axes, shape):
        if ax == "mixture" and n == 1:
            ndim -= 1
    return ndim


def decays(path: str, shape: tuple[int, ...], logical_axes: tuple[str | None, ...] | None) -> bool:
    """open_clip's rule: decay iff ndim >= 2 and the name has none of bn / ln / bias / logit_scale / norm."""
    if open_clip_ndim(shape, logical_axes) < 2:
        return False
    return not any(s in path for s in NO_DECAY_SUBSTRINGS)


def weight_decay_mask(abstract_params: nnx.State) -> dict[str, Any]:
    """Pure-dict tree of bools (True = decayed) for an nnx.State of Params (abstract or concrete)."""
    flat = {}
    for path, var in nnx.to_flat_state(abstract_params):
        name = ".".join(str(p) for p in path)
        shape = tuple(var.get_value().shape if hasattr(var, "get_value") else var.value.shape)
        flat[path] = decays(name, shape, variable_logical_axes(var))
    return traverse_util.unflatten_dict(flat)


def make_optimizer(config: Any, abstract_params: nnx.State) -> optax.GradientTransformation:
    """The optax transform of ``config.optimizer`` over the pure-dict params of ``abstract_params``."""
    o = config.optimizer
    schedule = lr_schedule(o.lr, o.warmup_steps, config.total_steps, o.schedule)
    parts = []
    if o.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(o.grad_clip))
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=weight_decay_mask(abstract_params)))
    return optax.chain(*parts)


def clamp_logit_scale(params: dict[str, Any], max_scale: float = 100.0) -> dict[str, Any]:
    """Clamp a top-level log-space ``logit_scale`` to [0, ln max_scale] (no-op without one)."""
    if "logit_scale" not in params:
        return params
    out = dict(params)
    out["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, math.log(max_scale))
    return out
