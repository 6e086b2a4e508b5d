"""Pool readers: every format, bad input skipped and counted by reason, never a crash."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.sources import SourceConfig, SourceStats, detect_format, read_rows
from metaclip_jax.records import uid_for_url
from tests.curation_pools import make_rows, wat_record, write_tar, write_wat


def read(path, **kw):
    stats = SourceStats()
    rows = list(read_rows(str(path), SourceConfig.from_dict(kw), stats))
    return rows, stats


def test_detect_format():
    assert detect_format("a/b.parquet") == "parquet"
    assert detect_format("x.jsonl.gz") == "jsonl"
    assert detect_format("cc3m.tsv") == "tsv"
    assert detect_format("00001.tar") == "webdataset"
    assert detect_format("CC-MAIN-2023-x.warc.wat.gz") == "wat"
    with pytest.raises(ValueError, match="source.format"):
        detect_format("pool.bin")


def test_parquet_configurable_columns_and_bad_rows(tmp_path):
    long = "x" * 200
    table = pa.table({
        "URL": pa.array([b"http://a/1.jpg", b"http://a/2.jpg", None, b"http://a/\xff.jpg", b"http://a/5.jpg",
                         b"http://a/6.jpg", b"http://a/7.jpg"], pa.binary()),
        "TEXT": pa.array([b"a dog", b"\xc3\x28 broken", b"no url", b"bad url", b"  ", long.encode(),
                          b"dup"], pa.binary()),
        "ALT": pa.array([["a cat", "a dog"], None, None, None, None, None, ["dup"]], pa.list_(pa.string())),
    })
    path = tmp_path / "pool.parquet"
    pq.write_table(table, path)
    rows, st = read(path, url_field="URL", text_fields=["TEXT", "ALT"], max_text_chars=100)
    assert [r["texts"] for r in rows] == [["a dog", "a cat"], ["dup"]]  # per-row text dedup
    assert rows[0]["uid"] == uid_for_url("http://a/1.jpg") and rows[0]["image"] is None
    assert st.rows_seen == 7 and st.rows_ok == 2
    assert st.skipped_rows == {"no_valid_text": 3, "missing_url": 1, "non_utf8": 1}
    assert st.dropped_texts == {"non_utf8": 1, "empty_text": 1, "text_too_long": 1, "duplicate_text": 2}


def test_parquet_with_ids_and_images(tmp_path):
    table = pa.table({"key": ["k1", "k2"], "url": ["http://a/1", "http://a/2"], "caption": ["x", "y"],
                      "jpg": [b"\xff\xd81", b"\xff\xd82"]})
    path = tmp_path / "img2dataset.parquet"
    pq.write_table(table, path)
    rows, _ = read(path, uid_field="key", image_field="jpg")
    assert [(r["uid"], r["image"]) for r in rows] == [("k1", b"\xff\xd81"), ("k2", b"\xff\xd82")]


def test_jsonl_bad_lines(tmp_path):
    path = tmp_path / "pool.jsonl"
    lines = [json.dumps({"url": "http://a/1", "caption": "one"}).encode(),
             b'{"url": "http://a/2", "caption": "caf\xe9"}',  # latin-1 byte: not UTF-8
             b"{broken json",
             json.dumps(["not", "an", "object"]).encode(),
             json.dumps({"caption": "no url"}).encode(),
             json.dumps({"url": "http://a/3"}).encode(),  # no caption field
             json.dumps({"url": "http://a/4", "caption": ["", "x" * 100_001, 5, "ok"]}).encode(),
             b"",
             json.dumps({"url": "http://a/5", "caption": "last"}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows, st = read(path)
    assert [r["texts"] for r in rows] == [["one"], ["ok"], ["last"]]
    assert st.skipped_rows == {"non_utf8": 1, "bad_json": 2, "missing_url": 1, "missing_text": 1}
    assert st.dropped_texts == {"empty_text": 1, "text_too_long": 1, "not_a_string": 1}
    assert st.rows_seen == 8 and st.error_rate == pytest.approx(5 / 8)
    # gzip-compressed JSONL reads the same
    gz = tmp_path / "pool.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    rows_gz, _ = read(gz)
    assert rows_gz == rows


def test_tsv_cc3m(tmp_path):
    path = tmp_path / "cc3m.tsv"
    path.write_bytes(b"a dog on a beach\thttp://a/1.jpg\n"
                     b"no tab here\n"
                     b"bad \xff bytes\thttp://a/2.jpg\n"
                     b"\thttp://a/3.jpg\n"
                     b"red car\thttp://a/4.jpg\r\n")
    rows, st = read(path)
    assert [(r["url"], r["texts"]) for r in rows] == [("http://a/1.jpg", ["a dog on a beach"]),
                                                      ("http://a/4.jpg", ["red car"])]
    assert st.skipped_rows == {"wrong_column_count": 1, "non_utf8": 1, "no_valid_text": 1}
    # a header line and another column order
    hdr = tmp_path / "other.tsv"
    hdr.write_text("url\tcaption\nhttp://b/1\thello\n")
    rows, _ = read(hdr, tsv_columns=["url", "caption"], tsv_header=True)
    want = {"uid": uid_for_url("http://b/1"), "url": "http://b/1", "texts": ["hello"], "image": None}
    assert rows == [want]


def test_webdataset_tar(tmp_path):
    src = make_rows(5, seed=3, with_images=True)
    path = write_tar(str(tmp_path / "00000.tar"), src)
    rows, st = read(path)
    assert len(rows) == 5 and st.skipped_rows == {}
    for r, s in zip(rows, src):
        assert r["image"] == s["image"] and r["url"] == s["url"]
        assert r["texts"] == list(dict.fromkeys([*s["caption"][1:], s["caption"][0]]))
    # missing image, bad json, then a truncated archive: rows before the cut are kept and counted
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in [("a.json", b'{"url": "http://x/a", "caption": "no image"}'),
                           ("b.jpg", b"\xff\xd8b"), ("b.json", b"{oops"),
                           ("c.jpg", b"\xff\xd8c"), ("c.txt", b"fine"), ("c.json", b'{"url": "http://x/c"}'),
                           ("d.jpg", b"\xff\xd8" * 5000), ("d.txt", b"cut")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    bad = tmp_path / "bad.tar"
    bad.write_bytes(data[: len(data) - 6000])  # cut inside d.jpg
    rows, st = read(bad)
    assert [r["url"] for r in rows] == ["http://x/c"]
    assert st.skipped_rows == {"missing_image": 1, "bad_json": 1}
    assert st.files == {"truncated_file": 1}
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file at all" * 30)
    rows, st = read(garbage)
    assert rows == [] and st.files == {"unreadable_file": 1}


def test_wat_parsing(tmp_path):
    recs = [
        wat_record("http://site.example/dir/page.html", [
            {"path": "IMG@/src", "url": "img/cat.jpg", "alt": "a cat\non a mat", "title": "Cat"},
            {"path": "A@/href", "url": "http://site.example/other", "title": "a link"},  # not an image
            {"path": "IMG@/src", "url": "/abs/dog.png", "data-image-title": "  dog  ", "alt": ""},
            {"path": "IMG@/src", "url": "http://cdn.example/x.jpg"},  # no text keys
            {"path": "IMG@/src", "alt": "no url"},
            {"path": "IMG@/src", "url": "data:image/png;base64,AAAA", "alt": "inline"},
            {"path": "IMG@/src", "url": "img/cat.jpg", "alt": "a cat on a mat", "title": "Kitty"},  # dup url
        ]),
        b"WARC/1.0\r\nWARC-Target-URI: http://broken.example/\r\n\r\n{this is not json\r\n\r\n",
        wat_record("https://other.example/", [{"path": "IMG@/src", "url": "pic.jpg", "title": "x" * 500}]),
    ]
    path = write_wat(str(tmp_path / "CC-MAIN-test.warc.wat.gz"), recs)
    rows, st = read(path, max_text_chars=100)
    assert [(r["url"], r["texts"]) for r in rows] == [
        ("http://site.example/dir/img/cat.jpg", ["a cat on a mat", "Cat", "Kitty"]),
        ("http://site.example/abs/dog.png", ["dog"]),
    ]
    assert rows[0]["uid"] == uid_for_url("http://site.example/dir/img/cat.jpg")
    assert st.skipped_rows == {"no_valid_text": 2, "missing_url": 1, "data_url": 1, "bad_json": 1}
    assert st.dropped_texts["duplicate_text"] == 1 and st.dropped_texts["text_too_long"] == 1
    # a truncated gzip keeps what was read and counts the file
    with open(path, "rb") as f:
        data = f.read()
    cut = tmp_path / "cut.wat.gz"
    cut.write_bytes(data[:-40])
    rows_cut, st_cut = read(cut, max_text_chars=100)
    assert st_cut.files == {"truncated_file": 1}
    assert [r["url"] for r in rows_cut] == [r["url"] for r in rows]
    # plain (uncompressed) WAT works too
    plain = tmp_path / "plain.wat"
    plain.write_bytes(b"".join(recs))
    assert [r["url"] for r in read(plain, max_text_chars=100)[0]] == [r["url"] for r in rows]


def test_missing_and_unreadable_files(tmp_path):
    rows, st = read(tmp_path / "nope.jsonl")
    assert rows == [] and st.files == {"missing_file": 1}
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really parquet")
    rows, st = read(bad)
    assert rows == [] and st.files == {"unreadable_file": 1}
    assert st.error_rate == 1.0
    os.mkdir(tmp_path / "dir.jsonl")
    rows, st = read(tmp_path / "dir.jsonl")
    assert rows == [] and sum(st.files.values()) == 1


def test_unknown_source_option():
    with pytest.raises(ValueError, match="unknown source option"):
        SourceConfig.from_dict({"url_column": "u"})
