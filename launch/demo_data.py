"""Synthetic image-caption world for the demo: a long-tailed pool, its concept metadata, held-out eval sets.

Everything is a pure function of ``(seed, sizes)``; nothing is downloaded.

- **Images**: one to three copies of a coloured shape (6 colours x 5 shapes) on a noisy dark background,
  drawn at twice the size and box-downsampled (anti-aliased), saved as PNG. Single objects sit at one of five
  positions (left, right, top, bottom, center); two or three objects are scattered.
- **Pool** (``pool/pool-{i}.tar``, webdataset: ``key.png`` + ``key.json`` with ``url`` and ``caption``): the
  colour x shape combinations follow a Zipf law (rank r has weight 1 / r^zipf over a seeded ranking), so a
  few combinations dominate and the tail is thin. Captions come from varied templates with noise: typos,
  extra words, UPPER/Title case, punctuation. A share of the pairs are noise (a random blob image with an
  unrelated caption) that match no concept and are dropped by curation.
- **Metadata** (``metadata.json``): colour words, shape words (singular and plural), count words, position
  words, and the colour-shape bigrams ("red circle", "red circles"): the entries curation matches and
  balances.
- **Held-out evaluation** (never in the pool, drawn with another seed stream):
  ``eval/zeroshot/<colour>_<shape>/`` (an image folder with class subfolders, uniform over the 30 classes) and
  ``eval/retrieval/captions.jsonl`` (images with one clean caption each).

``python -m launch.demo_data --out DIR [--pool N]`` writes it alone; the demo calls :func:`generate`.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40),
           "purple": (150, 60, 205), "orange": (245, 140, 25)}
SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
PLURAL = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
COUNTS = {1: "one", 2: "two", 3: "three"}
POSITIONS = ["left", "right", "top", "bottom", "center"]
CLASSES = [(c, s) for c in COLOURS for s in SHAPES]  # zero-shot classes: colour x shape

TEMPLATES_ONE = [
    "a {c} {s}", "a photo of a {c} {s}", "a {c} {s} on the {p}", "one {c} {s}", "{c} {s} at the {p}",
    "a picture of a {c} {s} in the {p}", "{c} {s}", "a small {c} {s} , {p} side", "drawing of a {c} {s}",
    "the {s} is {c}", "a {s} in {c}", "{c} {s} clipart",
]
TEMPLATES_MANY = [
    "{n} {c} {ss}", "a photo of {n} {c} {ss}", "{n} {c} {ss} on a dark background", "some {c} {ss}",
    "a picture with {n} {c} {ss}", "{c} {ss} , {n} of them", "{n} little {c} {ss}",
]
EXTRA_WORDS = ["hd", "stock photo", "free download", "#shapes", "nice", "wallpaper", "image", "vector art",
               "best", "new", "cute", "simple", "4k"]
NOISE_WORDS = ["sunset", "beach", "holiday", "cheap", "sale", "buy", "now", "my", "vacation", "family",
               "dinner", "IMG", "DSC", "2019", "summer", "party", "logo", "text", "screenshot", "meme", "lol",
               "birthday", "cake", "car", "house", "garden", "cat", "dog", "funny", "video"]

EVAL_TEMPLATES = ["a photo of a {c}.", "a {c}.", "a drawing of a {c}.", "{c}"]


def metadata_entries() -> list[str]:
    """The concept list curation matches (MetaCLIP-style metadata: unigrams and bigrams)."""
    out = list(COLOURS) + SHAPES + [PLURAL[s] for s in SHAPES] + list(COUNTS.values()) + POSITIONS
    out += [f"{c} {s}" for c, s in CLASSES] + [f"{c} {PLURAL[s]}" for c, s in CLASSES]
    return out


def class_name(c: str, s: str) -> str:
    return f"{c} {s}"


# ----------------------------------------------------------------------------------------------- drawing

def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    raise ValueError(shape)


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        q = r * 0.85
        d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif shape == "cross":
        w = r * 0.35
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        d.polygon(_polygon(shape, cx, cy, r), fill=fill)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    base = rng.integers(10, 90)
    tint = rng.integers(-12, 13, 3)
    arr = np.clip(base + tint + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _centres(rng: np.random.Generator, count: int, pos: str | None, canvas: int, r: float
             ) -> list[tuple[float, float]]:
    lo, hi, mid = r + 2, canvas - r - 2, canvas / 2
    if count == 1:
        j = lambda: rng.uniform(-canvas * 0.1, canvas * 0.1)
        edge = lambda a: rng.uniform(a, a + canvas * 0.08)
        if pos == "left":
            return [(edge(lo), mid + j())]
        if pos == "right":
            return [(canvas - edge(lo), mid + j())]
        if pos == "top":
            return [(mid + j(), edge(lo))]
        if pos == "bottom":
            return [(mid + j(), canvas - edge(lo))]
        return [(mid + j() * 0.5, mid + j() * 0.5)]
    pts: list[tuple[float, float]] = []
    for _ in range(200):
        p = (rng.uniform(lo, hi), rng.uniform(lo, hi))
        if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 > (2.1 * r) ** 2 for q in pts):
            pts.append(p)
            if len(pts) == count:
                break
    return pts


def render(rng: np.random.Generator, colour: str, shape: str, count: int, pos: str | None,
           size: int) -> bytes:
    """PNG bytes of ``count`` copies of a ``colour`` ``shape`` (drawn at 2x, box-downsampled)."""
    canvas = 2 * size
    img = _background(rng, canvas)
    d = ImageDraw.Draw(img)
    r = canvas * (rng.uniform(0.17, 0.23) if count == 1 else rng.uniform(0.11, 0.14))
    base = np.array(COLOURS[colour])
    for cx, cy in _centres(rng, count, pos, canvas, r):
        fill = tuple(int(v) for v in np.clip(base + rng.integers(-15, 16, 3), 0, 255))
        _draw_shape(d, shape, cx, cy, r * rng.uniform(0.9, 1.1), fill)
    buf = io.BytesIO()
    img.reduce(2).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def render_noise(rng: np.random.Generator, size: int) -> bytes:
    """A random blob image (no concept)."""
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- captions

def clean_caption(rng: np.random.Generator, colour: str, shape: str, count: int, pos: str | None) -> str:
    if count == 1:
        t = TEMPLATES_ONE[rng.integers(len(TEMPLATES_ONE))]
        if "{p}" in t and pos is None:
            t = "a {c} {s}"
        return t.format(c=colour, s=shape, p=pos)
    t = TEMPLATES_MANY[rng.integers(len(TEMPLATES_MANY))]
    return t.format(c=colour, ss=PLURAL[shape], n=COUNTS[count])


def _typo(rng: np.random.Generator, word: str) -> str:
    if len(word) < 3:
        return word
    i = int(rng.integers(len(word) - 1))
    kind = rng.integers(3)
    if kind == 0:  # swap
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:  # drop
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]  # double


def add_noise(rng: np.random.Generator, caption: str) -> str:
    """Typos, extra words, casing and punctuation, each with its own probability."""
    words = caption.split(" ")
    if rng.random() < 0.12:
        k = int(rng.integers(len(words)))
        words[k] = _typo(rng, words[k])
    if rng.random() < 0.3:
        extra = EXTRA_WORDS[rng.integers(len(EXTRA_WORDS))]
        words = ([extra] + words) if rng.random() < 0.5 else (words + [extra])
    text = " ".join(words)
    u = rng.random()
    if u < 0.06:
        text = text.upper()
    elif u < 0.14:
        text = text.title()
    elif u < 0.3:
        text = text[:1].upper() + text[1:]
    if rng.random() < 0.3:
        text += [".", "!", " !!", "...", " :)"][int(rng.integers(5))]
    return text


def noise_caption(rng: np.random.Generator) -> str:
    n = int(rng.integers(2, 6))
    return " ".join(NOISE_WORDS[i] for i in rng.integers(len(NOISE_WORDS), size=n))


# ----------------------------------------------------------------------------------------------- writers

def zipf_weights(n: int, s: float, seed: int) -> np.ndarray:
    """Weights of the n classes: 1 / rank^s over a seeded random ranking, normalised."""
    ranks = np.random.default_rng([seed, 7]).permutation(n) + 1
    w = 1.0 / ranks.astype(np.float64) ** s
    return w / w.sum()


def _sample_scene(rng: np.random.Generator, weights: np.ndarray | None) -> tuple[str, str, int, str | None]:
    k = int(rng.choice(len(CLASSES), p=weights)) if weights is not None else int(rng.integers(len(CLASSES)))
    colour, shape = CLASSES[k]
    count = int(rng.choice([1, 2, 3], p=[0.6, 0.2, 0.2]))
    pos = POSITIONS[int(rng.integers(len(POSITIONS)))] if count == 1 else None
    return colour, shape, count, pos


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def write_pool_shard(path: str, start: int, stop: int, seed: int, shard: int, size: int, zipf: float,
                     noise_fraction: float) -> dict[str, int]:
    """Pool pairs ``[start, stop)`` as one webdataset tar (its own seed stream); returns per-class counts."""
    weights = zipf_weights(len(CLASSES), zipf, seed)
    rng = np.random.default_rng([seed, 1, shard])
    counts = {class_name(c, s): 0 for c, s in CLASSES} | {"": 0}
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w") as tf:
        for i in range(start, stop):
            key = f"{i:07d}"
            if rng.random() < noise_fraction:
                img, meta, cls = render_noise(rng, size), {
                    "url": f"https://demo.invalid/noise/{key}.png", "caption": noise_caption(rng)}, ""
            else:
                colour, shape, count, pos = _sample_scene(rng, weights)
                caption = add_noise(rng, clean_caption(rng, colour, shape, count, pos))
                cls = class_name(colour, shape)
                img, meta = render(rng, colour, shape, count, pos, size), {
                    "url": f"https://demo.invalid/{colour}-{shape}/{key}.png", "caption": caption}
            _tar_add(tf, f"{key}.png", img)
            _tar_add(tf, f"{key}.json", json.dumps(meta).encode())
            counts[cls] += 1
    os.replace(tmp, path)
    return counts


def _progress(done: int, total: int, t0: float, what: str) -> None:
    rate = done / max(time.time() - t0, 1e-9)
    print(f"[data] {what}: {done}/{total}  {rate:.0f}/s  eta {(total - done) / max(rate, 1e-9):.0f}s",
          file=sys.stderr, flush=True)


def generate(out: str, *, pool: int = 24000, shards: int = 4, zeroshot_per_class: int = 20,
             retrieval: int = 300, size: int = 32, zipf: float = 1.1, noise_fraction: float = 0.12,
             seed: int = 0) -> dict[str, Any]:
    """Write pool shards, metadata and held-out eval sets under ``out``; return the stats (also in
    ``out/data.json``, written last: a rerun with the same arguments returns it without redoing work)."""
    params = dict(pool=pool, shards=shards, zeroshot_per_class=zeroshot_per_class, retrieval=retrieval,
                  size=size, zipf=zipf, noise_fraction=noise_fraction, seed=seed)
    marker = os.path.join(out, "data.json")
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            done = json.load(f)
        if done.get("params") == params:
            return done
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(os.path.join(out, "pool"))
    t0 = time.time()
    with open(os.path.join(out, "metadata.json"), "w", encoding="utf-8") as f:
        json.dump(metadata_entries(), f, indent=0)

    # ---- pool (webdataset tars), one process per core (forked before anything else is loaded)
    per_class = {class_name(c, s): 0 for c, s in CLASSES}
    noise = 0
    bounds = np.linspace(0, pool, shards + 1).astype(int)
    workers = max(1, min(shards, os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as ex:
        futs = [ex.submit(write_pool_shard, os.path.join(out, "pool", f"pool-{s:03d}.tar"), int(bounds[s]),
                          int(bounds[s + 1]), seed, s, size, zipf, noise_fraction) for s in range(shards)]
        done = 0
        for s, fut in enumerate(futs):
            counts = fut.result()
            noise += counts.pop("")
            for k, v in counts.items():
                per_class[k] += v
            done += int(bounds[s + 1] - bounds[s])
            _progress(done, pool, t0, "pool")

    # ---- held-out zero-shot folder (uniform over classes, its own seed stream)
    rng = np.random.default_rng([seed, 2])
    zs = os.path.join(out, "eval", "zeroshot")
    for c, s in CLASSES:
        folder = os.path.join(zs, f"{c}_{s}")
        os.makedirs(folder)
        for j in range(zeroshot_per_class):
            _, _, count, pos = _sample_scene(rng, None)
            with open(os.path.join(folder, f"{j:04d}.png"), "wb") as f:
                f.write(render(rng, c, s, count, pos, size))

    # ---- held-out retrieval set: images with one clean caption each
    rng = np.random.default_rng([seed, 3])
    rt = os.path.join(out, "eval", "retrieval")
    os.makedirs(os.path.join(rt, "images"))
    with open(os.path.join(rt, "captions.jsonl.tmp"), "w", encoding="utf-8") as f:
        for j in range(retrieval):
            colour, shape, count, pos = _sample_scene(rng, None)
            name = f"images/{j:05d}.png"
            with open(os.path.join(rt, name), "wb") as g:
                g.write(render(rng, colour, shape, count, pos, size))
            f.write(json.dumps({"image": name, "captions": [clean_caption(rng, colour, shape, count, pos)]})
                    + "\n")
    os.replace(os.path.join(rt, "captions.jsonl.tmp"), os.path.join(rt, "captions.jsonl"))
    print(f"[data] zero-shot set: {len(CLASSES) * zeroshot_per_class} images, retrieval set: {retrieval} "
          f"images (total {time.time() - t0:.1f}s)", file=sys.stderr, flush=True)

    stats = {"params": params, "pool_pairs": pool, "noise_pairs": noise, "per_class": per_class,
             # in label order: the image folder sorts its class folders by name
             "classes": [class_name(c, s) for c, s in sorted(CLASSES, key=lambda cs: f"{cs[0]}_{cs[1]}")],
             "templates": EVAL_TEMPLATES,
             "zeroshot_images": len(CLASSES) * zeroshot_per_class, "retrieval_images": retrieval,
             "metadata_entries": len(metadata_entries()), "seconds": round(time.time() - t0, 2)}
    with open(marker + ".tmp", "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
    os.replace(marker + ".tmp", marker)
    return stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--pool", type=int, default=24000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(json.dumps(generate(a.out, pool=a.pool, seed=a.seed), indent=2))


if __name__ == "__main__":
    main()
