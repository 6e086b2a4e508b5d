"""One loader for every checkpoint kind: export, inference, evaluation and fine-tuning all call it.

``load_params(path)`` accepts

(a) a params-only checkpoint folder written by ``save_params`` / ``python -m metaclip_jax.export
    --format params`` (``model_config.json`` + ``params/`` Orbax tree and/or ``model.safetensors``);
(b) a training workdir, its ``checkpoints/`` folder or one step folder: the latest *complete* step is
    used and only the ``params`` subtree of the ``state`` item is restored, to host numpy, with an
    Orbax partial restore whose target is read from the checkpoint's own tree metadata (no optimizer
    state shapes, no mesh needed);
(c) an open_clip / MetaCLIP checkpoint file (``.pt`` / ``.pth`` / ``.bin`` read with
    ``weights_only=True``, or ``.safetensors``), or a folder holding ``open_clip_config.json`` +
    ``open_clip_model.safetensors`` (what ``--format open_clip`` and open_clip's ``push_to_hf_hub``
    write).

and returns ``LoadedModel(model_type, config, params)``: ``params`` is a nested dict of numpy arrays
whose structure equals ``nnx.state(model, nnx.Param)`` of the model the config builds (names and shapes
are checked against the abstract model; a mismatch is a ``CheckpointMismatch`` naming the tensor).

Fine-tuning from any of these (training config key ``init_from``)::

    params = checkpoint_io.load_params(path).params        # nested numpy dict, float32 or bf16 as stored
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from metaclip_jax import open_clip_interop as oc
from metaclip_jax.models import presets
from metaclip_jax.models.config import CLIPConfig
from metaclip_jax.open_clip_interop import CheckpointMismatch

__all__ = [
    "MODEL_CONFIG_FILE", "TORCH_SUFFIXES", "CheckpointMismatch", "LoadedModel", "abstract_params",
    "build_model", "find_latest_step", "flatten_params", "load_params", "save_params", "unflatten_params",
]

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
SAFETENSORS_FILE = "model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
FORMAT_VERSION = 1
_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass
class LoadedModel:
    """A model's type, config and parameters (nested dict of host numpy arrays).

    ``model_type``: ``"clip"`` or ``"llip"``; ``config``: ``CLIPConfig`` (or the Llip config);
    ``source``: a human-readable description of where the parameters came from.
    """

    model_type: str
    config: Any
    params: dict[str, Any]
    source: str = ""

    @property
    def num_params(self) -> int:
        return int(sum(np.size(v) for v in flatten_params(self.params).values()))

    @property
    def nbytes(self) -> int:
        return int(sum(np.asarray(v).nbytes for v in flatten_params(self.params).values()))


# ------------------------------------------------------------------------------------------------
# Model types


def _model_classes(model_type: str) -> tuple[Any, Any]:
    """(config class, nnx module class) of a model type."""
    if model_type == "clip":
        from metaclip_jax.models.clip import CLIP

        return CLIPConfig, CLIP
    if model_type == "llip":
        try:
            from metaclip_jax.models import llip
        except ImportError as e:  # pragma: no cover - depends on the Llip module being present
            raise NotImplementedError("model_type 'llip' needs metaclip_jax.models.llip") from e
        cfg_cls = getattr(llip, "LlipConfig", None) or CLIPConfig
        return cfg_cls, llip.Llip
    raise ValueError(f"unknown model_type {model_type!r} (expected 'clip' or 'llip')")


def config_from_dict(model_type: str, d: Mapping[str, Any]) -> Any:
    """A model config from its ``to_dict()`` form."""
    cfg_cls, _ = _model_classes(model_type)
    return cfg_cls.from_dict(dict(d))


def abstract_params(model_type: str, config: Any) -> dict[str, Any]:
    """Nested dict of ``jax.ShapeDtypeStruct`` for the model's parameters (nothing allocated)."""
    from flax import nnx

    _, model_cls = _model_classes(model_type)
    model = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    out: dict[str, Any] = {}
    for path, var in flat:
        leaf = var.get_value() if hasattr(var, "get_value") else var.value
        _set(out, tuple(str(p) for p in path), leaf)
    return out


# ------------------------------------------------------------------------------------------------
# Flat <-> nested parameter dicts


def flatten_params(tree: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """``{"visual": {"proj": x}}`` -> ``{"visual/proj": x}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            for kk, vv in flatten_params(v, sep).items():
                out[f"{k}{sep}{kk}"] = vv
        else:
            out[str(k)] = v
    return out


def unflatten_params(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """Inverse of ``flatten_params``."""
    out: dict[str, Any] = {}
    for k, v in flat.items():
        _set(out, tuple(k.split(sep)), v)
    return out


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def validate_params(params: Mapping[str, Any], model_type: str, config: Any, source: str = "") -> None:
    """Names and shapes of ``params`` equal the model's; else ``CheckpointMismatch`` naming tensors."""
    want = flatten_params(abstract_params(model_type, config))
    got = flatten_params(params)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    where = f" in {source}" if source else ""
    if missing or extra:
        raise CheckpointMismatch(
            f"parameter names differ from the {model_type} model{where}: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    for k, spec in want.items():
        if tuple(np.shape(got[k])) != tuple(spec.shape):
            raise CheckpointMismatch(f"{k}: checkpoint shape {tuple(np.shape(got[k]))} != model shape "
                                     f"{tuple(spec.shape)}{where}")


# ------------------------------------------------------------------------------------------------
# Loading


def load_params(path: str | os.PathLike, *, model: str | None = None, quick_gelu: bool | None = None
                ) -> LoadedModel:
    """Load parameters and model config from any supported checkpoint (see module docstring).

    ``model`` (a preset name, e.g. ``ViT-B-32-quickgelu``) and ``quick_gelu`` only matter for open_clip
    files, whose architecture is otherwise read from tensor shapes and whose activation is otherwise
    read from the file name (``quick_gelu_from_name``); when neither says, this is an error asking for
    ``--quickgelu`` / ``--no-quickgelu`` (loading QuickGELU weights into a GELU graph runs silently with
    lower accuracy). For our own checkpoints the stored config wins; a conflicting ``model`` /
    ``quick_gelu`` is an error.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.is_file():
        if p.suffix == ".safetensors" and _is_our_safetensors(p):
            loaded = _load_params_dir(p.parent, prefer_safetensors=True)
        elif p.suffix == ".safetensors" or p.suffix in TORCH_SUFFIXES:
            return _load_open_clip_file(p, model=model, quick_gelu=quick_gelu)
        elif p.name == MODEL_CONFIG_FILE:
            loaded = _load_params_dir(p.parent)
        else:
            raise ValueError(f"{p}: unknown checkpoint file type (expected .pt/.pth/.bin/.safetensors)")
    elif (p / MODEL_CONFIG_FILE).is_file():
        loaded = _load_params_dir(p)
    elif (p / OPEN_CLIP_CONFIG).is_file():
        return _load_open_clip_dir(p, model=model, quick_gelu=quick_gelu)
    elif (p / "image_encoder.jaxexport").is_file():
        raise ValueError(f"{p} is a jax_export folder (serialized functions, not parameters); "
                         "use it with `python -m metaclip_jax.infer`, or export params from the original "
                         "checkpoint")
    else:
        loaded = _load_training_checkpoint(p)
    _check_overrides(loaded, model, quick_gelu)
    return loaded


def _check_overrides(loaded: LoadedModel, model: str | None, quick_gelu: bool | None) -> None:
    act = getattr(loaded.config, "activation", None)
    if quick_gelu is not None and act is not None and (act == "quick_gelu") != quick_gelu:
        raise ValueError(f"{loaded.source} was saved with activation={act!r}; "
                         f"--{'quickgelu' if quick_gelu else 'no-quickgelu'} contradicts it")
    if model is not None and loaded.model_type == "clip":
        want = presets.get_config(model)
        c = loaded.config
        same = dataclasses.replace(want, dtype=c.dtype, remat=c.remat, attention=c.attention,
                                   init_logit_scale=c.init_logit_scale,
                                   init_logit_bias=c.init_logit_bias) == c
        if not same:
            raise CheckpointMismatch(f"{loaded.source} does not hold a {model} model (its stored config "
                                     f"differs); drop --model to use the stored config")


def _is_our_safetensors(p: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(p), "np") as f:
        keys = list(f.keys())
    return any("/" in k for k in keys) and (p.parent / MODEL_CONFIG_FILE).is_file()


def _read_model_config(d: Path) -> dict[str, Any]:
    with open(d / MODEL_CONFIG_FILE) as f:
        meta = json.load(f)
    for key in ("model_type", "model_config"):
        if key not in meta:
            raise ValueError(f"{d / MODEL_CONFIG_FILE} lacks {key!r}")
    if meta.get("scanned_layers", True) is not True:
        raise ValueError(f"{d}: unscanned (per-layer) checkpoints are not supported; our models stack "
                         "layers (scanned_layers: true)")
    return meta


def _load_params_dir(d: Path, prefer_safetensors: bool = False) -> LoadedModel:
    meta = _read_model_config(d)
    model_type = meta["model_type"]
    config = config_from_dict(model_type, meta["model_config"])
    orbax_dir, st = d / PARAMS_DIR, d / SAFETENSORS_FILE
    if orbax_dir.is_dir() and not (prefer_safetensors and st.is_file()):
        params = _normalize_tree(_restore_pytree(orbax_dir))
        source = str(orbax_dir)
    elif st.is_file():
        from safetensors.numpy import load_file

        params = unflatten_params(load_file(str(st)))
        source = str(st)
    else:
        raise FileNotFoundError(f"{d} has {MODEL_CONFIG_FILE} but neither {PARAMS_DIR}/ nor "
                                f"{SAFETENSORS_FILE}")
    validate_params(params, model_type, config, source)
    return LoadedModel(model_type, config, params, source)


# ---------------------------------------------------------------- Orbax (params-only and training)


def _quiet_step_metadata(record: logging.LogRecord) -> bool:
    # An item folder has no step-level _CHECKPOINT_METADATA; Orbax warns about it on every read.
    return "Metadata file does not exist" not in str(record.msg)


def _restore_pytree(path: Path, subtree: str | None = None) -> Any:
    """Restore an Orbax PyTree checkpoint (or only its ``subtree`` key) as host numpy arrays."""
    import jax
    import orbax.checkpoint as ocp

    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(_quiet_step_metadata)
    try:
        return _restore_pytree_impl(path, subtree, ocp, jax)
    finally:
        absl_logger.removeFilter(_quiet_step_metadata)


def _restore_pytree_impl(path: Path, subtree: str | None, ocp: Any, jax: Any) -> Any:
    ckptr = ocp.PyTreeCheckpointer()
    md = ckptr.metadata(str(path))
    tree = getattr(md, "item_metadata", md)
    tree = getattr(tree, "tree", tree)
    if subtree is not None:
        if not isinstance(tree, Mapping) or subtree not in tree:
            keys = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
            raise CheckpointMismatch(f"{path} has no {subtree!r} subtree (top-level keys: {keys})")
        tree = {subtree: tree[subtree]}
    item = jax.tree.map(lambda m: np.zeros((0,), np.float32), tree)
    restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    out = ckptr.restore(str(path), args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=subtree is not None))
    return out[subtree] if subtree is not None else out


_WRAPPER_KEYS = ("value", "raw_value")


def _normalize_tree(tree: Any) -> dict[str, Any]:
    """Orbax restores nnx Variables as ``{..., "value": x}``; drop those wrapper keys, keep numpy."""
    import jax

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    out: dict[str, Any] = {}
    for path, leaf in flat:
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        while len(names) > 1 and names[-1] in _WRAPPER_KEYS:
            names.pop()
        _set(out, tuple(names), np.asarray(leaf))
    return out


def _step_dirs(d: Path) -> list[tuple[int, Path]]:
    """Complete Orbax step folders under ``d`` (digits, finalized: commit marker or metadata file)."""
    steps = []
    for child in d.iterdir() if d.is_dir() else []:
        m = re.fullmatch(r"(?:[A-Za-z_]*?_)?(\d+)", child.name)
        if not m or not child.is_dir():
            continue  # ".orbax-checkpoint-tmp-*" folders of an unfinished save do not match
        if (child / "_CHECKPOINT_METADATA").exists() or (child / "commit_success.txt").exists():
            steps.append((int(m.group(1)), child))
    return sorted(steps)


def find_latest_step(path: str | os.PathLike) -> Path:
    """The step folder to read from a workdir, its ``checkpoints/`` folder, or a step folder itself."""
    p = Path(path)
    if (p / "state").is_dir():
        return p
    for d in (p / "checkpoints", p):
        steps = _step_dirs(d)
        if steps:
            return steps[-1][1]
    raise FileNotFoundError(
        f"{p}: not a checkpoint (no {MODEL_CONFIG_FILE}, {OPEN_CLIP_CONFIG}, nor a complete Orbax step "
        "under checkpoints/)")


def _read_training_metadata(step_dir: Path) -> dict[str, Any]:
    md = step_dir / "metadata"
    candidates = [md] if md.is_file() else sorted(md.glob("*")) if md.is_dir() else []
    for c in candidates:
        if c.is_file() and c.name != "commit_success.txt" and not c.name.startswith("_"):
            try:
                with open(c) as f:
                    data = json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(data, Mapping) and "model_config" in data:
                return dict(data)
    raise FileNotFoundError(f"{step_dir}: no 'metadata' item with model_type / model_config")


def _load_training_checkpoint(p: Path) -> LoadedModel:
    step_dir = find_latest_step(p)
    meta = _read_training_metadata(step_dir)
    if meta.get("scanned_layers", True) is not True:
        raise ValueError(f"{step_dir}: unscanned checkpoints are not supported")
    model_type = meta.get("model_type", "clip")
    config = config_from_dict(model_type, meta["model_config"])
    params = _normalize_tree(_restore_pytree(step_dir / "state", subtree="params"))
    source = f"{step_dir / 'state'} (params)"
    validate_params(params, model_type, config, source)
    return LoadedModel(model_type, config, params, source)


# ---------------------------------------------------------------------------- open_clip files


def resolve_quick_gelu(path: str | os.PathLike, model: str | None, quick_gelu: bool | None) -> bool:
    """The activation of an open_clip checkpoint: the flag, else model / file name, else an error."""
    if quick_gelu is not None:
        return quick_gelu
    from_model = None
    if model is not None:
        from_model = presets.get_config(model).activation == "quick_gelu"
    from_name = oc.quick_gelu_from_name(Path(path).name)
    if from_model is not None and from_name is not None and from_model != from_name:
        raise ValueError(
            f"--model {model} ({'QuickGELU' if from_model else 'GELU'}) contradicts the file name "
            f"{Path(path).name} ({'QuickGELU' if from_name else 'GELU'}); pass --quickgelu or --no-quickgelu")
    if from_name is not None:
        return from_name
    if from_model is not None:     # the preset's activation ("-quickgelu" or GELU, as open_clip names them)
        return from_model
    raise ValueError(
        f"cannot tell whether {Path(path).name} uses QuickGELU or GELU (the file name does not say and no "
        "--model was given); pass --quickgelu (OpenAI / MetaCLIP 1 weights) or --no-quickgelu (GELU). "
        "Loading QuickGELU weights into a GELU model runs silently with lower accuracy.")


def _open_clip_to_loaded(sd: Mapping[str, np.ndarray], source: str, *, model: str | None,
                         quick_gelu: bool) -> LoadedModel:
    if model is not None:
        cfg = presets.get_config(model).replace(activation="quick_gelu" if quick_gelu else "gelu")
    else:
        cfg = oc.infer_config(sd, quick_gelu=quick_gelu)
    if cfg.vision.num_class_tokens != 1 or not cfg.vision.use_proj:
        raise CheckpointMismatch(f"{source}: not a CLIP state dict (Llip checkpoints are not importable "
                                 "from open_clip format)")
    params = oc.params_from_open_clip(sd, cfg)
    validate_params(params, "clip", cfg, source)
    return LoadedModel("clip", cfg, params, source)


def _load_open_clip_file(p: Path, *, model: str | None, quick_gelu: bool | None) -> LoadedModel:
    if p.suffix != ".safetensors" and p.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{p}: unknown checkpoint suffix")
    qg = resolve_quick_gelu(p, model, quick_gelu)
    sd = oc.load_state_dict(p)
    return _open_clip_to_loaded(sd, str(p), model=model, quick_gelu=qg)


def _load_open_clip_dir(d: Path, *, model: str | None, quick_gelu: bool | None) -> LoadedModel:
    with open(d / OPEN_CLIP_CONFIG) as f:
        oc_cfg = json.load(f)
    model_cfg = oc_cfg.get("model_cfg", {})
    weights = next((d / w for w in OPEN_CLIP_WEIGHTS if (d / w).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{d} has {OPEN_CLIP_CONFIG} but none of {OPEN_CLIP_WEIGHTS}")
    stored_qg = bool(model_cfg.get("quick_gelu", False))
    if quick_gelu is not None and quick_gelu != stored_qg:
        raise ValueError(f"{d / OPEN_CLIP_CONFIG} says quick_gelu={stored_qg}; the flag contradicts it")
    sd = oc.load_state_dict(weights)
    vision_heads = None
    vc = model_cfg.get("vision_cfg", {})
    if vc.get("head_width") and vc.get("width"):
        vision_heads = int(vc["width"]) // int(vc["head_width"])
    text_heads = model_cfg.get("text_cfg", {}).get("heads")
    tc = model_cfg.get("text_cfg", {})
    pool = "eos" if tc.get("pool_type") == "eos" else None
    if model is not None:
        return _open_clip_to_loaded(sd, str(weights), model=model, quick_gelu=stored_qg)
    cfg = oc.infer_config(sd, quick_gelu=stored_qg, pool=pool, eos_id=int(tc.get("eos_id", 2)),
                          vision_heads=vision_heads, text_heads=text_heads)
    params = oc.params_from_open_clip(sd, cfg)
    validate_params(params, "clip", cfg, str(weights))
    return LoadedModel("clip", cfg, params, str(weights))


# ------------------------------------------------------------------------------------------------
# Building a model, saving params


def build_model(loaded: LoadedModel, *, dtype: str | None = None) -> Any:
    """An nnx model holding ``loaded.params`` (float32 on the default device; nothing randomly
    initialised). ``dtype`` overrides the compute dtype (e.g. ``"bfloat16"``)."""
    from flax import nnx

    cfg = loaded.config
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    _, model_cls = _model_classes(loaded.model_type)
    model = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    oc.check_and_assign(model, loaded.params)
    return model


def cast_params(params: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """Every parameter cast to ``float32`` or ``bfloat16`` (host numpy)."""
    import ml_dtypes

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    np_dtype = np.dtype(np.float32) if dtype == "float32" else np.dtype(ml_dtypes.bfloat16)
    return unflatten_params({k: np.asarray(v).astype(np_dtype) for k, v in flatten_params(params).items()})


def model_config_json(loaded: LoadedModel, dtype: str = "float32") -> dict[str, Any]:
    """The ``model_config.json`` written beside every params-only checkpoint."""
    cfg_dict = loaded.config.to_dict()
    return {
        "format": "metaclip_jax.params",
        "format_version": FORMAT_VERSION,
        "model_type": loaded.model_type,
        "model_config": cfg_dict,
        "activation": cfg_dict.get("activation"),
        "scanned_layers": True,
        "params_dtype": dtype,
        "num_params": loaded.num_params,
        "source": loaded.source,
    }


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        old = out.with_name(out.name + ".old-" + next(tempfile._get_candidate_names()))
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def staging_dir(out: str | os.PathLike) -> Path:
    """A fresh temporary folder beside ``out`` (renamed into place when complete)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def publish_dir(tmp: Path, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Atomically move a completed staging folder to ``out``."""
    _replace_dir(tmp, Path(out), overwrite)
    return Path(out)


def save_params(out: str | os.PathLike, loaded: LoadedModel, dtype: str = "float32", *,
                overwrite: bool = False) -> Path:
    """Write a params-only checkpoint folder (appears whole or not at all):

    ``out/params/`` (Orbax PyTree of the nested params), ``out/model.safetensors`` ('/'-joined keys) and
    ``out/model_config.json`` (model_type, model config incl. activation, ``scanned_layers: true``).
    """
    import orbax.checkpoint as ocp
    from safetensors.numpy import save_file

    params = cast_params(loaded.params, dtype)
    tmp = staging_dir(out)
    try:
        ckptr = ocp.PyTreeCheckpointer()
        ckptr.save(str(tmp / PARAMS_DIR), params)
        save_file({k: np.array(v, order="C") for k, v in flatten_params(params).items()},
                  str(tmp / SAFETENSORS_FILE), metadata={"format": "metaclip_jax.params"})
        with open(tmp / MODEL_CONFIG_FILE, "w") as f:
            json.dump(model_config_json(loaded, dtype), f, indent=2)
        return publish_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
