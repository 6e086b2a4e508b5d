"""Evaluation data readers: TFDS array_record datasets, image folders, COCO / Flickr caption files.

Every reader is a random-access source: ``len(src)`` and ``src[i] -> {"image": bytes | ndarray, ...}``
with ``label`` (classification) or the image index (retrieval; captions are in ``src.captions``).

``make_eval_iterator`` turns a source into multi-host-safe batches: the example list is padded to a
multiple of the global batch, global batch k holds examples ``[k*G, (k+1)*G)`` in order (process p holds
the p-th contiguous chunk), so every process runs the same number of batches. Padding examples are zeros
with ``mask=False``; ``index`` gives each example's position in the source (-1 for padding), so retrieval
can map embeddings back to ``src.captions``. An image that fails to decode is also returned with
``mask=False`` and counted in ``EvalIterator.bad``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from input_pipeline import transforms

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _read(path: str) -> bytes:
    if "://" in path:
        from etils import epath

        return epath.Path(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


# ------------------------------------------------------------------------------------ classification

class ImageFolderSource:
    """``root/<class>/<image>``: class names sorted -> labels 0..C-1; images sorted within a class."""

    def __init__(self, root: str):
        self.root = root
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not self.classes:
            raise FileNotFoundError(f"no class subfolders in {root}")
        self.items: list[tuple[str, int]] = []
        for label, c in enumerate(self.classes):
            for name in sorted(os.listdir(os.path.join(root, c))):
                if name.lower().endswith(_IMAGE_EXTENSIONS):
                    self.items.append((os.path.join(root, c, name), label))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, label = self.items[i]
        return {"image": _read(path), "label": label}


class TfdsSource:
    """A TFDS dataset prepared as ``array_record`` (no TensorFlow needed): ``tfds.data_source``.

    ``image_key`` / ``label_key`` name the features; ``classes`` are the ClassLabel names when known.
    """

    def __init__(self, name: str, split: str = "test", data_dir: str | None = None,
                 image_key: str = "image", label_key: str = "label"):
        import tensorflow_datasets as tfds

        self._ds = tfds.data_source(name, split=split, data_dir=data_dir)
        self._image_key, self._label_key = image_key, label_key
        self.classes: list[str] | None = None
        try:
            self.classes = list(self._ds.dataset_info.features[label_key].names)
        except Exception:  # features without names, or info unavailable
            self.classes = None

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self._ds[i]
        return {"image": np.asarray(ex[self._image_key]), "label": int(ex[self._label_key])}


# ------------------------------------------------------------------------------------------ retrieval

class CaptionSource:
    """Images with several captions each: ``captions[i]`` belongs to ``image_paths[i]``."""

    def __init__(self, image_paths: Sequence[str], captions: Sequence[Sequence[str]]):
        if len(image_paths) != len(captions):
            raise ValueError("image_paths and captions differ in length")
        self.image_paths = list(image_paths)
        self.captions = [list(c) for c in captions]

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": _read(self.image_paths[i])}

    def flat_captions(self) -> tuple[list[str], np.ndarray]:
        """All captions flattened, and the image index of each (for Recall@k)."""
        texts = [t for caps in self.captions for t in caps]
        owner = np.repeat(np.arange(len(self.captions)), [len(c) for c in self.captions])
        return texts, owner.astype(np.int32)


def coco_captions(annotation_json: str, image_dir: str,
                  image_ids: Sequence[int] | None = None) -> CaptionSource:
    """COCO captions JSON (``images`` + ``annotations``); images ordered by id, captions by annotation id."""
    with open(annotation_json) as f:
        data = json.load(f)
    files = {im["id"]: im["file_name"] for im in data["images"]}
    caps: dict[int, list[tuple[int, str]]] = {i: [] for i in files}
    for a in data["annotations"]:
        if a["image_id"] in caps:
            caps[a["image_id"]].append((a.get("id", 0), a["caption"].strip()))
    ids = sorted(files) if image_ids is None else list(image_ids)
    ids = [i for i in ids if caps.get(i)]
    return CaptionSource([os.path.join(image_dir, files[i]) for i in ids],
                         [[c for _, c in sorted(caps[i])] for i in ids])


def flickr_captions(token_file: str, image_dir: str, split_file: str | None = None) -> CaptionSource:
    """Flickr8k/30k token file (``image.jpg#n<TAB>caption``); ``split_file`` lists the images to keep."""
    caps: dict[str, list[tuple[int, str]]] = {}
    with open(token_file, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            key, _, text = line.partition("\t")
            name, _, n = key.partition("#")
            caps.setdefault(name, []).append((int(n) if n.isdigit() else 0, text.strip()))
    names = sorted(caps)
    if split_file is not None:
        with open(split_file) as f:
            keep = [x.strip() for x in f if x.strip()]
        names = [n for n in keep if n in caps]
    return CaptionSource([os.path.join(image_dir, n) for n in names],
                         [[c for _, c in sorted(caps[n])] for n in names])


# ---------------------------------------------------------------------------------------- batching

def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    return max(1, math.ceil(num_examples / global_batch_size))


def process_indices(num_examples: int, global_batch_size: int, process_index: int,
                    process_count: int) -> np.ndarray:
    """This process's example indices (``-1`` = padding), batch after batch, same count on every process."""
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} not divisible by {process_count} processes")
    per = global_batch_size // process_count
    nb = num_eval_batches(num_examples, global_batch_size)
    idx = (np.arange(nb)[:, None] * global_batch_size + process_index * per + np.arange(per)[None, :])
    idx = idx.reshape(-1)
    return np.where(idx < num_examples, idx, -1).astype(np.int64)


class _EvalExample(grain.transforms.Map):
    def __init__(self, source: Any, image_size: int, has_label: bool):
        self._source, self._size, self._has_label = source, image_size, has_label

    def map(self, index: int) -> dict[str, np.ndarray]:
        out = {"image": np.zeros((self._size, self._size, 3), np.uint8), "index": np.int32(index),
               "mask": np.bool_(False), "bad": np.int32(0)}
        if self._has_label:
            out["label"] = np.int32(-1)
        if index < 0:
            return out
        ex = self._source[int(index)]
        try:
            out["image"] = transforms.eval_image(ex["image"], self._size)
        except Exception as e:  # counted, masked out; eval keeps going
            logging.warning("eval image %d unreadable: %s: %s", index, type(e).__name__, e)
            out["bad"] = np.int32(1)
            return out
        out["mask"] = np.bool_(True)
        if self._has_label:
            out["label"] = np.int32(ex["label"])
        return out


class EvalIterator:
    """Yields ``{"image" uint8 [B,S,S,3], "index" int32 [B], "mask" bool [B], "label" int32 [B]?}``.

    Global ``jax.Array``s on ``mesh`` (numpy per-process when ``mesh`` is None). ``num_batches`` is the
    same on every process; ``bad`` counts unreadable images seen so far (this process).
    """

    def __init__(self, dataset: grain.IterDataset, num_batches: int, mesh: Any, global_batch_size: int):
        self._it = iter(dataset)
        self.num_batches = num_batches
        self._mesh, self._global_batch_size = mesh, global_batch_size
        self.bad = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> EvalIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        local = dict(next(self._it))
        self.bad += int(local.pop("bad").sum())
        if self._mesh is None:
            return local
        from input_pipeline.train_data import to_global

        return to_global(local, self._mesh, self._global_batch_size)

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def make_eval_iterator(source: Any, global_batch_size: int, image_size: int = 224, mesh: Any = None,
                       process_index: int | None = None, process_count: int | None = None,
                       worker_count: int = 0, read_threads: int = 4) -> EvalIterator:
    """Batches of eval-transformed images from any source above (see module docstring)."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    has_label = len(source) > 0 and "label" in source[0]
    idx = process_indices(len(source), global_batch_size, process_index, process_count)
    ds = grain.MapDataset.source(idx.tolist()).map(_EvalExample(source, image_size, has_label))
    ds = ds.batch(global_batch_size // process_count, drop_remainder=False)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4))
    if worker_count > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return EvalIterator(it_ds, num_eval_batches(len(source), global_batch_size), mesh, global_batch_size)


def stack_batches(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-process numpy batches and drop padding (handy in tests and single-host eval)."""
    cat = {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in batches[0]}
    keep = cat["index"] >= 0
    return {k: v[keep] for k, v in cat.items()}
