"""The CLIP two-tower model (OpenAI / open_clip / MetaCLIP architecture)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from metaclip_jax.models.config import CLIPConfig
from metaclip_jax.models.layers import param
from metaclip_jax.models.towers import TextTransformer, VisionTransformer


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class CLIP(nnx.Module):
    """``CLIP(cfg, rngs=nnx.Rngs(seed))``; ``model(images, tokens)`` returns
    ``(image_features, text_features, logit_scale)`` as open_clip does: L2-normalised features and
    ``exp`` of the stored log-space scale. ``logit_bias`` exists when ``cfg.init_logit_bias`` is set
    (SigLIP loss)."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim, rngs=rngs)
        self.text = TextTransformer(cfg.text, cfg.embed_dim, rngs=rngs)
        self.logit_scale = param(rngs, lambda k, s: jnp.full(s, cfg.init_logit_scale, jnp.float32), (), ())
        if cfg.init_logit_bias is not None:
            self.logit_bias = param(rngs, lambda k, s: jnp.full(s, cfg.init_logit_bias, jnp.float32), (), ())

    def encode_image(self, images: jax.Array, normalize: bool = False) -> jax.Array:
        x = self.visual.encode(images, self.cfg).astype(jnp.float32)
        return l2_normalize(x) if normalize else x

    def encode_text(self, tokens: jax.Array, normalize: bool = False) -> jax.Array:
        x = self.text.encode(tokens, self.cfg).astype(jnp.float32)
        return l2_normalize(x) if normalize else x

    def __call__(self, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        img = self.encode_image(images, normalize=True)
        txt = self.encode_text(tokens, normalize=True)
        return img, txt, jnp.exp(self.logit_scale[...])
