"""Scoring adapters: how an image-text model is asked for embeddings and pair scores.

The evaluators never call model methods directly; they go through a ``ScoringModel``, so a model whose
image embedding depends on the text (Llip) plugs in by implementing the same six functions:

- ``image_embed(model, images)``   -> image side: a pytree with leading batch axis (CLIP: unit vectors
  [B, D]; Llip: the per-image keys and values (Kmat, Vmat)).
- ``text_embed(model, tokens)``    -> text side (CLIP: unit vectors [B, D]; Llip: (query q, unit target)).
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

import functools
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


def llip_attend(kmat: jax.Array, vmat: jax.Array, query: jax.Array, out_proj: jax.Array,
                temperature: float, num_heads: int) -> jax.Array:
    """Llip cross-attention of every image with every query (spec llip.md §2.3).

    ``kmat``, ``vmat``: [Ni, K, D]; ``query``: [Nt, D]; ``out_proj``: [D, D] (``x @ W``).
    Returns unit-normalised contextual image embeddings zhat [Ni, Nt, D] (float32).
    """
    ni, k, d = kmat.shape
    nt = query.shape[0]
    h = num_heads
    kh = kmat.astype(jnp.float32).reshape(ni, k, h, d // h)
    vh = vmat.astype(jnp.float32).reshape(ni, k, h, d // h)
    qh = query.astype(jnp.float32).reshape(nt, h, d // h)
    a = jnp.einsum("ikhe,the->ithk", kh, qh) / temperature
    w = jax.nn.softmax(a, axis=-1)
    o = jnp.einsum("ithk,ikhe->ithe", w, vh).reshape(ni, nt, d)
    return l2_normalize(o @ out_proj.astype(jnp.float32))


def llip_attend_pairs(kmat: jax.Array, vmat: jax.Array, query: jax.Array, out_proj: jax.Array,
                      temperature: float, num_heads: int) -> jax.Array:
    """``llip_attend`` for aligned pairs (image n with query n): [N, D]."""
    n, k, d = kmat.shape
    h = num_heads
    kh = kmat.astype(jnp.float32).reshape(n, k, h, d // h)
    vh = vmat.astype(jnp.float32).reshape(n, k, h, d // h)
    qh = query.astype(jnp.float32).reshape(n, h, d // h)
    w = jax.nn.softmax(jnp.einsum("nkhe,nhe->nhk", kh, qh) / temperature, axis=-1)
    o = jnp.einsum("nhk,nkhe->nhe", w, vh).reshape(n, d)
    return l2_normalize(o @ out_proj.astype(jnp.float32))


class LlipScoring:
    """Llip (text-conditioned image embedding, spec llip.md §6 / evaluation.md §9).

    Expects the model to expose ``encode_image_tokens(images) -> (Kmat, Vmat)`` ([B, K, D] each, after
    the optional LayerNorm), ``encode_text_query(tokens) -> (q, z_t)`` ([B, D] each, q after q_proj and
    the optional LayerNorm), an output projection and a head count. If the model has a method
    ``score_tokens(kmat, vmat, q, temperature=...) -> zhat [Ni, Nt, D]`` it is used; otherwise the
    cross-attention is computed here from ``model.out_proj`` (array or Param, ``x @ W``) and
    ``model.num_heads`` / ``model.cfg.llip_heads`` (see ``llip_attend``).
    The class side is ``(mean q, normalise(mean normalise(z_t)))``; the score is ``<zhat[i, c], t_c>``.
    """

    name = "llip"
    has_temperature = True

    def __init__(self, default_temperature: float = 5.0):
        self.default_temperature = default_temperature

    def image_embed(self, model: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        kmat, vmat = model.encode_image_tokens(images)
        return kmat.astype(jnp.float32), vmat.astype(jnp.float32)

    def text_embed(self, model: Any, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        q, z = model.encode_text_query(tokens)
        return q.astype(jnp.float32), l2_normalize(z)

    def prompt_features(self, text_side: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        q, z = text_side
        return q, l2_normalize(z)

    def class_features(self, mean: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        q, z = mean
        return q, l2_normalize(z)

    @staticmethod
    def _heads(model: Any) -> int:
        for name in ("num_heads", "llip_heads", "heads"):
            if hasattr(model, name):
                return int(getattr(model, name))
        cfg = getattr(model, "cfg", None)
        for name in ("llip_heads", "num_heads", "xattn_heads"):
            if cfg is not None and hasattr(cfg, name):
                return int(getattr(cfg, name))
        return 8  # every main Llip config (spec llip.md §2.0)

    @staticmethod
    def _out_proj(model: Any) -> jax.Array:
        w = model.out_proj
        if hasattr(w, "kernel"):
            w = w.kernel
        return w[...] if not isinstance(w, jax.Array) else w

    def _zhat(self, model: Any, kmat: jax.Array, vmat: jax.Array, q: jax.Array,
              temperature: float) -> jax.Array:
        if hasattr(model, "score_tokens"):
            return model.score_tokens(kmat, vmat, q, temperature=temperature)
        return llip_attend(kmat, vmat, q, self._out_proj(model), temperature, self._heads(model))

    def score(self, model: Any, image_side: tuple[jax.Array, jax.Array],
              text_side: tuple[jax.Array, jax.Array], temperature: float | None = None) -> jax.Array:
        kmat, vmat = image_side
        q, t = text_side
        tau = self.default_temperature if temperature is None else temperature
        zhat = self._zhat(model, kmat, vmat, q, tau)
        return jnp.einsum("itd,td->it", zhat, t.astype(jnp.float32))

    def score_pairs(self, model: Any, image_side: tuple[jax.Array, jax.Array],
                    text_side: tuple[jax.Array, jax.Array], temperature: float | None = None) -> jax.Array:
        kmat, vmat = image_side
        q, t = text_side
        tau = self.default_temperature if temperature is None else temperature
        if hasattr(model, "score_tokens_pairs"):
            zhat = model.score_tokens_pairs(kmat, vmat, q, temperature=tau)
        elif hasattr(model, "score_tokens"):
            zhat = jax.vmap(lambda k, v, qq: model.score_tokens(k[None], v[None], qq[None],
                                                                temperature=tau)[0, 0])(kmat, vmat, q)
        else:
            zhat = llip_attend_pairs(kmat, vmat, q, self._out_proj(model), tau, self._heads(model))
        return jnp.sum(zhat * t.astype(jnp.float32), axis=-1)


CLIP_SCORING = ClipScoring()
_MODEL_SCORING: dict[Any, ScoringModel] = {}


@functools.cache
def llip_scoring(default_temperature: float = 5.0) -> LlipScoring:
    """One shared ``LlipScoring`` per default temperature (jitted evaluator functions are cached on it)."""
    return LlipScoring(default_temperature)


def scoring_for(model: Any) -> ScoringModel:
    """The adapter for a model: its own ``scoring()`` if it has one (``metaclip_jax.models.llip.Llip``
    returns its ``LlipHeadScoring``), ``LlipScoring`` for other models with Llip's methods, else CLIP.

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
    if hasattr(model, "encode_image_tokens") and hasattr(model, "encode_text_query"):
        cfg = getattr(model, "cfg", None)
        tau = getattr(cfg, "temperature", None) or getattr(cfg, "llip_temperature", None) or 5.0
        return llip_scoring(float(tau))
    return CLIP_SCORING
