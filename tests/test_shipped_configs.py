"""Every shipped config: it loads, passes the schema, its model and train state build abstractly
(``jax.eval_shape``, nothing allocated), and the CPU-sized ones AOT-compile for a small TPU topology."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from metaclip_jax.config_schema import load_config
from tests.test_aot import _libtpu_available, _run

ROOT = Path(__file__).resolve().parents[1]

SHIPPED = {
    "tiny.py": [None, "siglip", "accum"],
    "llip_tiny.py": [None, "direct", "norm"],
    "demo.py": ["clip", "llip", "clip_quick", "llip_quick"],
    "siglip.py": [None],
    "metaclip.py": ["b32_400m", "b16_400m", "l14_400m", "b32_fullcc", "b16_fullcc", "l14_fullcc",
                    "h14_fullcc", "G14_fullcc"],
    "llip.py": ["b32_k64", "b16_k32", "l14_k32", "h14_k64", "G14_k64"],
}
CASES = [f"configs/{f}" + (f":{v}" if v else "") for f, vs in SHIPPED.items() for v in vs]


def test_every_config_file_is_listed():
    files = {p.name for p in (ROOT / "configs").glob("*.py") if p.name != "__init__.py"}
    assert files == set(SHIPPED), "add new config files (and their variants) to SHIPPED"


@pytest.mark.parametrize("spec", CASES)
def test_config_loads_validates_and_builds_abstractly(spec):
    from train.mesh import build_mesh
    from train.state import abstract_train_state

    config = load_config(spec)
    assert config.total_steps > 0
    mesh = build_mesh(config, devices=jax.devices()[:1])
    state, shardings = abstract_train_state(config, mesh)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    assert n_params > 0
    assert jax.tree.structure(state) == jax.tree.structure(shardings)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["configs/llip_tiny.py", "configs/demo.py:clip"])
def test_cpu_sized_configs_aot_compile_for_a_small_topology(spec, tmp_path):
    """configs/tiny.py is compiled by tests/test_aot.py; the MetaCLIP / Llip recipes are compiled for real
    topologies in docs/training.md (minutes each, not in CI)."""
    if not _libtpu_available():
        pytest.skip("libtpu is not installed (make test installs it into .venv-tpu/)")
    out = tmp_path / "aot.json"
    r = _run("--config", spec, "--topology", "v5e:2x2", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["chips"] == 4 and res["fits"] and res["per_chip_bytes"] > 0


