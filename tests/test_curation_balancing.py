"""Balancing: counts, t <-> p, keep probabilities vs the closed form, seeded draws (metaclip.md §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from curation import balancing as B


def csr(sets: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sets])]).astype(np.int64)
    ids = np.asarray([e for s in sets for e in sorted(s)], dtype=np.uint32)
    return offsets, ids


def test_count_entries_uint64_and_summable():
    a = np.array([0, 3, 3, 1], dtype=np.uint32)
    b = np.array([3, 4], dtype=np.uint32)
    ca, cb = B.count_entries(a, 5), B.count_entries(b, 5)
    assert ca.dtype == np.uint64 and ca.shape == (5,)
    np.testing.assert_array_equal(ca + cb, B.count_entries(np.concatenate([a, b]), 5))
    np.testing.assert_array_equal(ca + cb, [1, 1, 0, 3, 1])
    with pytest.raises(ValueError, match="out of range"):
        B.count_entries(np.array([7]), 5)


def test_t_to_p_p_to_t_hand_example():
    counts = np.array([10, 1, 4, 0, 3, 2], dtype=np.uint64)  # total 20; sorted 0,1,2,3,4,10
    # t_to_p: sum of counts strictly below t over the total.
    assert B.t_to_p(counts, 4) == pytest.approx(6 / 20)
    assert B.t_to_p(counts, 5) == pytest.approx(10 / 20)
    assert B.t_to_p(counts, 100) == pytest.approx(1.0)
    assert B.t_to_p(counts, 1) == 0.0
    # p_to_t: cumsum/total over sorted counts = 0, .05, .15, .30, .50, 1.0; nearest index -> its count.
    assert B.p_to_t(counts, 0.30) == 3
    assert B.p_to_t(counts, 0.45) == 4
    assert B.p_to_t(counts, 0.9) == 10
    assert B.p_to_t(counts, 0.0) == 0


def test_t_p_round_trips():
    rng = np.random.default_rng(0)
    counts = np.unique(rng.integers(1, 10**6, size=2000)).astype(np.uint64)  # distinct counts
    total = counts.sum()
    cum = np.cumsum(np.sort(counts)) / total
    for p in (0.01, 0.06, 0.3, 0.7):
        t = B.p_to_t(counts, p)
        # counts <= t hold the cumulative mass closest to p, so t_to_p just above t returns it.
        assert B.t_to_p(counts, t + 0.5) == pytest.approx(cum[np.argmin(np.abs(cum - p))])
        assert abs(B.t_to_p(counts, t + 0.5) - p) <= np.max(np.sort(counts)) / total
    for t in np.sort(counts)[[10, 500, 1500]]:
        p = B.t_to_p(counts, float(t))
        # the mass strictly below t ends at the count just below t.
        assert B.p_to_t(counts, p) == np.sort(counts)[np.searchsorted(np.sort(counts), t) - 1]
    # the MetaCLIP 2 recipe: p from English at t_en, then t per language lands near the same p.
    other = rng.lognormal(8, 2, size=50_000).astype(np.uint64) + 1
    p_en = B.t_to_p(counts, 170_000)
    t_lang = B.p_to_t(other, p_en)
    assert abs(B.t_to_p(other, t_lang + 0.5) - p_en) < 0.01


def test_entry_probs():
    counts = np.array([0, 5, 20, 40, 20_000_000], dtype=np.uint64)
    p = B.entry_probs(counts, 20)
    assert p.dtype == np.float64
    np.testing.assert_array_equal(p[:3], 1.0)  # tail (count <= t) gets exactly 1
    assert p[3] == 0.5 and p[4] == 20 / 20_000_000
    np.testing.assert_array_equal(B.entry_probs(counts, math.inf), 1.0)


def test_keep_probs_closed_form_no_sum_shortcut():
    probs = np.array([1.0, 0.5, 0.2, 0.1, 0.05, 1e-9])
    sets = [[1], [2, 3], [1, 2, 3, 4], [0, 4], [], [4], [1, 2], [5, 5 - 1], [5]]
    offsets, ids = csr(sets)
    keep = B.keep_probs(offsets, ids, probs)
    want = [1 - np.prod([1 - probs[e] for e in s]) if s else 0.0 for s in sets]
    np.testing.assert_allclose(keep, want, rtol=1e-7, atol=0)  # the naive product loses digits at 1e-9
    assert keep[3] == 1.0 and keep[4] == 0.0  # exact tail / no-match values
    assert keep[6] == pytest.approx(0.6)  # min(sum p, 1) would give 0.7
    assert keep[8] == pytest.approx(1e-9, rel=1e-6)  # float64 keeps tiny probabilities
    assert B.keep_probs(np.zeros(1, dtype=np.int64), np.zeros(0, np.uint32), probs).shape == (0,)


def test_uniforms_counter_based():
    keys = B.uid_keys(["a", "b", "c", "a"])
    assert keys[0] == keys[3] and len(set(keys.tolist())) == 3
    u = B.uniforms(7, keys, 1)
    assert u[0] == u[3] and np.all((u >= 0) & (u < 1))
    # element-wise: a draw does not depend on its neighbours or the batch size
    assert B.uniforms(7, keys[2:3], 1)[0] == u[2]
    assert not np.array_equal(B.uniforms(8, keys, 1), u)
    assert not np.array_equal(B.uniforms(7, keys, 2), u)
    big = B.uniforms(0, np.arange(200_000, dtype=np.uint64), 0)
    assert abs(big.mean() - 0.5) < 0.005 and abs(big.var() - 1 / 12) < 0.002


def _z(k: int, n: int, p: float) -> float:
    if p in (0.0, 1.0):
        return 0.0 if k == round(n * p) else math.inf
    return abs(k / n - p) / math.sqrt(p * (1 - p) / n)


PROBS = np.array([1.0, 0.5, 0.2, 0.1, 0.05])
PATTERNS = [[1], [2, 3], [1, 2, 3, 4], [0, 4], [4], [], [3]]


@pytest.mark.parametrize("seed", [0, 1])
def test_per_text_frequencies_match_closed_form(seed):
    n = 3000  # records per pattern, one text each
    sets = [s for s in PATTERNS for _ in range(n)]
    offsets, ids = csr(sets)
    keep = B.keep_probs(offsets, ids, PROBS)
    toff = np.arange(len(sets) + 1, dtype=np.int64)
    keys = B.uid_keys([f"uid-{i}" for i in range(len(sets))])
    sel = B.select("per_text", seed, keys, toff, keep)
    kept = np.bincount(sel[:, 0] // n, minlength=len(PATTERNS))
    for k, s in enumerate(PATTERNS):
        p = 1 - np.prod([1 - PROBS[e] for e in s]) if s else 0.0
        assert _z(int(kept[k]), n, p) < 4.5, (s, kept[k] / n, p)


def test_per_image_frequencies_match_closed_form():
    """MetaCLIP 2: one matched text chosen uniformly, then one accept test: P = mean of keep over the
    record's matched texts (unmatched texts are never chosen)."""
    n = 4000
    recs = [([1], [4]), ([2, 3], []), ([1, 2, 3, 4], [0]), ([4], [3]), ([], [])]
    sets, toff = [], [0]
    for a, b in recs:
        for _ in range(n):
            sets += [a, b]
            toff.append(toff[-1] + 2)
    offsets, ids = csr(sets)
    keep = B.keep_probs(offsets, ids, PROBS)
    toff = np.asarray(toff, dtype=np.int64)
    keys = np.arange(len(toff) - 1, dtype=np.uint64)
    sel = B.select("per_image", 3, keys, toff, keep)
    assert len(np.unique(sel[:, 0])) == len(sel)  # at most one text per image
    chosen_keep = keep[toff[sel[:, 0]] + sel[:, 1]]
    assert np.all(chosen_keep > 0)  # only matched texts are chosen
    kept = np.bincount(sel[:, 0] // n, minlength=len(recs))
    for k, (a, b) in enumerate(recs):
        ks = [1 - np.prod([1 - PROBS[e] for e in s]) for s in (a, b) if s]
        p = float(np.mean(ks)) if ks else 0.0
        assert _z(int(kept[k]), n, p) < 4.5, (a, b, kept[k] / n, p)
    # which text was chosen is uniform among the matched ones: ([1], [4]) picks each ~half the time
    # among the *chosen* (before acceptance) -- check through acceptance-free keep (t = inf)
    ones = np.where(keep > 0, 1.0, 0.0)
    sel_all = B.select("per_image", 3, keys, toff, ones)
    first = sel_all[sel_all[:, 0] < n]
    assert _z(int(np.sum(first[:, 1] == 0)), n, 0.5) < 4.5


def test_select_mode_none_and_errors():
    toff = np.array([0, 2, 3, 3], dtype=np.int64)
    keep = np.array([0.0, 0.3, 1.0])
    sel = B.select("none", 0, np.arange(3, dtype=np.uint64), toff, keep)
    np.testing.assert_array_equal(sel, [[0, 1], [1, 0]])
    with pytest.raises(ValueError, match="unknown balancing mode"):
        B.select("sometimes", 0, np.arange(3, dtype=np.uint64), toff, keep)


def test_selection_independent_of_batching():
    """Same seed, same keys -> same decisions whether records are processed together or in parts."""
    rng = np.random.default_rng(1)
    sets = [sorted(set(rng.integers(0, 5, size=rng.integers(0, 4)).tolist())) for _ in range(900)]
    offsets, ids = csr(sets)
    keep = B.keep_probs(offsets, ids, PROBS)
    toff = np.arange(0, 901, 3, dtype=np.int64)  # 300 records of 3 texts
    keys = B.uid_keys([f"u{i}" for i in range(300)])
    for mode in ("per_image", "per_text"):
        whole = B.select(mode, 11, keys, toff, keep)
        parts = []
        for a, b in ((0, 50), (50, 220), (220, 300)):
            s = B.select(mode, 11, keys[a:b], toff[a:b + 1] - toff[a], keep[toff[a]:toff[b]])
            parts.append(s + [a, 0])
        np.testing.assert_array_equal(whole, np.concatenate(parts))


def test_expected_kept():
    toff = np.array([0, 2, 3], dtype=np.int64)
    keep = np.array([0.5, 1.0, 0.2])
    assert B.expected_kept("per_text", toff, keep) == pytest.approx(1.7)
    assert B.expected_kept("per_image", toff, keep) == pytest.approx(0.75 + 0.2)
    assert B.expected_kept("none", toff, keep) == 2
