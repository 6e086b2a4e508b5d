"""Llip: folded vs direct pair scoring, the sharded chunked loss (1 vs 8 devices), K = 1 = SigLIP,
zero-shot classifier, evaluation adapter, init and a tiny training run (spec llip.md §11.4)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from metaclip_jax import llip_loss as L
from metaclip_jax.models import llip as llip_mod
from metaclip_jax.models.clip import l2_normalize
from metaclip_jax.models.llip import Llip, LlipConfig, get_llip_config
from metaclip_jax.sharding import make_mesh, tree_logical_axes


def _inputs(seed, b, c, H, K, d, scale=1.0):
    ks = jax.random.split(jax.random.key(seed), 5)
    D = H * d
    kmat = scale * jax.random.normal(ks[0], (b, H, K, d))
    vmat = jax.random.normal(ks[1], (b, H, K, d))
    q = jax.random.normal(ks[2], (c, H, d))
    zt = l2_normalize(jax.random.normal(ks[3], (c, D)))
    w_o = jax.random.normal(ks[4], (D, D)) * D**-0.5
    return kmat, vmat, q, zt, w_o


@pytest.mark.parametrize("H,K,d", [(4, 3, 8), (2, 16, 4), (1, 5, 6)])
def test_folded_logits_equal_direct(H, K, d):
    kmat, vmat, q, zt, w_o = _inputs(0, 6, 5, H, K, d, scale=0.5)
    ld = jax.jit(L.pair_logits_direct)(kmat, vmat, q, zt, w_o, 14.3, -10.0, 5.0)
    lf = jax.jit(L.pair_logits_folded)(kmat, vmat, q, zt, w_o, 14.3, -10.0, 5.0)
    np.testing.assert_allclose(lf, ld, rtol=1e-5, atol=2e-5)
    # auto form: folded when H*K < D
    assert L.choose_form("auto", H, K, H * d) == ("folded" if H * d > H * K else "direct")
    auto = jax.jit(L.pair_logits, static_argnames="form")(kmat, vmat, q, zt, w_o, 14.3, -10.0, 5.0)
    np.testing.assert_allclose(auto, ld, atol=2e-5)


def test_folded_equal_direct_sharp_attention():
    """Near one-hot attention (large keys, small τ) still agrees."""
    kmat, vmat, q, zt, w_o = _inputs(1, 4, 3, 2, 4, 8, scale=3.0)
    f = lambda fn: jax.jit(fn)(kmat, vmat, q, zt, w_o, 1.0, 0.0, 0.1)
    np.testing.assert_allclose(f(L.pair_logits_folded), f(L.pair_logits_direct), atol=1e-5)


def test_folded_norm_floor_is_finite():
    kmat, vmat, q, zt, w_o = _inputs(2, 3, 3, 2, 2, 4)
    zeros = jnp.zeros_like(vmat)
    lf = jax.jit(L.pair_logits_folded)(kmat, zeros, q, zt, w_o, 10.0, -10.0, 5.0)
    ld = jax.jit(L.pair_logits_direct)(kmat, zeros, q, zt, w_o, 10.0, -10.0, 5.0)
    assert np.isfinite(lf).all()
    np.testing.assert_allclose(lf, ld, atol=1e-6)
    g = jax.jit(jax.grad(lambda v: L.pair_logits_folded(kmat, v, q, zt, w_o, 10.0, -10.0, 5.0).sum()))(zeros)
    assert np.isfinite(g).all()


def _naive_loss(kmat, vmat, q, zt, w_o, s, b, tau):
    return L.naive_sigmoid_loss(L.pair_logits_direct(kmat, vmat, q, zt, w_o, jnp.exp(s), b, tau))


def _loss_grads(fn, args):
    val, grads = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(7))))(*args)
    return jax.block_until_ready((val, grads))


@pytest.mark.parametrize("H,K,d", [(2, 3, 8), (2, 16, 4)])  # folded-by-auto and direct-by-auto shapes
def test_loss_and_grads_agree_forms_devices_and_reference(H, K, d):
    B, tau = 16, 5.0
    kmat, vmat, _, _, w_o = _inputs(3, B, B, H, K, d, scale=0.5)
    _, _, q, zt, _ = _inputs(4, B, B, H, K, d)
    args = (kmat, vmat, q, zt, w_o, jnp.asarray(2.659, jnp.float32), jnp.asarray(-10.0, jnp.float32))
    ref_val, ref_g = _loss_grads(lambda *a: _naive_loss(*a, tau), args)
    mesh = make_mesh(devices=jax.devices()[:8])
    # (caption chunk, image chunk, mesh): unchunked single device, chunked both ways, 8 devices
    setups = ((None, None, None), (4, 8, None), (None, None, mesh), (4, 1, mesh))
    for form in ("folded", "direct"):
        for chunk, ichunk, m in setups:
            fn = lambda *a, form=form, chunk=chunk, ichunk=ichunk, m=m: L.llip_sigmoid_loss(
                *a, tau=tau, form=form, chunk_size=chunk, image_chunk=ichunk, mesh=m)
            val, g = _loss_grads(fn, args)
            where = f"{form} chunk={chunk} image_chunk={ichunk} mesh={m is not None}"
            np.testing.assert_allclose(val, ref_val, rtol=1e-5, err_msg=where)
            for gi, ri in zip(g, ref_g):
                np.testing.assert_allclose(gi, ri, rtol=2e-4, atol=1e-6, err_msg=where)


def test_k1_is_siglip_with_linear_image_map():
    cfg = get_llip_config("llip-test-tiny", num_tokens=1)
    model = Llip(cfg, rngs=nnx.Rngs(0))
    images = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3))
    tokens = jax.random.randint(jax.random.key(1), (5, 77), 1, 49408)

    @nnx.jit
    def run(model: Llip, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, ...]:
        kmat, vmat = model.encode_image_tokens(images)
        q, zt = model.encode_text_query(tokens)
        h = model.image_tokens(images)[:, 0]                                 # [B, W_v]
        img = l2_normalize(h @ (model.v_proj[0] @ model.out_proj[...]))      # linear map of one token
        siglip = jnp.exp(model.logit_scale[...]) * img @ zt.T + model.logit_bias[...]
        return (model.pair_logits_direct(kmat, vmat, q, zt), model.pair_logits_folded(kmat, vmat, q, zt),
                siglip)

    direct, folded, siglip = run(model, images, tokens)
    np.testing.assert_allclose(direct, siglip, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(folded, siglip, rtol=1e-4, atol=1e-4)


def test_config_presets_and_init():
    cfg = get_llip_config("Llip-B-16-K32")
    assert (cfg.num_tokens, cfg.num_heads, cfg.tau, cfg.use_norm, cfg.activation) == (32, 8, 5.0, False,
                                                                                         "quick_gelu")
    assert cfg.form == "folded" and not cfg.vision.use_proj and cfg.init_logit_bias == -10.0
    assert get_llip_config("Llip-L-14-K32").tau == 1.0
    assert get_llip_config("Llip-G-14-K64").use_norm and get_llip_config("Llip-G-14-K64").form == "folded"
    assert get_llip_config("Llip-B-32-K64").form == "direct"  # H*K = 512 = D
    assert LlipConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="use_proj"):
        cfg.replace(vision=cfg.vision.__class__(use_proj=True))
    with pytest.raises(KeyError):
        get_llip_config("Llip-X")
    # Extra params vs SigLIP = 2·K·W_v·D (+ q_proj, out_proj, bias); B/16 K=32: k/v = 25.2M (spec §2.4).
    model = nnx.eval_shape(lambda: Llip(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    assert model.k_proj.shape == (32, 768, 512) and 2 * np.prod(model.k_proj.shape) == 25_165_824
    axes = tree_logical_axes(state)
    for a, s in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)), jax.tree.leaves(state)):
        assert isinstance(a, tuple) and len(a) == len(s.shape)
    assert model.k_proj.get_metadata()["logical_axes"] == ("mixture", "embed", "joint_embed")


def test_tiny_init_statistics():
    cfg = get_llip_config("llip-test-tiny", num_tokens=8, use_norm=True)
    m = Llip(cfg, rngs=nnx.Rngs(0))
    Wv, Wt, D = 64, 64, 32
    assert float(jnp.std(m.k_proj[...])) == pytest.approx(Wv**-0.5, rel=0.05)
    assert float(jnp.std(m.q_proj[...])) == pytest.approx(Wt**-0.5, rel=0.05)
    assert float(jnp.std(m.out_proj[...])) == pytest.approx(D**-0.5, rel=0.1)
    assert float(m.logit_scale[...]) == pytest.approx(np.log(1 / 0.07), abs=1e-6)
    assert float(m.logit_bias[...]) == -10.0
    assert m.q_ln_scale.shape == (D,)
    m.logit_scale[...] = jnp.asarray(7.0)
    llip_mod.clamp_logit_scale(m)
    assert float(m.logit_scale[...]) == pytest.approx(np.log(100.0))


def test_zeroshot_one_template_equals_direct_and_template_mean():
    cfg = get_llip_config("llip-test-tiny", use_norm=True)
    model = Llip(cfg, rngs=nnx.Rngs(1))
    images = jax.random.uniform(jax.random.key(2), (5, 32, 32, 3))
    class_tokens = jax.random.randint(jax.random.key(3), (3, 2, 77), 1, 49408)   # C=3 classes, T=2
    kmat, vmat = nnx.jit(lambda m, x: m.encode_image_tokens(x))(model, images)
    encode_text = nnx.jit(lambda m, t: m.encode_text_query(t))
    w_o = model.out_proj[...]
    # one template: the classifier scores equal direct pair scoring of image x prompt
    cq, ct = llip_mod.zeroshot_classifier(model, class_tokens[:, :1])
    q1, z1 = encode_text(model, class_tokens[:, 0])
    direct = jax.jit(L.pair_logits_direct)(kmat, vmat, q1, z1, w_o, 1.0, 0.0, 3.0)
    scores = jax.jit(llip_mod.zeroshot_scores, static_argnames=("form", "image_chunk", "class_chunk"))
    for form in ("folded", "direct"):
        s = scores(kmat, vmat, cq, ct, w_o, 3.0, form=form, image_chunk=2, class_chunk=2)
        np.testing.assert_allclose(s, direct, rtol=1e-5, atol=1e-5)
    # two templates: queries averaged per head, targets CLIP-ensembled
    cq, ct = llip_mod.zeroshot_classifier(model, class_tokens, batch_size=6)
    q, z = encode_text(model, class_tokens.reshape(6, 77))
    np.testing.assert_allclose(cq, q.reshape(3, 2, *q.shape[1:]).mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ct, l2_normalize(z.reshape(3, 2, -1).mean(1)), rtol=1e-5, atol=1e-6)
    accs = llip_mod.zeroshot_tau_sweep(kmat, vmat, cq, ct, w_o, jnp.arange(5) % 3, taus=(1.0, 5.0))
    assert set(accs) == {1.0, 5.0} and all(0.0 <= a <= 1.0 for a in accs.values())
    # the evaluation adapter (evaluate.scoring protocol) agrees with direct scoring
    from evaluate.scoring import ScoringModel, scoring_for

    sc = scoring_for(model)
    assert isinstance(sc, llip_mod.LlipHeadScoring) and isinstance(sc, ScoringModel)
    score = nnx.jit(lambda m, i, t: sc.score(m, i, t, 3.0))
    np.testing.assert_allclose(score(model, (kmat, vmat), (q1, z1)), direct, rtol=1e-5, atol=1e-5)
    pairs = nnx.jit(lambda m, i, t: sc.score_pairs(m, i, t, 3.0))
    diag = pairs(model, (kmat[:3], vmat[:3]), (q1, z1))
    np.testing.assert_allclose(diag, jnp.diagonal(direct[:3, :3]), rtol=1e-5, atol=1e-5)


def test_tiny_llip_training_lowers_loss():
    cfg = get_llip_config("llip-test-tiny")
    model = Llip(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(1e-3, b1=0.9, b2=0.95, eps=1e-6, weight_decay=0.2),
                        wrt=nnx.Param)
    rng = np.random.default_rng(0)
    batches = [{"image": jnp.asarray(rng.uniform(size=(8, 32, 32, 3)), jnp.float32),
                "text": jnp.asarray(rng.integers(1, 49408, size=(8, 77)), jnp.int32)} for _ in range(2)]

    @nnx.jit
    def step(model: Llip, opt: nnx.Optimizer, batch: dict) -> jax.Array:
        (loss, _), grads = nnx.value_and_grad(llip_mod.llip_loss_fn, has_aux=True)(model, batch)
        opt.update(model, grads)
        llip_mod.clamp_logit_scale(model)
        return loss

    first = [float(llip_mod.llip_loss_fn(model, b)[0]) for b in batches]
    for _ in range(6):
        for b in batches:
            jax.block_until_ready(step(model, opt, b))
    last = [float(llip_mod.llip_loss_fn(model, b)[0]) for b in batches]
    assert np.mean(last) < 0.9 * np.mean(first), (first, last)


def test_configs_and_registry():
    from metaclip_jax.config_schema import ConfigError, load_config
    from metaclip_jax.models import registry

    expect = {"b32_k64": (64, 5.0, False, 5e-4), "b16_k32": (32, 5.0, False, 5e-4),
              "l14_k32": (32, 1.0, False, 4e-4), "h14_k64": (64, 5.0, True, 4e-4),
              "G14_k64": (64, 5.0, True, 4e-4)}
    for variant, (k, tau, norm, lr) in expect.items():
        c = load_config(f"configs/llip.py:{variant}", num_devices=256)
        assert (c.model.num_tokens, c.model.tau, c.model.use_norm, c.optimizer.lr) == (k, tau, norm, lr)
        assert (c.optimizer.b2, c.optimizer.weight_decay, c.optimizer.warmup_steps) == (0.95, 0.2, 2000)
        assert c.data.global_batch_size == 32_768 and c.total_steps * 32_768 >= 12_799_000_000
        cfg = llip_mod.llip_model_config(c)
        assert cfg.activation == "quick_gelu" and cfg.init_logit_bias == -10.0 and not cfg.vision.use_proj
    with pytest.raises(ConfigError, match="num_tokens"):
        load_config("configs/llip_tiny.py", ["--config.model.num_tokens=0"])
    with pytest.raises(ConfigError, match="loss.name"):
        load_config("configs/llip_tiny.py", ["--config.loss.name=clip"])
    config = load_config("configs/llip_tiny.py", ["--config.data.global_batch_size=4"])
    mt = registry.get_model_type("llip")
    model = mt.build(config, nnx.Rngs(0))
    assert isinstance(model, Llip) and model.cfg.num_tokens == 4 and model.cfg.form == "folded"
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 255, (4, 32, 32, 3)), jnp.uint8),
             "text": jnp.asarray(rng.integers(1, 49408, (4, 77)), jnp.int32)}
    loss, _ = nnx.jit(lambda m, b: registry.model_forward_and_loss(m, b, config, None))(model, batch)
    naive = lambda m, b: L.naive_sigmoid_loss(m.pair_logits_direct(*m(b["image"], b["text"]).values()))
    ref = nnx.jit(naive)(model, batch)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_evaluate_zeroshot_pipeline_uses_llip_adapter():
    """evaluate.zeroshot (prompt averaging, τ sweep) on a Llip model equals the functions of llip.py."""
    from evaluate import zeroshot
    from evaluate.scoring import scoring_for
    from metaclip_jax.tokenizer import ClipTokenizer

    model = Llip(get_llip_config("llip-test-tiny", use_norm=True), rngs=nnx.Rngs(0))
    tok = ClipTokenizer()
    classes, templates = ["cat", "dog", "car"], ["a photo of a {}.", "a {}"]
    sc = scoring_for(model)
    side = zeroshot.build_classifier(model, sc, classes, templates, tok, batch_size=8)
    prompts = np.asarray(tok([t.format(c) for c in classes for t in templates]), np.int32).reshape(3, 2, 77)
    cq, ct = llip_mod.zeroshot_classifier(model, jnp.asarray(prompts))
    np.testing.assert_allclose(side[0], cq, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(side[1], ct, rtol=1e-5, atol=1e-6)
    images = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3))
    outs = zeroshot.ClassifierScorer(sc, 3)(model, images, side, (1.0, 5.0))
    kmat, vmat = nnx.jit(lambda m, x: m.encode_image_tokens(x))(model, images)
    for tau, (top, _) in zip((1.0, 5.0), outs):
        s = llip_mod.zeroshot_scores(kmat, vmat, cq, ct, model.out_proj[...], tau)
        np.testing.assert_array_equal(np.asarray(top[:, 0]), np.asarray(jnp.argmax(s, -1)))
