"""The per-shard stage functions shared by the local runner and the Beam pipeline.

match_shard   pool file -> ShardMatch (rows + CSR of matched entry ids per text + entry counts + stats)
balance_shard ShardMatch + per-entry p -> selection (record index, text index) and per-text keep prob
shard_records ShardMatch + selection (+ images re-read from the pool) -> metaclip_jax.records.Record

Plus the on-disk form of a ShardMatch (``{stem}.rows.parquet`` + ``{stem}.offsets.npy`` /
``{stem}.entry_ids.npy`` / ``{stem}.counts.npy``) and atomic writers (tmp + rename). Packing is in
``curation.pack``. No jax, no Beam here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import uuid as _uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from curation import balancing
from curation.sources import SourceConfig, SourceStats, read_rows
from metaclip_jax.records import Record


@dataclasses.dataclass
class ShardMatch:
    uids: list[str]
    urls: list[str]
    texts: list[list[str]]
    has_image: bool
    offsets: np.ndarray  # int64[n_texts + 1], texts flattened in record order
    entry_ids: np.ndarray  # uint32[n_matches]
    counts: np.ndarray  # uint64[n_entries]
    stats: SourceStats

    @property
    def n_rows(self) -> int:
        return len(self.uids)

    @property
    def text_offsets(self) -> np.ndarray:
        lens = np.fromiter((len(t) for t in self.texts), dtype=np.int64, count=len(self.texts))
        return np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)

    def summary(self) -> dict[str, Any]:
        return {"rows": self.n_rows, "texts": int(len(self.offsets) - 1), "matches": len(self.entry_ids),
                "matched_texts": int(np.count_nonzero(np.diff(self.offsets))),
                "has_image": self.has_image, "source": self.stats.to_dict()}


# ----------------------------------------------------------------------------------------------------------
# Match


def match_shard(path: str, source: SourceConfig, matcher: Any, n_entries: int) -> ShardMatch:
    """Read one pool file and match every valid text; bad input is counted in the stats."""
    stats = SourceStats()
    uids, urls, texts = [], [], []
    has_image = False
    for row in read_rows(path, source, stats):
        uids.append(row["uid"])
        urls.append(row["url"])
        texts.append(row["texts"])
        has_image = has_image or row["image"] is not None
    flat = [t for ts in texts for t in ts]
    if flat:
        offsets, entry_ids = matcher.match_batch(flat)
        offsets = np.asarray(offsets, dtype=np.int64)
        entry_ids = np.asarray(entry_ids, dtype=np.uint32)
    else:
        offsets, entry_ids = np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.uint32)
    if len(offsets) != len(flat) + 1:
        raise RuntimeError(f"matcher returned {len(offsets) - 1} offsets for {len(flat)} texts")
    counts = balancing.count_entries(entry_ids, n_entries)
    return ShardMatch(uids, urls, texts, has_image, offsets, entry_ids, counts, stats)


# ----------------------------------------------------------------------------------------------------------
# Balance


@dataclasses.dataclass
class BalanceParams:
    """Global balancing parameters, resolved once from the summed counts."""

    t: float  # math.inf = no balancing
    tail_proportion: float
    mode: str
    seed: int
    rng_key: str
    probs: np.ndarray  # float64[n_entries]

    def to_json(self) -> dict[str, Any]:
        return {"t": self.t if np.isfinite(self.t) else "inf", "tail_proportion": self.tail_proportion,
                "mode": self.mode, "seed": self.seed, "rng_key": self.rng_key}


def resolve_balance(counts: np.ndarray, t: float | None, tail_proportion: float | None, mode: str,
                    seed: int, rng_key: str) -> BalanceParams:
    """t from the config, or t = p_to_t(counts, tail_proportion); p[e] = t / max(count[e], t)."""
    if tail_proportion is not None:
        t_val = balancing.p_to_t(counts, tail_proportion)
        t_val = max(t_val, 1.0)
    elif t is None:
        t_val = float("inf")
    else:
        t_val = float(t)
    p = balancing.t_to_p(counts, t_val) if np.isfinite(t_val) else 1.0
    return BalanceParams(t_val, p, mode, seed, rng_key, balancing.entry_probs(counts, t_val))


def balance_shard(sm: ShardMatch, params: BalanceParams,
                  index_base: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Returns (selection int64[n, 2] of (record, text-in-record), keep float64[n_texts])."""
    keep = balancing.keep_probs(sm.offsets, sm.entry_ids, params.probs)
    if params.rng_key == "uid":
        keys = balancing.uid_keys(sm.uids)
    else:
        keys = np.arange(index_base, index_base + sm.n_rows, dtype=np.uint64)
    sel = balancing.select(params.mode, params.seed, keys, sm.text_offsets, keep)
    return sel, keep


# ----------------------------------------------------------------------------------------------------------
# Records


def shard_records(sm: ShardMatch, sel: np.ndarray, keep: np.ndarray, mode: str,
                  images: dict[int, bytes] | None = None) -> Iterator[Record]:
    """Records for one shard, in selection order. Offline modes (per_image, per_text) emit the selected
    text with keep_prob 1.0; mode "none" emits every matched text with its keep probability, one record
    per image, for online balancing in the data loader."""
    toff = sm.text_offsets
    images = images or {}

    def ids_of(g: int) -> list[int]:
        return [int(x) for x in sm.entry_ids[sm.offsets[g]:sm.offsets[g + 1]]]

    if mode == "none":
        rows = np.unique(sel[:, 0]) if len(sel) else np.zeros(0, dtype=np.int64)
        by_row: dict[int, list[int]] = {}
        for r, j in sel:
            by_row.setdefault(int(r), []).append(int(j))
        for r in rows:
            r = int(r)
            js = by_row[r]
            g = [int(toff[r]) + j for j in js]
            yield Record(uid=sm.uids[r], url=sm.urls[r], image=images.get(r, b""),
                         texts=[sm.texts[r][j] for j in js], entry_ids=[ids_of(x) for x in g],
                         keep_prob=[float(keep[x]) for x in g])
        return
    for r, j in sel:
        r, j = int(r), int(j)
        g = int(toff[r]) + j
        yield Record(uid=sm.uids[r], url=sm.urls[r], image=images.get(r, b""), texts=[sm.texts[r][j]],
                     entry_ids=[ids_of(g)], keep_prob=[1.0])


def read_images(path: str, source: SourceConfig, rows: set[int]) -> dict[int, bytes]:
    """Re-read a pool file and return the image bytes of the given valid-row indices (the readers are
    deterministic, so row r here is row r of the match stage)."""
    out: dict[int, bytes] = {}
    if not rows:
        return out
    last = max(rows)
    for r, row in enumerate(read_rows(path, source, SourceStats())):
        if r in rows and row["image"] is not None:
            out[r] = row["image"]
        if r >= last:
            break
    return out


# ----------------------------------------------------------------------------------------------------------
# Files: atomic writes and the on-disk ShardMatch


def tmp_name(path: str) -> str:
    d, b = os.path.split(path)
    return os.path.join(d, f".{b}.tmp-{os.getpid()}-{_uuid.uuid4().hex[:8]}")


def clean_stale_tmp(folder: str) -> int:
    """Remove temporary files left by killed writers (their pid is gone). Returns how many."""
    n = 0
    if not os.path.isdir(folder):
        return 0
    for root, _, files in os.walk(folder):
        for f in files:
            if not (f.startswith(".") and ".tmp-" in f):
                continue
            try:
                pid = int(f.rsplit(".tmp-", 1)[1].split("-")[0])
                os.kill(pid, 0)
                continue  # the writer is alive
            except (ValueError, IndexError):
                continue
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            try:
                os.remove(os.path.join(root, f))
                n += 1
            except OSError:
                pass
    return n


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` then rename tmp over ``path``: the file appears whole or not at all."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = tmp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_json(path: str, obj: Any) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
    atomic_write(path, w)


def atomic_npy(path: str, arr: np.ndarray) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
    atomic_write(path, w)


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_shard_match(stem: str, sm: ShardMatch) -> None:
    """Write rows + CSR + counts (each atomically). The caller writes the done marker last."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"uid": pa.array(sm.uids, pa.string()), "url": pa.array(sm.urls, pa.string()),
                      "texts": pa.array(sm.texts, pa.list_(pa.string()))})
    atomic_write(stem + ".rows.parquet", lambda tmp: pq.write_table(table, tmp))
    atomic_npy(stem + ".offsets.npy", sm.offsets)
    atomic_npy(stem + ".entry_ids.npy", sm.entry_ids)
    atomic_npy(stem + ".counts.npy", sm.counts)


def load_shard_match(stem: str, summary: dict[str, Any]) -> ShardMatch:
    import pyarrow.parquet as pq

    t = pq.read_table(stem + ".rows.parquet")
    return ShardMatch(uids=t.column("uid").to_pylist(), urls=t.column("url").to_pylist(),
                      texts=t.column("texts").to_pylist(), has_image=bool(summary.get("has_image")),
                      offsets=np.load(stem + ".offsets.npy"), entry_ids=np.load(stem + ".entry_ids.npy"),
                      counts=np.load(stem + ".counts.npy"),
                      stats=SourceStats.from_dict(summary.get("source", {})))


def code_version() -> str:
    """Package version plus the git commit of the checkout when there is one."""
    version = "metaclip-jax 0.1.0"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        if sha:
            version += f" (git {sha})"
    except (OSError, subprocess.SubprocessError):
        pass
    return version

