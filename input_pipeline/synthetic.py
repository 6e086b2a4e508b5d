"""Small helpers to write curated-record ArrayRecord shards (tests, benchmarks, demos).

Production shards come from ``curation.pack``; these helpers write the same schema
(``metaclip_jax.records``) so the pipeline can be exercised without curated data.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

from metaclip_jax import records


def write_array_record(path: str, payloads: Iterable[bytes]) -> int:
    """Write raw byte payloads to one ArrayRecord file (group_size:1 for fast random access)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = path + ".tmp"
    w = ArrayRecordWriter(tmp, "group_size:1")
    n = 0
    for p in payloads:
        w.write(bytes(p))
        n += 1
    w.close()
    os.replace(tmp, path)
    return n


def write_shards(folder: str, items: Sequence[bytes | records.Record], num_shards: int = 1,
                 prefix: str = "train") -> list[str]:
    """Split records (or raw payloads) round-robin-free into ``num_shards`` contiguous shards."""
    os.makedirs(folder, exist_ok=True)
    payloads = [records.encode(x) if isinstance(x, records.Record) else bytes(x) for x in items]
    bounds = np.linspace(0, len(payloads), num_shards + 1).astype(int)
    paths = []
    for s in range(num_shards):
        path = os.path.join(folder, f"{prefix}-{s:05d}-of-{num_shards:05d}.array_record")
        write_array_record(path, payloads[bounds[s]:bounds[s + 1]])
        paths.append(path)
    return paths


def synthetic_image(width: int, height: int, seed: int, fmt: str = "JPEG", mode: str = "RGB",
                    quality: int = 90) -> bytes:
    """A smooth random image (compresses like a photo) encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    noise = rng.integers(-12, 13, (height, width, 3))
    img = Image.fromarray(np.clip(np.asarray(img, np.int32) + noise, 0, 255).astype(np.uint8))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def synthetic_records(n: int, width: int = 64, height: int = 48, texts_per_image: int = 2,
                      keep_prob: float | Sequence[float] = 1.0, seed: int = 0) -> list[records.Record]:
    """``n`` records with distinct captions ``"photo {i} caption {j}"`` and synthetic JPEGs."""
    out = []
    for i in range(n):
        kp = [float(keep_prob)] * texts_per_image if np.isscalar(keep_prob) else list(keep_prob)
        out.append(records.Record(
            uid=f"{i:024x}", url=f"https://example.com/{i}.jpg",
            image=synthetic_image(width, height, seed * 1_000_003 + i),
            texts=[f"photo {i} caption {j}" for j in range(texts_per_image)], keep_prob=kp))
    return out
