"""Curation config: one validated dataclass tree, loaded from JSON or a Python file, with overrides.

A config file is JSON (an object) or Python defining ``get_config(arg=None)`` that returns a dict (or an
``ml_collections.ConfigDict``); ``file.py:variant`` passes ``variant`` as ``arg``. Overrides are dotted
``key=value`` pairs (``balance.t=20000``), values parsed as JSON when possible. Unknown keys, wrong types
and conflicting options are errors naming the key.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from curation.balancing import MODES
from curation.sources import FORMATS, SourceConfig


class ConfigError(ValueError):
    """A config that names an unknown key, has a wrong type or conflicting values."""


@dataclasses.dataclass
class BalanceConfig:
    t: float | None = 20_000.0  # per-entry cap; None or "inf" = no offline balancing
    tail_proportion: float | None = None  # derive t = p_to_t(counts, p) instead of giving t
    mode: str = "per_image"  # per_image (MetaCLIP 2) | per_text (MetaCLIP 1 demo) | none
    seed: int = 0
    rng_key: str = "uid"  # uid | index (global record index over the ordered input list)


@dataclasses.dataclass
class PackConfig:
    options: str = "group_size:1"  # ArrayRecordWriter options ("group_size:1" = random access)
    prefix: str = "curated"
    url_list: str = "auto"  # auto (only for pools without images) | always | never


@dataclasses.dataclass
class ReportConfig:
    top_k: int = 50
    t_grid_points: int = 25
    max_shards: int = 256  # shards sampled for the kept-vs-t curve (scaled to the whole pool)


@dataclasses.dataclass
class CurationConfig:
    inputs: list[str] = dataclasses.field(default_factory=list)  # files or globs, expanded and sorted
    workdir: str = "runs/curation"
    output_dir: str = ""  # default: {workdir}/out
    metadata: str = ""
    match_mode: str = "v1"  # v1 | v2 (entry spacing, metaclip.md §3.2)
    workers: int = 0  # 0 = os.cpu_count()
    start_method: str = "forkserver"  # forkserver | spawn | fork (see curation/runner.py _parallel)
    max_error_rate: float = 0.01
    progress: bool = True
    source: SourceConfig = dataclasses.field(default_factory=SourceConfig)
    balance: BalanceConfig = dataclasses.field(default_factory=BalanceConfig)
    pack: PackConfig = dataclasses.field(default_factory=PackConfig)
    report: ReportConfig = dataclasses.field(default_factory=ReportConfig)

    # ------------------------------------------------------------------------------------------------------
    @property
    def out_dir(self) -> str:
        return self.output_dir or os.path.join(self.workdir, "out")

    @property
    def n_workers(self) -> int:
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)

    def input_files(self) -> list[str]:
        files: list[str] = []
        for pat in self.inputs:
            hits = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
            if not hits:
                raise ConfigError(f"inputs: pattern {pat!r} matches no file")
            files.extend(hits)
        seen: set[str] = set()
        out = []
        for f in files:
            if f not in seen:
                seen.add(f)
                out.append(f)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["source"] = self.source.to_dict()
        return d

    def validate(self) -> CurationConfig:
        if not self.inputs:
            raise ConfigError("inputs: no input files given")
        if not self.metadata:
            raise ConfigError("metadata: no metadata file given")
        if self.match_mode not in ("v1", "v2"):
            raise ConfigError(f"match_mode: expected 'v1' or 'v2', got {self.match_mode!r}")
        if self.start_method not in ("forkserver", "spawn", "fork"):
            raise ConfigError(f"start_method: expected forkserver, spawn or fork, got {self.start_method!r}")
        if self.source.format not in ("auto", *FORMATS):
            raise ConfigError(f"source.format: expected auto or one of {FORMATS}, got {self.source.format!r}")
        b = self.balance
        if b.mode not in MODES:
            raise ConfigError(f"balance.mode: expected one of {MODES}, got {b.mode!r}")
        if b.rng_key not in ("uid", "index"):
            raise ConfigError(f"balance.rng_key: expected 'uid' or 'index', got {b.rng_key!r}")
        if b.tail_proportion is not None:
            if b.t is not None:
                raise ConfigError("balance.t and balance.tail_proportion conflict: give only one "
                                  "(set balance.t=null)")
            if not 0.0 < b.tail_proportion < 1.0:
                raise ConfigError(f"balance.tail_proportion: expected in (0, 1), got {b.tail_proportion}")
        if b.t is not None and not (b.t > 0):
            raise ConfigError(f"balance.t: expected > 0 (or null/inf for no balancing), got {b.t}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ConfigError(f"max_error_rate: expected in [0, 1], got {self.max_error_rate}")
        if self.pack.url_list not in ("auto", "always", "never"):
            raise ConfigError(f"pack.url_list: expected auto|always|never, got {self.pack.url_list!r}")
        if self.source.max_text_chars < 1:
            raise ConfigError("source.max_text_chars: expected >= 1")
        return self


_SECTIONS = {"source": SourceConfig, "balance": BalanceConfig, "pack": PackConfig, "report": ReportConfig}


def _coerce(key: str, value: Any, field_type: Any) -> Any:
    ft = str(field_type)
    if value is None:
        if "None" in ft:
            return None
        raise ConfigError(f"{key}: null is not allowed")
    if ft.startswith("float"):
        if isinstance(value, str) and value.lower() in ("inf", "infinity"):
            return None if "None" in ft else math.inf
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        v = float(value)
        return None if (math.isinf(v) and "None" in ft) else v
    if ft.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if ft == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if ft == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if ft.startswith("list") or ft.startswith("tuple"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(value) if ft.startswith("tuple") else list(value)
    return value


def _build(cls: Any, d: dict[str, Any], prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'}: expected an object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if k not in fields:
            close = [n for n in fields if n.lower().startswith(k.lower()[:3])]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; known: {sorted(fields)}")
        if k in _SECTIONS and cls is CurationConfig:
            kwargs[k] = _build(_SECTIONS[k], v, f"{key}.")
        else:
            kwargs[k] = _coerce(key, v, fields[k].type)
    return cls(**kwargs)


def from_dict(d: dict[str, Any]) -> CurationConfig:
    d = dict(d)
    bal = d.get("balance")
    if isinstance(bal, dict) and "tail_proportion" in bal and bal["tail_proportion"] is not None \
            and "t" not in bal:
        bal = {**bal, "t": None}
        d["balance"] = bal
    return _build(CurationConfig, d, "")


def set_override(d: dict[str, Any], dotted: str) -> None:
    """Apply ``a.b=value`` to a nested dict (value parsed as JSON, else kept as a string)."""
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r}: expected key=value")
    key, raw = dotted.split("=", 1)
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
    node[parts[-1]] = value


def load_config_dict(spec: str) -> dict[str, Any]:
    """Read ``file.json``, ``file.py`` or ``file.py:variant`` into a plain dict."""
    path, arg = spec.rsplit(":", 1) if ".py:" in spec else (spec, "")
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    if path.endswith(".py"):
        mod_spec = importlib.util.spec_from_file_location("_curation_config", path)
        assert mod_spec is not None and mod_spec.loader is not None
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        if not hasattr(mod, "get_config"):
            raise ConfigError(f"{path}: a Python config must define get_config()")
        obj = mod.get_config(arg) if arg else mod.get_config()
        if hasattr(obj, "to_dict"):
            obj = obj.to_dict()
        return dict(obj)
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: the config must be a JSON object")
    return obj


def load_config(spec: str | None, overrides: Sequence[str] = ()) -> CurationConfig:
    d = load_config_dict(spec) if spec else {}
    for o in overrides:
        set_override(d, o)
    return from_dict(d).validate()


def fingerprint(*parts: Any) -> str:
    """Short stable hash of JSON-able parts (stage fingerprints in the done markers)."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8"))
    return h.hexdigest()[:16]


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
