"""The OpenAI / open_clip image tower (ViT) and causal text transformer, in Flax NNX."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from metaclip_jax.models.config import CLIPConfig, TextConfig, VisionConfig
from metaclip_jax.models.layers import Transformer, layer_norm, normal, ones, param, uniform, zeros

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] -> float32 normalised with the OpenAI mean/std (on device)."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(OPENAI_MEAN)) / jnp.asarray(OPENAI_STD)


class VisionTransformer(nnx.Module):
    """conv1 (no bias) -> prepend class token(s) -> + positional -> ln_pre -> blocks -> ln_post.

    ``__call__`` returns the ln_post-ed class tokens ``[B, K, W]`` (K = 1 for CLIP, the Llip mixture
    tokens otherwise); ``encode`` applies ``proj`` to the first token (CLIP).
    """

    def __init__(self, cfg: VisionConfig, embed_dim: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        W, P, K = cfg.width, cfg.patch_size, cfg.num_class_tokens
        scale = W**-0.5
        fan_in = 3 * P * P
        # conv1 as a patch matmul: HWIO kernel flattened in (row, column, channel) order.
        self.patch_kernel = param(rngs, uniform(1.0 / math.sqrt(fan_in)), (fan_in, W), ("patch", "embed"))
        self.class_embedding = param(rngs, normal(scale), (K, W), ("mixture", "embed"))
        self.positional_embedding = param(rngs, normal(scale), (cfg.seq_len, W), ("tokens", "embed"))
        self.ln_pre_scale = param(rngs, ones, (W,), ("embed",))
        self.ln_pre_bias = param(rngs, zeros, (W,), ("embed",))
        self.transformer = Transformer(W, cfg.layers, cfg.heads, cfg.mlp_dim, causal=False,
                                       init_scheme="torch", rngs=rngs)
        self.ln_post_scale = param(rngs, ones, (W,), ("embed",))
        self.ln_post_bias = param(rngs, zeros, (W,), ("embed",))
        if cfg.use_proj:
            self.proj = param(rngs, normal(scale), (W, embed_dim), ("embed", "joint_embed"))

    def __call__(self, images: jax.Array, model_cfg: CLIPConfig) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(model_cfg.dtype)
        if images.dtype == jnp.uint8:
            images = normalize_images(images)
        B, S = images.shape[0], cfg.image_size
        if images.shape[1:] != (S, S, 3):
            raise ValueError(f"expected images [B, {S}, {S}, 3], got {images.shape}")
        P, g = cfg.patch_size, cfg.grid
        patches = images.reshape(B, g, P, g, P, 3).transpose(0, 1, 3, 2, 4, 5).reshape(B, g * g, P * P * 3)
        x = jnp.einsum("bnp,pw->bnw", patches.astype(dtype), self.patch_kernel[...].astype(dtype))
        cls = jnp.broadcast_to(self.class_embedding[...], (B, cfg.num_class_tokens, cfg.width))
        x = jnp.concatenate([cls, x.astype(jnp.float32)], axis=1) + self.positional_embedding[...]
        x = layer_norm(x, self.ln_pre_scale[...], self.ln_pre_bias[...])
        x = self.transformer(x, act=model_cfg.activation, dtype=dtype, remat=model_cfg.remat,
                             attention=model_cfg.attention)
        return layer_norm(x[:, : cfg.num_class_tokens], self.ln_post_scale[...], self.ln_post_bias[...])

    def encode(self, images: jax.Array, model_cfg: CLIPConfig) -> jax.Array:
        pooled = self(images, model_cfg)[:, 0]
        return pooled @ self.proj[...]


def pool_positions(tokens: jax.Array, cfg: TextConfig) -> jax.Array:
    """Index of the pooled token: argmax id (CLIP EOT is the largest id) or the first ``eos_id``."""
    if cfg.pool == "argmax":
        return jnp.argmax(tokens, axis=-1)
    return jnp.argmax(tokens == cfg.eos_id, axis=-1)


class TextTransformer(nnx.Module):
    """token + positional embedding -> causal blocks -> ln_final -> pooled state [B, T].

    ``encode`` applies ``text_projection``; Llip uses the pooled state for its query too.
    """

    def __init__(self, cfg: TextConfig, embed_dim: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        T = cfg.width
        self.token_embedding = param(rngs, normal(0.02), (cfg.vocab_size, T), ("vocab", "embed"))
        self.positional_embedding = param(rngs, normal(0.01), (cfg.context_length, T), ("tokens", "embed"))
        self.transformer = Transformer(T, cfg.layers, cfg.heads, cfg.mlp_dim, causal=True,
                                       init_scheme="openai", rngs=rngs)
        self.ln_final_scale = param(rngs, ones, (T,), ("embed",))
        self.ln_final_bias = param(rngs, zeros, (T,), ("embed",))
        self.text_projection = param(rngs, normal(T**-0.5), (T, embed_dim), ("embed", "joint_embed"))

    def __call__(self, tokens: jax.Array, model_cfg: CLIPConfig) -> jax.Array:
        cfg = self.cfg
        if tokens.shape[-1] != cfg.context_length:
            raise ValueError(f"expected tokens [B, {cfg.context_length}], got {tokens.shape}")
        x = jnp.take(self.token_embedding[...], tokens, axis=0) + self.positional_embedding[...]
        x = self.transformer(x, act=model_cfg.activation, dtype=jnp.dtype(model_cfg.dtype),
                             remat=model_cfg.remat, attention=model_cfg.attention)
        x = layer_norm(x, self.ln_final_scale[...], self.ln_final_bias[...])
        idx = pool_positions(tokens, cfg)
        return jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]

    def encode(self, tokens: jax.Array, model_cfg: CLIPConfig) -> jax.Array:
        return self(tokens, model_cfg) @ self.text_projection[...]
