"""The README demo, reduced (``--quick``): every real stage end to end in a subprocess, then a resume."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo(workdir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-m", "launch.demo", "--workdir", str(workdir), "--quick"], cwd=ROOT,
                   env=env, check=True, timeout=600)
    with open(workdir / "summary.json", encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.slow
def test_demo_quick_end_to_end_and_resume(tmp_path):
    s = _demo(tmp_path)
    assert s["seconds"] > 0 and 0 < s["pairs"]["kept"] < s["pairs"]["total"]
    assert s["curation"]["head_tail_after"] < s["curation"]["head_tail_before"]   # balancing flattens
    for name in ("clip", "llip"):
        m = s["models"][name]
        for key in ("zeroshot_top1", "retrieval_r1"):
            assert 0.0 <= m[key] <= 1.0, (name, key, m[key])
        assert m["zeroshot_top1"] > s["zeroshot"]["chance"], (name, m)   # learns something even when quick
        assert (tmp_path / f"{name}_training_curves.png").stat().st_size > 0
    for plot in s["curation"]["plots"]:
        assert (tmp_path / plot).stat().st_size > 0
    assert len(s["curation"]["plots"]) >= 2

    again = _demo(tmp_path)   # every stage reuses its finished work
    for name in ("clip", "llip"):
        assert again["models"][name]["zeroshot_top1"] == s["models"][name]["zeroshot_top1"]
    assert again["seconds"] < s["seconds"]
