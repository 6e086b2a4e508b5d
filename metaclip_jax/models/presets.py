"""Model presets, named as open_clip names them, and abstract parameter counts.

``get_config("ViT-B-32-quickgelu")`` returns a ``CLIPConfig``; ``param_count(name)`` counts parameters
with ``nnx.eval_shape`` (no weights are allocated), so ``param_count("ViT-bigG-14")`` is instant.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx

from metaclip_jax.models.config import CLIPConfig, TextConfig, VisionConfig

# name: (embed, image, patch, v_width, v_layers, v_head_width, v_mlp_ratio, t_width, t_layers, t_heads,
#        vocab, pool)
_ARCHS: dict[str, tuple[Any, ...]] = {
    "ViT-B-32": (512, 224, 32, 768, 12, 64, 4.0, 512, 12, 8, 49408, "argmax"),
    "ViT-B-16": (512, 224, 16, 768, 12, 64, 4.0, 512, 12, 8, 49408, "argmax"),
    "ViT-L-14": (768, 224, 14, 1024, 24, 64, 4.0, 768, 12, 12, 49408, "argmax"),
    "ViT-H-14": (1024, 224, 14, 1280, 32, 80, 4.0, 1024, 24, 16, 49408, "argmax"),
    "ViT-bigG-14": (1280, 224, 14, 1664, 48, 104, 4.9231, 1280, 32, 20, 49408, "argmax"),
    "ViT-H-14-worldwide": (1024, 224, 14, 1280, 32, 80, 4.0, 1024, 24, 16, 901629, "eos"),
    "ViT-bigG-14-worldwide": (1280, 224, 14, 1664, 48, 104, 4.9231, 1280, 32, 20, 901629, "eos"),
    # Small open_clip sizes (benchmarks, quick experiments).
    "ViT-S-32": (384, 224, 32, 384, 12, 64, 4.0, 384, 12, 6, 49408, "argmax"),
    "ViT-S-16": (384, 224, 16, 384, 12, 64, 4.0, 384, 12, 6, 49408, "argmax"),
    "ViT-M-32": (512, 224, 32, 512, 12, 64, 4.0, 512, 12, 8, 49408, "argmax"),
    "ViT-M-16": (512, 224, 16, 512, 12, 64, 4.0, 512, 12, 8, 49408, "argmax"),
}

# Test / demo sizes (not open_clip names): tiny towers that compile and train on CPU in seconds.
_SMALL: dict[str, CLIPConfig] = {
    "test-tiny": CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_dim=256),
        text=TextConfig(context_length=77, vocab_size=49408, width=64, layers=2, heads=4, mlp_dim=256),
    ),
    # The README demo (launch/demo.py): 16-token captions make the text tower ~4x cheaper than 77 on CPU.
    "demo-tiny": CLIPConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=32, patch_size=8, width=96, layers=2, heads=4, mlp_dim=384),
        text=TextConfig(context_length=16, vocab_size=49408, width=64, layers=2, heads=4, mlp_dim=256),
    ),
    "test-small": CLIPConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=64, patch_size=16, width=128, layers=3, heads=4, mlp_dim=512),
        text=TextConfig(context_length=77, vocab_size=49408, width=128, layers=3, heads=4, mlp_dim=512),
    ),
}


def _from_arch(arch: tuple[Any, ...], activation: str) -> CLIPConfig:
    (embed, image, patch, vw, vl, vhw, ratio, tw, tl, th, vocab, pool) = arch
    vision = VisionConfig(image_size=image, patch_size=patch, width=vw, layers=vl, heads=vw // vhw,
                          mlp_dim=int(vw * ratio))
    text = TextConfig(vocab_size=vocab, width=tw, layers=tl, heads=th, mlp_dim=tw * 4, pool=pool,
                      eos_id=2)
    return CLIPConfig(embed_dim=embed, vision=vision, text=text, activation=activation)


def preset_names() -> list[str]:
    names = []
    for base in _ARCHS:
        names += [base, base + "-quickgelu"]
    return names + list(_SMALL)


def get_config(name: str, **overrides: Any) -> CLIPConfig:
    """The CLIPConfig of a preset; ``-quickgelu`` selects QuickGELU; overrides are dataclass fields."""
    if name in _SMALL:
        cfg = _SMALL[name]
    else:
        base, quick = (name[: -len("-quickgelu")], True) if name.endswith("-quickgelu") else (name, False)
        if base not in _ARCHS:
            raise KeyError(f"unknown model preset {name!r}; known: {', '.join(preset_names())}")
        cfg = _from_arch(_ARCHS[base], "quick_gelu" if quick else "gelu")
    return cfg.replace(**overrides) if overrides else cfg


def abstract_params(cfg: CLIPConfig) -> Any:
    """Parameter ShapeDtypeStructs of a CLIP model (nothing allocated)."""
    from metaclip_jax.models.clip import CLIP

    model = nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


def param_count(name_or_cfg: str | CLIPConfig) -> int:
    """Exact parameter count, computed abstractly (equals open_clip's, e.g. ViT-B-32: 151,277,313)."""
    cfg = get_config(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    leaves = jax.tree.leaves(abstract_params(cfg))
    return int(sum(math.prod(np.shape(x)) for x in leaves))
