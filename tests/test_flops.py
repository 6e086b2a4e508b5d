"""Analytic model FLOPs (used for MFU): they match open_clip's profile, and XLA's count would not."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from metaclip_jax.flops import forward_flops_per_example, train_step_flops
from metaclip_jax.models import presets
from metaclip_jax.models.clip import CLIP


def test_forward_flops_match_spec_table():
    # metaclip.md §7: forward GFLOPs per sample (open_clip model_profile.csv).
    for name, gflops in [("ViT-B-32", 14.78), ("ViT-B-16", 41.09), ("ViT-L-14", 175.33), ("ViT-H-14", 381.68),
                         ("ViT-bigG-14", 1065.36)]:
        assert forward_flops_per_example(presets.get_config(name)) / 1e9 == pytest.approx(gflops, abs=0.01)


def test_train_step_flops_counts_passes_and_logits():
    cfg = presets.get_config("ViT-B-32")
    fwd = forward_flops_per_example(cfg)
    assert train_step_flops(cfg, 8) == pytest.approx(3 * fwd * 8 + 12 * 8 * 8 * 512)
    assert train_step_flops(cfg, 8, "full") == pytest.approx(4 * fwd * 8 + 12 * 8 * 8 * 512)


def test_xla_cost_analysis_counts_a_scanned_layer_once():
    """Why the analytic count exists: doubling the (scanned) depth does not change XLA's FLOPs."""
    def xla_flops(layers: int) -> float:
        base = presets.get_config("test-tiny")
        cfg = base.replace(vision=base.vision.__class__(**{**base.vision.__dict__, "layers": layers}))
        graphdef, state = nnx.split(CLIP(cfg, rngs=nnx.Rngs(0)))
        f = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_image(x).sum())
        cost = f.lower(state, jnp.zeros((2, 32, 32, 3))).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, list | tuple) else cost)["flops"])

    assert xla_flops(4) == pytest.approx(xla_flops(2), rel=0.01)
