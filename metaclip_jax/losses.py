"""Contrastive losses over the global batch, memory-bounded: CLIP (symmetric InfoNCE) and SigLIP (sigmoid).

Sharded scheme (spec metaclip.md §6.1 / §6.12, open_clip ``local_loss=True, gather_with_grad=True``): inside
``jax.shard_map`` over the batch mesh axes each device holds ``B_local`` rows of image and text features. It
all-gathers the other tower (gradients flow back through the gather as a reduce-scatter) and computes only its
local rows against all ``B`` columns; the positive of local row ``r`` is global column
``device_index * B_local + r``. With ``chunk_size`` the columns are visited ``chunk_size`` at a time under
``lax.scan`` with an online log-sum-exp and a rematerialised body, so no device ever holds more than
``B_local x chunk_size`` logits (forward or backward) instead of ``B x B``.

- CLIP: ``0.5 * (CE_i2t + CE_t2i)`` averaged over the global batch; the t2i half uses the same local-rows
  scheme with the images gathered for the local texts.
- SigLIP: ``-sum_ij log sigmoid(y_ij (scale * <img_i, txt_j> + bias)) / B`` (normalised by B, not B^2).

All arithmetic is float32. ``scale`` is the exponentiated logit scale (what ``CLIP.__call__`` returns).
``*_reference`` are the naive single-device B x B formulas used as test oracles.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

# ------------------------------------------------------------------------------------- references


def clip_loss_reference(img: jax.Array, txt: jax.Array, scale: jax.Array) -> jax.Array:
    """Naive symmetric InfoNCE with the full B x B logits."""
    logits = scale * img.astype(jnp.float32) @ txt.astype(jnp.float32).T
    labels = jnp.arange(img.shape[0])
    i2t = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], axis=1).mean()
    t2i = -jnp.take_along_axis(jax.nn.log_softmax(logits.T, axis=1), labels[:, None], axis=1).mean()
    return 0.5 * (i2t + t2i)


def siglip_loss_reference(img: jax.Array, txt: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """Naive sigmoid loss: -sum_ij log sigmoid(y_ij * logits_ij) / B, y = 2 I - 1."""
    logits = scale * img.astype(jnp.float32) @ txt.astype(jnp.float32).T + bias
    y = 2.0 * jnp.eye(img.shape[0], dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(y * logits)) / img.shape[0]


# ---------------------------------------------------------------------------------- local kernels


def _chunks(cols: jax.Array, chunk_size: int | None) -> jax.Array:
    """[N, E] -> [N / c, c, E] (c = N when chunk_size is None or >= N)."""
    n = cols.shape[0]
    c = n if chunk_size is None or chunk_size >= n else chunk_size
    if n % c:
        raise ValueError(f"chunk_size {c} does not divide the {n} gathered columns")
    return cols.reshape(n // c, c, cols.shape[-1])


def _varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Mark a scan's initial carry as device-varying inside shard_map (its body output varies)."""
    return jax.lax.pcast(x, axes, to="varying") if axes else x


def _local_lse(rows: jax.Array, cols: jax.Array, scale: jax.Array, chunk_size: int | None,
               axes: tuple[str, ...] = ()) -> jax.Array:
    """logsumexp_j(scale * rows @ cols_j) per local row, streaming over column chunks."""
    chunks = _chunks(cols, chunk_size)

    @jax.checkpoint
    def body(carry: tuple[jax.Array, jax.Array], c: jax.Array) -> tuple[tuple[jax.Array, jax.Array], None]:
        m, s = carry
        logits = scale * rows @ c.T                       # [R, c]
        m_new = jnp.maximum(m, jax.lax.stop_gradient(logits.max(axis=1)))
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(axis=1)
        return (m_new, s), None

    r = rows.shape[0]
    init = (_varying(jnp.full((r,), -jnp.inf, jnp.float32), axes),
            _varying(jnp.zeros((r,), jnp.float32), axes))
    if chunks.shape[0] == 1:
        return jax.nn.logsumexp(scale * rows @ chunks[0].T, axis=1)
    (m, s), _ = jax.lax.scan(body, init, chunks)
    return m + jnp.log(s)


def _local_sigmoid_sum(rows: jax.Array, cols: jax.Array, scale: jax.Array, bias: jax.Array,
                       row_offset: jax.Array, chunk_size: int | None, axes: tuple[str, ...] = ()
                       ) -> jax.Array:
    """sum over local rows i and all columns j of log sigmoid(y_ij * (scale <r_i, c_j> + bias))."""
    chunks = _chunks(cols, chunk_size)
    c = chunks.shape[1]
    row_ids = row_offset + jnp.arange(rows.shape[0])

    @jax.checkpoint
    def body(total: jax.Array, xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        k, cols_k = xs
        logits = scale * rows @ cols_k.T + bias
        col_ids = k * c + jnp.arange(c)
        y = jnp.where(row_ids[:, None] == col_ids[None, :], 1.0, -1.0)
        return total + jnp.sum(jax.nn.log_sigmoid(y * logits)), None

    ks = jnp.arange(chunks.shape[0])
    if chunks.shape[0] == 1:
        return body(jnp.zeros((), jnp.float32), (ks[0], chunks[0]))[0]
    total, _ = jax.lax.scan(body, _varying(jnp.zeros((), jnp.float32), axes), (ks, chunks))
    return total


# ------------------------------------------------------------------------------------- sharded losses


def _axes(mesh: Mesh | None, batch_axes: Sequence[str] | str | None) -> tuple[str, ...]:
    if mesh is None or batch_axes is None:
        return ()
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    return tuple(a for a in axes if mesh.shape[a] > 1)


def _run(fn, mesh: Mesh | None, axes: tuple[str, ...], *args: jax.Array) -> jax.Array:
    """Run ``fn(axes, *args)`` on local rows inside shard_map (or directly when nothing is sharded)."""
    if not axes:
        return fn((), *args)
    batch = PartitionSpec(axes)
    in_specs = tuple(batch if a.ndim >= 1 else PartitionSpec() for a in args)
    return jax.shard_map(lambda *a: fn(axes, *a), mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec())(
        *args)


def _gather(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return jax.lax.all_gather(x, axes, axis=0, tiled=True) if axes else x


def _offset(axes: tuple[str, ...], local: int) -> jax.Array:
    return jax.lax.axis_index(axes) * local if axes else jnp.zeros((), jnp.int32)


def _psum(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return jax.lax.psum(x, axes) if axes else x


def clip_loss(img: jax.Array, txt: jax.Array, scale: jax.Array, *, mesh: Mesh | None = None,
              batch_axes: Sequence[str] | str | None = None, chunk_size: int | None = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE over the global batch. ``img``/``txt``: [B, E] L2-normalised, sharded over
    ``batch_axes`` of ``mesh`` (None: single device). Returns ``(loss, {"loss_i2t", "loss_t2i"})``."""
    axes = _axes(mesh, batch_axes)

    def local(axes: tuple[str, ...], img: jax.Array, txt: jax.Array, scale: jax.Array) -> jax.Array:
        img, txt = img.astype(jnp.float32), txt.astype(jnp.float32)
        n_global = img.shape[0] * (jax.lax.psum(1, axes) if axes else 1)
        pos = scale * jnp.sum(img * txt, axis=-1)                  # positives sit on the local diagonal
        i2t = _local_lse(img, _gather(txt, axes), scale, chunk_size, axes) - pos
        t2i = _local_lse(txt, _gather(img, axes), scale, chunk_size, axes) - pos
        sums = jnp.stack([i2t.sum(), t2i.sum()])
        return _psum(sums, axes) / n_global

    i2t, t2i = _run(local, mesh, axes, img, txt, jnp.asarray(scale, jnp.float32))
    return 0.5 * (i2t + t2i), {"loss_i2t": i2t, "loss_t2i": t2i}


def siglip_loss(img: jax.Array, txt: jax.Array, scale: jax.Array, bias: jax.Array, *,
                mesh: Mesh | None = None, batch_axes: Sequence[str] | str | None = None,
                chunk_size: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sigmoid loss over the global batch, normalised by B. Same sharding scheme as ``clip_loss``."""
    axes = _axes(mesh, batch_axes)

    def local(axes: tuple[str, ...], img: jax.Array, txt: jax.Array, scale: jax.Array,
              bias: jax.Array) -> jax.Array:
        img, txt = img.astype(jnp.float32), txt.astype(jnp.float32)
        n_global = img.shape[0] * (jax.lax.psum(1, axes) if axes else 1)
        total = _local_sigmoid_sum(img, _gather(txt, axes), scale, bias, _offset(axes, img.shape[0]),
                                   chunk_size, axes)
        return -_psum(total, axes) / n_global

    loss = _run(local, mesh, axes, img, txt, jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32))
    return loss, {}
