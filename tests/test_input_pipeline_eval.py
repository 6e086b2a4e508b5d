"""Evaluation readers: TFDS array_record, image folders, COCO / Flickr captions; multi-host padding."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from input_pipeline import eval_data, synthetic


def _png(value: int, w: int = 20, h: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _all(src, size=8, gb=4, pc=1):
    out = []
    for p in range(pc):
        it = eval_data.make_eval_iterator(src, gb, size, None, p, pc)
        batches = list(it)
        assert len(batches) == it.num_batches == eval_data.num_eval_batches(len(src), gb)
        out.append(batches)
    return out


def test_image_folder_labels_sorted_and_padding(tmp_path):
    for c, v in [("zebra", 200), ("ant", 10), ("cat", 100)]:
        (tmp_path / c).mkdir()
        for k in range(3 if c != "cat" else 2):
            (tmp_path / c / f"{k}.png").write_bytes(_png(v + k))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    src = eval_data.ImageFolderSource(str(tmp_path))
    assert src.classes == ["ant", "cat", "zebra"] and len(src) == 8
    per_process = _all(src, gb=6, pc=2)  # 8 examples, 2 global batches of 6, 3 per process
    for batches in per_process:
        assert len(batches) == 2 and all(b["image"].shape == (3, 8, 8, 3) for b in batches)
    merged = eval_data.stack_batches([b for batches in per_process for b in batches])
    assert sorted(merged["index"].tolist()) == list(range(8)) and merged["mask"].all()
    order = np.argsort(merged["index"])
    assert merged["label"][order].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert abs(int(merged["image"][order][5].mean()) - 200) <= 1
    pads = np.concatenate([b["mask"] for batches in per_process for b in batches])
    assert (~pads).sum() == 4


def test_global_eval_arrays_on_mesh(tmp_path):
    import jax

    from metaclip_jax.sharding import make_mesh

    (tmp_path / "a").mkdir()
    for k in range(3):
        (tmp_path / "a" / f"{k}.png").write_bytes(_png(k))
    mesh = make_mesh(data=2, devices=jax.devices()[:2])
    it = eval_data.make_eval_iterator(eval_data.ImageFolderSource(str(tmp_path)), 4, 8, mesh, 0, 1)
    b = next(it)
    assert b["image"].shape == (4, 8, 8, 3) and b["mask"].sharding.spec[0] == "data"
    assert np.asarray(b["mask"]).tolist() == [True, True, True, False]
    assert np.asarray(b["index"]).tolist() == [0, 1, 2, -1]


def test_coco_and_flickr_captions(tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    for i in (1, 2, 3):
        (imgs / f"{i:012d}.jpg").write_bytes(synthetic.synthetic_image(24, 20, i))
    coco = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (3, 1, 2)],
            "annotations": [{"id": 10 + k, "image_id": 1 + k % 3, "caption": f" cap {k} "} for k in range(7)]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    src = eval_data.coco_captions(str(tmp_path / "coco.json"), str(imgs))
    assert len(src) == 3 and src.captions[0] == ["cap 0", "cap 3", "cap 6"]
    texts, owner = src.flat_captions()
    assert len(texts) == 7 and owner.tolist() == [0, 0, 0, 1, 1, 2, 2]
    (batches,) = _all(src, gb=2)
    assert len(batches) == 2 and batches[1]["mask"].tolist() == [True, False]
    assert "label" not in batches[0]

    lines = [f"{i:012d}.jpg#{n}\tcaption {i}-{n}" for i in (2, 1) for n in (1, 0)]
    (tmp_path / "flickr.txt").write_text("\n".join(lines) + "\n")
    fl = eval_data.flickr_captions(str(tmp_path / "flickr.txt"), str(imgs))
    assert fl.image_paths[0].endswith("000000000001.jpg")
    assert fl.captions == [["caption 1-0", "caption 1-1"], ["caption 2-0", "caption 2-1"]]
    (tmp_path / "split.txt").write_text("000000000002.jpg\n")
    split = eval_data.flickr_captions(str(tmp_path / "flickr.txt"), str(imgs), str(tmp_path / "split.txt"))
    assert len(split) == 1


def test_unreadable_eval_image_is_masked_and_counted(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "0.png").write_bytes(_png(5))
    (tmp_path / "a" / "1.png").write_bytes(b"broken")
    it = eval_data.make_eval_iterator(eval_data.ImageFolderSource(str(tmp_path)), 2, 8, None, 0, 1)
    b = next(it)
    assert b["mask"].tolist() == [True, False] and it.bad == 1


def test_tfds_array_record_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyEvalSet(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        # TFDS looks for a checksums file beside a packaged builder's module (and needs the optional
        # importlib_resources for that); a builder living in __main__ skips the lookup.
        __module__ = "__main__"

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["dark", "light"])}))

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            # Encoded bytes (a file object), not arrays: encoding arrays would need TensorFlow.
            for i in range(5):
                yield i, {"image": io.BytesIO(_png(40 * i)), "label": int(i >= 3)}

    TinyEvalSet(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    src = eval_data.TfdsSource("tiny_eval_set", split="test", data_dir=str(tmp_path))
    assert len(src) == 5 and src.classes == ["dark", "light"]
    merged = eval_data.stack_batches(_all(src, gb=4)[0])
    assert sorted(merged["index"].tolist()) == list(range(5))
    # label follows the pixel value written with it, whatever order TFDS shuffled the examples into
    values = merged["image"].reshape(5, -1).mean(1)
    assert all(lab == int(v >= 120) for lab, v in zip(merged["label"], values))
