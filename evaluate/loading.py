"""Loading a model to evaluate: the one place the evaluators touch checkpoint formats.

``load_model(path, ...) -> (model_type, model)`` delegates to ``metaclip_jax.checkpoint_io.load_params``,
which reads every checkpoint kind: open_clip / OpenAI / MetaCLIP files (``.pt``, ``.bin``, ``.pth``,
``.safetensors``) and open_clip export folders (architecture from ``--model NAME`` or the tensor shapes,
QuickGELU from ``--quickgelu`` / ``--no-quickgelu`` or the file name), params-only exports, and training
workdirs / checkpoint folders (latest complete step, ``params`` subtree only). ``random:PRESET`` gives a
randomly initialised CLIP or Llip preset (smoke runs, pipeline checks).

The parameters are placed on ``mesh`` with the logical-axis sharding rules (replicated on a data mesh).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh


def place_on_mesh(model: nnx.Module, mesh: Mesh | None) -> nnx.Module:
    """Put every parameter on ``mesh`` following the logical-axis rules."""
    if mesh is None:
        return model
    from metaclip_jax.sharding import tree_shardings

    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, tree_shardings(state, mesh)))
    return model


def random_model(preset: str, quickgelu: bool | None = None) -> tuple[str, nnx.Module]:
    """A randomly initialised CLIP preset (``test-tiny``, ``ViT-B-32``, ...) or Llip preset."""
    if preset.lower().startswith("llip"):
        from metaclip_jax.models.llip import Llip, get_llip_config

        return "llip", Llip(get_llip_config(preset), rngs=nnx.Rngs(0))
    from metaclip_jax.models import presets
    from metaclip_jax.models.clip import CLIP

    cfg = presets.get_config(preset)
    if quickgelu is not None:
        cfg = cfg.replace(activation="quick_gelu" if quickgelu else "gelu")
    return "clip", CLIP(cfg, rngs=nnx.Rngs(0))


def load_model(path: str, model_name: str | None = None, quickgelu: bool | None = None,
               mesh: Mesh | None = None) -> tuple[str, nnx.Module]:
    """(model_type, model placed on ``mesh``) from any supported checkpoint (see module docstring)."""
    if path.startswith("random:"):
        model_type, model = random_model(path.split(":", 1)[1], quickgelu)
        return model_type, place_on_mesh(model, mesh)
    from metaclip_jax import checkpoint_io

    loaded = checkpoint_io.load_params(path, model=model_name, quick_gelu=quickgelu)
    model = checkpoint_io.build_model(loaded)
    return loaded.model_type, place_on_mesh(model, mesh)


def describe(model: nnx.Module) -> dict[str, Any]:
    """Config and parameter count of a model, for results.json."""
    cfg = getattr(model, "cfg", None)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {"config": cfg.to_dict() if hasattr(cfg, "to_dict") else repr(cfg), "num_params": n}
