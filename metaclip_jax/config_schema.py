"""Experiment config schema, loading, overrides, validation and duration conversion.

An experiment is a Python file in ``configs/`` with ``get_config(arg: str | None = None) -> ConfigDict``;
``load_config("configs/metaclip.py:b32_400m", ["--config.optimizer.lr=1e-4"])`` imports it, applies the
overrides (each parsed with the type of the field it replaces), validates the result against ``SCHEMA`` and
converts the duration to steps (``resolve_durations``). Every problem is a ``ConfigError`` naming the key,
raised before anything is compiled.

The schema is a nested dict of ``Field`` s. Other components extend it without editing this file:
``extend_schema("checkpoint", {...})`` adds fields to a section, and a model type registered in
``metaclip_jax.models.registry`` brings its own ``model.*`` fields (valid only for that ``model.type``).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

LN_100 = math.log(100.0)


class ConfigError(ValueError):
    """A config that does not fit the schema; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: accepted types, optional choices, ``None`` allowed or not, a check, a doc."""

    types: tuple[type, ...]
    default: Any = None
    choices: tuple[Any, ...] | None = None
    optional: bool = False
    check: Callable[[Any], bool] | None = None
    check_doc: str = ""
    doc: str = ""


def _f(types: type | tuple[type, ...], default: Any = None, *, choices: Sequence[Any] | None = None,
       optional: bool = False, check: Callable[[Any], bool] | None = None, check_doc: str = "",
       doc: str = "") -> Field:
    types = types if isinstance(types, tuple) else (types,)
    if float in types and int not in types:
        types = (*types, int)  # an int literal is a fine float
    return Field(types, default, tuple(choices) if choices is not None else None, optional or default is None,
                 check, check_doc, doc)


_pos = dict(check=lambda v: v > 0, check_doc="must be > 0")
_nonneg = dict(check=lambda v: v >= 0, check_doc="must be >= 0")
_mesh_dim = dict(check=lambda v: v == -1 or v >= 1, check_doc="must be >= 1 or -1 (the remaining devices)")
_unit = dict(check=lambda v: 0.0 <= v < 1.0, check_doc="must be in [0, 1)")

REMAT_CHOICES = ("none", "full", "dots", "dots_no_batch")

# A section maps names to Fields or to sub-sections (dicts). ``FREEFORM`` marks sections whose keys are
# not fixed (their values are checked by ``validate``).
FREEFORM = "__freeform__"

SCHEMA: dict[str, Any] = {
    "seed": _f(int, 0, doc="root seed: params init, the step rng (folded with the step)"),
    "workdir": _f(str, None, doc="run folder (checkpoints, metrics); None: no outputs"),
    "init_from": _f(str, None, doc="params-only checkpoint to fine-tune from (optimizer starts fresh)"),
    "log_every_steps": _f(int, 100, **_pos),
    # Durations: exactly one of the three; converted to total_steps by resolve_durations.
    "total_steps": _f(int, None, **_pos),
    "total_examples": _f(int, None, **_pos),
    "total_epochs": _f((int, float), None, **_pos, doc="epochs of data.num_examples"),
    "model": {
        "type": _f(str, "clip", doc="model family; see metaclip_jax.models.registry"),
        "preset": _f(str, "ViT-B-32-quickgelu", doc="metaclip_jax.models.presets name"),
        "dtype": _f(str, "float32", choices=("float32", "bfloat16"), doc="matmul compute dtype"),
        "remat": _f(str, "none", choices=REMAT_CHOICES),
        "attention": _f(str, "xla", choices=("xla", "cudnn")),
        "init_logit_scale": _f(float, None, doc="log-space init; None = ln(1/0.07)"),
        "init_logit_bias": _f(float, None, doc="None = no bias parameter (CLIP); SigLIP: -10"),
    },
    "loss": {
        "name": _f(str, "clip", choices=("clip", "siglip", "llip")),
        "chunk_size": _f(int, None, **_pos,
                         doc="columns per chunk of the sharded loss; None = all columns at once"),
    },
    "optimizer": {
        "name": _f(str, "adamw", choices=("adamw",)),
        "lr": _f(float, 5e-4, **_nonneg),
        "b1": _f(float, 0.9, **_unit),
        "b2": _f(float, 0.98, **_unit),
        "eps": _f(float, 1e-6, **_pos),
        "weight_decay": _f(float, 0.2, **_nonneg),
        "warmup_steps": _f(int, 2000, **_nonneg),
        "schedule": _f(str, "cosine", choices=("cosine", "constant")),
        "grad_clip": _f(float, None, **_pos, doc="global-norm clip; None = off (MetaCLIP)"),
        "grad_accum_steps": _f(int, 1, **_pos,
                               doc="micro-batches per optimizer step (exact full-batch loss)"),
        "max_logit_scale": _f(float, 100.0, check=lambda v: v >= 1.0, check_doc="must be >= 1",
                              doc="logit_scale is clamped to [0, ln max] after every update"),
    },
    "data": {
        # Fields of input_pipeline.TrainDataConfig (passed through by train_data_config) ...
        "paths": _f((str, list, tuple), (), doc="ArrayRecord files, globs or folders"),
        "global_batch_size": _f(int, 256, **_pos),
        "image_size": _f(int, None, **_pos, doc="None = the model preset's image size"),
        "context_length": _f(int, 77, **_pos),
        "seed": _f(int, 0),
        "num_epochs": _f(int, None, **_pos, doc="None: repeat forever"),
        "online_balancing": _f(bool, True),
        "scale": _f((tuple, list), (0.9, 1.0)),
        "ratio": _f((tuple, list), (3 / 4, 4 / 3)),
        "image_dtype": _f(str, "uint8", choices=("uint8", "float32")),
        "draft_decode": _f(bool, True),
        "draft_min_scale": _f(float, 0.9, **_pos),
        "resize_backend": _f(str, "auto", choices=("auto", "pil", "cv2")),
        "jpeg_decoder": _f(str, "auto", choices=("auto", "pil", "simplejpeg")),
        "max_pixels": _f(int, 89_478_485, **_pos),
        "worker_count": _f(int, 0, **_nonneg),
        "worker_buffer_size": _f(int, 2, **_pos),
        "read_threads": _f(int, 1, **_pos),
        "read_buffer_size": _f(int, 64, **_pos),
        "prefetch": _f(int, 2, **_nonneg),
        "tokenizer": _f(str, "clip", choices=("clip", "bytes")),
        # ... and two that are not the pipeline's.
        "num_examples": _f(int, None, **_pos, doc="examples per epoch (for total_epochs)"),
        "synthetic_examples": _f(int, 0, **_nonneg,
                                 doc="> 0: train on that many generated records (tests, demos)"),
    },
    "mesh": {
        "data": _f(int, -1, **_mesh_dim),
        "fsdp": _f(int, 1, **_mesh_dim),
        "tensor": _f(int, 1, **_mesh_dim),
        "rules": {FREEFORM: True},
        "replicated_warning": _f(float, 0.5, check=lambda v: 0.0 <= v <= 1.0, check_doc="must be in [0, 1]",
                                 doc="warn when more than this fraction of param bytes is replicated"),
    },
    "checkpoint": {
        "every_steps": _f(int, 5000, **_pos),
        "keep": _f(int, 3, **_pos),
        "async_save": _f(bool, True),
    },
    "eval": {
        "every_steps": _f(int, 5000, **_pos),
        "evaluators": _f((list, tuple), ()),
    },
}

# Keys of ``data`` that are not input_pipeline.TrainDataConfig fields.
_NON_PIPELINE_DATA_KEYS = ("num_examples", "synthetic_examples")


def extend_schema(section: str, fields: Mapping[str, Field | dict]) -> None:
    """Add fields to a (dotted) section, creating it if needed; for components owned elsewhere."""
    node = SCHEMA
    for part in section.split(".") if section else []:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{section} is a field, not a section")
    node.update(fields)


def default_config() -> ml_collections.ConfigDict:
    """A ConfigDict with every schema field at its default (configs start from this)."""

    def build(section: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in section.items():
            if k == FREEFORM:
                continue
            out[k] = build(v) if isinstance(v, dict) else v.default
        return out

    return ml_collections.ConfigDict(build(SCHEMA))


# ----------------------------------------------------------------------------------------- loading

def load_config(spec: str, overrides: Sequence[str] = (), *, num_devices: int | None = None
                ) -> ml_collections.ConfigDict:
    """``file.py[:arg]`` -> validated ConfigDict with durations resolved to ``total_steps``.

    ``overrides``: ``--config.a.b=value`` (or ``a.b=value``) strings. ``num_devices`` (optional) also
    checks the mesh and batch divisibility for that device count.
    """
    config = config_from_file(spec)
    apply_overrides(config, overrides)
    validate(config, num_devices=num_devices)
    return resolve_durations(config)


def config_from_file(spec: str) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    name = "_config_" + os.path.splitext(os.path.basename(path))[0]
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg)")
    config = module.get_config(arg or None)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}:get_config must return an ml_collections.ConfigDict")
    return config


def _schema_field(key: str, config: ml_collections.ConfigDict | None = None) -> Field | dict | None:
    node: Any = full_schema(config)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return {} if isinstance(node, dict) and node.get(FREEFORM) else None
        node = node[part]
    return node


def _suggest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def parse_value(text: str, field: Field | None, current: Any) -> Any:
    """Parse an override's text with the type of the field it replaces."""
    low = text.strip().lower()
    if low in ("none", "null") and (field is None or field.optional):
        return None
    types = field.types if field is not None else ((type(current),) if current is not None else ())
    if bool in types:
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"cannot read {text!r} as a bool")
    if int in types and float not in types:
        try:
            return int(text)
        except ValueError:
            try:
                f = float(text)  # "1e3"
            except ValueError:
                raise ConfigError(f"cannot read {text!r} as an int") from None
            if f != int(f):
                raise ConfigError(f"cannot read {text!r} as an int") from None
            return int(f)
    if float in types and str not in types:
        try:
            v = float(text)
        except ValueError:
            raise ConfigError(f"cannot read {text!r} as a float") from None
        integral = v == int(v) and "." not in text and "e" not in low
        return int(v) if types[0] is int and integral else v   # float-first fields stay float
    if any(t in types for t in (list, tuple, dict)):
        try:
            v = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            if str in types:
                return text
            raise ConfigError(f"cannot read {text!r} as a {'/'.join(t.__name__ for t in types)}") from None
        return v
    if str in types or not types:
        if not types:
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return text
        return text
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Apply ``--config.a.b=value`` strings in place (unknown keys are a ConfigError)."""
    for item in overrides:
        s = item
        for prefix in ("--config.", "config."):
            if s.startswith(prefix):
                s = s[len(prefix):]
                break
        key, eq, text = s.partition("=")
        if not eq or not key:
            raise ConfigError(f"override {item!r} is not of the form --config.key=value")
        parts = key.split(".")
        node = config
        for i, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                where = ".".join(parts[:i]) or "config"
                known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                raise ConfigError(f"unknown config section {'.'.join(parts[: i + 1])!r} in {where}"
                                  + _suggest(part, known))
            node = node[part]
        leaf = parts[-1]
        field = _schema_field(key, config)
        if leaf not in node and field is None:
            raise ConfigError(f"unknown config key {key!r}" + _suggest(leaf, list(node.keys())))
        current = node.get(leaf, None)
        if isinstance(field, dict) and field and leaf in node:   # a whole section: a dict literal
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ConfigError(f"{key} is a section; give a dict literal, got {text!r}") from None
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section; give a dict literal, got {text!r}")
        else:
            try:
                value = parse_value(text, field if isinstance(field, Field) else None, current)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"config.{key}: {e}") from None
        _set(node, leaf, value)


def _set(node: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Set exactly ``value`` (ConfigDict would keep a field's first type, e.g. float for an int)."""
    with node.unlocked():
        if key in node:
            del node[key]
        node[key] = value


# -------------------------------------------------------------------------------------- validation

def full_schema(config: ml_collections.ConfigDict | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """SCHEMA plus the ``model.*`` fields of the config's model type."""
    if config is None:
        return SCHEMA
    model_type = (config.get("model") or {}).get("type", "clip")
    extra = _model_type_fields(model_type)
    if not extra:
        return SCHEMA
    schema = dict(SCHEMA)
    schema["model"] = {**SCHEMA["model"], **extra}
    return schema


def _model_type_fields(model_type: str) -> dict[str, Field]:
    from metaclip_jax.models import registry

    try:
        return dict(registry.get_model_type(model_type).fields)
    except KeyError:
        return {}


def _check_value(key: str, value: Any, field: Field) -> None:
    if value is None:
        if not field.optional:
            raise ConfigError(f"{key} must not be None")
        return
    ok = isinstance(value, field.types) and not (isinstance(value, bool) and bool not in field.types)
    if not ok:
        names = "/".join(t.__name__ for t in field.types if not (t is int and float in field.types))
        raise ConfigError(f"{key} must be {names}, got {type(value).__name__} {value!r}")
    if field.choices is not None and value not in field.choices:
        raise ConfigError(f"{key} must be one of {list(field.choices)}, got {value!r}"
                          + (_suggest(value, field.choices) if isinstance(value, str) else ""))
    if field.check is not None and not field.check(value):
        raise ConfigError(f"{key} {field.check_doc}, got {value!r}")


def _walk(config: Mapping[str, Any], schema: Mapping[str, Any], prefix: str) -> None:
    for k, v in config.items():
        key = f"{prefix}{k}"
        if k not in schema:
            known = [s for s in schema if s != FREEFORM]
            raise ConfigError(f"unknown config key {key!r}" + _suggest(k, known))
        spec = schema[k]
        if isinstance(spec, dict):
            if spec.get(FREEFORM):
                if v is not None and not isinstance(v, Mapping | ml_collections.ConfigDict):
                    raise ConfigError(f"{key} must be a mapping, got {type(v).__name__}")
                continue
            if not isinstance(v, Mapping | ml_collections.ConfigDict):
                raise ConfigError(f"{key} is a section, got {type(v).__name__} {v!r}")
            _walk(v, spec, key + ".")
        else:
            _check_value(key, v, spec)


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> None:
    """Schema check (unknown keys, types, choices, ranges) then cross-field conflicts.

    With ``num_devices``, also checks the mesh shape and batch divisibility for that many devices.
    """
    from metaclip_jax.models import registry

    _walk(config, full_schema(config), "")
    m, o, d, loss = config.model, config.optimizer, config.data, config.loss
    try:
        mtype = registry.get_model_type(m.type)
    except KeyError:
        raise ConfigError(f"model.type {m.type!r} is not registered; known: {registry.model_type_names()}"
                          + _suggest(m.type, registry.model_type_names())) from None
    names = mtype.preset_names() if mtype.preset_names is not None else None
    if names is not None and m.preset not in names:
        raise ConfigError(f"model.preset {m.preset!r} is unknown for model.type {m.type!r}"
                          + _suggest(m.preset, names))
    if loss.name not in mtype.losses:
        raise ConfigError(f"loss.name {loss.name!r} does not fit model.type {m.type!r} "
                          f"(allowed: {list(mtype.losses)})")
    if loss.name == "siglip" and m.init_logit_bias is None:
        raise ConfigError("loss.name 'siglip' needs model.init_logit_bias (e.g. -10.0); it is None")
    if loss.name == "clip" and m.init_logit_bias is not None:
        raise ConfigError("model.init_logit_bias is set but loss.name 'clip' has no bias; set it to None")
    image_size = model_image_size(config)
    if d.image_size is not None and d.image_size != image_size:
        raise ConfigError(f"data.image_size {d.image_size} != model.preset {m.preset!r} "
                          f"image size {image_size}")
    durations = [k for k in ("total_steps", "total_examples", "total_epochs") if config.get(k) is not None]
    if len(durations) != 1:
        raise ConfigError("set exactly one of total_steps / total_examples / total_epochs, "
                          f"got {durations or 'none'}")
    if durations[0] == "total_epochs" and d.num_examples is None:
        raise ConfigError("total_epochs needs data.num_examples (examples per epoch)")
    total = _steps(config)
    if total < 1:
        raise ConfigError(f"{durations[0]} gives {total} steps at data.global_batch_size "
                          f"{d.global_batch_size}")
    if o.warmup_steps > total:
        raise ConfigError(f"optimizer.warmup_steps {o.warmup_steps} is longer than the run ({total} steps)")
    if o.schedule == "cosine" and o.warmup_steps == total and total > 0:
        raise ConfigError("optimizer.warmup_steps equals the run length: no room for the cosine decay")
    micro = d.global_batch_size // o.grad_accum_steps
    if d.global_batch_size % o.grad_accum_steps:
        raise ConfigError(f"data.global_batch_size {d.global_batch_size} is not divisible by "
                          f"optimizer.grad_accum_steps {o.grad_accum_steps}")
    if loss.chunk_size is not None and micro % loss.chunk_size:
        raise ConfigError(f"loss.chunk_size {loss.chunk_size} does not divide the micro-batch {micro} "
                          "(data.global_batch_size / optimizer.grad_accum_steps)")
    _check_rules(config.mesh.rules)
    if mtype.validate is not None:
        mtype.validate(config)
    if num_devices is not None:
        mesh_shape(config, num_devices)


def _check_rules(rules: Any) -> None:
    from metaclip_jax.sharding import DEFAULT_RULES, MESH_AXES

    for k, v in (rules or {}).items():
        if k not in DEFAULT_RULES:
            raise ConfigError(f"mesh.rules: unknown logical axis {k!r}" + _suggest(k, list(DEFAULT_RULES)))
        targets = () if v is None else (v,) if isinstance(v, str) else tuple(v)
        for t in targets:
            if t not in MESH_AXES:
                raise ConfigError(f"mesh.rules.{k}: unknown mesh axis {t!r}; mesh axes are {list(MESH_AXES)}")


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) for ``num_devices``, with -1 resolved; ConfigError on a misfit."""
    sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
    if sizes.count(-1) > 1:
        raise ConfigError("mesh: at most one of data / fsdp / tensor may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices are not divisible by the fixed axes ({known})")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
                          f"devices, but {num_devices} are available")
    batch_devices = _batch_devices(config, sizes)
    d, o = config.data, config.optimizer
    if d.global_batch_size % (batch_devices * o.grad_accum_steps):
        raise ConfigError(f"data.global_batch_size {d.global_batch_size} is not divisible by the batch "
                          f"devices ({batch_devices}) x optimizer.grad_accum_steps ({o.grad_accum_steps})")
    return tuple(sizes)


def _batch_devices(config: ml_collections.ConfigDict, sizes: Sequence[int]) -> int:
    from metaclip_jax.sharding import DEFAULT_RULES, MESH_AXES

    rules = {**DEFAULT_RULES, **dict(config.mesh.rules or {})}
    b = rules.get("batch")
    axes = () if b is None else (b,) if isinstance(b, str) else tuple(b)
    return math.prod(sizes[MESH_AXES.index(a)] for a in axes)


# --------------------------------------------------------------------------------------- durations

def _steps(config: Mapping[str, Any]) -> int:
    batch = config["data"]["global_batch_size"]
    if config.get("total_steps") is not None:
        return int(config["total_steps"])
    if config.get("total_examples") is not None:
        return int(config["total_examples"]) // batch
    # open_clip: steps per epoch = floor(num_examples / batch), times the epochs.
    per_epoch = int(config["data"]["num_examples"]) // batch
    return math.floor(per_epoch * float(config["total_epochs"]) + 1e-9)


def resolve_durations(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The one place durations become steps: returns a copy with ``total_steps`` set and
    ``total_examples`` / ``total_epochs`` cleared (so resolving twice is a no-op).

    examples -> floor(examples / global_batch); epochs -> floor(num_examples / global_batch) * epochs
    (open_clip's per-epoch floor: MetaCLIP's 32 epochs of 400M at 32,768 = 12,207 x 32 = 390,624 steps).
    """
    out = ml_collections.ConfigDict(config.to_dict())
    steps = _steps(out)
    with out.unlocked():
        out.total_steps = steps
        out.total_examples = None
        out.total_epochs = None
    return out


def model_image_size(config: ml_collections.ConfigDict) -> int:
    """The image size of the configured model (its model type's ``model_config``, else the CLIP preset)."""
    from metaclip_jax.models import presets, registry

    mtype = registry.get_model_type(config.model.type)
    try:
        if mtype.model_config is None:
            return presets.get_config(config.model.preset).vision.image_size
        return int(mtype.model_config(config).vision.image_size)
    except KeyError:
        raise ConfigError(f"model.preset {config.model.preset!r} is unknown"
                          + _suggest(config.model.preset, presets.preset_names())) from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None


def train_data_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``config.data`` as the mapping ``input_pipeline.TrainDataConfig.from_mapping`` accepts
    (image_size filled from the model when None)."""
    d = {k: v for k, v in config.data.to_dict().items() if k not in _NON_PIPELINE_DATA_KEYS}
    if d.get("image_size") is None:
        d["image_size"] = model_image_size(config)
    for k in ("scale", "ratio"):
        d[k] = tuple(d[k])
    return d
