"""``--format jax_export``: serialized encoders reload and run without this project (subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from input_pipeline.transforms import eval_image
from metaclip_jax import checkpoint_io as cio
from metaclip_jax import export as ex
from metaclip_jax.models import presets
from metaclip_jax.tokenizer import ClipTokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a photo of a cat.", "A RED car, parked!", "it's two dogs' toys", "x " * 100]

# Runs launch/run_exported.py with the project made unimportable (and -I: no PYTHONPATH, no user site).
_ISOLATED = ("import runpy, sys\n"
             "for m in ('metaclip_jax', 'input_pipeline', 'train', 'evaluate', 'curation', 'launch'):\n"
             "    sys.modules[m] = None\n"
             "sys.argv = sys.argv[1:]\n"
             "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def _random_loaded() -> cio.LoadedModel:
    cfg = presets.get_config("test-tiny")
    rng = np.random.default_rng(0)
    flat = {k: (0.05 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in cio.flatten_params(cio.abstract_params("clip", cfg)).items()}
    return cio.LoadedModel("clip", cfg, cio.unflatten_params(flat), "random")


def _images(d: Path) -> list[str]:
    paths = []
    for i, (w, h) in enumerate([(40, 30), (32, 64), (50, 50), (33, 47), (90, 41)]):
        im = Image.new("RGB", (w, h), (40 * i, 255 - 30 * i, 90))
        ImageDraw.Draw(im).rectangle((3, 3, 3 + 4 * i, 20), fill=(250, 10 * i, 0))
        paths.append(str(d / f"img{i}.png"))
        im.save(paths[-1])
    return paths


def test_jax_export_runs_standalone_with_two_batch_sizes(tmp_path):
    import jax

    loaded = _random_loaded()
    cio.save_params(tmp_path / "ckpt", loaded)
    outs = {}
    for flag in ("--bake-params", "--pass-params"):
        outs[flag] = out = tmp_path / flag.strip("-")
        assert ex.main(["--checkpoint", str(tmp_path / "ckpt"), "--format", "jax_export", flag,
                        "--output", str(out)]) == 0
        spec = json.loads((out / "export_spec.json").read_text())
        assert spec["params"] == ("baked" if flag == "--bake-params" else "params.npz")
        assert spec["image"]["image_size"] == 32 and spec["text"]["context_length"] == 77
        assert (out / "params.npz").exists() == (flag == "--pass-params")

    # Consumer of the baked export: a temp dir, PYTHONPATH unset, -I, the project blocked from import.
    run_dir = tmp_path / "consumer"
    run_dir.mkdir()
    script = shutil.copy(ROOT / "launch" / "run_exported.py", run_dir / "run_exported.py")
    paths = _images(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["JAX_PLATFORMS"] = "cpu"
    res = subprocess.run(
        [sys.executable, "-I", "-c", _ISOLATED, script, str(outs["--bake-params"]), "--images", *paths,
         "--texts", *TEXTS, "--batch-size", "3", "--output", str(run_dir / "feats.npz")],
        cwd=run_dir, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(res.stdout.strip().splitlines()) == len(paths)
    got = np.load(run_dir / "feats.npz")

    model = cio.build_model(loaded)
    images = np.stack([eval_image(Path(p).read_bytes(), 32) for p in paths])
    tokens = ClipTokenizer()(TEXTS)
    want_img = np.asarray(jax.jit(lambda x: model.encode_image(x))(images))
    want_txt = np.asarray(jax.jit(lambda x: model.encode_text(x))(tokens))
    np.testing.assert_array_equal(got["tokens"], tokens)
    # 5 images in batches of 3 + 2 and 4 texts in 3 + 1: the symbolic batch ran with several sizes.
    np.testing.assert_allclose(got["image_features"], want_img, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["text_features"], want_txt, rtol=1e-5, atol=1e-5)

    # Parameters passed as an argument (params.npz), in-process, two batch sizes.
    d = outs["--pass-params"]
    spec = json.loads((d / "export_spec.json").read_text())
    img_fn = jax.export.deserialize(bytearray((d / spec["image"]["file"]).read_bytes()))
    params = dict(np.load(d / "params.npz"))
    for n in (2, 5):
        np.testing.assert_allclose(np.asarray(img_fn.call(params, images[:n])), want_img[:n],
                                   rtol=1e-5, atol=1e-5)


def test_jax_export_llip_has_pair_function(tmp_path):
    llip = pytest.importorskip("metaclip_jax.models.llip")
    import jax

    cfg = llip.get_llip_config("llip-test-tiny")
    rng = np.random.default_rng(1)
    flat = {k: (0.05 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in cio.flatten_params(cio.abstract_params("llip", cfg)).items()}
    loaded = cio.LoadedModel("llip", cfg, cio.unflatten_params(flat), "random")
    out = ex.export_jax(loaded, tmp_path / "llip")
    spec = json.loads((out / "export_spec.json").read_text())
    fn = {n: jax.export.deserialize(bytearray((out / spec[n]["file"]).read_bytes()))
          for n in ("image", "text", "pair")}
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    tokens = ClipTokenizer()(["a cat", "a dog"])
    logits = fn["pair"].call(*fn["image"].call(images), *fn["text"].call(tokens))
    model = cio.build_model(loaded)
    ref = jax.jit(lambda x, t: model.pair_logits(*model.encode_image_tokens(x), *model.encode_text_query(t)))(
        images, tokens)
    assert logits.shape == (3, 2)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), rtol=1e-5, atol=1e-5)
