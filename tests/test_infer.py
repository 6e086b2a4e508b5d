"""``python -m metaclip_jax.infer`` on a generated image folder with a random test-tiny model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from metaclip_jax import checkpoint_io as cio
from metaclip_jax import export as ex
from metaclip_jax import infer
from metaclip_jax.models import presets

LABELS = ["cat", "dog", "red car"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    cfg = presets.get_config("test-tiny")
    rng = np.random.default_rng(0)
    flat = {k: (0.05 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in cio.flatten_params(cio.abstract_params("clip", cfg)).items()}
    ckpt = cio.save_params(root / "ckpt", cio.LoadedModel("clip", cfg, cio.unflatten_params(flat), "random"))
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for i in range(7):   # 7 readable images (2 batches of 4, the last padded), in two folders
        im = Image.new("RGB", (30 + 9 * i, 60 - 4 * i), (30 * i, 200 - 20 * i, 120))
        ImageDraw.Draw(im).ellipse((2, 2, 12 + 2 * i, 14), fill=(255, 255 - 30 * i, 0))
        im.save(images / ("sub" if i % 2 else "") / f"im{i}.{'png' if i < 4 else 'jpg'}")
    (images / "broken.jpg").write_bytes(b"not an image")
    (images / "notes.txt").write_text("ignored")
    return root, ckpt, images


def _common(ckpt):
    return ["--checkpoint", str(ckpt), "--batch-size", "4"]


def test_embed_images_and_texts(setup, capsys):
    root, ckpt, images = setup
    out = root / "img.npy"
    assert infer.main(["embed-images", *_common(ckpt), "--images", str(images), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 of 8 images" in err and "broken.jpg" in err
    emb = np.load(out)
    paths = Path(infer.paths_file(str(out))).read_text().splitlines()
    assert emb.shape == (7, 32) and len(paths) == 7 and not any("broken" in p for p in paths)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)

    # A list file gives the same rows; a jax_export folder gives the same embeddings.
    (root / "list.txt").write_text("\n".join(paths[:3]) + "\n")
    assert infer.main(["embed-images", *_common(ckpt), "--images", str(root / "list.txt"),
                       "--output", str(root / "few.npy")]) == 0
    np.testing.assert_allclose(np.load(root / "few.npy"), emb[:3], rtol=1e-5, atol=1e-6)
    ex.export_jax(cio.load_params(ckpt), root / "exported")
    assert infer.main(["embed-images", *_common(root / "exported"), "--images", str(images),
                       "--output", str(root / "exp.npy")]) == 0
    np.testing.assert_allclose(np.load(root / "exp.npy"), emb, rtol=1e-5, atol=1e-5)

    (root / "texts.txt").write_text("a photo of a cat\n\na red car\nthree dogs\n")
    assert infer.main(["embed-texts", *_common(ckpt), "--texts", str(root / "texts.txt"),
                       "--output", str(root / "txt.npy")]) == 0
    assert np.load(root / "txt.npy").shape == (3, 32)


def test_classify_and_search(setup, capsys):
    root, ckpt, images = setup
    out = root / "pred.jsonl"
    assert infer.main(["classify", *_common(ckpt), "--images", str(images), "--labels", ",".join(LABELS),
                       "--templates", "a photo of a {}.", "a drawing of a {}.", "--top-k", "2",
                       "--output", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 7
    for r in rows:
        assert r["label"] in LABELS and len(r["topk"]) == 2 and r["topk"][0][0] == r["label"]
        assert 1 / 3 <= r["prob"] <= 1 and r["topk"][0][1] >= r["topk"][1][1]

    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    assert infer.main(["classify", *_common(ckpt), "--images", str(images), "--labels-file",
                       str(root / "labels.txt"), "--output", str(root / "pred.csv")]) == 0
    with open(root / "pred.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["label"] for r in csv_rows][:1] and len(csv_rows) == 7
    # Single-template CSV and the two-template JSONL agree on the image order.
    assert [r["image"] for r in csv_rows] == [r["image"] for r in rows]

    capsys.readouterr()
    assert infer.main(["search", *_common(ckpt), "--images", str(images), "--query", "a red car",
                       "a dog", "-k", "3"]) == 0
    hits = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [h["rank"] for h in hits] == [1, 2, 3, 1, 2, 3]
    assert {h["query"] for h in hits} == {"a red car", "a dog"}
    scores = [h["score"] for h in hits[:3]]
    assert scores == sorted(scores, reverse=True)


def test_errors_are_messages(setup, capsys):
    root, ckpt, _ = setup
    assert infer.main(["embed-images", *_common(root / "missing"), "--images", str(root),
                       "--output", str(root / "x.npy")]) == 2
    assert "not found" in capsys.readouterr().err
