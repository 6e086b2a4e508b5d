"""Balancing: entry counts, t <-> p conversion, per-text keep probabilities and seeded draws.

Spec: metaclip.md §4. Everything here is numpy only (no jax) and vectorised over a CSR of matched
entry ids per text (``offsets`` int64[n_texts + 1], ``entry_ids`` uint32[n_matches]).

- ``count[e]`` = number of texts whose match set contains ``e`` (uint64, summable across shards).
- ``p[e] = t / max(count[e], t)`` (float64; entries with count <= t get exactly 1).
- ``keep(S) = 1 - prod_{e in S} (1 - p[e])``, computed in float64 as ``-expm1(sum log1p(-p))`` with the
  tail case (some p[e] == 1) set to exactly 1. The ``min(sum p, 1)`` display shortcut is NOT used.

Random draws come from a counter-based generator: a uniform is a pure function of
(seed, record key, counter), where the record key is derived from the record's uid (or its global record
index). The same seed therefore gives the same subset whatever the sharding and the worker count.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

# Counters used for the draws of one record (see draw_* below). Text j of a record in per-text mode uses
# counter _CTR_TEXT0 + j.
_CTR_CHOICE = 0
_CTR_ACCEPT = 1
_CTR_TEXT0 = 2

MODES = ("per_image", "per_text", "none")


# ----------------------------------------------------------------------------------------------------------
# Counting and t <-> p


def count_entries(entry_ids: np.ndarray, n_entries: int) -> np.ndarray:
    """uint64[n_entries] counts of entry ids (each id counted once per text by construction of the CSR)."""
    ids = np.asarray(entry_ids)
    if ids.size and int(ids.max()) >= n_entries:
        raise ValueError(f"entry id {int(ids.max())} out of range for {n_entries} entries")
    return np.bincount(ids.astype(np.int64, copy=False), minlength=n_entries).astype(np.uint64)


def t_to_p(counts: np.ndarray, t: float) -> float:
    """Tail proportion: sum of counts below t over the sum of all counts (metaclip.md §4.4)."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    if total <= 0:
        return 0.0
    return float(c[c < t].sum() / total)


def p_to_t(counts: np.ndarray, p: float) -> float:
    """Inverse of t_to_p as in MetaCLIP 2 ``curate.py``: sort counts ascending, take the normalised
    cumulative sum, and return the count at the index minimising |cumsum - p|."""
    c = np.sort(np.asarray(counts, dtype=np.float64))
    if c.size == 0 or c.sum() <= 0:
        raise ValueError("p_to_t needs at least one non-zero count")
    cum = np.cumsum(c) / c.sum()
    return float(c[int(np.argmin(np.abs(cum - p)))])


def entry_probs(counts: np.ndarray, t: float) -> np.ndarray:
    """float64 per-entry probability t / max(count, t). ``t = inf`` gives all ones (no balancing)."""
    c = np.asarray(counts, dtype=np.float64)
    if not t > 0:
        raise ValueError(f"t must be > 0, got {t}")
    if np.isinf(t):
        return np.ones_like(c)
    return t / np.maximum(c, t)


# ----------------------------------------------------------------------------------------------------------
# Per-text keep probabilities over a CSR


def segment_ids(offsets: np.ndarray) -> np.ndarray:
    """Text index of every CSR slot: [0, 0, 1, 3, 3, ...]."""
    offsets = np.asarray(offsets, dtype=np.int64)
    return np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))


def keep_probs(offsets: np.ndarray, entry_ids: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """float64[n_texts]: 1 - prod_{e in S_i}(1 - probs[e]); 0 for a text with no match; exactly 1 when any
    matched entry has probs == 1 (tail)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    if n <= 0:
        return np.zeros(0, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)[np.asarray(entry_ids, dtype=np.int64)]
    seg = segment_ids(offsets)
    tail = np.bincount(seg, weights=(p >= 1.0).astype(np.float64), minlength=n) > 0
    with np.errstate(divide="ignore"):
        logq = np.log1p(-np.minimum(p, 1.0))  # -inf where p == 1; those texts are overwritten below
    logq[p >= 1.0] = 0.0
    s = np.bincount(seg, weights=logq, minlength=n)
    keep = -np.expm1(s)
    keep[np.diff(offsets) == 0] = 0.0
    keep[tail] = 1.0
    return keep


# ----------------------------------------------------------------------------------------------------------
# Counter-based random numbers


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (bijective 64-bit mixer), on uint64 arrays with wrap-around."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def uid_keys(uids: Sequence[str]) -> np.ndarray:
    """uint64 record keys from uids (blake2b-64 of the UTF-8 uid): independent of position and sharding."""
    out = np.empty(len(uids), dtype=np.uint64)
    for i, u in enumerate(uids):
        out[i] = int.from_bytes(hashlib.blake2b(u.encode("utf-8"), digest_size=8).digest(), "little")
    return out


def uniforms(seed: int, keys: np.ndarray, counters: np.ndarray | int) -> np.ndarray:
    """float64 uniforms in [0, 1): a pure function of (seed, key, counter), element-wise."""
    keys = np.asarray(keys, dtype=np.uint64)
    ctr = np.broadcast_to(np.asarray(counters, dtype=np.uint64), keys.shape)
    with np.errstate(over="ignore"):
        s = _mix64(np.asarray([int(seed) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + _GOLDEN)
        h = _mix64(keys ^ s)
        h = _mix64(h + (ctr + np.uint64(1)) * _GOLDEN)
        h = _mix64(h ^ s)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


# ----------------------------------------------------------------------------------------------------------
# Selection


def select(mode: str, seed: int, keys: np.ndarray, text_offsets: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Choose which (record, text) pairs are kept.

    Args:
      mode: "per_image" (MetaCLIP 2: one uniformly chosen matched text per record, then one accept test),
        "per_text" (MetaCLIP 1 demo: each matched text tested alone; a record may be emitted once per
        accepted text), or "none" (no draw: every record with >= 1 matched text, all matched texts).
      seed: balancing seed.
      keys: uint64[n_records] record keys (uid_keys or global record indices).
      text_offsets: int64[n_records + 1]: texts of record r are text_offsets[r]:text_offsets[r + 1].
      keep: float64[n_texts] per-text keep probability (0 = unmatched text, never chosen).

    Returns:
      int64[n_kept, 2] rows (record index, text index within the record), sorted by record then text.
      For mode "none", one row per matched text of every record that has one.
    """
    if mode not in MODES:
        raise ValueError(f"unknown balancing mode {mode!r}; expected one of {MODES}")
    text_offsets = np.asarray(text_offsets, dtype=np.int64)
    keep = np.asarray(keep, dtype=np.float64)
    n_rec = len(text_offsets) - 1
    rec_of_text = segment_ids(text_offsets)
    local = np.arange(len(keep), dtype=np.int64) - text_offsets[rec_of_text]
    matched = keep > 0
    if mode == "none":
        return np.stack([rec_of_text[matched], local[matched]], axis=1).astype(np.int64).reshape(-1, 2)
    if mode == "per_text":
        u = uniforms(seed, np.asarray(keys, dtype=np.uint64)[rec_of_text], local + _CTR_TEXT0)
        ok = matched & (u < keep)
        return np.stack([rec_of_text[ok], local[ok]], axis=1).astype(np.int64).reshape(-1, 2)
    # per_image: pick the k-th matched text uniformly, then accept with its keep probability.
    n_matched = np.bincount(rec_of_text[matched], minlength=n_rec)
    has = np.flatnonzero(n_matched > 0)
    if has.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    k = np.asarray(keys, dtype=np.uint64)[has]
    u0 = uniforms(seed, k, _CTR_CHOICE)
    pick = np.minimum((u0 * n_matched[has]).astype(np.int64), n_matched[has] - 1)
    # Position of the pick-th matched text of each record.
    matched_idx = np.flatnonzero(matched)  # global text indices of matched texts, grouped by record
    first = np.concatenate([[0], np.cumsum(n_matched)])[has]
    chosen = matched_idx[first + pick]
    u1 = uniforms(seed, k, _CTR_ACCEPT)
    ok = u1 < keep[chosen]
    return np.stack([has[ok], local[chosen[ok]]], axis=1).astype(np.int64).reshape(-1, 2)


def expected_kept(mode: str, text_offsets: np.ndarray, keep: np.ndarray) -> float:
    """Expected number of emitted records under ``mode`` (for the kept-vs-t curve of the report)."""
    text_offsets = np.asarray(text_offsets, dtype=np.int64)
    keep = np.asarray(keep, dtype=np.float64)
    if mode == "per_text":
        return float(keep.sum())
    rec = segment_ids(text_offsets)
    n_rec = len(text_offsets) - 1
    n_matched = np.bincount(rec, weights=(keep > 0).astype(np.float64), minlength=n_rec)
    if mode == "none":
        return float((n_matched > 0).sum())
    s = np.bincount(rec, weights=keep, minlength=n_rec)
    with np.errstate(invalid="ignore", divide="ignore"):
        per = np.where(n_matched > 0, s / np.maximum(n_matched, 1), 0.0)
    return float(per.sum())
