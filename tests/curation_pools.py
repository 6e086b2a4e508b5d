"""Small generated pools for the curation tests (no network, no ../shared): every format, with bad rows.

Importable both from the main suite and from tests/beam (which runs in .venv-beam without jax/absl).
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import random
import tarfile
from typing import Any

ENTRIES = ["dog", "cat", "New York", "photo", "the", "red", "car", "tree", "house", "beach", "sunset",
           "mountain", "river", "bird", "flower", "York City"] + [f"w{i}" for i in range(60)]
HEAD = ENTRIES[:8]


def write_metadata(path: str, entries: list[str] | None = None) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(entries or ENTRIES, f)
    return path


def make_rows(n: int, seed: int = 0, with_images: bool = False) -> list[dict[str, Any]]:
    """Rows with 1-3 captions; head words are frequent, rare words form the tail."""
    rng = random.Random(seed)
    rows = []
    for r in range(n):
        texts = []
        for _ in range(rng.randint(1, 3)):
            k = rng.randint(1, 5)
            words = [rng.choice(HEAD) if rng.random() < 0.7 else rng.choice(ENTRIES[8:]) for _ in range(k)]
            if rng.random() < 0.1:
                words = ["zzz", "qqq"]  # matches nothing
            texts.append(" ".join(words))
        row: dict[str, Any] = {"url": f"http://img.example/{seed}/{r}.jpg", "caption": texts}
        if with_images:
            row["image"] = b"\xff\xd8\xff" + f"image-{seed}-{r}".encode() * 3
        rows.append(row)
    return rows


def split(rows: list[Any], k: int) -> list[list[Any]]:
    """Split rows into k contiguous, unequal parts (same concatenation)."""
    n = len(rows)
    cuts = sorted({0, n, *[(n * (j * j + 1)) // (k * k + 1) for j in range(1, k)]})
    return [rows[a:b] for a, b in itertools.pairwise(cuts)]


def write_jsonl(path: str, rows: list[dict[str, Any]], bad_lines: int = 0) -> str:
    with open(path, "wb") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({k: v for k, v in r.items() if k != "image"}).encode() + b"\n")
            if i < bad_lines:
                f.write(b"{not json\n")
    return path


def write_jsonl_pool(folder: str, rows: list[dict[str, Any]], n_files: int, bad_lines: int = 0) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    return [write_jsonl(os.path.join(folder, f"part-{k:03d}.jsonl"), part, bad_lines)
            for k, part in enumerate(split(rows, n_files))]


def write_tar(path: str, rows: list[dict[str, Any]], key_prefix: str = "") -> str:
    """img2dataset-style webdataset shard: key.jpg, key.json (url, caption), key.txt (first caption)."""
    with tarfile.open(path, "w") as tf:
        for i, r in enumerate(rows):
            key = f"{key_prefix}{i:06d}"
            members = {"jpg": r["image"], "json": json.dumps({"url": r["url"], "caption": r["caption"][1:],
                                                               "key": key}).encode(),
                       "txt": r["caption"][0].encode()}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def wat_record(target: str, links: list[dict[str, Any]]) -> bytes:
    """One WAT metadata record (WARC headers + JSON envelope), as CommonCrawl writes it."""
    env = {"Envelope": {"WARC-Header-Metadata": {"WARC-Target-URI": target},
                        "Payload-Metadata": {"HTTP-Response-Metadata": {"HTML-Metadata": {"Links": links}}}}}
    body = json.dumps(env).encode()
    head = (f"WARC/1.0\r\nWARC-Type: metadata\r\nWARC-Target-URI: {target}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body + b"\r\n\r\n"


def write_wat(path: str, records: list[bytes]) -> str:
    """Multi-member gzip, one member per record (as CommonCrawl WAT files)."""
    with open(path, "wb") as f:
        f.write(gzip.compress(b"WARC/1.0\r\nWARC-Type: warcinfo\r\n\r\nsoftware: test\r\n\r\n"))
        for rec in records:
            f.write(gzip.compress(rec))
    return path
