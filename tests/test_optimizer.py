"""Optimizer: open_clip weight-decay rule on the equivalent torch tensors, schedule formula, logit clamp."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaclip_jax import open_clip_interop
from metaclip_jax.models import presets
from train import optimizer


def open_clip_excluded(name: str, ndim: int) -> bool:
    """open_clip main.py: exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n
    or "logit_scale" in n (MetaCLIP adds "norm")."""
    return ndim < 2 or any(s in name for s in ("bn", "ln", "bias", "logit_scale", "norm"))


@pytest.mark.parametrize("preset", ["test-tiny", "ViT-B-32-quickgelu"])
def test_decay_mask_equals_open_clip_rule(preset):
    cfg = presets.get_config(preset)
    abstract = presets.abstract_params(cfg)
    mask = optimizer.weight_decay_mask(abstract)
    # Mask as arrays of the param shapes (1.0 = decayed), converted with the real open_clip mapping.
    shapes = abstract.to_pure_dict()
    as_arrays = jax.tree.map(lambda m, s: np.full(s.shape, 1.0 if m else 0.0, np.float32), mask, shapes)
    sd = open_clip_interop.params_to_open_clip(as_arrays, cfg)
    assert len(sd) > 20
    for name, t in sd.items():
        t = np.asarray(t)
        want = not open_clip_excluded(name, t.ndim)
        assert np.all(t == (1.0 if want else 0.0)), f"{name} ndim={t.ndim}: decayed={not want} expected"
    # Spot checks from spec §6.3.
    assert not mask["visual"]["class_embedding"] and not mask["logit_scale"]
    assert not mask["visual"]["transformer"]["ln1_scale"]          # stacked [L, W], 1-D in torch
    assert mask["visual"]["transformer"]["qkv_kernel"] and mask["visual"]["positional_embedding"]
    assert mask["text"]["token_embedding"] and mask["text"]["text_projection"]
    assert mask["visual"]["patch_kernel"]


def test_llip_mixture_tokens_are_decayed():
    cfg = presets.get_config("test-tiny")
    llip_cfg = cfg.replace(vision=cfg.vision.__class__(**{**cfg.vision.__dict__, "num_class_tokens": 4}))
    mask = optimizer.weight_decay_mask(presets.abstract_params(llip_cfg))
    assert mask["visual"]["class_embedding"]  # [K, W], K > 1: 2-D in torch too (llip.md §7)


def test_open_clip_ndim():
    assert optimizer.open_clip_ndim((12, 768), ("layers", "embed")) == 1
    assert optimizer.open_clip_ndim((1, 768), ("mixture", "embed")) == 1
    assert optimizer.open_clip_ndim((32, 768), ("mixture", "embed")) == 2
    assert optimizer.open_clip_ndim((12, 768, 3072), ("layers", "embed", "mlp")) == 2


def test_schedule_matches_spec_formula():
    base, warmup, total = 5e-4, 2000, 390_624
    f = jax.jit(optimizer.lr_schedule(base, warmup, total))
    for step in [0, 1, 999, 1999, 2000, 2001, 100_000, 390_000, 390_623]:
        if step < warmup:
            want = base * (step + 1) / warmup
        else:
            want = base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        np.testing.assert_allclose(float(f(step)), want, rtol=2e-5, atol=1e-12)
    assert float(f(total + 10)) == pytest.approx(0.0, abs=1e-12)
    const = optimizer.lr_schedule(1.0, 10, 100, "constant")
    assert float(const(3)) == pytest.approx(0.4) and float(const(50)) == 1.0


def test_clamp_logit_scale():
    p = {"logit_scale": jnp.float32(5.0), "w": jnp.ones(2)}
    assert float(optimizer.clamp_logit_scale(p)["logit_scale"]) == pytest.approx(math.log(100), rel=1e-6)
    assert float(optimizer.clamp_logit_scale({"logit_scale": jnp.float32(-1.0)})["logit_scale"]) == 0.0
    assert float(optimizer.clamp_logit_scale({"logit_scale": jnp.float32(3.0)})["logit_scale"]) == 3.0
    assert optimizer.clamp_logit_scale({"w": 1}) == {"w": 1}


@pytest.mark.parametrize("clip", [None, 0.5])
def test_grad_clip_option(clip):
    import optax

    from metaclip_jax.config_schema import load_config

    cfg = load_config("configs/tiny.py", [f"--config.optimizer.grad_clip={clip}"])
    abstract = presets.abstract_params(presets.get_config("test-tiny"))
    tx = optimizer.make_optimizer(cfg, abstract)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract.to_pure_dict())
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 3.0, p.dtype), params)
    _, state = tx.update(grads, tx.init(params), params)
    mu = optax.tree_utils.tree_get(state, "mu")
    norm = float(optax.global_norm(mu)) / (1 - cfg.optimizer.b1)   # first moment = (1 - b1) * grad
    want = clip if clip is not None else float(optax.global_norm(grads))
    assert norm == pytest.approx(want, rel=1e-4)
