"""Losses: golden values (spec checkpoints_and_tokenizer.md §10); sharded/chunked == naive (values, grads)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaclip_jax import losses
from metaclip_jax.sharding import make_mesh

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "loss_golden_inputs.npz")


def golden_inputs():
    """B=8, D=16 from torch.Generator().manual_seed(0): randn image then text, L2-normalised (saved once)."""
    d = np.load(GOLDEN)
    return jnp.asarray(d["image"]), jnp.asarray(d["text"])


def test_golden_inputs_match_torch_recipe():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    a, b = golden_inputs()
    np.testing.assert_array_equal(np.asarray(a), img.numpy())
    np.testing.assert_array_equal(np.asarray(b), txt.numpy())


@pytest.mark.parametrize("chunk", [None, 2])
def test_golden_values(chunk):
    img, txt = golden_inputs()
    np.testing.assert_allclose(losses.clip_loss_reference(img, txt, 1 / 0.07), 4.229057, atol=2e-6)
    np.testing.assert_allclose(losses.siglip_loss_reference(img, txt, 10.0, -10.0), 8.985855, atol=2e-6)
    np.testing.assert_allclose(losses.clip_loss(img, txt, 1 / 0.07, chunk_size=chunk)[0], 4.229057, atol=2e-6)
    np.testing.assert_allclose(losses.siglip_loss(img, txt, 10.0, -10.0, chunk_size=chunk)[0], 8.985855,
                               atol=2e-6)


def _features(b=16, d=8, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    img = jax.random.normal(k1, (b, d))
    txt = img * 0.3 + jax.random.normal(k2, (b, d))   # correlated, so positives matter
    n = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return n(img), n(txt)


def _check(kind, n_devices, chunk):
    img, txt = _features()
    scale, bias = jnp.float32(14.0), jnp.float32(-5.0)
    if kind == "clip":
        ref = lambda i, t, s, b: losses.clip_loss_reference(i, t, s)
    else:
        ref = losses.siglip_loss_reference
    if n_devices == 0:
        mesh, axes = None, None
    else:
        mesh, axes = make_mesh(devices=jax.devices()[:n_devices]), ("data", "fsdp")

    def sharded(i, t, s, b):
        if kind == "clip":
            return losses.clip_loss(i, t, s, mesh=mesh, batch_axes=axes, chunk_size=chunk)[0]
        return losses.siglip_loss(i, t, s, b, mesh=mesh, batch_axes=axes, chunk_size=chunk)[0]

    args = (img, txt, scale, bias)
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        sh = NamedSharding(mesh, PartitionSpec(("data",)))
        args = (jax.device_put(img, sh), jax.device_put(txt, sh), scale, bias)
    want, want_g = jax.value_and_grad(ref, argnums=(0, 1, 2, 3))(img, txt, scale, bias)
    got, got_g = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3)))(*args)
    got = jax.block_until_ready(got)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(got_g, want_g):
        if kind == "clip" and w is want_g[3]:
            continue  # no bias in the CLIP loss
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("n_devices,chunk", [(0, None), (0, 4), (1, None), (2, None), (2, 4), (8, 2)])
def test_sharded_chunked_equals_naive(kind, n_devices, chunk):
    _check(kind, n_devices, chunk)


def test_chunk_must_divide():
    img, txt = _features()
    with pytest.raises(ValueError, match="chunk_size"):
        losses.clip_loss(img, txt, 10.0, chunk_size=5)


def test_no_full_logits_when_chunked():
    """The chunked sharded loss never builds a [B, B] array (checked on the jaxpr, forward + backward)."""
    b = 64
    img, txt = _features(b=b)
    mesh = make_mesh(devices=jax.devices()[:2])

    def f(i, t):
        return losses.clip_loss(i, t, 10.0, mesh=mesh, batch_axes=("data",), chunk_size=8)[0]

    jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(img, txt)
    shapes = set()

    def walk(jp):
        for eqn in jp.eqns:
            for v in eqn.outvars:
                shapes.add(tuple(getattr(v.aval, "shape", ())))
            for p in eqn.params.values():
                for sub in (p if isinstance(p, list | tuple) else [p]):
                    if hasattr(sub, "jaxpr"):
                        walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(jaxpr.jaxpr)
    biggest = max(int(np.prod(s)) for s in shapes if len(s) == 2)
    assert (b, b) not in shapes and (b // 2, b) not in shapes
    assert biggest <= b * 8  # local rows x chunk (or the gathered [B, E] features)
