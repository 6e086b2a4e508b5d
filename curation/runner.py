"""Local multi-process curation runner: match -> count -> balance -> pack (-> report).

Work folder (``cfg.workdir``)::

    config.json                         the resolved config of the last run
    match/{i:05d}.rows.parquet          valid rows of input i: uid, url, texts
    match/{i:05d}.offsets.npy           CSR over the shard's texts (int64[n_texts + 1])
    match/{i:05d}.entry_ids.npy         matched entry ids (uint32)
    match/{i:05d}.counts.npy            per-entry text counts of the shard (uint64)
    match/{i:05d}.done.json             done marker: fingerprint + stats (written last)
    count/entry_counts.npy, done.json   global counts (sum over shards)
    balance/params.json                 resolved t, tail proportion, mode, seed
    balance/entry_probs.npy             float32 p[e] for the data loader
    balance/{i:05d}.sel.npy / .keep.npy selection (record, text) and per-text keep probability
    balance/{i:05d}.done.json
    pack/{i:05d}.done.json              pack markers (the shards themselves go to the output folder)

Output folder (``cfg.out_dir``): ``{prefix}-{i:05d}-of-{n:05d}.array_record`` per input shard,
``urls/{prefix}-{i:05d}.parquet`` for pools without images, and ``manifest.json`` (written last).

Every file is written to a temporary name and renamed; a shard counts as done only when its marker
exists and carries the fingerprint of the current config and inputs. A run killed at any point and
rerun therefore produces exactly the output of an uninterrupted run. Work is spread over processes
forked after the matcher is built (the automaton is never pickled or sent through a queue).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from curation import stages
from curation.config import CurationConfig, file_digest, fingerprint
from curation.pack import ENTRY_COUNTS, ENTRY_PROBS, MANIFEST, finish_manifest, pack_shard, shard_name
from curation.sources import SourceStats

# Debug/testing aid: seconds to sleep before each shard task (lets tests kill a run mid-way).
_DELAY_ENV = "METACLIP_CURATION_SHARD_DELAY_S"

# State shared with forked workers (set in the parent before the pool is created).
_G: dict[str, Any] = {}


class CurationError(RuntimeError):
    """The run cannot continue (bad config, error rate above max_error_rate, ...)."""


def log(msg: str) -> None:
    print(f"[curation] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _delay() -> None:
    d = float(os.environ.get(_DELAY_ENV, "0") or 0)
    if d > 0:
        time.sleep(d)


def _marker_ok(path: str, fp: str) -> dict[str, Any] | None:
    try:
        m = stages.read_json(path)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("fingerprint") == fp else None


def _init_worker(state: dict[str, Any]) -> None:
    """Worker initializer (forkserver/spawn): install the stage state; build the matcher here, once per
    worker process, when the stage needs one (it is never pickled or sent through a queue)."""
    _G.update(state)
    if state.get("build_matcher"):
        from curation.matching import Matcher
        from curation.metadata import load_metadata

        cfg: CurationConfig = state["cfg"]
        entries = load_metadata(cfg.metadata)
        _G.update(matcher=Matcher(entries, mode=cfg.match_mode), n_entries=len(entries))


def _parallel(fn: Callable[[Any], Any], tasks: list[Any], cfg: CurationConfig,
              state: dict[str, Any]) -> Iterator[Any]:
    """Run ``fn`` over ``tasks`` in worker processes, yielding results as they complete.

    One worker (or one task): inline, in this process. ``start_method = "fork"``: workers are forked
    from this process after ``state`` (including a matcher built here) is installed. Otherwise
    (``forkserver``, the default, or ``spawn``): clean workers get ``state`` through the initializer and
    build the matcher themselves. Clean workers are the safe default: native libraries with thread pools
    (ArrayRecord/riegeli) crash in a child forked after the parent used them. A worker that dies makes
    the stage fail with BrokenProcessPool instead of hanging.
    """
    workers = min(cfg.n_workers, len(tasks))
    if workers <= 1 or cfg.start_method == "fork":
        _init_worker(state)  # a matcher built by the caller is in ``state`` already
    if workers <= 1:
        for t in tasks:
            yield fn(t)
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context(cfg.start_method)
    if cfg.start_method == "forkserver":
        ctx.set_forkserver_preload(["curation.runner"])
    kwargs: dict[str, Any] = {}
    if cfg.start_method != "fork":
        kwargs = {"initializer": _init_worker, "initargs": (state,)}
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, **kwargs)
    try:
        futures = [ex.submit(fn, t) for t in tasks]
        for f in as_completed(futures):
            yield f.result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _progress(it: Iterable[Any], total: int, desc: str, enabled: bool,
              unit_key: str = "rows") -> Iterator[Any]:
    """tqdm over shard results with a rows/s postfix (rate and ETA per shard from tqdm itself)."""
    if not enabled:
        yield from it
        return
    from tqdm import tqdm

    t0, units = time.monotonic(), 0
    with tqdm(total=total, desc=desc, unit="shard", file=sys.stderr, dynamic_ncols=True) as bar:
        for r in it:
            units += int(r.get(unit_key, 0)) if isinstance(r, dict) else 0
            rate = units / max(time.monotonic() - t0, 1e-9)
            bar.set_postfix_str(f"{unit_key}={units:,} ({rate:,.0f}/s)", refresh=False)
            bar.update(1)
            yield r


def _stem(cfg: CurationConfig, stage: str, i: int) -> str:
    return os.path.join(cfg.workdir, stage, f"{i:05d}")


# ----------------------------------------------------------------------------------------------------------
# Stage 1: match


def _match_common(cfg: CurationConfig) -> str:
    return fingerprint("match", cfg.source.to_dict(), cfg.match_mode, file_digest(cfg.metadata))


def _match_fp(common: str, path: str) -> str:
    try:
        size = os.path.getsize(path)
    except OSError:
        size = -1
    return fingerprint(common, path, size)


def _match_task(task: tuple[int, str, str]) -> dict[str, Any]:
    i, path, fp = task
    _delay()
    cfg: CurationConfig = _G["cfg"]
    sm = stages.match_shard(path, cfg.source, _G["matcher"], _G["n_entries"])
    stem = _stem(cfg, "match", i)
    stages.save_shard_match(stem, sm)
    summary = {"fingerprint": fp, "index": i, "input": path, **sm.summary()}
    stages.atomic_json(stem + ".done.json", summary)
    return summary


def stage_match(cfg: CurationConfig, files: list[str]) -> list[dict[str, Any]]:
    """Match every input shard not yet done; returns the per-shard summaries in input order."""
    common = _match_common(cfg)
    fps = [_match_fp(common, f) for f in files]
    done: dict[int, dict[str, Any]] = {}
    todo = []
    for i, (f, fp) in enumerate(zip(files, fps)):
        m = _marker_ok(_stem(cfg, "match", i) + ".done.json", fp)
        if m is not None:
            done[i] = m
        else:
            todo.append((i, f, fp))
    log(f"match: {len(files)} shards, {len(done)} already done, {len(todo)} to do")
    if todo:
        os.makedirs(os.path.join(cfg.workdir, "match"), exist_ok=True)
        state: dict[str, Any] = {"cfg": cfg, "build_matcher": True}
        n_workers = min(cfg.n_workers, len(todo))
        if n_workers <= 1 or cfg.start_method == "fork":
            # Build once here; forked workers inherit it (copy-on-write), nothing is pickled.
            from curation.matching import Matcher
            from curation.metadata import load_metadata

            t0 = time.monotonic()
            entries = load_metadata(cfg.metadata)
            state = {"cfg": cfg, "matcher": Matcher(entries, mode=cfg.match_mode), "n_entries": len(entries)}
            log(f"match: built the {cfg.match_mode} matcher over {len(entries):,} entries "
                f"in {time.monotonic() - t0:.1f}s")
        log(f"match: {n_workers} worker(s) ({cfg.start_method if n_workers > 1 else 'inline'})")
        try:
            results = _parallel(_match_task, todo, cfg, state)
            for s in _progress(results, len(todo), "match", cfg.progress):
                done[s["index"]] = s
        finally:
            _G.pop("matcher", None)
    return [done[i] for i in range(len(files))]


def check_error_rate(cfg: CurationConfig, summaries: list[dict[str, Any]]) -> SourceStats:
    total = SourceStats()
    for s in summaries:
        total.merge(SourceStats.from_dict(s["source"]))
    if total.error_rate > cfg.max_error_rate:
        raise CurationError(
            f"bad input rate {total.error_rate:.2%} exceeds max_error_rate {cfg.max_error_rate:.2%}: "
            f"{total.errors:,} bad rows/files out of {total.rows_seen:,} rows seen; skipped rows by reason "
            f"{dict(total.skipped_rows)}, files {dict(total.files)}. Fix the input or raise max_error_rate "
            f"(outputs so far are kept; rerunning continues).")
    return total


# ----------------------------------------------------------------------------------------------------------
# Stage 2: count


def stage_count(cfg: CurationConfig, summaries: list[dict[str, Any]]) -> tuple[np.ndarray, str]:
    fp = fingerprint("count", [s["fingerprint"] for s in summaries])
    path = os.path.join(cfg.workdir, "count", "entry_counts.npy")
    marker = os.path.join(cfg.workdir, "count", "done.json")
    if _marker_ok(marker, fp) is not None and os.path.exists(path):
        return np.load(path), fp
    counts: np.ndarray | None = None
    for i in range(len(summaries)):
        c = np.load(_stem(cfg, "match", i) + ".counts.npy")
        counts = c.astype(np.uint64) if counts is None else counts + c.astype(np.uint64)
    assert counts is not None
    stages.atomic_npy(path, counts)
    stages.atomic_json(marker, {"fingerprint": fp, "entries": len(counts), "matches": int(counts.sum()),
                                "nonzero_entries": int(np.count_nonzero(counts))})
    log(f"count: {int(counts.sum()):,} matches over {int(np.count_nonzero(counts)):,} entries")
    return counts, fp


# ----------------------------------------------------------------------------------------------------------
# Stage 3: balance


def resolve_params(cfg: CurationConfig, counts: np.ndarray) -> stages.BalanceParams:
    b = cfg.balance
    return stages.resolve_balance(counts, b.t, b.tail_proportion, b.mode, b.seed, b.rng_key)


def _balance_task(task: tuple[int, str, int]) -> dict[str, Any]:
    i, fp, base = task
    _delay()
    cfg: CurationConfig = _G["cfg"]
    stem = _stem(cfg, "match", i)
    sm = stages.load_shard_match(stem, stages.read_json(stem + ".done.json"))
    sel, keep = stages.balance_shard(sm, _G["params"], base)
    out = _stem(cfg, "balance", i)
    stages.atomic_npy(out + ".sel.npy", sel)
    stages.atomic_npy(out + ".keep.npy", keep)
    summary = {"fingerprint": fp, "index": i, "selected": len(sel), "rows": sm.n_rows,
               "expected": float(np.sum(keep))}
    stages.atomic_json(out + ".done.json", summary)
    return summary


def stage_balance(cfg: CurationConfig, summaries: list[dict[str, Any]], counts: np.ndarray,
                  count_fp: str) -> tuple[stages.BalanceParams, list[dict[str, Any]]]:
    params = resolve_params(cfg, counts)
    common = fingerprint("balance", count_fp, params.to_json())
    bdir = os.path.join(cfg.workdir, "balance")
    os.makedirs(bdir, exist_ok=True)
    stages.atomic_json(os.path.join(bdir, "params.json"), {"fingerprint": common, **params.to_json()})
    stages.atomic_npy(os.path.join(bdir, "entry_probs.npy"), params.probs.astype(np.float32))
    bases = np.concatenate([[0], np.cumsum([s["rows"] for s in summaries])]).astype(np.int64)
    done: dict[int, dict[str, Any]] = {}
    todo = []
    for i, s in enumerate(summaries):
        fp = fingerprint(common, s["fingerprint"], int(bases[i]))
        m = _marker_ok(_stem(cfg, "balance", i) + ".done.json", fp)
        if m is not None:
            done[i] = m
        else:
            todo.append((i, fp, int(bases[i])))
    t_txt = f"{params.t:,.0f}" if np.isfinite(params.t) else "inf"
    log(f"balance: t={t_txt} (tail proportion {params.tail_proportion:.4f}), mode={params.mode}, "
        f"seed={params.seed}; {len(done)} shards done, {len(todo)} to do")
    state = {"cfg": cfg, "params": params}
    for s in _progress(_parallel(_balance_task, todo, cfg, state), len(todo), "balance", cfg.progress):
        done[s["index"]] = s
    return params, [done[i] for i in range(len(summaries))]


# ----------------------------------------------------------------------------------------------------------
# Stage 4: pack


def _url_list_wanted(cfg: CurationConfig, has_image: bool) -> bool:
    return cfg.pack.url_list == "always" or (cfg.pack.url_list == "auto" and not has_image)


def _pack_task(task: tuple[int, str, str]) -> dict[str, Any]:
    i, path, fp = task
    _delay()
    cfg: CurationConfig = _G["cfg"]
    n = _G["n_shards"]
    stem = _stem(cfg, "match", i)
    summary = stages.read_json(stem + ".done.json")
    sm = stages.load_shard_match(stem, summary)
    b = _stem(cfg, "balance", i)
    sel, keep = np.load(b + ".sel.npy"), np.load(b + ".keep.npy")
    out = os.path.join(cfg.out_dir, shard_name(cfg.pack.prefix, i, n))
    urls = (os.path.join(cfg.out_dir, "urls", f"{cfg.pack.prefix}-{i:05d}.parquet")
            if _url_list_wanted(cfg, sm.has_image) else "")
    entry = pack_shard(sm, sel, keep, cfg.balance.mode, path, cfg.source, out, cfg.pack.options, urls)
    entry["input"] = path
    stages.atomic_json(_stem(cfg, "pack", i) + ".done.json", {"fingerprint": fp, "index": i, "entry": entry})
    return {"index": i, "entry": entry, "records": entry["records"]}


def stage_pack(cfg: CurationConfig, files: list[str], summaries: list[dict[str, Any]],
               bsummaries: list[dict[str, Any]], params: stages.BalanceParams,
               source_total: SourceStats, counts: np.ndarray) -> dict[str, Any]:
    common = fingerprint("pack", cfg.pack.options, cfg.pack.prefix, cfg.pack.url_list,
                         os.path.abspath(cfg.out_dir), len(files))
    os.makedirs(cfg.out_dir, exist_ok=True)
    os.makedirs(os.path.join(cfg.workdir, "pack"), exist_ok=True)
    done: dict[int, dict[str, Any]] = {}
    todo = []
    for i, f in enumerate(files):
        fp = fingerprint(common, bsummaries[i]["fingerprint"])
        m = _marker_ok(_stem(cfg, "pack", i) + ".done.json", fp)
        if m is not None and os.path.exists(os.path.join(cfg.out_dir, m["entry"]["file"])):
            done[i] = m["entry"]
        else:
            todo.append((i, f, fp))
    log(f"pack: {len(done)} shards done, {len(todo)} to do -> {cfg.out_dir}")
    if todo:
        # The folder is about to change: a manifest from an earlier run must not describe it meanwhile.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(cfg.out_dir, MANIFEST))
    state = {"cfg": cfg, "n_shards": len(files)}
    for r in _progress(_parallel(_pack_task, todo, cfg, state), len(todo), "pack", cfg.progress,
                       unit_key="records"):
        done[r["index"]] = r["entry"]
    shards = [done[i] for i in range(len(files))]
    stages.atomic_npy(os.path.join(cfg.out_dir, ENTRY_COUNTS), counts)
    stages.atomic_npy(os.path.join(cfg.out_dir, ENTRY_PROBS), params.probs.astype(np.float32))
    manifest = finish_manifest(cfg.out_dir, config=cfg.to_dict(), summaries=summaries, shards=shards,
                               balance=params.to_json(), source_total=source_total, runner="local")
    c = manifest["counts"]
    log(f"pack: {c['records']:,} records in {len(shards)} shards "
        f"({c['records_with_image']:,} with images); manifest at {cfg.out_dir}/manifest.json")
    return manifest


# ----------------------------------------------------------------------------------------------------------
# The whole stage


STAGES = ("match", "count", "balance", "pack", "report")


def run(cfg: CurationConfig, until: str = "report") -> dict[str, Any]:
    """Run the stages up to ``until`` (inclusive), skipping work already done. Returns a summary dict
    (the manifest when packing ran)."""
    if until not in STAGES:
        raise CurationError(f"unknown stage {until!r}; expected one of {STAGES}")
    stop = STAGES.index(until)
    cfg.validate()
    files = cfg.input_files()
    os.makedirs(cfg.workdir, exist_ok=True)
    stale = stages.clean_stale_tmp(cfg.workdir) + stages.clean_stale_tmp(cfg.out_dir)
    if stale:
        log(f"removed {stale} temporary file(s) left by an interrupted run")
    stages.atomic_json(os.path.join(cfg.workdir, "config.json"), cfg.to_dict())
    t0 = time.monotonic()
    summaries = stage_match(cfg, files)
    total = check_error_rate(cfg, summaries)
    result: dict[str, Any] = {"match": {"shards": len(summaries), "source": total.to_dict()}}
    if stop >= 1:
        counts, count_fp = stage_count(cfg, summaries)
        result["count"] = {"matches": int(counts.sum())}
    if stop >= 2:
        params, bsum = stage_balance(cfg, summaries, counts, count_fp)
        result["balance"] = {**params.to_json(), "selected": sum(s["selected"] for s in bsum)}
    if stop >= 3:
        result = stage_pack(cfg, files, summaries, bsum, params, total, counts)
    if stop >= 4:
        from curation.report import write_report

        write_report(cfg.workdir)
    log(f"done in {time.monotonic() - t0:.1f}s")
    return result


# ----------------------------------------------------------------------------------------------------------
# The fixed `match` contract: one file in, one row per input row out


def _match_chunk(texts: list[str | None]) -> list[list[int]]:
    offsets, ids = _G["matcher"].match_batch([t if isinstance(t, str) else "" for t in texts])
    ids = ids.tolist()
    return [ids[offsets[k]:offsets[k + 1]] for k in range(len(texts))]


def read_text_column(path: str, field: str) -> list[str | None]:
    """The ``field`` value of every row of a parquet or JSONL file, in order; None where the row has no
    such field, the value is not a string, the bytes are not UTF-8 or the JSON line is broken."""
    import json

    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path, columns=[field])
        except (KeyError, pa.ArrowInvalid) as e:
            raise CurationError(f"{path}: cannot read column {field!r}: {e}") from None
        col = table.column(field)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            col = col.cast(pa.binary())  # decode below, so invalid UTF-8 is counted, not raised
        texts: list[str | None] = []
        for v in col.to_pylist():
            if isinstance(v, bytes):
                try:
                    v = v.decode("utf-8")
                except UnicodeDecodeError:
                    v = None
            texts.append(v if isinstance(v, str) else None)
        return texts
    if not path.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        raise CurationError(f"{path}: expected a .parquet or .jsonl file")
    from curation.sources import open_maybe_gzip

    texts = []
    with open_maybe_gzip(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
                v = obj.get(field) if isinstance(obj, dict) else None
            except (UnicodeDecodeError, ValueError):
                v = None
            texts.append(v if isinstance(v, str) else None)
    return texts


def match_file(metadata: str, input_path: str, text_field: str, output: str, *, mode: str = "v1",
               workers: int | None = None) -> dict[str, Any]:
    """Write ``output`` (parquet): one row per input row, in input order, with the text column and
    ``entry_ids`` (sorted list of int; empty when nothing matched or the text is missing/invalid)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.matching import Matcher
    from curation.metadata import load_metadata

    workers = workers or os.cpu_count() or 1
    texts = read_text_column(input_path, text_field)
    entries = load_metadata(metadata)
    _G["matcher"] = Matcher(entries, mode=mode)
    try:
        n_chunks = max(1, min(len(texts), workers * 8))
        bounds = np.linspace(0, len(texts), n_chunks + 1).astype(int)
        chunks = [texts[bounds[k]:bounds[k + 1]] for k in range(n_chunks)]
        ids: list[list[int]] = []
        if workers <= 1 or len(texts) < 2:
            for c in chunks:
                ids.extend(_match_chunk(c))
        else:
            with mp.get_context("fork").Pool(workers) as pool:
                for part in pool.imap(_match_chunk, chunks):  # ordered
                    ids.extend(part)
    finally:
        _G.pop("matcher", None)
    table = pa.table({text_field: pa.array(texts, pa.string()),
                      "entry_ids": pa.array([sorted(int(x) for x in r) for r in ids], pa.list_(pa.int64()))})
    stages.atomic_write(output, lambda tmp: pq.write_table(table, tmp))
    n_bad = sum(1 for t in texts if t is None)
    return {"rows": len(texts), "matched_rows": sum(1 for r in ids if r), "missing_or_invalid_text": n_bad,
            "workers": workers, "output": output}
