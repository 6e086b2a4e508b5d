"""Runs the Beam tests (tests/beam) in the separate Beam environment, when it exists.

Beam cannot live in the main environment (protobuf/pyarrow pins), so the Beam-vs-local comparison runs
as a subprocess under ``.venv-beam/bin/python``. Create it with
``python3 -m venv .venv-beam && .venv-beam/bin/pip install -r requirements-beam.txt``.
"""

from __future__ import annotations

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEAM_PY = os.path.join(ROOT, ".venv-beam", "bin", "python")


@pytest.mark.skipif(not os.path.exists(BEAM_PY), reason=".venv-beam does not exist; create it with "
                    "python3 -m venv .venv-beam && .venv-beam/bin/pip install -r requirements-beam.txt")
def test_beam_pipeline_in_beam_venv(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "JAX_", "XLA_"))}
    p = subprocess.run([BEAM_PY, "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider",
                        "--basetemp", str(tmp_path / "beam"), "tests/beam"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-5000:]
    assert " passed" in out and "skipped" not in out, out[-2000:]
