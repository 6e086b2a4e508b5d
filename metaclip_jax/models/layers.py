"""Shared building blocks: annotated parameters, PyTorch-equivalent initialisers, LayerNorm,
activations and the stacked (scanned) pre-LN transformer used by both towers.

Transformer layers are stored stacked along a leading ``layers`` axis and applied with ``lax.scan``:
compile time stays flat in depth (48-layer bigG compiles as fast as 12 layers) and remat is one
``jax.checkpoint`` around the block. Checkpoint metadata records ``scanned: true``; the open_clip
interop stacks / unstacks per-layer tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from metaclip_jax.sharding import LOGICAL_AXES_KEY, constrain

LN_EPS = 1e-5  # PyTorch / open_clip LayerNorm epsilon (Flax's default is 1e-6)

Init = Callable[[jax.Array, Sequence[int]], jax.Array]


def param(rngs: nnx.Rngs, init: Init, shape: Sequence[int], axes: Sequence[str | None]) -> nnx.Param:
    """A float32 parameter carrying its logical axis names (the one place annotations are made)."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    return nnx.Param(init(rngs.params(), tuple(shape)), **{LOGICAL_AXES_KEY: tuple(axes)})


def normal(std: float) -> Init:
    return lambda key, shape: std * jax.random.normal(key, shape, jnp.float32)


def uniform(bound: float) -> Init:
    return lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def zeros(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    return jnp.zeros(shape, jnp.float32)


def ones(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    return jnp.ones(shape, jnp.float32)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)  # exact erf GELU, as torch.nn.GELU
    raise ValueError(f"unknown activation {name!r}")


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """LayerNorm in float32 (eps 1e-5), cast back to the input dtype."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + LN_EPS) * scale + bias
    return y.astype(x.dtype)


REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    """``layers`` pre-LN residual blocks (x += Attn(LN1 x); x += MLP(LN2 x)), parameters stacked.

    ``init_scheme``: "torch" = PyTorch defaults (the open_clip vision tower: xavier in_proj, zero
    attention biases, kaiming-uniform Linear weights and biases); "openai" = the OpenAI text-tower
    normal init (std w^-1/2 for in_proj, w^-1/2 (2L)^-1/2 for out_proj / c_proj, (2w)^-1/2 for c_fc).
    """

    def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, *, causal: bool,
                 init_scheme: str, rngs: nnx.Rngs):
        self.width, self.layers, self.heads, self.mlp_dim = width, layers, heads, mlp_dim
        self.causal = causal
        L, W, H, M = layers, width, heads, mlp_dim
        hd = W // H
        if init_scheme == "torch":
            qkv_init = uniform(math.sqrt(6.0 / (W + 3 * W)))
            out_init = uniform(1.0 / math.sqrt(W))
            fc_init, proj_init = uniform(1.0 / math.sqrt(W)), uniform(1.0 / math.sqrt(M))
        elif init_scheme == "openai":
            proj_std = W**-0.5 * (2 * L) ** -0.5
            qkv_init, out_init = normal(W**-0.5), normal(proj_std)
            fc_init, proj_init = normal((2 * W) ** -0.5), normal(proj_std)
        else:
            raise ValueError(f"unknown init scheme {init_scheme!r}")
        self.ln1_scale = param(rngs, ones, (L, W), ("layers", "embed"))
        self.ln1_bias = param(rngs, zeros, (L, W), ("layers", "embed"))
        self.qkv_kernel = param(rngs, qkv_init, (L, W, 3, H, hd), ("layers", "embed", "qkv", "heads", "kv"))
        self.qkv_bias = param(rngs, zeros, (L, 3, H, hd), ("layers", "qkv", "heads", "kv"))
        self.out_kernel = param(rngs, out_init, (L, H, hd, W), ("layers", "heads", "kv", "embed"))
        self.out_bias = param(rngs, zeros, (L, W), ("layers", "embed"))
        self.ln2_scale = param(rngs, ones, (L, W), ("layers", "embed"))
        self.ln2_bias = param(rngs, zeros, (L, W), ("layers", "embed"))
        # nn.Linear biases keep PyTorch's default U(+-1/sqrt(fan_in)) in both towers.
        self.fc_kernel = param(rngs, fc_init, (L, W, M), ("layers", "embed", "mlp"))
        self.fc_bias = param(rngs, uniform(1.0 / math.sqrt(W)), (L, M), ("layers", "mlp"))
        self.proj_kernel = param(rngs, proj_init, (L, M, W), ("layers", "mlp", "embed"))
        self.proj_bias = param(rngs, uniform(1.0 / math.sqrt(M)), (L, W), ("layers", "embed"))

    def __call__(self, x: jax.Array, *, act: str, dtype: jnp.dtype, remat: str = "none",
                 attention: str = "xla") -> jax.Array:
        """x: float32 [B, S, W] residual stream; matmuls run in ``dtype``."""
        act_fn = activation(act)
        names = ("ln1_scale", "ln1_bias", "qkv_kernel", "qkv_bias", "out_kernel", "out_bias",
                 "ln2_scale", "ln2_bias", "fc_kernel", "fc_bias", "proj_kernel", "proj_bias")
        stacked = {n: getattr(self, n)[...] for n in names}
        causal = self.causal
        impl = None if attention == "xla" else attention

        def block(x: jax.Array, p: dict[str, jax.Array]) -> tuple[jax.Array, None]:
            c = lambda a: a.astype(dtype)
            x = constrain(x, ("batch", None, None))   # keep activations batch-sharded (see sharding.py)
            h = c(layer_norm(x, p["ln1_scale"], p["ln1_bias"]))
            qkv = jnp.einsum("bsw,wthd->tbshd", h, c(p["qkv_kernel"])) + c(p["qkv_bias"])[:, None, None]
            qkv = constrain(qkv, (None, "batch", None, "heads", None))
            o = jax.nn.dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal, implementation=impl)
            o = jnp.einsum("bshd,hdw->bsw", o, c(p["out_kernel"])) + c(p["out_bias"])
            x = x + o.astype(jnp.float32)
            h = c(layer_norm(x, p["ln2_scale"], p["ln2_bias"]))
            h = act_fn(jnp.einsum("bsw,wm->bsm", h, c(p["fc_kernel"])) + c(p["fc_bias"]))
            h = constrain(h, ("batch", None, "mlp"))
            h = jnp.einsum("bsm,mw->bsw", h, c(p["proj_kernel"])) + c(p["proj_bias"])
            return constrain(x + h.astype(jnp.float32), ("batch", None, None)), None

        if remat != "none":
            if remat not in REMAT_POLICIES:
                raise ValueError(f"remat must be none or one of {sorted(REMAT_POLICIES)}, got {remat!r}")
            block = jax.checkpoint(block, policy=REMAT_POLICIES[remat], prevent_cse=False)
        x, _ = jax.lax.scan(block, x, stacked)
        return x
