"""Model architecture: parameter counts, init statistics, shapes, pooling, logical axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metaclip_jax.models import presets
from metaclip_jax.models.clip import CLIP
from metaclip_jax.sharding import tree_logical_axes

# Spec checkpoints_and_tokenizer.md §3 / metaclip.md §7.
EXPECTED_COUNTS = {
    "ViT-B-32": 151_277_313,
    "ViT-B-16": 149_620_737,
    "ViT-L-14": 427_616_513,
    "ViT-H-14": 986_109_441,
    "ViT-bigG-14": 2_539_567_105,
    "ViT-H-14-worldwide": 1_858_783_745,
    "ViT-bigG-14-worldwide": 3_630_409_985,
}


@pytest.mark.parametrize("name,count", sorted(EXPECTED_COUNTS.items()))
def test_param_counts_match_open_clip(name, count):
    assert presets.param_count(name) == count
    assert presets.param_count(name + "-quickgelu") == count


def test_vit_b32_tower_split():
    state = presets.abstract_params(presets.get_config("ViT-B-32"))
    n = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
    assert n(state["visual"]) == 87_849_216
    assert n(state["text"]) + 1 == 63_428_097  # + logit_scale


def test_quickgelu_flag_and_unknown_preset():
    assert presets.get_config("ViT-B-32-quickgelu").activation == "quick_gelu"
    assert presets.get_config("ViT-B-32").activation == "gelu"
    assert presets.get_config("ViT-H-14-worldwide").text.pool == "eos"
    with pytest.raises(KeyError, match="unknown model preset"):
        presets.get_config("ViT-B-33")


def test_every_param_has_logical_axes():
    model = nnx.eval_shape(lambda: CLIP(presets.get_config("ViT-B-16"), rngs=nnx.Rngs(0)))
    axes = tree_logical_axes(nnx.state(model, nnx.Param))
    shapes = nnx.state(model, nnx.Param)
    for a, s in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
                    jax.tree.leaves(shapes)):
        assert isinstance(a, tuple) and len(a) == len(s.shape)


def test_init_follows_reference_scheme():
    cfg = presets.get_config("ViT-B-32")
    model = CLIP(cfg, rngs=nnx.Rngs(0))
    W, T, L = 768, 512, 12
    assert float(model.logit_scale[...]) == pytest.approx(np.log(1 / 0.07), abs=1e-6)
    std = lambda x: float(jnp.std(x))
    assert std(model.text.token_embedding[...]) == pytest.approx(0.02, rel=0.02)
    assert std(model.text.positional_embedding[...]) == pytest.approx(0.01, rel=0.05)
    tt = model.text.transformer
    assert std(tt.qkv_kernel[...]) == pytest.approx(T**-0.5, rel=0.02)
    assert std(tt.out_kernel[...]) == pytest.approx(T**-0.5 * (2 * L) ** -0.5, rel=0.02)
    assert std(tt.fc_kernel[...]) == pytest.approx((2 * T) ** -0.5, rel=0.02)
    assert std(model.text.text_projection[...]) == pytest.approx(T**-0.5, rel=0.02)
    vt = model.visual.transformer
    bound = np.sqrt(6 / (4 * W))  # xavier_uniform on the stacked [3W, W] in_proj
    assert float(jnp.abs(vt.qkv_kernel[...]).max()) <= bound
    assert std(vt.qkv_kernel[...]) == pytest.approx(bound / np.sqrt(3), rel=0.02)
    assert float(jnp.abs(vt.qkv_bias[...]).max()) == 0.0 and float(jnp.abs(vt.out_bias[...]).max()) == 0.0
    assert float(jnp.abs(model.visual.patch_kernel[...]).max()) <= 1 / np.sqrt(3 * 32 * 32)
    assert std(model.visual.class_embedding[...]) == pytest.approx(W**-0.5, rel=0.15)
    assert std(model.visual.proj[...]) == pytest.approx(W**-0.5, rel=0.02)


def test_forward_shapes_and_normalisation():
    cfg = presets.get_config("test-tiny")
    model = CLIP(cfg, rngs=nnx.Rngs(0))
    imgs = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3))
    toks = jnp.zeros((3, 77), jnp.int32).at[:, 0].set(49406).at[:, 5].set(49407)
    img, txt, scale = model(imgs, toks)
    assert img.shape == (3, 32) and txt.shape == (3, 32)
    np.testing.assert_allclose(jnp.linalg.norm(img, axis=-1), 1.0, rtol=1e-5)
    assert float(scale) == pytest.approx(1 / 0.07, rel=1e-5)
    # uint8 images are normalised on device with the OpenAI mean/std.
    u8 = (np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3))).astype(np.uint8)
    from metaclip_jax.models.towers import normalize_images
    np.testing.assert_allclose(model.encode_image(jnp.asarray(u8)),
                               model.encode_image(normalize_images(jnp.asarray(u8))), atol=1e-6)


def test_text_pooling_argmax_and_eos():
    cfg = presets.get_config("test-tiny")
    model = CLIP(cfg, rngs=nnx.Rngs(0))
    toks = np.zeros((2, 77), np.int32)
    toks[:, 0] = 49406
    toks[0, 1:4] = [320, 1125, 49407]
    toks[1, 1:3] = [320, 49407]
    pooled = model.text(jnp.asarray(toks), cfg)
    # Changing tokens after EOT must not change the pooled state (causal mask + EOT pooling).
    toks2 = toks.copy()
    toks2[0, 10] = 500
    np.testing.assert_allclose(pooled, model.text(jnp.asarray(toks2), cfg), atol=1e-6)
    # eos pooling (MetaCLIP 2 / XLM-V): pool at the first id == 2 even though it is not the largest id.
    eos_cfg = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "pool": "eos", "eos_id": 2}))
    t = np.ones((1, 77), np.int32)
    t[0, :4] = [0, 900, 2, 1]
    from metaclip_jax.models.towers import pool_positions
    assert int(pool_positions(jnp.asarray(t), eos_cfg.text)[0]) == 2
    assert int(pool_positions(jnp.asarray(toks), cfg.text)[0]) == 3


def test_bf16_compute_close_to_f32():
    cfg = presets.get_config("test-tiny")
    m32 = CLIP(cfg, rngs=nnx.Rngs(0))
    m16 = CLIP(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    imgs = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    a, b = m32.encode_image(imgs, normalize=True), m16.encode_image(imgs, normalize=True)
    assert a.dtype == b.dtype == jnp.float32
    assert float(jnp.abs(a - b).max()) < 0.05


def test_remat_gives_same_gradients():
    cfg = presets.get_config("test-tiny")
    imgs = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))

    def grads(remat):
        model = CLIP(cfg.replace(remat=remat), rngs=nnx.Rngs(0))
        g = nnx.grad(lambda m: jnp.sum(m.encode_image(imgs) ** 2))(model)
        return jax.tree.leaves(nnx.state(g))

    for a, b in zip(grads("none"), grads("dots_no_batch")):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
