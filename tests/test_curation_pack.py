"""Packing: ArrayRecord shards read back with ArrayRecordDataSource, manifest, URL lists, joins, report."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_data_source import ArrayRecordDataSource

from curation.config import from_dict
from curation.pack import join_downloaded, read_manifest
from curation.report import write_report
from curation.runner import run
from metaclip_jax import records
from tests.curation_pools import make_rows, write_jsonl_pool, write_metadata, write_tar


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("img")
    write_metadata(str(tmp / "meta.json"))
    rows_a, rows_b = make_rows(120, seed=1, with_images=True), make_rows(80, seed=2, with_images=True)
    files = [write_tar(str(tmp / "00000.tar"), rows_a), write_tar(str(tmp / "00001.tar"), rows_b)]
    cfg = from_dict({"inputs": [str(tmp / "*.tar")], "workdir": str(tmp / "wd"),
                     "metadata": str(tmp / "meta.json"), "workers": 1, "progress": False,
                     "balance": {"t": 30, "mode": "per_image", "seed": 1}}).validate()
    manifest = run(cfg)
    return tmp, rows_a + rows_b, files, manifest


def test_pack_read_back_with_array_record_data_source(image_run):
    tmp, rows, _, manifest = image_run
    out = tmp / "wd" / "out"
    paths = [str(out / s["file"]) for s in manifest["shards"]]
    ds = ArrayRecordDataSource(paths)
    assert len(ds) == manifest["counts"]["records"] > 0
    by_url = {r["url"]: r for r in rows}
    seen = set()
    for k in range(len(ds)):
        rec = records.decode(ds[k])
        src = by_url[rec.url]
        assert rec.uid == records.uid_for_url(rec.url)
        assert rec.image == src["image"]  # image bytes carried through unchanged
        assert len(rec.texts) == 1 and rec.texts[0] in src["caption"]
        assert rec.entry_ids[0] == sorted(rec.entry_ids[0]) and rec.entry_ids[0]
        assert rec.keep_prob == [1.0] and rec.lang == [""]
        seen.add(rec.uid)
    assert len(seen) == len(ds)  # per-image mode: each image at most once
    # random access works (group_size:1)
    assert records.decode(ds[len(ds) - 1]).uid


def test_manifest_contents(image_run):
    tmp, rows, files, manifest = image_run
    m = read_manifest(str(tmp / "wd" / "out"))
    assert m == json.loads(json.dumps(manifest))
    assert m["schema_version"] == records.SCHEMA_VERSION and m["format"] == "array_record"
    assert m["code_version"].startswith("metaclip-jax")
    assert m["config"]["balance"]["t"] == 30 and m["config"]["inputs"] == [str(tmp / "*.tar")]
    assert m["balance"]["mode"] == "per_image" and m["balance"]["t"] == 30
    assert [s["input"] for s in m["shards"]] == files
    assert [s["file"] for s in m["shards"]] == ["curated-00000-of-00002.array_record",
                                                "curated-00001-of-00002.array_record"]
    c = m["counts"]
    assert c["rows"] == len(rows) and c["input_files"] == 2
    assert c["records"] == sum(s["records"] for s in m["shards"]) == c["records_with_image"]
    assert c["urls"] == 0 and m["url_lists"] == []  # pools with images need no URL list
    assert m["error_rate"] == 0.0


def test_report(image_run):
    tmp, _, _, manifest = image_run
    rep = write_report(str(tmp / "wd"))
    d = tmp / "wd" / "report"
    for f in ("report.json", "entry_counts.png", "kept_vs_t.png", "top_entries.md"):
        assert (d / f).stat().st_size > 0
    assert (d / "entry_counts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    j = json.loads((d / "report.json").read_text())
    assert j["balance"]["t"] == 30 and j["totals"]["selected"] == manifest["counts"]["records"]
    e = j["entries"]
    assert e["head_matches"] + e["tail_matches"] == j["totals"]["matches"]
    counts = np.load(tmp / "wd" / "count" / "entry_counts.npy")
    assert e["head"] == int(np.sum(counts > 30))
    top = j["top_entries"][0]
    assert top["count"] == int(counts.max()) and top["entry"] in ("dog", "cat", "New York", "photo", "the",
                                                                  "red", "car", "tree")
    assert "| rank | entry id | entry |" in (d / "top_entries.md").read_text()
    kv = j["kept_vs_t"]
    assert kv["expected_records"] == sorted(kv["expected_records"])  # more kept as t grows
    assert 30.0 in kv["t"]
    assert rep["totals"] == j["totals"]


def _img2dataset_parquet(path, rows, with_uid):
    table = {"key": [f"{i:09d}" for i in range(len(rows))], "url": [r["url"] for r in rows],
             "status": ["success" if i % 5 else "failed_to_download" for i in range(len(rows))],
             "jpg": [b"JPEG-" + r["url"].encode() if i % 5 else None for i, r in enumerate(rows)]}
    if with_uid:
        table["uid"] = [r["uid"] for r in rows]
    pq.write_table(pa.table(table), path)


def test_url_list_and_join_downloaded(tmp_path):
    write_metadata(str(tmp_path / "meta.json"))
    files = write_jsonl_pool(str(tmp_path / "pool"), make_rows(150, seed=4), 2)
    cfg = from_dict({"inputs": files, "workdir": str(tmp_path / "wd"),
                     "metadata": str(tmp_path / "meta.json"), "workers": 1, "progress": False,
                     "balance": {"t": 30, "mode": "per_text"}}).validate()
    m = run(cfg, until="pack")
    out = tmp_path / "wd" / "out"
    assert m["url_lists"] == ["urls/curated-00000.parquet", "urls/curated-00001.parquet"]
    urls = pa.concat_tables([pq.read_table(out / u) for u in m["url_lists"]])
    assert urls.column_names == ["uid", "url", "text"]
    uids = urls.column("uid").to_pylist()
    assert len(uids) == len(set(uids)) == m["counts"]["urls"]  # one row per image for img2dataset
    curated = [records.decode(p) for s in m["shards"]
               for p in ArrayRecordDataSource([str(out / s["file"])])]
    assert all(r.image == b"" for r in curated)
    assert {r.uid for r in curated} == set(uids)
    assert len(curated) >= len(uids)  # per-text mode may emit an image once per accepted text

    # img2dataset output: one parquet shard (uid column saved) and one webdataset shard (url only)
    url_rows = urls.to_pylist()
    dl = tmp_path / "download"
    dl.mkdir()
    half = len(url_rows) // 2
    _img2dataset_parquet(dl / "00000.parquet", url_rows[:half], with_uid=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i, r in enumerate(url_rows[half:] + url_rows[:3]):  # 3 re-downloads of earlier images
            for ext, data in (("jpg", b"JPEG-" + r["url"].encode()),
                              ("json", json.dumps({"url": r["url"], "key": f"{i:09d}",
                                                   "status": "success"}).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    (dl / "00001.tar").write_bytes(buf.getvalue())
    joined = join_downloaded(str(out), str(dl), str(tmp_path / "joined"))
    redownloaded = {r["uid"] for r in url_rows[:3]}
    failed = {r["uid"] for i, r in enumerate(url_rows[:half]) if i % 5 == 0} - redownloaded
    want = [r for r in curated if r.uid not in failed]
    got = [records.decode(p) for s in joined["shards"]
           for p in ArrayRecordDataSource([str(tmp_path / "joined" / s["file"])])]
    assert sorted((r.uid, r.texts[0]) for r in got) == sorted((r.uid, r.texts[0]) for r in want)
    assert all(r.image == b"JPEG-" + r.url.encode() for r in got)  # each record exactly once, with image
    c = joined["counts"]
    assert c["joined_records"] == len(want) and c["not_downloaded"] == len(curated) - len(want)
    # rerun: every output is done already and identical
    again = join_downloaded(str(out), str(dl), str(tmp_path / "joined"))
    assert again["shards"] == joined["shards"]
    assert os.path.exists(tmp_path / "joined" / "manifest.json")
