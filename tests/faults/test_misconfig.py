"""Misconfiguration is a clear error naming the cause, before any compile or any work: the train CLI
(unknown key, wrong type, batch not divisible by the mesh), the AOT topology check (a mesh that does not fit
the topology, an unknown topology), the curation config and the input-pipeline config. ``jax.jit`` and
``Lowered.compile`` are replaced by functions that fail the test if called."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.faults import trials

pytestmark = pytest.mark.faults

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class CompileAttempted(AssertionError):
    pass


@pytest.fixture
def no_compile(monkeypatch):
    import importlib

    import jax

    from train import loop

    for mod in ("train.__main__", "train.state", "train.step"):  # first: modules may jit at import time
        importlib.import_module(mod)

    def boom(*a, **k):
        raise CompileAttempted("a compile was attempted")

    monkeypatch.setattr(jax, "jit", boom)
    monkeypatch.setattr(jax.stages.Lowered, "compile", boom)
    monkeypatch.setattr(jax.stages.Traced, "lower", boom)
    monkeypatch.setattr(loop, "train_and_evaluate", boom)


TRAIN_CASES = {
    "unknown-key": (["--config.optimizer.weight_decy=0.1"],
                    r"optimizer.weight_decy.*did you mean 'weight_decay'"),
    "unknown-section": (["--config.optimiser.lr=1e-3"], r"optimiser"),
    "wrong-type": (["--config.total_steps=ten"], r"total_steps.*'ten'|'ten'.*total_steps"),
    "wrong-type-float": (["--config.optimizer.lr=fast"], r"optimizer.lr.*'fast'|'fast'.*optimizer.lr"),
    "wrong-choice": (["--config.model.dtype=bf16"], r"model.dtype must be one of"),
    "batch-not-divisible-by-mesh": (["--config.data.global_batch_size=12"],
                                    r"global_batch_size 12 is not divisible by the batch devices \(\d+\)"),
    "mesh-too-big": (["--config.mesh.data=1024"], r"mesh data=1024 .* 1024 devices, but \d+ are available"),
    "unknown-config-file": ([], r"nope.py"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_cli_rejects_before_compile(case, no_compile, capsys, tmp_path):
    import re

    from train.__main__ import main

    overrides, pattern = TRAIN_CASES[case]
    config = "configs/nope.py" if case == "unknown-config-file" else "configs/tiny.py"
    t0 = time.perf_counter()
    rc = main(["--config", config, "--workdir", str(tmp_path / "wd"), *overrides])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    ok = rc == 2 and "config error" in err and re.search(pattern, err) is not None
    trials.record("config", f"train-{case}", fault=f"misconfig: {case}", survived=ok,
                  seconds=round(elapsed, 3))
    assert rc == 2, err
    assert re.search(pattern, err), err
    assert not (tmp_path / "wd" / "checkpoints").exists()


_AOT_DRIVER = r"""
import io, json, sys, contextlib
import jax
from launch import aot
import train.state, train.step, metaclip_jax.config_schema, metaclip_jax.models.registry
def boom(*a, **k):
    raise SystemExit("COMPILE ATTEMPTED")
jax.jit = boom
jax.stages.Lowered.compile = boom
jax.stages.Traced.lower = boom
out = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = aot.main(argv)
    out[name] = {"rc": rc, "err": err.getvalue()}
print("RESULT " + json.dumps(out))
"""

AOT_CASES = {
    "mesh-does-not-fit-topology": (["--config", "configs/tiny.py", "--topology", "v5e:2x2",
                                    "--config.mesh.data=8"], ["mesh data=8", "4 are available"]),
    "batch-not-divisible-by-topology": (["--config", "configs/tiny.py", "--topology", "v5e:2x3",
                                         "--config.data.global_batch_size=16"], ["not divisible"]),
    "unknown-generation": (["--config", "configs/tiny.py", "--topology", "v9:2x2"], ["unknown generation"]),
    "bad-topology-shape": (["--config", "configs/tiny.py", "--topology", "v5p:4x4"], ["3 dimensions"]),
}


def test_aot_topology_errors_before_compile():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    argv = {k: v[0] for k, v in AOT_CASES.items()}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _AOT_DRIVER, json.dumps(argv)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t0
    assert "COMPILE ATTEMPTED" not in r.stdout + r.stderr
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, r.stderr[-3000:]
    res = json.loads(line[len("RESULT "):])
    for name, (_, needles) in AOT_CASES.items():
        ok = res[name]["rc"] == 1 and all(n in res[name]["err"] for n in needles)
        trials.record("config", f"aot-{name}", fault=f"misconfig: {name}", survived=ok,
                      seconds=round(elapsed / len(AOT_CASES), 3))
    for name, (_, needles) in AOT_CASES.items():
        assert res[name]["rc"] == 1, (name, res[name])
        for n in needles:
            assert n in res[name]["err"], (name, res[name]["err"])


CURATION_CASES = {
    "unknown-key": ({"balanse": {"t": 10}}, "balanse"),
    "unknown-nested-key": ({"source": {"url_column": "u"}}, "url_column"),
    "wrong-type": ({"workers": "two"}, "workers"),
    "conflicting-pair": ({"balance": {"t": 100, "tail_proportion": 0.06}}, "tail_proportion"),
}


@pytest.mark.parametrize("case", sorted(CURATION_CASES))
def test_curation_config_errors_name_the_key(case, tmp_path):
    from curation.config import from_dict

    extra, key = CURATION_CASES[case]
    base = {"inputs": [str(tmp_path / "*.jsonl")], "metadata": str(tmp_path / "m.json"),
            "workdir": str(tmp_path / "wd"), "progress": False}
    with pytest.raises(Exception) as e:
        from_dict({**base, **extra}).validate()
    ok = key in str(e.value) and not (tmp_path / "wd").exists()
    trials.record("config", f"curation-{case}", fault=f"misconfig: {case}", survived=ok)
    assert key in str(e.value), str(e.value)
    assert not (tmp_path / "wd").exists()  # no work started


def test_input_pipeline_config_errors():
    from input_pipeline import TrainDataConfig

    for name, cfg, key in [("unknown-key", {"paths": "x", "global_bach_size": 8}, "global_bach_size"),
                           ("bad-dtype", {"paths": "x", "image_dtype": "float16"}, "image_dtype")]:
        with pytest.raises(Exception) as e:
            TrainDataConfig.from_mapping(cfg).validate()
        trials.record("config", f"input-{name}", fault=f"misconfig: {name}", survived=key in str(e.value))
        assert key in str(e.value), str(e.value)
