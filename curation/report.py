"""Curation report: JSON, PNG plots (matplotlib Agg) and a markdown table of the top entries.

``python -m curation report --workdir DIR`` reads a runner work folder (after balance) and writes
``DIR/report/``:

- ``report.json``: totals, bad-input counts, t and tail proportion, head/tail split, kept-vs-t curve,
  top entries (count, p, kept count);
- ``entry_counts.png``: entry counts sorted descending (log-log), before and after balancing, t marked;
- ``kept_vs_t.png``: expected kept records and pairs as a function of t, the chosen t marked;
- ``top_entries.md``: the top entries table.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from curation import balancing
from curation.stages import atomic_json, atomic_write, read_json


def _text_offsets(rows_parquet: str) -> np.ndarray:
    import pyarrow.parquet as pq

    col = pq.read_table(rows_parquet, columns=["texts"]).column("texts").combine_chunks()
    offs = np.asarray(col.offsets, dtype=np.int64)
    return offs - offs[0]


def _shards(workdir: str) -> list[int]:
    mdir = os.path.join(workdir, "match")
    return sorted(int(f.split(".")[0]) for f in os.listdir(mdir) if f.endswith(".done.json"))


def _entry_names(metadata: str, n: int) -> list[str]:
    try:
        from curation.metadata import load_metadata

        names = list(load_metadata(metadata))
        if len(names) == n:
            return names
    except Exception:  # the report still works without the metadata file
        pass
    return [f"#{i}" for i in range(n)]


def compute_report(workdir: str) -> dict[str, Any]:
    cfg = read_json(os.path.join(workdir, "config.json"))
    counts = np.load(os.path.join(workdir, "count", "entry_counts.npy")).astype(np.uint64)
    params = read_json(os.path.join(workdir, "balance", "params.json"))
    t = float("inf") if params["t"] == "inf" else float(params["t"])
    mode = params["mode"]
    n_entries = len(counts)
    probs = balancing.entry_probs(counts, t)
    shards = _shards(workdir)
    rep_cfg = cfg.get("report", {})
    top_k = int(rep_cfg.get("top_k", 50))
    grid_n = int(rep_cfg.get("t_grid_points", 25))
    max_shards = int(rep_cfg.get("max_shards", 256))

    # Actual counts after balancing (over the selected pairs) and totals.
    after = np.zeros(n_entries, dtype=np.uint64)
    totals = {"shards": len(shards), "rows": 0, "texts": 0, "matched_texts": 0, "selected": 0}
    source: dict[str, dict[str, int]] = {"skipped_rows": {}, "dropped_texts": {}, "files": {}}
    rows_seen = 0
    sampled = shards if len(shards) <= max_shards else [
        shards[k] for k in np.linspace(0, len(shards) - 1, max_shards).astype(int)]
    sampled_set = set(sampled)
    grid = _t_grid(counts, t, grid_n)
    exp_records = np.zeros(len(grid))
    exp_pairs = np.zeros(len(grid))
    sampled_texts = 0
    for i in shards:
        stem = os.path.join(workdir, "match", f"{i:05d}")
        s = read_json(stem + ".done.json")
        totals["rows"] += s["rows"]
        totals["texts"] += s["texts"]
        totals["matched_texts"] += s["matched_texts"]
        rows_seen += s["source"].get("rows_seen", 0)
        for k in source:
            for reason, v in s["source"].get(k, {}).items():
                source[k][reason] = source[k].get(reason, 0) + v
        sel_path = os.path.join(workdir, "balance", f"{i:05d}.sel.npy")
        need_sel = os.path.exists(sel_path)
        if not need_sel and i not in sampled_set:
            continue
        offsets = np.load(stem + ".offsets.npy")
        ids = np.load(stem + ".entry_ids.npy")
        toff = _text_offsets(stem + ".rows.parquet")
        if need_sel:
            sel = np.load(sel_path)
            totals["selected"] += len(sel)
            if len(sel):
                # How often each text was selected, spread onto its matched entries.
                w = np.bincount(toff[sel[:, 0]] + sel[:, 1], minlength=len(offsets) - 1)
                per_match = w[balancing.segment_ids(offsets)].astype(np.float64)
                after += np.rint(np.bincount(ids.astype(np.int64), weights=per_match,
                                             minlength=n_entries)).astype(np.uint64)
        if i in sampled_set:
            sampled_texts += s["texts"]
            for k, tk in enumerate(grid):
                keep = balancing.keep_probs(offsets, ids, balancing.entry_probs(counts, tk))
                exp_records[k] += balancing.expected_kept(mode, toff, keep)
                exp_pairs[k] += float(keep.sum())
    scale = totals["texts"] / sampled_texts if sampled_texts else 0.0
    finite = np.isfinite(t)
    head = counts > t if finite else np.zeros(n_entries, dtype=bool)
    order = np.argsort(-counts.astype(np.float64), kind="stable")[:top_k]
    names = _entry_names(cfg.get("metadata", ""), n_entries)
    top = [{"rank": r + 1, "entry_id": int(e), "entry": names[e], "count": int(counts[e]),
            "p": float(probs[e]), "kept": int(after[e])} for r, e in enumerate(order) if counts[e] > 0]
    return {
        "workdir": os.path.abspath(workdir),
        "totals": {**totals, "rows_seen": rows_seen, "matches": int(counts.sum())},
        "bad_input": source,
        "balance": {"t": t if finite else "inf", "mode": mode, "seed": params.get("seed"),
                    "tail_proportion": balancing.t_to_p(counts, t) if finite else 1.0},
        "entries": {"total": n_entries, "zero_count": int(np.sum(counts == 0)),
                    "head": int(head.sum()), "tail_nonzero": int(np.sum((~head) & (counts > 0))),
                    "head_matches": int(counts[head].sum()), "tail_matches": int(counts[~head].sum())},
        "kept_vs_t": {"t": [float(x) for x in grid],
                      "expected_records": [float(x * scale) for x in exp_records],
                      "expected_pairs": [float(x * scale) for x in exp_pairs],
                      "sampled_shards": len(sampled)},
        "top_entries": top,
        "_counts_after": after,  # removed before writing JSON
    }


def _t_grid(counts: np.ndarray, t: float, n: int) -> np.ndarray:
    nz = counts[counts > 0]
    if nz.size == 0:
        return np.array([1.0])
    lo, hi = 1.0, float(nz.max())
    grid = np.unique(np.round(np.geomspace(lo, max(hi, 2.0), max(n, 2))))
    if np.isfinite(t):
        grid = np.unique(np.concatenate([grid, [t]]))
    return grid


def write_report(workdir: str) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = compute_report(workdir)
    after = rep.pop("_counts_after")
    counts = np.load(os.path.join(workdir, "count", "entry_counts.npy"))
    out = os.path.join(workdir, "report")
    os.makedirs(out, exist_ok=True)
    t = rep["balance"]["t"]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    before_sorted = np.sort(counts[counts > 0])[::-1]
    after_sorted = np.sort(after[after > 0])[::-1]
    if before_sorted.size:
        ax.loglog(np.arange(1, before_sorted.size + 1), before_sorted, label="pool (before balancing)")
    if after_sorted.size:
        ax.loglog(np.arange(1, after_sorted.size + 1), after_sorted, label="curated (after balancing)")
    if t != "inf":
        ax.axhline(float(t), color="red", ls="--", lw=1, label=f"t = {float(t):,.0f}")
    ax.set_xlabel("entry rank")
    ax.set_ylabel("matched texts per entry")
    e = rep["entries"]
    ax.set_title(f"Entry counts: {e['head']:,} head / {e['tail_nonzero']:,} tail entries "
                 f"(tail proportion {rep['balance']['tail_proportion']:.1%})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, os.path.join(out, "entry_counts.png"))
    plt.close(fig)

    kv = rep["kept_vs_t"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.semilogx(kv["t"], kv["expected_records"], marker=".", label=f"records ({rep['balance']['mode']})")
    ax.semilogx(kv["t"], kv["expected_pairs"], marker=".", label="pairs (per-text keep)")
    if t != "inf":
        ax.axvline(float(t), color="red", ls="--", lw=1, label=f"t = {float(t):,.0f}")
    ax.set_xlabel("t (per-entry cap)")
    ax.set_ylabel("expected kept")
    ax.set_title("Kept vs t", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, os.path.join(out, "kept_vs_t.png"))
    plt.close(fig)

    lines = ["| rank | entry id | entry | count | p | kept |", "|---:|---:|---|---:|---:|---:|"]
    for r in rep["top_entries"]:
        entry = r["entry"].replace("|", "\\|")
        lines.append(f"| {r['rank']} | {r['entry_id']} | {entry} | {r['count']:,} | {r['p']:.4g} | "
                     f"{r['kept']:,} |")
    md = "# Top entries by count\n\n" + "\n".join(lines) + "\n"

    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(md)
    atomic_write(os.path.join(out, "top_entries.md"), w)
    rep["files"] = ["report.json", "entry_counts.png", "kept_vs_t.png", "top_entries.md"]
    atomic_json(os.path.join(out, "report.json"), rep)
    return json.loads(json.dumps(rep))


def _save_fig(fig: Any, path: str) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
