"""Corrupt inputs through BOTH stages, end to end: a pool (webdataset tar + JSONL + a truncated tar + a
garbage file) full of bad rows and bad images is curated, and the curated shards plus a shard of bad
ArrayRecord records go through the training input pipeline. Every bad input is skipped and counted under
its reason, the counts are exact, and nothing crashes. Image formats that are valid (PNG, RGBA, palette,
greyscale, CMYK, 16-bit, WebP) decode."""

from __future__ import annotations

import base64
import collections
import io
import json
import struct
import tarfile
import zlib

import msgpack
import numpy as np
import pytest
from PIL import Image

from curation.config import from_dict
from curation.pack import iter_records, read_manifest
from curation.runner import run
from input_pipeline import synthetic, train_data
from metaclip_jax import records
from tests.curation_pools import write_metadata
from tests.faults import trials

pytestmark = pytest.mark.faults

MB_TEXT = "dog " * 262_144  # 1 MiB caption


def _jpeg(seed: int, w: int = 64, h: int = 48, mode: str = "RGB") -> bytes:
    return synthetic.synthetic_image(w, h, seed=seed, fmt="JPEG", mode=mode)


def _png16() -> bytes:
    buf = io.BytesIO()
    arr = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 20).astype(np.uint16)
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _png_bomb(w: int = 40_000, h: int = 40_000) -> bytes:
    """A valid PNG header declaring 1.6 G pixels, with a tiny (deflated-zeros) body: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\x00" * (w + 1) * 4)            # a few rows; the rest is missing
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _jpeg_bomb(w: int = 60_000, h: int = 60_000) -> bytes:
    """A real JPEG whose SOF0 header is patched to declare 3.6 G pixels."""
    data = bytearray(_jpeg(9))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


OK_IMAGES = {  # name -> (extension, bytes): valid images of every kind, decoded by the pipeline
    "jpeg-rgb-0": ("jpg", _jpeg(0)), "jpeg-rgb-1": ("jpg", _jpeg(1)), "jpeg-rgb-2": ("jpg", _jpeg(2)),
    "jpeg-greyscale": ("jpg", _jpeg(3, mode="L")), "jpeg-cmyk": ("jpg", _jpeg(4, mode="CMYK")),
    "png-rgb": ("png", synthetic.synthetic_image(64, 48, seed=5, fmt="PNG")),
    "png-rgba": ("png", synthetic.synthetic_image(64, 48, seed=6, fmt="PNG", mode="RGBA")),
    "png-palette": ("png", synthetic.synthetic_image(64, 48, seed=7, fmt="PNG", mode="P")),
    "png-greyscale": ("png", synthetic.synthetic_image(64, 48, seed=8, fmt="PNG", mode="L")),
    "png-16bit": ("png", _png16()),
    "webp": ("webp", synthetic.synthetic_image(64, 48, seed=10, fmt="WEBP")),
}
BIG = _jpeg(11, 320, 240)
BAD_IMAGES = {  # name -> (extension, bytes, input-pipeline reason); curation carries image bytes as given
    "truncated-jpeg": ("jpg", BIG[: len(BIG) // 2], "corrupt_image"),
    "garbage-jpeg": ("jpg", b"\xff\xd8\xff\xe0" + b"garbage" * 50, "corrupt_image"),
    "random-bytes": ("jpg", np.random.default_rng(0).bytes(3000), "corrupt_image"),
    "zero-byte-image": ("jpg", b"", "no_image"),
    "png-decompression-bomb": ("png", _png_bomb(), "too_large"),
    "jpeg-decompression-bomb": ("jpg", _jpeg_bomb(), "too_large"),
}


def _tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _url(key: str) -> bytes:
    return json.dumps({"url": f"http://img.example/{key}.jpg"}).encode()


def build_pool(folder):
    """Writes the pool; returns (expected curation bad_input counts, curation faults tried, expected
    pipeline verdicts by uid for the curated records)."""
    good = _jpeg(20)
    samples: list[tuple[str, dict[str, bytes]]] = []
    pipeline: dict[str, str] = {}  # uid -> input-pipeline verdict ("ok" or a skip reason)
    for name, (ext, data) in OK_IMAGES.items():
        samples.append((f"ok-{name}", {ext: data, "json": _url(f"ok-{name}"), "txt": b"a red car photo"}))
        pipeline[records.uid_for_url(f"http://img.example/ok-{name}.jpg")] = "ok"
    for name, (ext, data, reason) in BAD_IMAGES.items():
        samples.append((f"img-{name}", {ext: data, "json": _url(f"img-{name}"),
                                        "txt": b"a dog on the beach"}))
        pipeline[records.uid_for_url(f"http://img.example/img-{name}.jpg")] = reason
    # a 1 MB caption next to a good one: the long text is dropped, the row kept
    long_json = json.dumps({"url": "http://img.example/row-1mb-plus-good.jpg", "caption": [MB_TEXT]}).encode()
    samples.append(("row-1mb-plus-good", {"jpg": good, "json": long_json, "txt": b"red car"}))
    pipeline[records.uid_for_url("http://img.example/row-1mb-plus-good.jpg")] = "ok"
    row_faults = [  # (key, members) of rows the curation skips
        ("row-non-utf8-caption", {"jpg": good, "json": _url("a"), "txt": b"caf\xe9 dog"}),
        ("row-non-utf8-json", {"jpg": good, "json": b'{"url": "http://x/\xff", "caption": "dog"}'}),
        ("row-1mb-caption-only", {"jpg": good, "json": _url("b"), "txt": MB_TEXT.encode()}),
        ("row-no-text", {"jpg": good, "json": _url("c")}),
        ("row-missing-image", {"json": _url("d"), "txt": b"red car"}),
        ("row-zero-byte-json", {"jpg": good, "json": b"", "txt": b"red car"}),
        ("row-garbage-json", {"jpg": good, "json": b"{oops", "txt": b"red car"}),
        ("row-blank-caption", {"jpg": good, "json": _url("e"), "txt": b"   "}),
    ]
    samples += row_faults
    _tar(folder / "00-pool.tar", samples)

    b64 = base64.b64encode(good).decode()
    lines = [
        json.dumps({"url": "http://j.example/ok", "caption": "a dog photo", "jpg": b64}).encode(),
        b'{"url": "http://j.example/latin1", "caption": "caf\xe9"}',      # non-UTF-8 line
        b"{broken json",                                                  # broken JSON
        b"null",                                                          # zero-content record
        json.dumps(["not", "an", "object"]).encode(),                     # not an object
        json.dumps({"caption": "a dog", "jpg": b64}).encode(),            # missing url
        json.dumps({"url": "http://j.example/nocap", "jpg": b64}).encode(),  # missing caption field
        json.dumps({"url": "http://j.example/num", "caption": 5}).encode(),  # caption not a string
        json.dumps({"url": "http://j.example/long", "caption": MB_TEXT}).encode(),  # 1 MB caption only
        json.dumps({"url": "http://j.example/badb64", "caption": "red car", "jpg": "%%%"}).encode(),
    ]
    (folder / "01-pool.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    pipeline[records.uid_for_url("http://j.example/ok")] = "ok"
    pipeline[records.uid_for_url("http://j.example/badb64")] = "no_image"  # image did not decode: no bytes

    # a tar cut inside its third sample (the two before the cut are kept), and a file that is not a tar
    whole = _tar(folder / "02-cut.tar", [
        ("cut-a", {"jpg": good, "json": _url("cut-a"), "txt": b"red car"}),
        ("cut-b", {"jpg": good, "json": _url("cut-b"), "txt": b"red car"}),
        ("cut-c", {"jpg": BIG * 4, "txt": b"red car"})])
    (folder / "02-cut.tar").write_bytes(whole[: len(whole) - len(BIG) * 2])
    for k in ("cut-a", "cut-b"):
        pipeline[records.uid_for_url(f"http://img.example/{k}.jpg")] = "ok"
    (folder / "03-garbage.tar").write_bytes(b"this is not a tar file" * 40)

    want = {
        "skipped_rows": {"non_utf8": 2, "no_valid_text": 6, "missing_image": 1, "bad_json": 5,
                         "missing_url": 1, "missing_text": 1},
        "dropped_texts": {"non_utf8": 1, "text_too_long": 3, "empty_text": 1, "not_a_string": 1},
        "files": {"truncated_file": 1, "unreadable_file": 1},
    }
    # tar rows + JSONL lines (not the good one, nor the bad-base64 one: its row is fine, the pipeline counts
    # its missing image) + 2 bad files
    tried = len(row_faults) + (len(lines) - 2) + 2
    return want, tried, pipeline


ARRAY_RECORD_FAULTS = {  # name -> (payload, reason)
    "zero-byte-record": (b"", "bad_record"),
    "garbage-record": (b"\x93not msgpack at all", "bad_record"),
    "msgpack-list-not-map": (msgpack.packb([1, 2, 3]), "bad_record"),
    "missing-texts-field": (msgpack.packb({"v": 1, "uid": "m1", "image": b"x"}), "bad_record"),
    "missing-uid-field": (msgpack.packb({"v": 1, "texts": ["a dog"], "image": b"x"}), "bad_record"),
    "newer-schema": (msgpack.packb({"v": 99, "uid": "n", "texts": ["a"], "image": b"x"}), "bad_record"),
    "non-utf8-caption": (records.encode(records.Record(uid="u8", image=_jpeg(30), texts=["XXXX"]))
                         .replace(b"XXXX", b"\xff\xfe\xfd\xfc"), "bad_record"),
    "missing-image-field": (msgpack.packb({"v": 1, "uid": "mi", "texts": ["a dog"]}), "no_image"),
    "no-texts": (records.encode(records.Record(uid="nt", image=_jpeg(31), texts=[])), "no_text"),
    "blank-texts": (records.encode(records.Record(uid="bt", image=_jpeg(32), texts=["  ", ""])), "no_text"),
    "1mb-caption": (records.encode(records.Record(uid="mb", image=_jpeg(33), texts=[MB_TEXT])), "ok"),
}


def test_bad_inputs_through_curation_and_input_pipeline(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    want_curation, tried_curation, pipeline = build_pool(pool)
    cfg = from_dict({"inputs": [str(pool / "*")], "metadata": write_metadata(str(tmp_path / "meta.json")),
                     "workdir": str(tmp_path / "wd"), "workers": 1, "progress": False, "max_error_rate": 1.0,
                     "source": {"text_fields": ["caption"], "image_field": "jpg"},
                     "balance": {"t": None, "mode": "per_image"}}).validate()
    run(cfg, until="pack")  # never raises on bad input (max_error_rate 1.0: only counted)

    out = str(tmp_path / "wd" / "out")
    bad = read_manifest(out)["bad_input"]
    got = {k: {r: n for r, n in bad[k].items() if n} for k in ("skipped_rows", "dropped_texts", "files")}
    curated = {r.uid: r for r in iter_records(out)}
    counted_curation = sum(got["skipped_rows"].values()) + sum(got["files"].values())
    trials.record("inputs", "curation-bad-rows-and-files", fault="corrupt pool rows/files through curation",
                  survived=got == want_curation, bad_inputs_tried=tried_curation,
                  bad_inputs_counted=counted_curation,
                  records_lost=len(set(pipeline) - set(curated)))
    assert got == want_curation, json.dumps(got, sort_keys=True)
    assert counted_curation == tried_curation
    assert set(curated) == set(pipeline), "a good or image-only-bad row was lost (or an extra kept)"

    # the curated shards + a shard of bad ArrayRecord records -> the training input pipeline
    extra = synthetic.write_shards(str(tmp_path / "extra"), [p for p, _ in ARRAY_RECORD_FAULTS.values()], 1,
                                   prefix="faults")
    paths = [str(tmp_path / "wd" / "out" / s["file"]) for s in read_manifest(out)["shards"]] + extra
    source = train_data.grain.sources.ArrayRecordDataSource(paths)
    uids = [records.decode(source[i]).uid for i in range(len(curated))] + list(ARRAY_RECORD_FAULTS)
    expected = [pipeline[u] for u in uids[:len(curated)]] + [r for _, r in ARRAY_RECORD_FAULTS.values()]
    # a shuffle seed whose epoch ends on a kept record: skips after the last kept record end the stream
    # without a batch and are not counted (documented in input_pipeline.md), so this makes every count visible
    n = len(uids)
    seed = next(sd for sd in range(100)
                if expected[list(train_data.grain.MapDataset.range(n).shuffle(seed=sd))[-1]] == "ok")
    cfg_data = dict(paths=paths, global_batch_size=1, image_size=16, tokenizer="clip", prefetch=0,
                    num_epochs=1, seed=seed)
    decode = train_data._DecodeExample(source, train_data.TrainDataConfig.from_mapping(cfg_data))
    verdicts = []
    for i in range(len(uids)):
        v = decode.map((0, i))["skip"]
        verdicts.append("ok" if v < 0 else train_data.SKIP_REASONS[v])
    assert dict(zip(uids, verdicts)) == dict(zip(uids, expected))  # every record's verdict, exactly

    # one epoch through the Grain pipeline: every bad record counted, exactly
    order = list(train_data.grain.MapDataset.range(n).shuffle(seed=seed))
    last_kept = max(k for k, i in enumerate(order) if expected[i] == "ok")
    want_counts = collections.Counter(expected[i] for i in order[:last_kept + 1] if expected[i] != "ok")
    it = train_data.make_train_iterator(cfg_data, None, 0, 1)
    n_batches = sum(1 for _ in it)
    it.close()
    st = it.stats
    got_counts = {r: st[f"skipped/{r}"] for r in train_data.SKIP_REASONS if st[f"skipped/{r}"]}
    tried_pipeline = sum(1 for e in expected if e != "ok")
    trials.record("inputs", "input-pipeline-bad-records", fault="corrupt records/images through the loader",
                  survived=got_counts == dict(want_counts) and n_batches == expected.count("ok"),
                  bad_inputs_tried=tried_pipeline, bad_inputs_counted=sum(got_counts.values()),
                  shuffle_seed=seed)
    assert n_batches == st["examples"] == expected.count("ok")
    assert got_counts == dict(want_counts), (got_counts, want_counts)
    assert sum(got_counts.values()) == tried_pipeline
