"""Input pipeline throughput: ArrayRecord -> ready 224 px batches, ours vs a plain PIL + numpy loop.

    python -m benchmarks.input_pipeline [--quick]

Data: the real COCO JPEGs in ../shared/data/coco_mini when present (packed into a temporary ArrayRecord
file with their captions), else generated 640x480 JPEGs. Both sides do the same work per example: read the
record, msgpack-decode it, draw a caption, decode the JPEG, RandomResizedCrop(0.9-1, 3/4-4/3, bicubic) to
224, tokenize (CLIP BPE, 77) and stack into a batch. The plain loop is what a PyTorch-style loader does per
worker (full decode, crop, resize, float32 normalise); ours is the Grain pipeline (reduced-size JPEG decode,
uint8 output normalised on device). Rows report wall-clock images/s and images per CPU-second (all threads and
worker processes of the loader), which is images/s per fully used core and does not move with the load of
other jobs on a shared machine, and the fidelity of each row's transform: mean |difference| in 8-bit levels
from torchvision's exact RandomResizedCrop pixels (the plain loop) on the same crops. The last line is the
headline ratio of ours (worker_count=0) to the plain loop in images per CPU-second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "coco_mini")


def _mark_flags_parsed() -> None:
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _build_records(folder: str, n_generated: int, synthetic_only: bool = False):
    from input_pipeline import synthetic
    from metaclip_jax import records

    recs, origin = [], ""
    shared = os.path.normpath(SHARED)
    if not synthetic_only and os.path.exists(os.path.join(shared, "captions.json")):
        with open(os.path.join(shared, "captions.json")) as f:
            items = json.load(f)
        for it in items:
            with open(os.path.join(shared, it["file"]), "rb") as f:
                recs.append(records.Record(uid=str(it["image_id"]), image=f.read(), texts=it["captions"]))
        origin = f"{len(recs)} real COCO JPEGs from {shared}"
    else:
        recs = [records.Record(uid=str(i), image=synthetic.synthetic_image(640, 480, i, quality=90),
                               texts=[f"a generated photo number {i}", f"synthetic image {i} of a scene"])
                for i in range(n_generated)]
        origin = f"{n_generated} generated 640x480 JPEGs"
    sizes = [len(r.image) for r in recs]
    paths = synthetic.write_shards(folder, recs, 1, prefix="bench")
    return paths, origin, float(np.mean(sizes)), [r.image for r in recs]


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its live child processes (Grain workers; Linux /proc)."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    me = os.getpid()
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


class _Timer:
    """Wall and CPU seconds of a timed region."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), _cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = _cpu_seconds() - self.cpu


def plain_loop(paths, batch_size: int, n_batches: int, seed: int = 0) -> tuple[float, float]:
    """A PyTorch-Dataset-style loop on one core: full decode, crop, resize, float32 normalise, stack."""
    import io

    from array_record.python.array_record_module import ArrayRecordReader
    from PIL import Image

    from input_pipeline import transforms
    from metaclip_jax import records
    from metaclip_jax.tokenizer import ClipTokenizer

    tok = ClipTokenizer(context_length=77, truncate="eot")
    reader = ArrayRecordReader(paths[0])
    n = reader.num_records()
    rng = np.random.default_rng(seed)
    mean = np.asarray(transforms.OPENAI_MEAN, np.float32)
    std = np.asarray(transforms.OPENAI_STD, np.float32)

    def one_batch(k):
        imgs, caps = [], []
        for j in range(batch_size):
            idx = (k * batch_size + j) % n
            rec = records.decode(reader.read([idx])[0])
            caps.append(rec.texts[int(rng.integers(len(rec.texts)))])
            img = Image.open(io.BytesIO(rec.image)).convert("RGB")
            top, left, h, w = transforms.random_resized_crop_params(img.size[0], img.size[1], rng)
            img = img.crop((left, top, left + w, top + h)).resize((224, 224), Image.Resampling.BICUBIC)
            imgs.append((np.asarray(img, np.float32) / 255.0 - mean) / std)
        return {"image": np.stack(imgs), "text": tok(caps)}

    one_batch(0)  # warm-up
    with _Timer() as t:
        for k in range(1, n_batches + 1):
            one_batch(k)
    n = n_batches * batch_size
    return n / t.wall, n / t.cpu


_TRANSFORM_KEYS = {"draft_decode": "draft", "draft_min_scale": "draft_min_scale",
                   "resize_backend": "resize_backend", "jpeg_decoder": "jpeg_decoder"}


def _crops(images: list[bytes], **transform_kw) -> list[np.ndarray]:
    """Every image through ``train_image`` at 224 px with the pipeline's crop draws for (seed 0, epoch 0)."""
    from input_pipeline import train_data, transforms

    return [transforms.train_image(data, 224, train_data.example_rng(0, 0, i), **transform_kw)
            for i, data in enumerate(images)]


def fidelity(images: list[bytes], exact: list[np.ndarray], kw: dict | None) -> float:
    """Mean |ours - torchvision| in 8-bit levels over ``images``, same crop draws (0 for the plain loop).

    ``exact``: torchvision's pixels for the same crops (``_crops`` with the exact settings), computed once.
    """
    from input_pipeline import train_data

    if kw is None:
        return 0.0
    cfg = train_data.TrainDataConfig(**{k: v for k, v in kw.items() if k in _TRANSFORM_KEYS})
    mine = _crops(images, **{arg: getattr(cfg, key) for key, arg in _TRANSFORM_KEYS.items()})
    diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)).mean() for a, b in zip(mine, exact, strict=True)]
    return float(np.mean(diffs))


def ours(paths, batch_size: int, n_batches: int, **kw) -> tuple[float, float]:
    from input_pipeline import train_data

    cfg = dict(paths=paths, global_batch_size=batch_size, image_size=224, seed=0, prefetch=2)
    cfg.update(kw)
    it = train_data.make_train_iterator(cfg, None, 0, 1)
    for _ in range(2 if kw.get("worker_count", 0) else 1):
        next(it)  # warm-up (worker start-up, tokenizer build)
    with _Timer() as t:
        for _ in range(n_batches):
            next(it)
    it.close()
    n = n_batches * batch_size
    return n / t.wall, n / t.cpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer batches (under a minute)")
    ap.add_argument("--synthetic", action="store_true", help="generated JPEGs even when coco_mini exists")
    args = ap.parse_args(argv)
    _mark_flags_parsed()
    batch = 32
    n_batches, rounds = (4, 2) if args.quick else (16, 3)
    with tempfile.TemporaryDirectory() as tmp:
        paths, origin, mean_bytes, images = _build_records(tmp, 128 if args.quick else 256, args.synthetic)
        print(f"data: {origin}; mean JPEG {mean_bytes / 1024:.0f} KiB; batch {batch}, {n_batches} timed "
              f"batches per row, best of {rounds} interleaved rounds; os.cpu_count()={os.cpu_count()}")
        variants = [
            ("plain PIL+numpy loop (full decode, float32)", 1, None),
            ("ours, workers=0, uint8 (defaults)", 1, dict(worker_count=0)),
            ("ours, workers=0, float32", 1, dict(worker_count=0, image_dtype="float32")),
            ("ours, workers=0, uint8, draft_min_scale=1.0", 1, dict(worker_count=0, draft_min_scale=1.0)),
            ("ours, workers=0, uint8, resize_backend=pil", 1, dict(worker_count=0, resize_backend="pil")),
            ("ours, workers=0, uint8, jpeg_decoder=pil", 1, dict(worker_count=0, jpeg_decoder="pil")),
            ("ours, workers=0, uint8, no draft, pil resize", 1,
             dict(worker_count=0, draft_decode=False, resize_backend="pil")),
            ("ours, workers=1, uint8 (defaults)", 1, dict(worker_count=1)),
            ("ours, workers=2, uint8 (defaults)", 2, dict(worker_count=2)),
        ]
        best = [(0.0, 0.0)] * len(variants)
        for _ in range(rounds):  # interleaved: a noisy neighbour slows every row alike
            for k, (_, _, kw) in enumerate(variants):
                # Worker rows time more batches: their buffers (workers x buffer + prefetch) start full.
                n = n_batches * ((2 if args.quick else 3) if kw and kw.get("worker_count") else 1)
                rate = plain_loop(paths, batch, n) if kw is None else ours(paths, batch, n, **kw)
                best[k] = (max(best[k][0], rate[0]), max(best[k][1], rate[1]))
        images = images[:64] if args.quick else images
        exact = _crops(images, draft=False, resize_backend="pil", jpeg_decoder="pil")
        fid = [fidelity(images, exact, kw) for _, _, kw in variants]
    base = best[0][1]
    print("img/s: wall clock; img/cpu-s: images per CPU-second of the loader (all its threads and worker")
    print("processes), i.e. images/s per fully used core, robust to neighbours' load. Ratios use img/cpu-s.")
    print("|diff|: mean absolute difference from torchvision's RandomResizedCrop pixels, in 8-bit levels.")
    print(f"{'pipeline':48s} {'cores':>5s} {'img/s':>8s} {'img/cpu-s':>10s} {'vs plain':>9s} {'|diff|':>7s}")
    for (name, cores, _), (wall, per_cpu), f in zip(variants, best, fid):
        print(f"{name:48s} {cores:5d} {wall:8.1f} {per_cpu:10.1f} {per_cpu / base:8.2f}x {f:7.2f}")
    print(f"headline: speedup_vs_plain_loop {best[1][1] / base:.2f} x (target 2.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
