"""Scoring adapters: how an image-text model is asked for embeddings and pair scores.

The evaluators never call model methods directly; they go through a ``ScoringModel``, so a model whose
image embedding depends on the text (Llip) plugs in by implementing the same six functions. This module
holds the CLIP adapter; a model with its own adapter returns it from a ``scoring()`` method
(``metaclip_jax.models.llip.Llip.scoring()`` returns ``LlipHeadScoring``), which ``scoring_for`` prefers:

- ``image_embed(model, images)``   -> image side: a pytree with leading batch axis (CLIP: unit vectors
  [B, D]; Llip: the per-image keys and values (Kmat, Vmat) [B, H, K, d]).
- ``text_embed(model, tokens)``    -> text side (CLIP: unit vectors [B, D]; Llip: (query q [B, H, d],
  unit target [B, D])).
- ``prompt_features(text_side)``   -> what is *averaged* over a class's prompts (templates x synonyms).
- ``class_features(mean)``         -> the class side from that mean (CLIP: renormalise, spec §2.2; Llip:
  query = mean of q, target = normalise(mean of normalised z_t), spec §9).
- ``score(model, image_side, text_side, temperature)`` -> scores [Ni, Nt] of every (image, text) pair.
- ``score_pairs(model, image_side, text_side, temperature)`` -> scores [N] of aligned pairs (row n with
  row n), used for retrieval positives.

All functions are pure and jit-traceable; ``model`` is an ``nnx.Module`` (merged inside ``jax.jit`` by
the evaluators). ``temperature`` is ignored by models without one (``has_temperature = False``); Llip's
attention temperature can be swept at test time (spec §9: τ in {1, 3, 5, 8, 10}).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

PyTree = Any


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Unit vectors along the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@runtime_checkable
class ScoringModel(Protocol):
    """Adapter between a model and the evaluators (see the module docstring)."""

    name: str
    has_temperature: bool

    def image_embed(self, model: Any, images: jax.Array) -> PyTree: ...

    def text_embed(self, model: Any, tokens: jax.Array) -> PyTree: ...

    def prompt_features(self, text_side: PyTree) -> PyTree: ...

    def class_features(self, mean: PyTree) -> PyTree: ...

    def score(self, model: Any, image_side: PyTree, text_side: PyTree,
              temperature: float | None = None) -> jax.Array: ...

    def score_pairs(self, model: Any, image_side: PyTree, text_side: PyTree,
                    temperature: float | None = None) -> jax.Array: ...


class ClipScoring:
    """Single-vector dual encoders (CLIP, SigLIP): cosine similarity of unit embeddings."""

    name = "clip"
    has_temperature = False

    def image_embed(self, model: Any, images: jax.Array) -> jax.Array:
        return l2_normalize(model.encode_image(images))

    def text_embed(self, model: Any, tokens: jax.Array) -> jax.Array:
        return l2_normalize(model.encode_text(tokens))

    def prompt_features(self, text_side: jax.Array) -> jax.Array:
        return l2_normalize(text_side)

    def class_features(self, mean: jax.Array) -> jax.Array:
        return l2_normalize(mean)

    def score(self, model: Any, image_side: jax.Array, text_side: jax.Array,
              temperature: float | None = None) -> jax.Array:
        del model, temperature
        return jnp.einsum("id,td->it", image_side, text_side, preferred_element_type=jnp.float32)

    def score_pairs(self, model: Any, image_side: jax.Array, text_side: jax.Array,
                    temperature: float | None = None) -> jax.Array:
        del model, temperature
        return jnp.sum(image_side.astype(jnp.float32) * text_side.astype(jnp.float32), axis=-1)


CLIP_SCORING = ClipScoring()
_MODEL_SCORING: dict[Any, ScoringModel] = {}


def scoring_for(model: Any) -> ScoringModel:
    """The adapter for a model: its own ``scoring()`` if it has one (``metaclip_jax.models.llip.Llip``
    returns its ``LlipHeadScoring``), else CLIP (``encode_image`` / ``encode_text``).

    The returned objects are shared per (model class, config), so compiled evaluator functions are reused
    across runs."""
    if hasattr(model, "scoring") and callable(model.scoring):
        key = (type(model), getattr(model, "cfg", None))
        try:
            if key not in _MODEL_SCORING:
                _MODEL_SCORING[key] = model.scoring()
            return _MODEL_SCORING[key]
        except TypeError:  # unhashable config: no sharing
            return model.scoring()
    return CLIP_SCORING
