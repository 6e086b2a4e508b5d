"""The curation stage as an Apache Beam pipeline (DirectRunner, Dataflow, Flink, Spark).

Same per-shard functions as the local runner (``curation.stages``), so the curated subset is identical
for the same config and seed:

    Create(input files) -> ParDo(Match)              one element per input shard: (i, ShardMatch)
                        -> CombineGlobally(sum)      global uint64 entry counts
                        -> Map(resolve t, p)         balancing parameters (side input)
    ShardMatch + params -> ParDo(BalanceAndPack)     ArrayRecord shard (+ URL list) per input shard
                        -> ToList -> Map(manifest)   manifest.json

Install it in its own environment (Beam pins protobuf/pyarrow ranges that clash with the JAX stack):
``python3 -m venv .venv-beam && .venv-beam/bin/pip install -r requirements-beam.txt``.

Run: ``python -m curation run --config CFG --runner beam -- [Beam pipeline options]``, e.g.
``-- --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp
--requirements_file=requirements-beam.txt --setup_file=./setup.py`` (see docs/curation.md).
Inputs, metadata and the output folder may be ``gs://`` (or any Beam filesystem) paths: workers copy
each input file to local disk before reading it, and write outputs locally before uploading them.
Every output file is written whole (tmp + rename, or a single upload), so Beam's bundle retries are
harmless: a retried shard rewrites identical bytes.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from curation import stages
from curation.config import CurationConfig, from_dict
from curation.pack import ENTRY_COUNTS, ENTRY_PROBS, finish_manifest, pack_shard, shard_name
from curation.sources import SourceStats


def _remote(path: str) -> bool:
    return "://" in path


def _local_copy(path: str, tmpdir: str) -> str:
    """A local path for ``path`` (copied from a Beam filesystem when remote)."""
    if not _remote(path):
        return path
    from apache_beam.io.filesystems import FileSystems

    dst = os.path.join(tmpdir, os.path.basename(path))
    with FileSystems.open(path) as src, open(dst, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    return dst


def _upload(local: str, dest: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    with open(local, "rb") as src, FileSystems.create(dest) as out:
        shutil.copyfileobj(src, out, 1 << 20)


def _join(base: str, *parts: str) -> str:
    if _remote(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


class MatchShard(beam.DoFn):
    """Builds the matcher once per worker (setup), then matches one input file per element."""

    def __init__(self, cfg: dict[str, Any]):
        self._cfg_dict = cfg

    def setup(self) -> None:
        from curation.matching import Matcher
        from curation.metadata import load_metadata

        self.cfg = from_dict(self._cfg_dict)
        self._tmp = tempfile.mkdtemp(prefix="curation-beam-")
        entries = load_metadata(_local_copy(self.cfg.metadata, self._tmp))
        self.n_entries = len(entries)
        self.matcher = Matcher(entries, mode=self.cfg.match_mode)

    def process(self, element: tuple[int, str]) -> Iterator[tuple[int, stages.ShardMatch]]:
        i, path = element
        local = _local_copy(path, self._tmp)
        try:
            sm = stages.match_shard(local, self.cfg.source, self.matcher, self.n_entries)
        finally:
            if local != path:
                os.remove(local)
        yield i, sm

    def teardown(self) -> None:
        shutil.rmtree(getattr(self, "_tmp", ""), ignore_errors=True)


class SumCounts(beam.CombineFn):
    def __init__(self, n_entries: int):
        self.n = n_entries

    def create_accumulator(self) -> np.ndarray:
        return np.zeros(self.n, dtype=np.uint64)

    def add_input(self, acc: np.ndarray, counts: np.ndarray) -> np.ndarray:
        return acc + counts.astype(np.uint64)

    def merge_accumulators(self, accs: Any) -> np.ndarray:
        out = np.zeros(self.n, dtype=np.uint64)
        for a in accs:
            out = out + a
        return out

    def extract_output(self, acc: np.ndarray) -> np.ndarray:
        return acc


def _shard_info(kv: tuple[int, stages.ShardMatch]) -> tuple[int, dict[str, Any]]:
    i, sm = kv
    return i, sm.summary()


def _check_and_index(infos: list[tuple[int, dict[str, Any]]], cfg: dict[str, Any]) -> dict[str, Any]:
    """Error-rate check (fails the pipeline with the reason) and global record index bases."""
    from curation.runner import check_error_rate

    c = from_dict(cfg)
    infos = sorted(infos)
    summaries = [s for _, s in infos]
    total = check_error_rate(c, summaries)
    bases = np.concatenate([[0], np.cumsum([s["rows"] for s in summaries])]).astype(np.int64)
    return {"summaries": summaries, "bases": [int(b) for b in bases[:-1]], "source": total.to_dict()}


def _save_npy(dest: str, arr: np.ndarray) -> None:
    if not _remote(dest):
        stages.atomic_npy(dest, arr)
        return
    from apache_beam.io.filesystems import FileSystems

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    with FileSystems.create(dest) as out:
        out.write(buf.getvalue())


def _resolve(counts: np.ndarray, cfg: dict[str, Any]) -> stages.BalanceParams:
    c = from_dict(cfg)
    b = c.balance
    params = stages.resolve_balance(counts, b.t, b.tail_proportion, b.mode, b.seed, b.rng_key)
    # Next to the shards, as the local runner does: counts and float32 p[e] for online balancing.
    _save_npy(_join(c.out_dir, ENTRY_COUNTS), counts)
    _save_npy(_join(c.out_dir, ENTRY_PROBS), params.probs.astype(np.float32))
    return params


class BalanceAndPack(beam.DoFn):
    def __init__(self, cfg: dict[str, Any], files: Sequence[str]):
        self._cfg_dict = cfg
        self.files = list(files)

    def setup(self) -> None:
        self.cfg: CurationConfig = from_dict(self._cfg_dict)
        self._tmp = tempfile.mkdtemp(prefix="curation-beam-")

    def process(self, kv: tuple[int, stages.ShardMatch], params: stages.BalanceParams,
                index: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any]]]:
        i, sm = kv
        cfg = self.cfg
        sel, keep = stages.balance_shard(sm, params, index["bases"][i])
        name = shard_name(cfg.pack.prefix, i, len(self.files))
        out_dir = cfg.out_dir
        want_urls = cfg.pack.url_list == "always" or (cfg.pack.url_list == "auto" and not sm.has_image)
        url_name = f"{cfg.pack.prefix}-{i:05d}.parquet"
        local_dir = self._tmp if _remote(out_dir) else out_dir
        local_in = _local_copy(self.files[i], self._tmp) if sm.has_image else self.files[i]
        entry = pack_shard(sm, sel, keep, cfg.balance.mode, local_in, cfg.source,
                           os.path.join(local_dir, name), cfg.pack.options,
                           os.path.join(local_dir, "urls", url_name) if want_urls else "")
        if _remote(out_dir):
            _upload(os.path.join(local_dir, name), _join(out_dir, name))
            os.remove(os.path.join(local_dir, name))
            if want_urls:
                _upload(os.path.join(local_dir, "urls", url_name), _join(out_dir, "urls", url_name))
        if local_in != self.files[i]:
            os.remove(local_in)
        entry["input"] = self.files[i]
        yield i, entry

    def teardown(self) -> None:
        shutil.rmtree(getattr(self, "_tmp", ""), ignore_errors=True)


def _write_manifest(entries: list[tuple[int, dict[str, Any]]], cfg: dict[str, Any],
                    params: stages.BalanceParams, index: dict[str, Any]) -> dict[str, Any]:
    c = from_dict(cfg)
    shards = [e for _, e in sorted(entries, key=lambda kv: kv[0])]
    out_dir = c.out_dir
    local = tempfile.mkdtemp(prefix="curation-manifest-") if _remote(out_dir) else out_dir
    manifest = finish_manifest(local, config=cfg, summaries=index["summaries"], shards=shards,
                               balance=params.to_json(), source_total=SourceStats.from_dict(index["source"]),
                               runner="beam")
    if _remote(out_dir):
        _upload(os.path.join(local, "manifest.json"), _join(out_dir, "manifest.json"))
        shutil.rmtree(local, ignore_errors=True)
    return manifest["counts"]


def build_pipeline(p: beam.Pipeline, cfg: CurationConfig) -> beam.PCollection:
    """Add the curation stage to ``p``; returns the PCollection holding the manifest counts."""
    from curation.metadata import load_metadata

    cfg.validate()
    files = cfg.input_files() if not any(_remote(x) for x in cfg.inputs) else _expand_remote(cfg.inputs)
    cfg_dict = cfg.to_dict()
    with tempfile.TemporaryDirectory() as tmp:
        n_entries = len(load_metadata(_local_copy(cfg.metadata, tmp)))
    if not _remote(cfg.out_dir):
        os.makedirs(cfg.out_dir, exist_ok=True)
    # The folder is about to change: an earlier manifest must not describe it until the new one is written.
    stale = _join(cfg.out_dir, "manifest.json")
    from apache_beam.io.filesystems import FileSystems

    if FileSystems.exists(stale):
        FileSystems.delete([stale])

    matched = (p | "Inputs" >> beam.Create(list(enumerate(files)))
                 | "Reshuffle" >> beam.Reshuffle()
                 | "Match" >> beam.ParDo(MatchShard(cfg_dict)))
    counts = (matched | "Counts" >> beam.Map(lambda kv: kv[1].counts)
                      | "SumCounts" >> beam.CombineGlobally(SumCounts(n_entries)))
    params = counts | "ResolveT" >> beam.Map(_resolve, cfg_dict)
    index = (matched | "ShardInfo" >> beam.Map(_shard_info)
                     | "AllInfo" >> beam.combiners.ToList()
                     | "CheckErrors" >> beam.Map(_check_and_index, cfg_dict))
    packed = matched | "BalanceAndPack" >> beam.ParDo(
        BalanceAndPack(cfg_dict, files), params=beam.pvalue.AsSingleton(params),
        index=beam.pvalue.AsSingleton(index))
    return (packed | "AllShards" >> beam.combiners.ToList()
                   | "Manifest" >> beam.Map(_write_manifest, cfg_dict, beam.pvalue.AsSingleton(params),
                                            beam.pvalue.AsSingleton(index)))


def _expand_remote(patterns: Sequence[str]) -> list[str]:
    from apache_beam.io.filesystems import FileSystems

    out: list[str] = []
    for pat in patterns:
        if any(c in pat for c in "*?["):
            res = FileSystems.match([pat])[0]
            out.extend(sorted(m.path for m in res.metadata_list))
        else:
            out.append(pat)
    return list(dict.fromkeys(out))


def run_beam(cfg: CurationConfig, pipeline_args: Sequence[str] = ()) -> dict[str, Any]:
    """Run the pipeline (DirectRunner unless ``pipeline_args`` say otherwise) and wait for it."""
    args = list(pipeline_args)
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=DirectRunner")  # explicit: never fall back to a runner that downloads binaries
    options = PipelineOptions(args)
    with beam.Pipeline(options=options) as p:
        build_pipeline(p, cfg)
    if not _remote(cfg.out_dir):
        return stages.read_json(os.path.join(cfg.out_dir, "manifest.json"))["counts"]
    return {"output_dir": cfg.out_dir}
