"""AOT topology check: compile the real train step for a TPU topology with no TPU attached."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _libtpu_available() -> bool:
    return (importlib.util.find_spec("libtpu") is not None
            or os.path.isdir(os.path.join(ROOT, ".venv-tpu", "libtpu")))


def _run(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"        # the topology comes from libtpu; nothing runs on a device
    return subprocess.run([sys.executable, "-m", "launch.aot", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_parse_topology():
    from launch.aot import TopologyError, parse_topology

    assert parse_topology("v5p:4x4x8") == ("v5p", (4, 4, 8))
    assert parse_topology("v5litepod:2x2") == ("v5e", (2, 2))
    assert parse_topology("v6e:8x8") == ("v6e", (8, 8))
    assert parse_topology("v4:2x2x2") == ("v4", (2, 2, 2))
    for bad, msg in [("v9:2x2", "unknown generation"), ("v5p:4x4", "3 dimensions"), ("v5p-256", "expected")]:
        with pytest.raises(TopologyError, match=msg):
            parse_topology(bad)


def test_mesh_that_does_not_fit_fails_before_compile():
    r = _run("--config", "configs/tiny.py", "--topology", "v5e:2x2", "--config.mesh.data=8", timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "mesh data=8" in r.stderr and "4 are available" in r.stderr


@pytest.mark.slow
def test_aot_compile_small_topology(tmp_path):
    if not _libtpu_available():
        pytest.skip("libtpu is not installed (pip install -r requirements-tpu.txt, or copy it to .venv-tpu/)")
    out = tmp_path / "aot.json"
    r = _run("--config", "configs/tiny.py", "--topology", "v5e:2x2", "--json", str(out))
    if r.returncode == 1 and "topolog" in r.stderr.lower() and "libtpu" in r.stderr.lower():
        pytest.skip(f"TPU topologies unavailable: {r.stderr[-500:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["chips"] == 4 and res["chip"] == "TPU v5e"
    assert res["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert 0 < res["per_chip_bytes"] < res["hbm_bytes"] and res["fits"]
    assert res["flops_per_chip"] > 0 and res["xla_flops_per_chip"] > 0 and res["roofline_step_s"] > 0
    assert "per-chip memory" in r.stdout and "fits" in r.stdout
