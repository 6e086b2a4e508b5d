"""open_clip / OpenAI / MetaCLIP state dicts <-> our Flax CLIP parameters.

Mapping (spec ``checkpoints_and_tokenizer.md`` §4.1): Linear weights are transposed; ``in_proj_weight``
[3W, W] splits into q, k, v in that order; ``conv1.weight`` OIHW -> HWIO flattened to a patch matmul;
``visual.proj`` and ``text_projection`` are used as ``x @ M`` (no transpose); per-layer tensors are
stacked along our leading ``layers`` axis. Reading a ``.pt`` uses ``torch.load(weights_only=True)``
(no pickle code execution); safetensors needs no torch at all.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from metaclip_jax.models.config import CLIPConfig, TextConfig, VisionConfig

PREFIXES = ("module.", "_orig_mod.")


class CheckpointMismatch(ValueError):
    """A state dict whose names or shapes do not fit the target model."""


# ----------------------------------------------------------------------------------------------
# Reading files


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Load an open_clip / MetaCLIP checkpoint file as float32 numpy arrays.

    Accepts ``.safetensors`` and torch files (``.pt``/``.bin``/``.pth``, read with
    ``weights_only=True``), unwraps ``{"state_dict": ...}`` and strips ``module.`` / ``_orig_mod.``.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        sd: Mapping[str, Any] = load_file(str(path))
    else:
        try:
            import torch
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise ImportError(f"reading {path.name} needs torch (or convert it to .safetensors)") from e
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping) and "state_dict" in obj:
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise CheckpointMismatch(f"{path} does not hold a state dict (got {type(obj).__name__})")
        sd = {k: v.detach().float().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}
    return strip_prefixes({k: np.asarray(v, dtype=np.float32) for k, v in sd.items()})


def strip_prefixes(sd: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------------
# Inferring a config from shapes


def infer_config(sd: Mapping[str, np.ndarray], *, quick_gelu: bool, pool: str | None = None,
                 eos_id: int = 2, vision_heads: int | None = None, text_heads: int | None = None
                 ) -> CLIPConfig:
    """Architecture from tensor shapes (widths, layers, patch, image size, vocab, context).

    Head counts are not visible in a state dict: they come from the arguments, else from the preset
    with the same shapes, else from open_clip's default head width (64; 80 for H, 104 for bigG)."""
    def n_layers(prefix: str) -> int:
        pat = re.compile(re.escape(prefix) + r"(\d+)\.")
        return 1 + max(int(m.group(1)) for k in sd if (m := pat.match(k)))

    conv = sd["visual.conv1.weight"]
    vw, _, patch, _ = conv.shape
    n_pos = sd["visual.positional_embedding"].shape[0]
    cls = sd["visual.class_embedding"]
    k_tokens = 1 if cls.ndim == 1 else cls.shape[0]
    grid = round((n_pos - k_tokens) ** 0.5)
    vl = n_layers("visual.transformer.resblocks.")
    v_mlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    vocab, tw = sd["token_embedding.weight"].shape
    ctx = sd["positional_embedding"].shape[0]
    tl = n_layers("transformer.resblocks.")
    t_mlp = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    embed = sd["text_projection"].shape[1]
    v_head_width = 64 if vw % 64 == 0 and vw <= 1024 else {1280: 80, 1664: 104}.get(vw, 64)
    if pool is None:
        pool = "argmax" if vocab == 49408 else "eos"
    vision = VisionConfig(image_size=grid * patch, patch_size=patch, width=vw, layers=vl,
                          heads=vw // v_head_width, mlp_dim=v_mlp, num_class_tokens=k_tokens,
                          use_proj="visual.proj" in sd)
    text = TextConfig(context_length=ctx, vocab_size=vocab, width=tw, layers=tl, heads=tw // 64,
                      mlp_dim=t_mlp, pool=pool, eos_id=eos_id)
    from metaclip_jax.models import presets

    for name in presets.preset_names():
        p = presets.get_config(name)
        same = lambda a, b: dataclasses.replace(a, heads=b.heads) == b
        if p.embed_dim == embed and same(p.vision, vision) and same(p.text, text):
            vision, text = p.vision, p.text
            break
    if vision_heads:
        vision = dataclasses.replace(vision, heads=vision_heads)
    if text_heads:
        text = dataclasses.replace(text, heads=text_heads)
    return CLIPConfig(embed_dim=embed, vision=vision, text=text,
                      activation="quick_gelu" if quick_gelu else "gelu")


def quick_gelu_from_name(name: str) -> bool | None:
    """QuickGELU flag implied by a model / checkpoint name, or None when the name does not say."""
    n = name.lower()
    if "quickgelu" in n or "quick_gelu" in n:
        return True
    if re.search(r"(^|[/_-])(b32|b16|l14|h14|g14)_(400m|fullcc)", n) or "metaclip_400m" in n \
            or "metaclip_fullcc" in n:
        return True  # every MetaCLIP 1 checkpoint is QuickGELU
    if "altogether" in n:
        return False
    return None


# ----------------------------------------------------------------------------------------------
# open_clip -> ours


def _tower_from_torch(sd: Mapping[str, np.ndarray], prefix: str, layers: int, heads: int) -> dict:
    def stack(name: str) -> np.ndarray:
        return np.stack([sd[f"{prefix}{i}.{name}"] for i in range(layers)])

    in_w = stack("attn.in_proj_weight")          # [L, 3W, W]
    L, threeW, W = in_w.shape
    hd = W // heads
    qkv_kernel = in_w.reshape(L, 3, heads, hd, W).transpose(0, 4, 1, 2, 3)   # [L, W, 3, H, hd]
    qkv_bias = stack("attn.in_proj_bias").reshape(L, 3, heads, hd)
    out_kernel = stack("attn.out_proj.weight").transpose(0, 2, 1).reshape(L, heads, hd, W)
    return {
        "ln1_scale": stack("ln_1.weight"), "ln1_bias": stack("ln_1.bias"),
        "qkv_kernel": qkv_kernel, "qkv_bias": qkv_bias,
        "out_kernel": out_kernel, "out_bias": stack("attn.out_proj.bias"),
        "ln2_scale": stack("ln_2.weight"), "ln2_bias": stack("ln_2.bias"),
        "fc_kernel": stack("mlp.c_fc.weight").transpose(0, 2, 1), "fc_bias": stack("mlp.c_fc.bias"),
        "proj_kernel": stack("mlp.c_proj.weight").transpose(0, 2, 1), "proj_bias": stack("mlp.c_proj.bias"),
    }


def params_from_open_clip(sd: Mapping[str, np.ndarray], cfg: CLIPConfig) -> dict[str, Any]:
    """A nested dict matching ``nnx.state(CLIP(cfg), nnx.Param)`` (as pure dict) from a state dict.

    Raises CheckpointMismatch naming the tensors when names or shapes do not fit ``cfg``."""
    sd = strip_prefixes(sd)
    sd = {k: np.asarray(v, np.float32) for k, v in sd.items() if k != "attn_mask"}
    missing = sorted(set(_expected_keys(cfg)) - set(sd) - {"logit_bias"})
    if missing:
        raise CheckpointMismatch(f"state dict lacks {len(missing)} tensors of the model: {missing[:8]}")
    try:
        return _convert_from_open_clip(sd, cfg)
    except ValueError as e:
        raise CheckpointMismatch(f"tensor shapes do not fit the model config: {e}") from None


def _convert_from_open_clip(sd: dict[str, np.ndarray], cfg: CLIPConfig) -> dict[str, Any]:
    v, t = cfg.vision, cfg.text
    conv = sd["visual.conv1.weight"]                                  # OIHW
    visual = {
        "patch_kernel": conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0]),
        "class_embedding": sd["visual.class_embedding"].reshape(v.num_class_tokens, v.width),
        "positional_embedding": sd["visual.positional_embedding"],
        "ln_pre_scale": sd["visual.ln_pre.weight"], "ln_pre_bias": sd["visual.ln_pre.bias"],
        "transformer": _tower_from_torch(sd, "visual.transformer.resblocks.", v.layers, v.heads),
        "ln_post_scale": sd["visual.ln_post.weight"], "ln_post_bias": sd["visual.ln_post.bias"],
    }
    if v.use_proj:
        visual["proj"] = sd["visual.proj"]
    text = {
        "token_embedding": sd["token_embedding.weight"],
        "positional_embedding": sd["positional_embedding"],
        "transformer": _tower_from_torch(sd, "transformer.resblocks.", t.layers, t.heads),
        "ln_final_scale": sd["ln_final.weight"], "ln_final_bias": sd["ln_final.bias"],
        "text_projection": sd["text_projection"],
    }
    out = {"visual": visual, "text": text, "logit_scale": np.asarray(sd["logit_scale"]).reshape(())}
    if cfg.init_logit_bias is not None:
        out["logit_bias"] = np.asarray(sd.get("logit_bias", cfg.init_logit_bias), np.float32).reshape(())
    used = set(_expected_keys(cfg))
    extra = sorted(set(sd) - used)
    if extra:
        raise CheckpointMismatch(f"state dict has {len(extra)} tensors the model does not use: {extra[:8]}")
    return out


def _expected_keys(cfg: CLIPConfig) -> list[str]:
    keys = ["visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
            "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias",
            "token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
            "text_projection", "logit_scale"]
    if cfg.vision.use_proj:
        keys.append("visual.proj")
    if cfg.init_logit_bias is not None:
        keys.append("logit_bias")
    block = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
             "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
             "mlp.c_proj.weight", "mlp.c_proj.bias"]
    for prefix, n in (("visual.transformer.resblocks.", cfg.vision.layers),
                      ("transformer.resblocks.", cfg.text.layers)):
        keys += [f"{prefix}{i}.{b}" for i in range(n) for b in block]
    return keys


# ----------------------------------------------------------------------------------------------
# ours -> open_clip


def _tower_to_torch(p: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    qkv = np.asarray(p["qkv_kernel"])                   # [L, W, 3, H, hd]
    L, W = qkv.shape[:2]
    in_w = qkv.transpose(0, 2, 3, 4, 1).reshape(L, 3 * W, W)
    in_b = np.asarray(p["qkv_bias"]).reshape(L, 3 * W)
    out_w = np.asarray(p["out_kernel"]).reshape(L, W, W).transpose(0, 2, 1)
    per_layer = {
        "ln_1.weight": p["ln1_scale"], "ln_1.bias": p["ln1_bias"],
        "attn.in_proj_weight": in_w, "attn.in_proj_bias": in_b,
        "attn.out_proj.weight": out_w, "attn.out_proj.bias": p["out_bias"],
        "ln_2.weight": p["ln2_scale"], "ln_2.bias": p["ln2_bias"],
        "mlp.c_fc.weight": np.asarray(p["fc_kernel"]).transpose(0, 2, 1), "mlp.c_fc.bias": p["fc_bias"],
        "mlp.c_proj.weight": np.asarray(p["proj_kernel"]).transpose(0, 2, 1),
        "mlp.c_proj.bias": p["proj_bias"],
    }
    return {f"{prefix}{i}.{k}": np.ascontiguousarray(np.asarray(v)[i])
            for k, v in per_layer.items() for i in range(L)}


def params_to_open_clip(params: Mapping[str, Any], cfg: CLIPConfig) -> dict[str, np.ndarray]:
    """Our parameter dict -> an open_clip state dict (numpy float32, open_clip key names)."""
    v, t = params["visual"], params["text"]
    W, P = cfg.vision.width, cfg.vision.patch_size
    kernel = np.asarray(v["patch_kernel"]).reshape(P, P, 3, W)          # HWIO
    cls = np.asarray(v["class_embedding"])
    sd = {
        "visual.conv1.weight": kernel.transpose(3, 2, 0, 1),
        "visual.class_embedding": cls[0] if cfg.vision.num_class_tokens == 1 else cls,
        "visual.positional_embedding": v["positional_embedding"],
        "visual.ln_pre.weight": v["ln_pre_scale"], "visual.ln_pre.bias": v["ln_pre_bias"],
        "visual.ln_post.weight": v["ln_post_scale"], "visual.ln_post.bias": v["ln_post_bias"],
        "token_embedding.weight": t["token_embedding"], "positional_embedding": t["positional_embedding"],
        "ln_final.weight": t["ln_final_scale"], "ln_final.bias": t["ln_final_bias"],
        "text_projection": t["text_projection"], "logit_scale": params["logit_scale"],
    }
    if cfg.vision.use_proj:
        sd["visual.proj"] = v["proj"]
    if "logit_bias" in params:
        sd["logit_bias"] = params["logit_bias"]
    sd.update(_tower_to_torch(v["transformer"], "visual.transformer.resblocks."))
    sd.update(_tower_to_torch(t["transformer"], "transformer.resblocks."))
    return {k: np.array(x, np.float32, order="C") for k, x in sd.items()}  # keeps 0-d logit_scale


def open_clip_model_config(cfg: CLIPConfig) -> dict[str, Any]:
    """The ``open_clip_config.json`` ``model_cfg`` that builds the same architecture in open_clip."""
    v, t = cfg.vision, cfg.text
    text_cfg: dict[str, Any] = {"context_length": t.context_length, "vocab_size": t.vocab_size,
                                "width": t.width, "heads": t.heads, "layers": t.layers,
                                "mlp_ratio": t.mlp_dim / t.width}
    if t.pool == "eos":
        text_cfg.update(pool_type="eos", eos_id=t.eos_id)
    return {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": cfg.activation == "quick_gelu",
        "vision_cfg": {"image_size": v.image_size, "layers": v.layers, "width": v.width,
                       "head_width": v.width // v.heads, "mlp_ratio": v.mlp_dim / v.width,
                       "patch_size": v.patch_size},
        "text_cfg": text_cfg,
    }


# ----------------------------------------------------------------------------------------------
# Putting a params dict into a model


def check_and_assign(model: Any, params: Mapping[str, Any]) -> None:
    """Write a nested params dict into an nnx model, failing loudly on any name or shape mismatch."""
    import jax.numpy as jnp
    from flax import nnx

    state = nnx.state(model, nnx.Param)
    flat_target = dict(nnx.to_flat_state(state))
    flat_src = _flatten(params)
    missing = sorted(".".join(map(str, k)) for k in flat_target if k not in flat_src)
    extra = sorted(".".join(map(str, k)) for k in flat_src if k not in flat_target)
    if missing or extra:
        raise CheckpointMismatch(f"parameter names differ: missing {missing[:8]}, unexpected {extra[:8]}")
    for k, var in flat_target.items():
        src = np.asarray(flat_src[k])
        if tuple(src.shape) != tuple(var.shape):
            raise CheckpointMismatch(f"{'.'.join(map(str, k))}: checkpoint shape {src.shape} != model "
                                     f"shape {tuple(var.shape)}")
        var.set_value(jnp.asarray(src, var.dtype)) if hasattr(var, "set_value") else setattr(
            var, "value", jnp.asarray(src, var.dtype))
    nnx.update(model, nnx.from_flat_state(flat_target))


def _flatten(tree: Mapping[str, Any], prefix: tuple = ()) -> dict[tuple, Any]:
    out: dict[tuple, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def model_params_dict(model: Any) -> dict[str, Any]:
    """An nnx model's parameters as a plain nested dict of numpy arrays."""
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    out: dict[str, Any] = {}
    for path, var in flat:
        d = out
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = np.asarray(var.get_value() if hasattr(var, "get_value") else var.value)
    return out
