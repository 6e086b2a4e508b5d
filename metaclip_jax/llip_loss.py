"""Llip pair scoring and the sigmoid loss over all B² (image, caption) pairs (spec ``llip.md`` §2.3–§5).

Every (image i, caption j) pair gets its own caption-conditioned image embedding, so the B×B logits are
not one matmul. This module computes them block by block, never forming the ``B×B×D`` tensor of the
naive implementation:

* ``pair_logits_direct``: the reference form of §2.3 (softmax over the K mixture tokens, mixing, the
  per-pair ``D×D`` out-projection, L2 normalisation, dot with the caption target).
* ``pair_logits_folded``: the exact folded form of §5. The out-projection is folded into per-image Gram
  matrices ``G_i = U_i U_iᵀ`` (``HK×HK``) and per-caption vectors ``r_j = W_o^(h) ẑ_t(j)``; the per-pair
  work drops from ``2KD + D²`` to ``2KD + (HK)²`` multiply-adds. ``G_i`` is built from ``M = W_o W_oᵀ``
  (``K·D² + (HK)²·d`` per image instead of ``K·D² + (HK)²·D``); ``wᵀGw`` has a custom VJP.
* ``choose_form``: ``auto`` = folded when H·K < D, direct otherwise (§5.2).
* ``llip_sigmoid_loss``: the §3.1 loss, sharded with ``jax.shard_map``: images stay on their device, the
  small caption-side tensors (query ``q`` and ``ẑ_t`` or the folded ``r``) are all-gathered, and
  (image chunk × caption chunk) blocks are scored under ``jax.checkpoint`` inside one ``lax.scan``
  (``local_loss_sum``), so per-device memory is ``O(B_global·D + b·(HK)² + ci·c·H·K)``, linear in the
  global batch.
* ``chunked_pair_logits``: all logits / cosines in blocks, for zero-shot and retrieval evaluation.

Shapes (per device): ``kmat, vmat [b, H, K, d]`` (per-image keys / values after the optional LayerNorm,
heads split), ``q [c, H, d]`` (per-caption query, heads split, *not* divided by τ), ``zt [c, D]``
(L2-normalised caption target), ``w_o [D, D]`` (``concat_h(o) @ w_o``). All head arithmetic runs in
float32.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

NORM_EPS = 1e-12  # same floor as ``l2_normalize``: z / max(||z||, eps)
FORMS = ("auto", "folded", "direct")

f32 = lambda x: jnp.asarray(x, jnp.float32)


# ---------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------


def choose_form(form: str, heads: int, num_tokens: int, embed_dim: int) -> str:
    """Resolve ``form``: ``auto`` picks ``folded`` when H·K < D and ``direct`` otherwise (§5.2)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if form != "auto":
        return form
    return "folded" if heads * num_tokens < embed_dim else "direct"


def attention_weights(kmat: jax.Array, q: jax.Array, tau: float | jax.Array) -> jax.Array:
    """Softmax over the K mixture tokens of ``<Kmat[i,h,k], q[j,h]> / τ`` (no 1/√d): ``[b, c, H, K]``."""
    a = jnp.einsum("ihkd,jhd->ijhk", f32(kmat), f32(q) / tau)
    return jax.nn.softmax(a, axis=-1)


def split_out_proj(w_o: jax.Array, heads: int) -> jax.Array:
    """``W_o [D, D]`` -> per-head row blocks ``W_o^(h) [H, d, D]``."""
    D = w_o.shape[0]
    return f32(w_o).reshape(heads, D // heads, w_o.shape[1])


def _finish(cos: jax.Array, scale: jax.Array | float, bias: jax.Array | float) -> jax.Array:
    return f32(scale) * cos + f32(bias)


# ---------------------------------------------------------------------------------------------------
# Direct (reference) form, §2.3
# ---------------------------------------------------------------------------------------------------


def pair_cosines_direct(kmat: jax.Array, vmat: jax.Array, q: jax.Array, zt: jax.Array, w_o: jax.Array,
                        tau: float | jax.Array) -> jax.Array:
    """``<ẑ(i|j), ẑ_t(j)>`` for all pairs by the direct form: ``[b, c]``. Forms ``[b, c, D]``."""
    b, H, K, d = kmat.shape
    w = attention_weights(kmat, q, tau)                               # [b, c, H, K]
    o = jnp.einsum("ijhk,ihkd->ijhd", w, f32(vmat))                  # [b, c, H, d]
    z = o.reshape(b, q.shape[0], H * d) @ f32(w_o)                   # [b, c, D]
    norm = jnp.maximum(jnp.linalg.norm(z, axis=-1), NORM_EPS)
    return jnp.einsum("ijD,jD->ij", z, f32(zt)) / norm


def pair_logits_direct(kmat: jax.Array, vmat: jax.Array, q: jax.Array, zt: jax.Array, w_o: jax.Array,
                       scale: jax.Array | float, bias: jax.Array | float,
                       tau: float | jax.Array) -> jax.Array:
    """Logits ``scale · <ẑ(i|j), ẑ_t(j)> + bias`` by the direct form (reference): ``[b, c]``.

    ``scale`` is the linear scale (``exp`` of the stored log-space parameter).
    """
    return _finish(pair_cosines_direct(kmat, vmat, q, zt, w_o, tau), scale, bias)


# ---------------------------------------------------------------------------------------------------
# Folded form, §5
# ---------------------------------------------------------------------------------------------------


def fold_images(vmat: jax.Array, w_o: jax.Array) -> jax.Array:
    """Per-image Gram matrices ``G [b, HK, HK]``, ``G_i[(h,k),(h',k')] = <u[i,h,k], u[i,h',k']>``.

    ``u[i,h,k] = V[i,h,k] @ W_o^(h)`` is never formed: G is computed through ``M = W_o W_oᵀ``
    (``[H, d, H, d]`` blocks), i.e. ``G_i = V_i M V_iᵀ`` with ``V_i``
    block-diagonal over heads: ``K·D² + (HK)²·d`` multiply-adds per image.
    """
    b, H, K, d = vmat.shape
    wo = split_out_proj(w_o, H)                                      # [H, d, D]
    m = jnp.einsum("hdD,geD->hdge", wo, wo)                          # [H, d, H, d]
    y = jnp.einsum("ihkd,hdge->ihkge", f32(vmat), m)                 # [b, H, K, H, d]
    g = jnp.einsum("ihkge,igle->ihkgl", y, f32(vmat))                # [b, H, K, H, K]
    return g.reshape(b, H * K, H * K)


def fold_texts(zt: jax.Array, w_o: jax.Array, heads: int) -> jax.Array:
    """Per-caption ``r[j,h] = W_o^(h) ẑ_t(j)``: ``[c, H, d]`` (``D²`` multiply-adds per caption)."""
    return jnp.einsum("hdD,jD->jhd", split_out_proj(w_o, heads), f32(zt))


@jax.custom_vjp
def quad_form(wf: jax.Array, gram: jax.Array) -> jax.Array:
    """``n[i,j] = w[i,j]ᵀ G_i w[i,j]`` for symmetric ``G`` (``wf [b, c, HK]``, ``gram [b, HK, HK]``).

    Custom VJP: ``∂n/∂w = 2 G w`` reuses the forward product ``G w``, so the backward pass does one
    ``(HK)²``-per-pair product (``∂G = Σ_j ḡ w wᵀ``) instead of autodiff's two.
    """
    return jnp.sum(jnp.einsum("ija,iab->ijb", wf, gram) * wf, axis=-1)


def _quad_form_fwd(wf: jax.Array, gram: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    gw = jnp.einsum("ija,iab->ijb", wf, gram)
    return jnp.sum(gw * wf, axis=-1), (wf, gw)


def _quad_form_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    wf, gw = res
    gwf = g[..., None] * wf
    return 2.0 * g[..., None] * gw, jnp.einsum("ija,ijb->iab", gwf, wf)   # ∂G = ḡ w wᵀ (symmetric)


quad_form.defvjp(_quad_form_fwd, _quad_form_bwd)


def pair_cosines_folded_pre(kmat: jax.Array, vmat: jax.Array, gram: jax.Array, q: jax.Array,
                            r: jax.Array, tau: float | jax.Array) -> jax.Array:
    """Folded cosines from precomputed ``gram = fold_images(vmat, w_o)`` and ``r = fold_texts(zt, ...)``.

    ``cos[i,j] = Σ_hk w·<V[i,h,k], r[j,h]> / sqrt(max(wᵀ G_i w, eps²))``: ``[b, c]``, no ``[b, c, D]``.
    """
    b, H, K, _ = kmat.shape
    w = attention_weights(kmat, q, tau)                               # [b, c, H, K]
    c = jnp.einsum("ihkd,jhd->ijhk", f32(vmat), f32(r))              # [b, c, H, K]
    num = jnp.sum(w * c, axis=(-2, -1))                               # [b, c]
    norm2 = quad_form(w.reshape(b, q.shape[0], H * K), f32(gram))   # wᵀ G_i w: [b, c]
    # wᵀGw >= 0 in exact arithmetic; clamp at the direct form's floor eps² before the square root.
    return num * jax.lax.rsqrt(jnp.maximum(norm2, NORM_EPS**2))


def pair_logits_folded(kmat: jax.Array, vmat: jax.Array, q: jax.Array, zt: jax.Array, w_o: jax.Array,
                       scale: jax.Array | float, bias: jax.Array | float,
                       tau: float | jax.Array) -> jax.Array:
    """Logits by the exact folded form (equal to ``pair_logits_direct`` up to rounding): ``[b, c]``."""
    H = kmat.shape[1]
    cos = pair_cosines_folded_pre(kmat, vmat, fold_images(vmat, w_o), q, fold_texts(zt, w_o, H), tau)
    return _finish(cos, scale, bias)


def pair_logits(kmat: jax.Array, vmat: jax.Array, q: jax.Array, zt: jax.Array, w_o: jax.Array,
                scale: jax.Array | float, bias: jax.Array | float, tau: float | jax.Array,
                form: str = "auto") -> jax.Array:
    """Pair logits by the folded or direct form (``auto``: folded when H·K < D)."""
    _, H, K, _ = kmat.shape
    fn = pair_logits_folded if choose_form(form, H, K, w_o.shape[1]) == "folded" else pair_logits_direct
    return fn(kmat, vmat, q, zt, w_o, scale, bias, tau)


# ---------------------------------------------------------------------------------------------------
# Chunked scoring (local images × a stream of caption chunks)
# ---------------------------------------------------------------------------------------------------


def _text_side(form: str, zt: jax.Array, w_o: jax.Array, heads: int) -> jax.Array:
    """What travels with each caption besides ``q``: ``r`` (folded) or ``ẑ_t`` (direct)."""
    return fold_texts(zt, w_o, heads) if form == "folded" else f32(zt)


def _image_side(form: str, vmat: jax.Array, w_o: jax.Array) -> jax.Array | None:
    return fold_images(vmat, w_o) if form == "folded" else None


def _block_cosines(form: str, kmat: jax.Array, vmat: jax.Array, gram: jax.Array | None, w_o: jax.Array,
                   q: jax.Array, t: jax.Array, tau: float | jax.Array) -> jax.Array:
    if form == "folded":
        return pair_cosines_folded_pre(kmat, vmat, gram, q, t, tau)
    return pair_cosines_direct(kmat, vmat, q, t, w_o, tau)


def _chunk_size(n: int, chunk_size: int | None) -> int:
    c = n if chunk_size is None or chunk_size <= 0 else min(chunk_size, n)
    if n % c:
        raise ValueError(f"text chunk size {c} must divide the number of captions {n}")
    return c


def local_loss_sum(form: str, kmat: jax.Array, vmat: jax.Array, w_o: jax.Array, q_all: jax.Array,
                   t_all: jax.Array, scale: jax.Array, bias: jax.Array, tau: float | jax.Array,
                   first_pos: jax.Array | int, chunk: int, image_chunk: int | None = None) -> jax.Array:
    """One device's share: Σ over local images × all captions of ``-log σ(y·logit)``.

    ``t_all`` is ``r`` (folded) or ``ẑ_t`` (direct) of every caption; the positive of local image i is
    caption ``first_pos + i``. One ``lax.scan`` runs over (image chunk, caption chunk) blocks; each block
    is a ``jax.checkpoint`` that slices its rows and columns from the loop-invariant arrays, so only the
    block indices are saved per step and one block's ``[ci, c, H, K]`` tensors are live at a time.
    """
    b = kmat.shape[0]
    n = q_all.shape[0]
    ci = _chunk_size(b, image_chunk)
    chunk = _chunk_size(n, chunk)
    n_i, n_t = b // ci, n // chunk
    gram = None
    if form == "folded":  # once per image, outside the pair loop; per image chunk, recomputed in the
        # backward pass, so the [ci, H, K, D] intermediate of fold_images is live for one chunk only
        fold = jax.checkpoint(lambda v: fold_images(v, w_o), prevent_cse=False)
        hk = vmat.shape[1] * vmat.shape[2]
        gram = jax.lax.map(fold, vmat.reshape(n_i, ci, *vmat.shape[1:])).reshape(b, hk, hk)
    sl = lambda x, i, size: jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=0)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def block(ii: jax.Array, jj: jax.Array) -> jax.Array:
        g_i = None if gram is None else sl(gram, ii, ci)
        cos = _block_cosines(form, sl(kmat, ii, ci), sl(vmat, ii, ci), g_i, w_o, sl(q_all, jj, chunk),
                             sl(t_all, jj, chunk), tau)
        logits = _finish(cos, scale, bias)
        rows = first_pos + ii * ci + jnp.arange(ci)[:, None]
        cols = jj * chunk + jnp.arange(chunk)[None, :]
        labels = jnp.where(rows == cols, 1.0, -1.0)
        return -jnp.sum(jax.nn.log_sigmoid(labels * logits))

    def body(carry: None, idx: jax.Array) -> tuple[None, jax.Array]:
        return None, block(idx // n_t, idx % n_t)

    # Per-block sums as scan outputs (no carry: its device-varying type would differ from the init's).
    _, sums = jax.lax.scan(body, None, jnp.arange(n_i * n_t))
    return jnp.sum(sums)


def chunked_pair_logits(kmat: jax.Array, vmat: jax.Array, q: jax.Array, zt: jax.Array, w_o: jax.Array,
                        scale: jax.Array | float = 1.0, bias: jax.Array | float = 0.0,
                        tau: float | jax.Array = 5.0, *, form: str = "auto",
                        text_chunk: int | None = None, image_chunk: int | None = None) -> jax.Array:
    """All ``[N_img, N_txt]`` logits, in (image chunk × text chunk) blocks via ``lax.map``.

    For evaluation (zero-shot / retrieval). Chunk sizes that do not divide the counts are handled by
    padding. With ``scale=1, bias=0`` the result is the cosine ``<ẑ(i|j), ẑ_t(j)>``.
    """
    ni, H, K, d = kmat.shape
    nt = q.shape[0]
    form = choose_form(form, H, K, w_o.shape[1])
    ci = ni if not image_chunk else min(image_chunk, ni)
    ct = nt if not text_chunk else min(text_chunk, nt)
    pad_i, pad_t = (-ni) % ci, (-nt) % ct
    pad = lambda x, p: jnp.pad(x, [(0, p)] + [(0, 0)] * (x.ndim - 1)) if p else x
    kmat, vmat = pad(f32(kmat), pad_i), pad(f32(vmat), pad_i)
    t_all = pad(_text_side(form, zt, w_o, H), pad_t)
    q = pad(f32(q), pad_t)
    t_chunks = t_all.reshape(-1, ct, *t_all.shape[1:])
    q_chunks = q.reshape(-1, ct, H, d)

    def image_block(xs: tuple[jax.Array, jax.Array]) -> jax.Array:
        k_i, v_i = xs
        gram = _image_side(form, v_i, w_o)

        def text_block(ys: tuple[jax.Array, jax.Array]) -> jax.Array:
            return _block_cosines(form, k_i, v_i, gram, w_o, ys[0], ys[1], tau)

        out = jax.lax.map(text_block, (q_chunks, t_chunks))          # [nt/ct, ci, ct]
        return out.transpose(1, 0, 2).reshape(ci, -1)

    cos = jax.lax.map(image_block, (kmat.reshape(-1, ci, H, K, d), vmat.reshape(-1, ci, H, K, d)))
    cos = cos.reshape(-1, cos.shape[-1])[:ni, :nt]
    return _finish(cos, scale, bias)


# ---------------------------------------------------------------------------------------------------
# The loss (§3.1), sharded
# ---------------------------------------------------------------------------------------------------


def _batch_axes(mesh: Mesh, batch_axes: Sequence[str] | str | None) -> tuple[str, ...]:
    if batch_axes is None:
        from metaclip_jax.sharding import logical_to_spec

        spec = logical_to_spec(("batch",), None, mesh)
        entry = spec[0] if len(spec) else None
        batch_axes = () if entry is None else entry
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    return tuple(a for a in axes if mesh.shape[a] > 1)


def llip_sigmoid_loss(kmat: jax.Array, vmat: jax.Array, q: jax.Array, zt: jax.Array, w_o: jax.Array,
                      logit_scale: jax.Array, logit_bias: jax.Array, *, tau: float,
                      form: str = "auto", chunk_size: int | None = None, image_chunk: int | None = None,
                      mesh: Mesh | None = None, batch_axes: Sequence[str] | str | None = None) -> jax.Array:
    """The Llip sigmoid loss ``-(1/B) Σ_i Σ_j log σ(y_ij · logit[i,j])`` (positives on the diagonal).

    Args:
      kmat, vmat: ``[B, H, K, d]`` per-image keys / values (batch-sharded on ``mesh``).
      q: ``[B, H, d]`` caption queries; zt: ``[B, D]`` L2-normalised caption targets (batch-sharded).
      w_o: ``[D, D]`` out-projection; logit_scale: log-space scalar (``exp`` is applied here);
        logit_bias: scalar.
      tau: attention temperature. form: ``auto`` | ``folded`` | ``direct``.
      chunk_size: captions per scored block (default: the local batch size b); must divide B.
      image_chunk: local images per scored block (default: all b); must divide b.
      mesh, batch_axes: shard over the mesh's batch axes (default: the ``batch`` logical rule). With no
        mesh (or a single batch shard) the same chunked code runs unsharded.

    Each device sums over its b local images × all B captions and divides by b; the mean over
    devices equals the 1/B_global form. Memory per device: the gathered caption tensors (``B·2D``), the
    per-image Gram matrices (folded, ``b·(HK)²``) and one checkpointed ``image_chunk × chunk × H·K``
    block (direct: also ``image_chunk × chunk × D``).
    """
    B, H, K, _ = kmat.shape
    form = choose_form(form, H, K, w_o.shape[1])
    scale = jnp.exp(f32(logit_scale))
    bias = f32(logit_bias)
    axes = () if mesh is None else _batch_axes(mesh, batch_axes)
    n_shards = 1
    for a in axes:
        n_shards *= mesh.shape[a]  # type: ignore[union-attr]
    if n_shards == 1:
        t = _text_side(form, zt, w_o, H)
        total = local_loss_sum(form, kmat, vmat, w_o, q, t, scale, bias, tau, 0,
                               _chunk_size(B, chunk_size or B), image_chunk)
        return total / B
    if B % n_shards:
        raise ValueError(f"global batch {B} is not divisible by the {n_shards} batch shards")
    b = B // n_shards
    chunk = _chunk_size(B, chunk_size or b)
    spec = PartitionSpec(axes)

    def local(kmat: jax.Array, vmat: jax.Array, q: jax.Array, zt: jax.Array, w_o: jax.Array,
              scale: jax.Array, bias: jax.Array) -> jax.Array:
        t = _text_side(form, zt, w_o, H)                             # computed locally, then gathered
        q_all = jax.lax.all_gather(f32(q), axes, axis=0, tiled=True)
        t_all = jax.lax.all_gather(t, axes, axis=0, tiled=True)
        rank = jax.lax.axis_index(axes)
        total = local_loss_sum(form, kmat, vmat, w_o, q_all, t_all, scale, bias, tau, rank * b, chunk,
                               image_chunk)
        return jax.lax.pmean(total / b, axes)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, spec, PartitionSpec(), PartitionSpec(),
                                                   PartitionSpec()),
                       out_specs=PartitionSpec())
    return fn(kmat, vmat, q, zt, w_o, scale, bias)


def naive_sigmoid_loss(logits: jax.Array) -> jax.Array:
    """Reference: the §3.1 loss from a full ``[B, B]`` logit matrix (tests, tiny batches)."""
    B = logits.shape[0]
    labels = 2.0 * jnp.eye(B, dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * f32(logits))) / B


def head_flops(batch: int, heads: int, num_tokens: int, embed_dim: int, form: str,
               num_texts: int | None = None) -> dict[str, Any]:
    """Analytic forward FLOPs (2 per multiply-add) of one device's pair head: ``batch`` local images ×
    ``num_texts`` captions (default ``batch``).

    Per pair: direct ``2KD + D²``; folded ``2KD + (HK)²`` (§5.2). Folded extras: per local image
    ``K·D² + (HK)²·d`` (Gram via ``M = W_o W_oᵀ``), per local caption ``D²`` (``r``; the other devices'
    ``r`` arrive by all_gather), once ``D³`` (``M``). Softmax / normalisation element-wise work is not
    counted.
    """
    n_t = batch if num_texts is None else num_texts
    H, K, D = heads, num_tokens, embed_dim
    d = D // H
    pairs = batch * n_t
    if form == "direct":
        per_pair = 2 * K * D + D * D
        pre = 0
    elif form == "folded":
        per_pair = 2 * K * D + (H * K) ** 2
        pre = batch * (K * D * D + (H * K) ** 2 * d + D * D) + D * D * D
    elif form == "clip":
        per_pair, pre = D, 0
    else:
        raise ValueError(form)
    macs = pairs * per_pair + pre
    return {"macs_per_pair": per_pair, "macs": macs, "flops": 2 * macs}
