"""No code path loads pickles from data or checkpoints: an AST scan of every Python file of the project for
``pickle.load(s)`` / ``Unpickler`` (also ``cPickle``, ``_pickle``), ``dill`` (any import),
``cloudpickle.load(s)``, ``joblib.load``, ``pandas.read_pickle``, ``np.load(..., allow_pickle=True)`` and
``torch.load`` without ``weights_only=True``. Fails naming file:line. Allowlist: empty (an entry would need
a justifying comment)."""

from __future__ import annotations

import ast
import os

import pytest

from tests.faults import trials

pytestmark = pytest.mark.faults

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SKIP_DIRS = {"runs", "build", "dist", "node_modules", "__pycache__"}
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill"}
# "path:line" -> justification. Keep empty unless a load is provably not of untrusted data.
ALLOWLIST: dict[str, str] = {}


def project_files(root: str = ROOT) -> list[str]:
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x not in SKIP_DIRS)
        out += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
    return out


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _is_round_trip(call: ast.Call, alias: dict[str, str]) -> bool:
    """``pickle.loads(pickle.dumps(obj))``: an in-memory round trip of an object the code itself just pickled
    (tests/test_tokenizer.py checks the tokenizer survives the trip to spawned Grain workers). No data or
    checkpoint bytes are involved, so it is not a trust boundary; any other argument is flagged."""
    if len(call.args) != 1 or not isinstance(call.args[0], ast.Call):
        return False
    inner = _dotted(call.args[0].func) or ""
    head, _, rest = inner.partition(".")
    full = alias.get(head, head) + ("." + rest if rest else "")
    return full.rpartition(".")[0] in PICKLE_MODULES and full.endswith(".dumps")


def scan_source(src: str, path: str = "<src>") -> list[str]:
    """Findings as ``path:line: what``."""
    tree = ast.parse(src, filename=path)
    alias: dict[str, str] = {}  # local name -> canonical dotted name
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if a.name.split(".")[0] == "dill":
                    found.append(f"{path}:{node.lineno}: imports dill")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"
            if node.module.split(".")[0] == "dill":
                found.append(f"{path}:{node.lineno}: imports from dill")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name is None:
            continue
        head, _, rest = name.partition(".")
        full = alias.get(head, head) + ("." + rest if rest else "")
        mod, _, fn = full.rpartition(".")
        where = f"{path}:{node.lineno}"
        if mod.split(".")[0] in PICKLE_MODULES and fn in ("load", "loads", "Unpickler"):
            if _is_round_trip(node, alias):
                continue
            found.append(f"{where}: {full}(...) unpickles")
        elif full in ("joblib.load", "pandas.read_pickle", "pd.read_pickle") or fn == "read_pickle":
            found.append(f"{where}: {full}(...) unpickles")
        elif full in ("numpy.load", "np.load") and _kw(node, "allow_pickle") is not None and not (
                isinstance(_kw(node, "allow_pickle"), ast.Constant)
                and _kw(node, "allow_pickle").value is False):
            found.append(f"{where}: {full}(..., allow_pickle=...) may unpickle")
        elif full == "torch.load" and not _is_true(_kw(node, "weights_only")):
            found.append(f"{where}: torch.load without weights_only=True")
    return found


def test_scanner_catches_every_pattern():
    bad = """
import pickle, dill, joblib, torch
import numpy as np
from pickle import loads as L
import cloudpickle as cp
pickle.load(f); L(b); cp.loads(b); pickle.loads(pickle.dumps(x)); joblib.load(p)
np.load(p, allow_pickle=True); torch.load(p)
torch.load(p, weights_only=False); pickle.Unpickler(f)
"""
    got = scan_source(bad)
    assert len(got) == 9, got  # dill import + 8 calls (the in-memory round trip is not one)
    ok = ("import numpy as np, torch\nnp.load(p)\nnp.load(p, allow_pickle=False)\n"
          "torch.load(p, weights_only=True)\n")
    assert scan_source(ok) == []


def test_no_pickle_loads_in_project():
    files = project_files()
    assert len(files) > 50 and any(f.endswith("train/checkpoint.py") for f in files)
    found = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            src = f.read()
        rel = os.path.relpath(path, ROOT)
        found += [x for x in scan_source(src, rel) if x.split(": ", 1)[0] not in ALLOWLIST]
    trials.record("security", "no-pickle-scan", fault="pickle/unsafe deserialisation in project code",
                  survived=not found, files_scanned=len(files), findings=len(found))
    assert not found, "unsafe deserialisation:\n" + "\n".join(found)
