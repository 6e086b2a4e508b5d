"""Packing: curated records -> ArrayRecord shards + manifest.json; URL lists; joining downloaded images.

- ``pack_shard`` writes one ArrayRecord file per input shard (``metaclip_jax.records.encode`` payloads,
  ``group_size:1`` for random access by Grain) and, for pools without images, a curated URL list
  (parquet: uid, url, text) for img2dataset.
- ``write_manifest`` writes ``manifest.json``: counts, config, schema version, shard list, code version.
- ``join_downloaded`` reads img2dataset output (parquet or webdataset shards, with ``key``/``url`` and
  optionally the ``uid`` column saved through ``--save_additional_columns '["uid"]'``), fills image bytes
  into the curated records (matched by uid, else by sha224(url)) and writes new ArrayRecord shards.

All files are written atomically (tmp + rename); each output file has a done marker with a fingerprint,
so a killed run picks up where it stopped.
"""

from __future__ import annotations

import json
import os
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from curation.config import fingerprint
from curation.sources import IMAGE_EXTS, SourceConfig, SourceStats, iter_tar_samples
from curation.stages import (
    ShardMatch,
    atomic_json,
    atomic_write,
    code_version,
    read_images,
    read_json,
    shard_records,
)
from metaclip_jax.records import SCHEMA_VERSION, Record, decode, encode, uid_for_url

MANIFEST = "manifest.json"
ENTRY_COUNTS = "entry_counts.npy"  # uint64 global counts, next to the shards
ENTRY_PROBS = "entry_probs.npy"  # float32 p[e] = t / max(count, t), for online balancing


def shard_name(prefix: str, i: int, n: int) -> str:
    return f"{prefix}-{i:05d}-of-{n:05d}.array_record"


def write_array_record(path: str, payloads: list[bytes], options: str = "group_size:1") -> None:
    """Write encoded records to one ArrayRecord file, atomically."""
    from array_record.python.array_record_module import ArrayRecordWriter

    def w(tmp: str) -> None:
        writer = ArrayRecordWriter(tmp, options)
        for p in payloads:
            writer.write(p)
        writer.close()
    atomic_write(path, w)


def read_array_record(path: str) -> list[bytes]:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path)
    try:
        return list(reader.read_all()) if reader.num_records() else []
    finally:
        reader.close()


def write_url_list(path: str, records: list[Record]) -> int:
    """Curated URL list for img2dataset: one row per distinct uid (uid, url, text). Returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    seen: set[str] = set()
    rows = []
    for r in records:
        if r.uid in seen or not r.url:
            continue
        seen.add(r.uid)
        rows.append(r)
    table = pa.table({"uid": pa.array([r.uid for r in rows], pa.string()),
                      "url": pa.array([r.url for r in rows], pa.string()),
                      "text": pa.array([r.texts[0] if r.texts else "" for r in rows], pa.string())})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return len(rows)


def pack_shard(sm: ShardMatch, sel: np.ndarray, keep: np.ndarray, mode: str, input_path: str,
               source: SourceConfig, out_path: str, options: str, url_list_path: str = "") -> dict[str, Any]:
    """Write one ArrayRecord shard (and optionally its URL list). Returns its manifest entry."""
    rows = {int(r) for r in sel[:, 0]} if len(sel) else set()
    images = read_images(input_path, source, rows) if sm.has_image and rows else {}
    records = list(shard_records(sm, sel, keep, mode, images))
    payloads = [encode(r) for r in records]
    write_array_record(out_path, payloads, options)
    entry: dict[str, Any] = {"file": os.path.basename(out_path), "records": len(records),
                             "images": sum(1 for r in records if r.image),
                             "texts": sum(len(r.texts) for r in records),
                             "bytes": int(sum(len(p) for p in payloads))}
    if url_list_path:
        entry["url_list"] = os.path.relpath(url_list_path, os.path.dirname(out_path))
        entry["urls"] = write_url_list(url_list_path, records)
    return entry


def write_manifest(out_dir: str, *, config: dict[str, Any], shards: list[dict[str, Any]],
                   counts: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    manifest = {
        "format": "array_record",
        "record_encoding": "msgpack (metaclip_jax.records)",
        "schema_version": SCHEMA_VERSION,
        "code_version": code_version(),
        "counts": counts,
        "config": config,
        "shards": shards,
        **(extra or {}),
    }
    atomic_json(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def finish_manifest(out_dir: str, *, config: dict[str, Any], summaries: list[dict[str, Any]],
                    shards: list[dict[str, Any]], balance: dict[str, Any], source_total: SourceStats,
                    runner: str) -> dict[str, Any]:
    """The manifest of a curation run (shared by the local runner and the Beam pipeline)."""
    counts = {
        "input_files": len(summaries),
        "rows_seen": source_total.rows_seen,
        "rows": sum(s["rows"] for s in summaries),
        "texts": sum(s["texts"] for s in summaries),
        "matched_texts": sum(s["matched_texts"] for s in summaries),
        "matches": sum(s["matches"] for s in summaries),
        "records": sum(s["records"] for s in shards),
        "records_with_image": sum(s["images"] for s in shards),
        "urls": sum(s.get("urls", 0) for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
    }
    extra = {"runner": runner, "balance": balance, "entry_counts": ENTRY_COUNTS, "entry_probs": ENTRY_PROBS,
             "bad_input": source_total.to_dict(),
             "error_rate": source_total.error_rate,
             "url_lists": [s["url_list"] for s in shards if "url_list" in s]}
    return write_manifest(out_dir, config=config, shards=shards, counts=counts, extra=extra)


def read_manifest(out_dir: str) -> dict[str, Any]:
    return read_json(os.path.join(out_dir, MANIFEST))


def iter_records(out_dir: str) -> Iterator[Record]:
    """All records of a packed folder, in manifest shard order."""
    for s in read_manifest(out_dir)["shards"]:
        for payload in read_array_record(os.path.join(out_dir, s["file"])):
            yield decode(payload)


# ----------------------------------------------------------------------------------------------------------
# Joining img2dataset downloads


def _downloaded_files(download_dir: str) -> list[str]:
    out = []
    for root, _, files in os.walk(download_dir):
        for f in files:
            if f.endswith((".parquet", ".tar")) and not f.startswith("."):
                out.append(os.path.join(root, f))
    return sorted(out)


def _iter_downloaded(path: str, image_column: str, with_images: bool,
                     stats: Counter) -> Iterator[tuple[str, bytes | None]]:
    """(uid, image bytes or None) for every successfully downloaded sample of one img2dataset file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            names = set(pf.schema_arrow.names)
            cols = [c for c in ("uid", "url", "status") if c in names]
            if with_images and image_column in names:
                cols.append(image_column)
            for batch in pf.iter_batches(batch_size=1024, columns=cols):
                d = batch.to_pydict()
                for i in range(batch.num_rows):
                    if "status" in d and d["status"][i] not in (None, "success"):
                        continue
                    uid = d["uid"][i] if "uid" in d and d["uid"][i] else (
                        uid_for_url(d["url"][i]) if "url" in d and d["url"][i] else "")
                    if not uid:
                        stats["downloaded_without_uid_or_url"] += 1
                        continue
                    img = d[image_column][i] if with_images and image_column in d else None
                    if with_images and not img:
                        continue
                    yield uid, img
        except Exception:
            stats["unreadable_download_file"] += 1
        return
    want = ("json", *IMAGE_EXTS) if with_images else ("json",)
    try:
        for _, parts in iter_tar_samples(path, want):
            meta: dict[str, Any] = {}
            if "json" in parts:
                try:
                    meta = json.loads(parts["json"])
                except ValueError:
                    meta = {}
            if not isinstance(meta, dict) or meta.get("status", "success") != "success":
                continue
            uid = meta.get("uid") or (uid_for_url(meta["url"]) if meta.get("url") else "")
            img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
            if not uid:
                stats["downloaded_without_uid_or_url"] += 1
            elif not with_images or img:
                yield uid, img
    except (OSError, tarfile.TarError, EOFError, zlib.error):
        stats["unreadable_download_file"] += 1


def join_downloaded(curated_dir: str, download_dir: str, out_dir: str, *, image_column: str = "jpg",
                    options: str = "group_size:1", prefix: str = "joined") -> dict[str, Any]:
    """Fill downloaded image bytes into curated records; one output shard per downloaded file.

    Each curated record is emitted once, in the output of the first downloaded file (in sorted path
    order) that holds its uid; curated records never downloaded are counted as ``not_downloaded``."""
    manifest = read_manifest(curated_dir)
    # uid -> curated records (in curated order); records are small without images.
    by_uid: dict[str, list[bytes]] = {}
    n_curated = 0
    for s in manifest["shards"]:
        for payload in read_array_record(os.path.join(curated_dir, s["file"])):
            by_uid.setdefault(decode(payload).uid, []).append(payload)
            n_curated += 1
    files = _downloaded_files(download_dir)
    stats: Counter = Counter()
    # Pass 1 (no images): first downloaded occurrence of every curated uid.
    first: dict[str, tuple[int, int]] = {}
    for k, f in enumerate(files):
        for pos, (uid, _) in enumerate(_iter_downloaded(f, image_column, False, stats)):
            if uid in by_uid and uid not in first:
                first[uid] = (k, pos)
    fp = fingerprint(manifest.get("shards"), files, image_column, options)
    shards = []
    os.makedirs(out_dir, exist_ok=True)
    for k, f in enumerate(files):
        name = shard_name(prefix, k, len(files))
        path = os.path.join(out_dir, name)
        marker = os.path.join(out_dir, ".done", f"{k:05d}.json")
        if os.path.exists(path) and os.path.exists(marker):
            try:
                done = read_json(marker)
                if done.get("fingerprint") == fp:
                    shards.append(done["entry"])
                    continue
            except ValueError:
                pass
        payloads = []
        for pos, (uid, img) in enumerate(_iter_downloaded(f, image_column, True, Counter())):
            if first.get(uid, (None, None))[0] != k or first[uid][1] != pos:
                continue
            for p in by_uid[uid]:
                rec = decode(p)
                rec.image = img or b""
                payloads.append(encode(rec))
        write_array_record(path, payloads, options)
        entry = {"file": name, "records": len(payloads), "downloaded_from": os.path.relpath(f, download_dir)}
        atomic_json(marker, {"fingerprint": fp, "entry": entry})
        shards.append(entry)
    joined_uids = len(first)
    n_joined = sum(len(by_uid[u]) for u in first)
    counts = {"curated_records": n_curated, "joined_records": n_joined, "joined_uids": joined_uids,
              "not_downloaded": n_curated - n_joined, "downloaded_files": len(files), **dict(stats)}
    return write_manifest(out_dir, config={"curated_dir": curated_dir, "download_dir": download_dir,
                                           "image_column": image_column, "options": options},
                          shards=shards, counts=counts)
