"""Model-type registry: how the train step builds a model and turns a batch into a loss.

A model type (``config.model.type``) is a ``ModelType`` with

- ``build(config, rngs) -> nnx.Module``: the model (its parameters carry logical-axis metadata);
- ``encode(model, batch, config, *, rng) -> features``: per-example features, a pytree of batch-major
  arrays (one row per example). Rows are independent: the step may run ``encode`` on micro-batches;
- ``loss(model, features, config, mesh) -> (loss, metrics)``: the global-batch loss from all features
  (model parameters such as ``logit_scale`` / ``logit_bias`` or a Llip head are read from ``model``);
- ``losses``: the ``loss.name`` values it accepts; ``fields``: extra ``model.*`` config fields
  (``config_schema.Field``), valid only for this type; ``validate(config)``: extra conflict checks;
- ``model_config(config)``: the architecture config (a ``CLIPConfig`` or subclass: ``.vision.image_size`` is
  read for validation and AOT); ``preset_names()``: the valid ``model.preset`` values.

``model_forward_and_loss(model, batch, config, mesh, rng=None)`` = ``loss(model, encode(model, batch))``.
The split lets gradient accumulation be exact (features of all micro-batches, then one full-batch loss,
then one backward per micro-batch; see ``train/step.py``).

"clip" is registered here; "llip" is registered on import of ``metaclip_jax.models.llip`` (imported lazily
by ``get_model_type``).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from metaclip_jax import losses
from metaclip_jax.sharding import DEFAULT_RULES


@dataclasses.dataclass(frozen=True)
class ModelType:
    name: str
    build: Callable[..., nnx.Module]
    encode: Callable[..., Any]
    loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
    losses: tuple[str, ...]
    model_config: Callable[[Any], Any] | None = None
    preset_names: Callable[[], list[str]] | None = None
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    validate: Callable[[Any], None] | None = None


_REGISTRY: dict[str, ModelType] = {}
_LAZY = {"llip": "metaclip_jax.models.llip"}


def register_model_type(model_type: ModelType) -> None:
    _REGISTRY[model_type.name] = model_type


def get_model_type(name: str) -> ModelType:
    if name not in _REGISTRY and name in _LAZY:
        try:
            importlib.import_module(_LAZY[name])
        except ModuleNotFoundError as e:   # the module is not written yet; a broken one still raises
            if e.name != _LAZY[name]:
                raise
    if name not in _REGISTRY:
        raise KeyError(name)
    return _REGISTRY[name]


def model_type_names() -> list[str]:
    return sorted(set(_REGISTRY) | set(_LAZY))


def model_forward_and_loss(model: nnx.Module, batch: Mapping[str, jax.Array], config: Any, mesh: Any,
                           rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss of ``batch`` for ``config.model.type`` (forward + loss, differentiable)."""
    mt = get_model_type(config.model.type)
    return mt.loss(model, mt.encode(model, batch, config, rng=rng), config, mesh)


def batch_axes(config: Any) -> tuple[str, ...]:
    """Mesh axes of the batch dimension under ``config.mesh.rules``."""
    rules = {**DEFAULT_RULES, **dict(config.mesh.rules or {})}
    b = rules.get("batch")
    return () if b is None else (b,) if isinstance(b, str) else tuple(b)


# ------------------------------------------------------------------------------------------ CLIP


def clip_model_config(config: Any) -> Any:
    """The ``CLIPConfig`` of ``config.model`` (preset + dtype / remat / attention / logit init)."""
    from metaclip_jax.models import presets

    m = config.model
    kw: dict[str, Any] = dict(dtype=m.dtype, remat=m.remat, attention=m.attention,
                              init_logit_bias=m.init_logit_bias)
    if m.init_logit_scale is not None:
        kw["init_logit_scale"] = m.init_logit_scale
    return presets.get_config(m.preset, **kw)


def _clip_build(config: Any, rngs: nnx.Rngs) -> nnx.Module:
    from metaclip_jax.models.clip import CLIP

    return CLIP(clip_model_config(config), rngs=rngs)


def _clip_encode(model: nnx.Module, batch: Mapping[str, jax.Array], config: Any, *,
                 rng: jax.Array | None = None) -> dict[str, jax.Array]:
    return {"image": model.encode_image(batch["image"], normalize=True),
            "text": model.encode_text(batch["text"], normalize=True)}


def _clip_loss(model: nnx.Module, feats: Mapping[str, jax.Array], config: Any, mesh: Any
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    scale = jnp.exp(model.logit_scale[...])
    kw = dict(mesh=mesh, batch_axes=batch_axes(config), chunk_size=config.loss.chunk_size)
    if config.loss.name == "siglip":
        return losses.siglip_loss(feats["image"], feats["text"], scale, model.logit_bias[...], **kw)
    return losses.clip_loss(feats["image"], feats["text"], scale, **kw)


def _clip_presets() -> list[str]:
    from metaclip_jax.models import presets

    return presets.preset_names()


register_model_type(ModelType(name="clip", build=_clip_build, encode=_clip_encode, loss=_clip_loss,
                              losses=("clip", "siglip"), model_config=clip_model_config,
                              preset_names=_clip_presets))
