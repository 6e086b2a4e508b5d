"""Llip (Latent Language Image Pretraining, spec ``llip.md``): a SigLIP-style dual encoder whose image
tower emits K mixture tokens; each caption attends over them to build its own image embedding.

``Llip(cfg, rngs=nnx.Rngs(0))``:

* ``encode_image_tokens(images) -> (kmat, vmat)`` ``[B, H, K, d]``: the K ln_post-ed mixture tokens
  through per-token key / value projections ``k_proj, v_proj [K, W_v, D]`` (optional LayerNorm), heads
  split. Computed once per image.
* ``encode_text_query(tokens) -> (q, zt_hat)``: ``q = LN(h_txt @ q_proj)`` split into heads ``[B, H, d]``
  and the L2-normalised target ``ẑ_t = normalize(h_txt @ text_projection)`` ``[B, D]``.
* ``pair_logits_direct / pair_logits_folded / pair_logits``: all (image, caption) logits
  ``exp(s) · <ẑ(i|j), ẑ_t(j)> + b`` (see ``metaclip_jax.llip_loss`` for the folded form).
* ``loss(images, tokens, mesh=...)``: the sharded, chunked sigmoid loss.

Zero-shot helpers (template-averaged queries, CLIP-ensembled targets, τ sweep) and chunked retrieval
scoring are at the end of this file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from metaclip_jax import llip_loss
from metaclip_jax.models.clip import l2_normalize
from metaclip_jax.models.config import CLIPConfig, VisionConfig
from metaclip_jax.models.layers import layer_norm, normal, ones, param, zeros
from metaclip_jax.models.towers import TextTransformer, VisionTransformer

LOG_SCALE_MAX = 4.605170185988092  # ln 100: logit_scale is clamped to [0, ln 100] after each step


_LLIP_VISION = VisionConfig(patch_size=16, num_class_tokens=32, use_proj=False)  # B/16, K = 32


@dataclasses.dataclass(frozen=True)
class LlipConfig(CLIPConfig):
    """A CLIPConfig plus the Llip head. K is ``vision.num_class_tokens``; ``vision.use_proj`` must be False.

    Defaults follow the official code: 8 cross-attention heads, τ = 5, logit bias −10, scale init
    ln(1/0.07), QuickGELU.
    """

    vision: VisionConfig = _LLIP_VISION
    activation: str = "quick_gelu"
    init_logit_bias: float | None = -10.0
    num_heads: int = 8          # H, cross-attention heads (``num_heads`` in the official config)
    tau: float = 5.0            # attention temperature (``weight_scale``), fixed during training
    use_norm: bool = False      # LayerNorm(D) on q, Kmat, Vmat (H/14, G/14)
    head_form: str = "auto"     # auto | folded | direct (auto: folded when H·K < D)
    text_chunk: int = 0         # captions per scored block in the loss; 0 = the local batch size

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vision.use_proj:
            raise ValueError("Llip drops visual.proj: set vision.use_proj=False")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        if self.init_logit_bias is None:
            raise ValueError("Llip uses a sigmoid loss: init_logit_bias must be set (-10)")
        if self.head_form not in llip_loss.FORMS:
            raise ValueError(f"head_form must be one of {llip_loss.FORMS}, got {self.head_form!r}")
        if self.tau <= 0:
            raise ValueError("tau must be positive")

    @property
    def num_tokens(self) -> int:
        """K, the number of mixture tokens."""
        return self.vision.num_class_tokens

    @property
    def form(self) -> str:
        """The head form the loss uses (``head_form`` resolved by the H·K < D rule)."""
        return llip_loss.choose_form(self.head_form, self.num_heads, self.num_tokens, self.embed_dim)


class Llip(nnx.Module):
    """The Llip model: ViT with K mixture tokens, causal text transformer, and the cross-attention head.

    Parameters beyond the towers (spec §2.4 init): ``k_proj, v_proj [K, W_v, D]`` N(0, W_v^-½),
    ``q_proj [W_t, D]`` N(0, W_t^-½), ``out_proj [D, D]`` N(0, D^-½) (no bias), optional q/k/v
    LayerNorms, ``logit_scale`` (log space, ln(1/0.07)), ``logit_bias`` (−10).
    """

    def __init__(self, cfg: LlipConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, LlipConfig):
            raise TypeError("Llip needs a LlipConfig")
        self.cfg = cfg
        K, Wv, Wt, D = cfg.num_tokens, cfg.vision.width, cfg.text.width, cfg.embed_dim
        self.visual = VisionTransformer(cfg.vision, D, rngs=rngs)
        self.text = TextTransformer(cfg.text, D, rngs=rngs)
        self.k_proj = param(rngs, normal(Wv**-0.5), (K, Wv, D), ("mixture", "embed", "joint_embed"))
        self.v_proj = param(rngs, normal(Wv**-0.5), (K, Wv, D), ("mixture", "embed", "joint_embed"))
        self.q_proj = param(rngs, normal(Wt**-0.5), (Wt, D), ("embed", "joint_embed"))
        self.out_proj = param(rngs, normal(D**-0.5), (D, D), ("joint_embed", "joint_embed"))
        if cfg.use_norm:
            for n in ("q", "k", "v"):
                setattr(self, f"{n}_ln_scale", param(rngs, ones, (D,), ("joint_embed",)))
                setattr(self, f"{n}_ln_bias", param(rngs, zeros, (D,), ("joint_embed",)))
        self.logit_scale = param(rngs, lambda k, s: jnp.full(s, cfg.init_logit_scale, jnp.float32), (), ())
        self.logit_bias = param(rngs, lambda k, s: jnp.full(s, cfg.init_logit_bias, jnp.float32), (), ())

    # -- towers ------------------------------------------------------------------------------------

    def _norm(self, x: jax.Array, which: str) -> jax.Array:
        if not self.cfg.use_norm:
            return x
        return layer_norm(x, getattr(self, f"{which}_ln_scale")[...], getattr(self, f"{which}_ln_bias")[...])

    def _heads(self, x: jax.Array) -> jax.Array:
        H = self.cfg.num_heads
        return x.reshape(*x.shape[:-1], H, x.shape[-1] // H)

    def image_tokens(self, images: jax.Array) -> jax.Array:
        """The ln_post-ed mixture tokens ``h_img [B, K, W_v]`` (float32)."""
        return self.visual(images, self.cfg).astype(jnp.float32)

    def project_image_tokens(self, h_img: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``h_img [B, K, W_v]`` -> ``(kmat, vmat)`` ``[B, H, K, d]`` float32 (per-token projections)."""
        dtype = jnp.dtype(self.cfg.dtype)
        h = h_img.astype(dtype)
        kmat = jnp.einsum("bkw,kwd->bkd", h, self.k_proj[...].astype(dtype)).astype(jnp.float32)
        vmat = jnp.einsum("bkw,kwd->bkd", h, self.v_proj[...].astype(dtype)).astype(jnp.float32)
        kmat, vmat = self._norm(kmat, "k"), self._norm(vmat, "v")
        return self._heads(kmat).transpose(0, 2, 1, 3), self._heads(vmat).transpose(0, 2, 1, 3)

    def encode_image_tokens(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images ``[B, S, S, 3]`` -> per-image ``(kmat, vmat)`` ``[B, H, K, d]`` (float32)."""
        return self.project_image_tokens(self.image_tokens(images))

    def text_state(self, tokens: jax.Array) -> jax.Array:
        """Pooled post-ln_final text state ``h_txt [B, W_t]`` (float32)."""
        return self.text(tokens, self.cfg).astype(jnp.float32)

    def project_text_state(self, h_txt: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``h_txt [B, W_t]`` -> ``(q [B, H, d], zt_hat [B, D])``."""
        dtype = jnp.dtype(self.cfg.dtype)
        h = h_txt.astype(dtype)
        q = (h @ self.q_proj[...].astype(dtype)).astype(jnp.float32)
        zt = (h @ self.text.text_projection[...].astype(dtype)).astype(jnp.float32)
        return self._heads(self._norm(q, "q")), l2_normalize(zt)

    def encode_text_query(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Token ids ``[B, L]`` -> ``(q [B, H, d], zt_hat [B, D])`` (query not divided by τ)."""
        return self.project_text_state(self.text_state(tokens))

    # -- head --------------------------------------------------------------------------------------

    def head_params(self) -> dict[str, jax.Array]:
        """``out_proj``, linear ``scale = exp(logit_scale)`` and ``bias`` for the pair functions."""
        return {"w_o": self.out_proj[...], "scale": jnp.exp(self.logit_scale[...]),
                "bias": self.logit_bias[...]}

    def pair_logits_direct(self, kmat: jax.Array, vmat: jax.Array, q: jax.Array, zt: jax.Array,
                           tau: float | None = None) -> jax.Array:
        """All ``[b_img, c_txt]`` logits by the direct (reference) form."""
        p = self.head_params()
        return llip_loss.pair_logits_direct(kmat, vmat, q, zt, p["w_o"], p["scale"], p["bias"],
                                            self.cfg.tau if tau is None else tau)

    def pair_logits_folded(self, kmat: jax.Array, vmat: jax.Array, q: jax.Array, zt: jax.Array,
                           tau: float | None = None) -> jax.Array:
        """All ``[b_img, c_txt]`` logits by the exact folded form."""
        p = self.head_params()
        return llip_loss.pair_logits_folded(kmat, vmat, q, zt, p["w_o"], p["scale"], p["bias"],
                                            self.cfg.tau if tau is None else tau)

    def pair_logits(self, kmat: jax.Array, vmat: jax.Array, q: jax.Array, zt: jax.Array,
                    tau: float | None = None, form: str | None = None) -> jax.Array:
        """All logits by ``form`` (default ``cfg.head_form``; ``auto`` resolves by H·K < D)."""
        p = self.head_params()
        return llip_loss.pair_logits(kmat, vmat, q, zt, p["w_o"], p["scale"], p["bias"],
                                     self.cfg.tau if tau is None else tau,
                                     self.cfg.head_form if form is None else form)

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        """Both towers: ``{"kmat", "vmat", "q", "zt"}`` (the inputs of the loss / pair functions)."""
        kmat, vmat = self.encode_image_tokens(images)
        q, zt = self.encode_text_query(tokens)
        return {"kmat": kmat, "vmat": vmat, "q": q, "zt": zt}

    def scoring(self) -> LlipHeadScoring:
        """The evaluation adapter (``evaluate.scoring.ScoringModel`` protocol) for this model."""
        return LlipHeadScoring(default_temperature=self.cfg.tau, form=self.cfg.head_form)

    def loss(self, images: jax.Array, tokens: jax.Array, *, mesh: Any = None,
             batch_axes: Sequence[str] | str | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The sharded sigmoid loss on a batch, and metrics (scale, bias)."""
        out = self(images, tokens)
        cfg = self.cfg
        loss = llip_loss.llip_sigmoid_loss(
            out["kmat"], out["vmat"], out["q"], out["zt"], self.out_proj[...], self.logit_scale[...],
            self.logit_bias[...], tau=cfg.tau, form=cfg.head_form, chunk_size=cfg.text_chunk or None,
            mesh=mesh, batch_axes=batch_axes)
        metrics = {"loss": loss, "logit_scale": jnp.exp(self.logit_scale[...]),
                   "logit_bias": self.logit_bias[...]}
        return loss, metrics


def clamp_logit_scale(model: Llip) -> None:
    """Clamp ``logit_scale`` to [0, ln 100] in place (after each optimizer step, §3.2)."""
    model.logit_scale[...] = jnp.clip(model.logit_scale[...], 0.0, LOG_SCALE_MAX)


def llip_loss_fn(model: Llip, batch: dict[str, jax.Array], mesh: Any = None,
                 batch_axes: Sequence[str] | str | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Forward + loss for a training step: ``batch = {"image": [B,S,S,3], "text": [B,L]}``.

    Positional-only friendly (``nnx.value_and_grad`` does not accept keyword-only parameters).
    """
    return model.loss(batch["image"], batch["text"], mesh=mesh, batch_axes=batch_axes)


# ---------------------------------------------------------------------------------------------------
# Presets (spec §7)
# ---------------------------------------------------------------------------------------------------

# name: (CLIP preset, K, tau, use_norm)
_LLIP_PRESETS: dict[str, tuple[str, int, float, bool]] = {
    "Llip-B-32-K64": ("ViT-B-32", 64, 5.0, False),     # the B/32 ablation base
    "Llip-B-16-K32": ("ViT-B-16", 32, 5.0, False),     # released B/16
    "Llip-L-14-K32": ("ViT-L-14", 32, 1.0, False),     # L/14: tau 1
    "Llip-H-14-K64": ("ViT-H-14", 64, 5.0, True),
    "Llip-G-14-K64": ("ViT-bigG-14", 64, 5.0, True),   # released G/14
}


def llip_preset_names() -> list[str]:
    """Names accepted by ``get_llip_config``."""
    return [*_LLIP_PRESETS, "llip-test-tiny"]


def llip_config(base: CLIPConfig, *, num_tokens: int, num_heads: int = 8, tau: float = 5.0,
                use_norm: bool = False, **overrides: Any) -> LlipConfig:
    """A ``LlipConfig`` from a CLIP preset's config: K mixture tokens, no visual.proj, QuickGELU, bias −10.

    ``overrides`` are any other ``LlipConfig`` fields (dtype, remat, head_form, text_chunk, ...).
    """
    vision = dataclasses.replace(base.vision, num_class_tokens=num_tokens, use_proj=False)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(CLIPConfig)}
    fields.update(vision=vision, activation="quick_gelu", init_logit_bias=-10.0)
    fields.update(overrides)
    return LlipConfig(**fields, num_heads=num_heads, tau=tau, use_norm=use_norm)


def get_llip_config(name: str, **overrides: Any) -> LlipConfig:
    """The ``LlipConfig`` of a preset (QuickGELU, H = 8, bias −10); overrides are dataclass fields.

    ``num_tokens=K`` is accepted as an override for K (e.g. the K ablations).
    """
    from metaclip_jax.models import presets

    overrides = dict(overrides)
    if name == "llip-test-tiny":
        clip_name, k, tau, use_norm, heads = "test-tiny", 4, 5.0, False, 4
    elif name in _LLIP_PRESETS:
        clip_name, k, tau, use_norm = _LLIP_PRESETS[name]
        heads = 8
    else:
        raise KeyError(f"unknown Llip preset {name!r}; known: {', '.join(llip_preset_names())}")
    return llip_config(presets.get_config(clip_name), num_tokens=overrides.pop("num_tokens", k),
                       num_heads=overrides.pop("num_heads", heads), tau=overrides.pop("tau", tau),
                       use_norm=overrides.pop("use_norm", use_norm), **overrides)


# ---------------------------------------------------------------------------------------------------
# Zero-shot classification and retrieval (spec §6)
# ---------------------------------------------------------------------------------------------------

EVAL_TAUS = (1.0, 3.0, 5.0, 8.0, 10.0)


def zeroshot_classifier(model: Llip, class_tokens: jax.Array,
                        batch_size: int = 256) -> tuple[jax.Array, jax.Array]:
    """Class queries and targets from templated prompts ``class_tokens [C, T, L]`` (T templates).

    Returns ``(Q [C, H, d], targets [C, D])``: ``Q_c`` = mean over templates of the per-head query
    (after q_proj and the optional LayerNorm); ``t_c = normalize(mean_t normalize(z_t))`` (CLIP
    ensembling). τ is not folded in, so one classifier serves every evaluation temperature.
    """
    C, T, L = class_tokens.shape
    flat = class_tokens.reshape(C * T, L)
    fn = nnx.jit(lambda m, t: m.encode_text_query(t))
    qs, zs = [], []
    for s in range(0, C * T, batch_size):
        q, zt = fn(model, flat[s: s + batch_size])
        qs.append(q)
        zs.append(zt)
    q = jnp.concatenate(qs).reshape(C, T, *qs[0].shape[1:])
    zt = jnp.concatenate(zs).reshape(C, T, -1)
    return q.mean(axis=1), l2_normalize(zt.mean(axis=1))


def zeroshot_scores(kmat: jax.Array, vmat: jax.Array, class_q: jax.Array, class_t: jax.Array,
                    w_o: jax.Array, tau: float, *, form: str = "auto", image_chunk: int = 256,
                    class_chunk: int = 1000) -> jax.Array:
    """Cosine scores ``<ẑ(i|c), t_c>`` ``[N, C]`` for images' ``(kmat, vmat)`` against class queries.

    Scale and bias do not change the argmax, so they are left out.
    """
    return llip_loss.chunked_pair_logits(kmat, vmat, class_q, class_t, w_o, 1.0, 0.0, tau, form=form,
                                         text_chunk=class_chunk, image_chunk=image_chunk)


def zeroshot_tau_sweep(kmat: jax.Array, vmat: jax.Array, class_q: jax.Array, class_t: jax.Array,
                       w_o: jax.Array, labels: jax.Array, taus: Sequence[float] = EVAL_TAUS, *,
                       form: str = "auto") -> dict[float, float]:
    """Top-1 accuracy for each evaluation temperature τ (the official evaluation sweeps {1,3,5,8,10})."""
    out = {}
    for tau in taus:
        s = zeroshot_scores(kmat, vmat, class_q, class_t, w_o, tau, form=form)
        out[float(tau)] = float(jnp.mean(jnp.argmax(s, axis=-1) == labels))
    return out


def retrieval_scores(kmat: jax.Array, vmat: jax.Array, q: jax.Array, zt: jax.Array, w_o: jax.Array,
                     tau: float, *, form: str = "auto", image_chunk: int = 256,
                     text_chunk: int = 1024) -> jax.Array:
    """The full ``S[i, j] = <ẑ(i|j), ẑ_t(j)>`` ``[N_img, N_txt]`` for retrieval, in chunks.

    Image→text ranks row i; text→image ranks column j.
    """
    return llip_loss.chunked_pair_logits(kmat, vmat, q, zt, w_o, 1.0, 0.0, tau, form=form,
                                         text_chunk=text_chunk, image_chunk=image_chunk)


def encode_in_batches(fn: Callable[[jax.Array], tuple[jax.Array, jax.Array]], x: jax.Array,
                      batch_size: int = 256) -> tuple[jax.Array, jax.Array]:
    """Apply a jitted two-output encoder over ``x`` in batches and concatenate."""
    a, b = [], []
    for s in range(0, x.shape[0], batch_size):
        u, v = fn(x[s: s + batch_size])
        a.append(u)
        b.append(v)
    return jnp.concatenate(a), jnp.concatenate(b)


class LlipHeadScoring:
    """Evaluation adapter for ``Llip`` (the ``evaluate.scoring.ScoringModel`` protocol, by duck type).

    Image side ``(kmat, vmat) [N, H, K, d]``; text side ``(q [N, H, d], ẑ_t [N, D])``. Prompts are
    averaged as spec §6.1 asks: the class query is the mean per-head query, the class target
    ``normalize(mean normalize(z_t))``. Scores are cosines ``<ẑ(i|j), t_j>`` computed in chunks by the
    folded or direct form; ``temperature`` is the attention τ (default: the training τ).
    """

    name = "llip"
    has_temperature = True

    def __init__(self, default_temperature: float = 5.0, form: str = "auto", image_chunk: int = 256,
                 text_chunk: int = 1024):
        self.default_temperature = float(default_temperature)
        self.form = form
        self.image_chunk, self.text_chunk = image_chunk, text_chunk

    def image_embed(self, model: Llip, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        return model.encode_image_tokens(images)

    def text_embed(self, model: Llip, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        return model.encode_text_query(tokens)

    def prompt_features(self, text_side: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        q, z = text_side
        return q.astype(jnp.float32), l2_normalize(z)

    def class_features(self, mean: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        q, z = mean
        return q.astype(jnp.float32), l2_normalize(z)

    def score(self, model: Llip, image_side: tuple[jax.Array, jax.Array],
              text_side: tuple[jax.Array, jax.Array], temperature: float | None = None) -> jax.Array:
        tau = self.default_temperature if temperature is None else temperature
        return retrieval_scores(*image_side, *text_side, model.out_proj[...], tau, form=self.form,
                                image_chunk=self.image_chunk, text_chunk=self.text_chunk)

    def score_pairs(self, model: Llip, image_side: tuple[jax.Array, jax.Array],
                    text_side: tuple[jax.Array, jax.Array], temperature: float | None = None) -> jax.Array:
        tau = self.default_temperature if temperature is None else temperature
        w_o = model.out_proj[...]
        one = lambda k, v, q, t: llip_loss.pair_cosines_direct(k[None], v[None], q[None], t[None], w_o,
                                                                tau)[0, 0]
        return jax.vmap(one)(*image_side, *text_side)


# ---------------------------------------------------------------------------------------------------
# Registration with the train step (``config.model.type = "llip"``, ``config.loss.name = "llip"``)
# ---------------------------------------------------------------------------------------------------


def llip_model_config(config: Any) -> LlipConfig:
    """The ``LlipConfig`` of an experiment config: the CLIP ``model.preset`` + the ``model.*`` Llip fields."""
    from metaclip_jax.models import presets

    m = config.model
    kw: dict[str, Any] = dict(dtype=m.dtype, remat=m.remat, attention=m.attention, head_form=m.head_form,
                              init_logit_bias=m.init_logit_bias)
    if m.init_logit_scale is not None:
        kw["init_logit_scale"] = m.init_logit_scale
    if config.loss.get("chunk_size") is not None:
        kw["text_chunk"] = int(config.loss.chunk_size)
    return llip_config(presets.get_config(m.preset), num_tokens=m.num_tokens, num_heads=m.num_heads,
                       tau=float(m.tau), use_norm=m.use_norm, **kw)


def _registry_build(config: Any, rngs: nnx.Rngs) -> Llip:
    return Llip(llip_model_config(config), rngs=rngs)


def _registry_encode(model: Llip, batch: Any, config: Any, *, rng: jax.Array | None = None
                     ) -> dict[str, jax.Array]:
    del config, rng
    return model(batch["image"], batch["text"])


def _registry_loss(model: Llip, feats: Any, config: Any, mesh: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    from metaclip_jax.models import registry

    cfg = model.cfg
    loss = llip_loss.llip_sigmoid_loss(
        feats["kmat"], feats["vmat"], feats["q"], feats["zt"], model.out_proj[...], model.logit_scale[...],
        model.logit_bias[...], tau=cfg.tau, form=cfg.head_form, chunk_size=config.loss.chunk_size,
        mesh=mesh, batch_axes=registry.batch_axes(config) if mesh is not None else None)
    return loss, {}


def _registry_validate(config: Any) -> None:
    from metaclip_jax.config_schema import ConfigError
    from metaclip_jax.models import presets

    m = config.model
    if m.init_logit_bias is None:
        raise ConfigError("model.type 'llip' needs model.init_logit_bias (the spec uses -10.0); it is None")
    embed = presets.get_config(m.preset).embed_dim
    if embed % m.num_heads:
        raise ConfigError(f"model.num_heads {m.num_heads} does not divide the embed dim {embed} of "
                          f"model.preset {m.preset!r}")


def _register() -> None:
    from metaclip_jax.config_schema import Field
    from metaclip_jax.models import registry

    pos = lambda v: v > 0
    fields = {
        "num_tokens": Field((int,), 32, check=pos, check_doc="must be > 0",
                            doc="K mixture tokens (replace the class token)"),
        "num_heads": Field((int,), 8, check=pos, check_doc="must be > 0", doc="H cross-attention heads"),
        "tau": Field((float, int), 5.0, check=pos, check_doc="must be > 0",
                     doc="attention temperature (5; 1 for L/14)"),
        "use_norm": Field((bool,), False, doc="LayerNorm on q / Kmat / Vmat (H/14, G/14)"),
        "head_form": Field((str,), "auto", choices=llip_loss.FORMS,
                           doc="pair scoring: auto (folded when H*K < D) | folded | direct"),
    }
    registry.register_model_type(registry.ModelType(
        name="llip", build=_registry_build, encode=_registry_encode, loss=_registry_loss,
        losses=("llip",), model_config=llip_model_config, fields=fields, validate=_registry_validate))


_register()
