"""Training input pipeline: transforms, determinism, per-process slicing, resume, balancing, bad records."""

import io

import numpy as np
import pytest
from PIL import Image

from input_pipeline import synthetic, train_data, transforms
from metaclip_jax import records

N = 24
SIZE = 32


def _tokenizer_or_skip() -> str:
    try:
        import metaclip_jax.tokenizer  # noqa: F401
    except ImportError:
        pytest.skip("metaclip_jax.tokenizer is missing")
    return "clip"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    return synthetic.write_shards(str(folder), synthetic.synthetic_records(N, 48, 40, texts_per_image=3),
                                  num_shards=3)


def _cfg(paths, **kw):
    base = dict(paths=paths, global_batch_size=4, image_size=SIZE, seed=7, tokenizer=_tokenizer_or_skip(),
                prefetch=0)
    base.update(kw)
    return base


def _take(it, n):
    out = []
    for _ in range(n):
        b = next(it)
        out.append({k: np.asarray(v) for k, v in b.items()} | {"record": it.last_host["record"].copy(),
                                                                "epoch": it.last_host["epoch"].copy()})
    return out


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


# ------------------------------------------------------------------------------------------ transforms

def test_random_resized_crop_params_bounds_and_fallback():
    rng = np.random.default_rng(0)
    for _ in range(200):
        i, j, h, w = transforms.random_resized_crop_params(640, 480, rng)
        assert i >= 0 and j >= 0 and i + h <= 480 and j + w <= 640
        assert 0.9 * 640 * 480 * 0.97 <= h * w <= 640 * 480
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
    # A 10:1 strip never satisfies the ratio with scale >= 0.9: torchvision's centre-crop fallback.
    assert transforms.random_resized_crop_params(1000, 100, rng) == (0, 433, 100, 133)


@pytest.mark.parametrize("width,min_scale,backend", [(1024, 1.0, "pil"), (640, 0.9, "pil"),
                                                     (640, 0.9, "auto"), (1024, 1.0, "auto")])
def test_fast_decode_paths_are_close_to_full_decode(width, min_scale, backend):
    data = synthetic.synthetic_image(width, width * 3 // 4, seed=1)
    full = transforms.train_image(data, 224, np.random.default_rng(3), draft=False, resize_backend="pil")
    fast = transforms.train_image(data, 224, np.random.default_rng(3), draft=True, draft_min_scale=min_scale,
                                  resize_backend=backend)
    assert full.shape == fast.shape == (224, 224, 3) and full.dtype == fast.dtype == np.uint8
    assert np.abs(full.astype(int) - fast.astype(int)).mean() < 6


@pytest.mark.parametrize("width,draft", [(1024, True), (1024, False), (300, True)])
def test_simplejpeg_and_pil_decoders_give_equal_pixels(width, draft):
    """Both run libjpeg-turbo: at the same DCT scale (1/4 for 1024 px, 1/1 otherwise) the pixels are equal."""
    data = synthetic.synthetic_image(width, width * 3 // 4, seed=6)
    kw = dict(draft=draft, draft_min_scale=1.0, resize_backend="pil")
    fast = transforms.train_image(data, 224, np.random.default_rng(4), jpeg_decoder="simplejpeg", **kw)
    ref = transforms.train_image(data, 224, np.random.default_rng(4), jpeg_decoder="pil", **kw)
    np.testing.assert_array_equal(fast, ref)


def test_simplejpeg_refusals_fall_back_to_pil():
    """CMYK (TurboJPEG's conversion rounds differently) decodes through PIL; a truncated file still fails
    as it does in PIL."""
    cmyk = synthetic.synthetic_image(300, 200, seed=2, mode="CMYK")
    assert transforms._jpeg_size(cmyk) is None
    assert transforms._jpeg_size(synthetic.synthetic_image(300, 200, seed=2, mode="L")) == (300, 200)
    for backend in ("pil", "cv2"):
        got = transforms.train_image(cmyk, 64, np.random.default_rng(1), jpeg_decoder="simplejpeg",
                                     resize_backend=backend)
        want = transforms.train_image(cmyk, 64, np.random.default_rng(1), jpeg_decoder="pil",
                                      resize_backend=backend)
        np.testing.assert_array_equal(got, want)
    jpeg = synthetic.synthetic_image(300, 200, seed=2)
    assert transforms._decode_jpeg_scaled(jpeg[: len(jpeg) // 2], 300, 200, 1) is None
    with pytest.raises(OSError):
        transforms.train_image(jpeg[: len(jpeg) // 2], 64, np.random.default_rng(1), jpeg_decoder="pil")
    with pytest.raises(OSError):
        transforms.train_image(jpeg[: len(jpeg) // 2], 64, np.random.default_rng(1),
                               jpeg_decoder="simplejpeg")


def test_jpeg_bomb_is_refused_from_the_header():
    data = synthetic.synthetic_image(400, 300, seed=3)
    for decoder in ("simplejpeg", "pil"):
        with pytest.raises(transforms.ImageTooLarge):
            transforms.train_image(data, 32, np.random.default_rng(0), max_pixels=100_000,
                                   jpeg_decoder=decoder)


def test_cv2_area_resize_is_close_to_antialiased_pil_on_big_shrinks():
    """A 4x shrink: plain bicubic would alias; area averaging stays within ~1 level of PIL's antialiased
    bicubic (the torchvision pixels)."""
    data = synthetic.synthetic_image(1024, 768, seed=8)
    want = transforms.train_image(data, 224, np.random.default_rng(2), draft=False, resize_backend="pil")
    got = transforms.train_image(data, 224, np.random.default_rng(2), draft=False, resize_backend="cv2")
    diff = np.abs(want.astype(int) - got.astype(int))
    assert diff.mean() < 1.5, diff.mean()


def test_decode_divisor_keeps_the_crop_above_min_scale():
    assert transforms._decode_divisor(609, 440, 224, 0.9) == 2    # 220 px >= 201.6 at 1/2
    assert transforms._decode_divisor(609, 440, 224, 1.0) == 1    # 220 < 224: never upsample
    assert transforms._decode_divisor(1000, 900, 224, 1.0) == 4   # 225 px at 1/4
    assert transforms._decode_divisor(4000, 3000, 224, 1.0) == 8  # 1/8 is libjpeg's smallest scale


def test_eval_image_short_side_and_centre_crop():
    img = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (100, 1, 3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out = transforms.eval_image(buf.getvalue(), 50)
    assert out.shape == (50, 50, 3)
    # Resize 200x100 -> 100x50, crop the middle 50 columns: pixel values around 50..150.
    assert 40 < out[:, 0].mean() < 60 and 140 < out[:, -1].mean() < 160


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("PNG", "L"), ("PNG", "RGBA"), ("PNG", "P"),
                                      ("JPEG", "L"), ("JPEG", "CMYK"), ("WEBP", "RGB"), ("PNG", "I;16")])
def test_formats_decode(fmt, mode):
    if mode == "I;16":
        arr = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        data = buf.getvalue()
    else:
        data = synthetic.synthetic_image(40, 30, seed=2, fmt=fmt, mode=mode)
    out = transforms.train_image(data, SIZE, np.random.default_rng(0))
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    if mode == "I;16":
        assert out.max() > 200  # scaled to 8 bits, not clipped at 255 of a 16-bit range


# --------------------------------------------------------------------------------- determinism + slices

def test_same_seed_same_batches_and_seed_matters(shards):
    a = train_data.make_train_iterator(_cfg(shards), None, 0, 1)
    b = train_data.make_train_iterator(_cfg(shards), None, 0, 1)
    c = train_data.make_train_iterator(_cfg(shards, seed=8), None, 0, 1)
    xa, xb, xc = _take(a, 3), _take(b, 3), _take(c, 3)
    assert _same(xa, xb)
    assert not _same(xa, xc)
    assert xa[0]["image"].shape == (4, SIZE, SIZE, 3) and xa[0]["image"].dtype == np.uint8
    assert xa[0]["text"].shape == (4, 77) and xa[0]["text"].dtype == np.int32


def test_process_slices_are_disjoint_and_cover_each_epoch(shards):
    seen = []
    for p in range(2):
        it = train_data.make_train_iterator(_cfg(shards, num_epochs=1, global_batch_size=4), None, p, 2)
        recs = np.concatenate([x["record"] for x in _take(it, N // 4)])  # N/2 per process, batch 2
        seen.append(set(recs.tolist()))
        assert len(recs) == len(set(recs.tolist()))
        with pytest.raises(StopIteration):
            next(it)
    assert not (seen[0] & seen[1])
    assert seen[0] | seen[1] == set(range(N))


def test_reshuffle_and_caption_redraw_across_epochs(shards):
    it = train_data.make_train_iterator(_cfg(shards, global_batch_size=N), None, 0, 1)
    e0, e1 = _take(it, 2)
    assert (e0["epoch"] == 0).all() and (e1["epoch"] == 1).all()
    assert sorted(e0["record"]) == sorted(e1["record"]) == list(range(N))
    assert not np.array_equal(e0["record"], e1["record"])
    t0 = dict(zip(e0["record"].tolist(), map(tuple, e0["text"])))
    t1 = dict(zip(e1["record"].tolist(), map(tuple, e1["text"])))
    assert sum(t0[r] != t1[r] for r in range(N)) >= N // 3  # 3 captions: ~2/3 change


# --------------------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bit_identical(shards, workers):
    cfg = _cfg(shards, worker_count=workers, prefetch=2)
    ref = train_data.make_train_iterator(cfg, None, 0, 1)
    first = _take(ref, 4)  # crosses an epoch boundary (24 records, batch 4 -> 6 per epoch)
    state = train_data.save_state(ref)
    assert isinstance(state, bytes)
    cont = _take(ref, 4)
    ref.close()
    resumed = train_data.make_train_iterator(cfg, None, 0, 1)
    train_data.restore_state(resumed, state)
    again = _take(resumed, 4)
    resumed.close()
    assert _same(cont, again)
    assert resumed.stats["batches"] == 8 and resumed.stats["examples"] == 32
    assert not _same(first, cont)


# ------------------------------------------------------------------------------------ online balancing

def test_online_balancing_acceptance_matches_keep_prob(tmp_path):
    tok = _tokenizer_or_skip()
    probs = [0.1, 0.5, 0.9, 1.0]
    recs = synthetic.synthetic_records(50, 16, 16, texts_per_image=4, keep_prob=probs)
    paths = synthetic.write_shards(str(tmp_path), recs, 1)
    it = train_data.make_train_iterator(dict(paths=paths, global_batch_size=25, image_size=16,
                                             tokenizer=tok, prefetch=0, seed=3), None, 0, 1)
    kept_by_text = np.zeros(4)
    for _ in range(40):
        next(it)
    st = it.stats
    visits = st["examples"] + st["skipped/balanced_out"]
    rate = st["examples"] / visits
    expected = float(np.mean(probs))  # uniform text draw, then accept with that text's keep_prob
    assert abs(rate - expected) < 4 * np.sqrt(expected * (1 - expected) / visits)
    # Per text: among kept pairs, text j appears with frequency p_j / sum(p).
    it2 = train_data.make_train_iterator(dict(paths=paths, global_batch_size=25, image_size=16,
                                              tokenizer="bytes", prefetch=0, seed=3), None, 0, 1)
    for _ in range(40):
        b = next(it2)
        # byte tokens: "photo {i} caption {j}" -> the last character before EOT is j
        ends = np.argmax(b["text"] == 258, axis=1)
        digits = b["text"][np.arange(len(ends)), ends - 1] - 1 - ord("0")
        kept_by_text += np.bincount(digits, minlength=4)
    freq = kept_by_text / kept_by_text.sum()
    want = np.asarray(probs) / sum(probs)
    assert np.all(np.abs(freq - want) < 4 * np.sqrt(want * (1 - want) / kept_by_text.sum()) + 1e-3)


def test_keep_prob_one_and_switch_off_pass_everything(tmp_path):
    tok = _tokenizer_or_skip()
    paths = synthetic.write_shards(str(tmp_path / "a"), synthetic.synthetic_records(8, 16, 16), 1)
    it = train_data.make_train_iterator(dict(paths=paths, global_batch_size=8, image_size=16, tokenizer=tok,
                                             num_epochs=3, prefetch=0), None, 0, 1)
    _take(it, 3)
    assert it.stats["skipped/balanced_out"] == 0
    paths = synthetic.write_shards(str(tmp_path / "b"),
                                   synthetic.synthetic_records(8, 16, 16, keep_prob=0.01), 1)
    it = train_data.make_train_iterator(dict(paths=paths, global_batch_size=8, image_size=16, tokenizer=tok,
                                             num_epochs=3, prefetch=0, online_balancing=False), None, 0, 1)
    _take(it, 3)
    assert it.stats["skipped/balanced_out"] == 0


# ---------------------------------------------------------------------------------------- bad records

@pytest.mark.parametrize("workers", [0, 2])
def test_bad_records_are_skipped_and_counted(tmp_path, workers):
    tok = _tokenizer_or_skip()
    good = synthetic.synthetic_records(6, 32, 24)
    jpeg = synthetic.synthetic_image(64, 48, seed=5)
    bad = [
        b"",                                                                    # zero-byte record
        b"\x93not msgpack at all",                                               # undecodable
        records.encode(records.Record(uid="a", image=jpeg, texts=[])),          # missing text
        records.encode(records.Record(uid="b", image=jpeg, texts=["  "])),      # empty text
        records.encode(records.Record(uid="c", image=b"", texts=["x"])),        # no image
        records.encode(records.Record(uid="d", image=jpeg[: len(jpeg) // 2], texts=["x"])),  # truncated
        records.encode(records.Record(uid="e", image=b"\xff\xd8garbage", texts=["x"])),       # corrupt
        records.encode(records.Record(uid="f", image=synthetic.synthetic_image(400, 300, 1, fmt="PNG"),
                                      texts=["x"])),                                         # bomb
    ]
    items = [*good[:3], *bad, *good[3:]]
    paths = synthetic.write_shards(str(tmp_path), items, 2)
    cfg = dict(paths=paths, global_batch_size=1, image_size=16, tokenizer=tok, prefetch=0,
               max_pixels=100_000, worker_count=workers)
    want = {"bad_record": 2, "no_text": 2, "no_image": 1, "corrupt_image": 2, "too_large": 1,
            "balanced_out": 0}
    if workers == 0:  # every record's verdict, exactly
        decode = train_data._DecodeExample(train_data.grain.sources.ArrayRecordDataSource(paths),
                                           train_data.TrainDataConfig.from_mapping(cfg))
        verdicts = [decode.map((0, i))["skip"] for i in range(len(items))]
        got = {r: verdicts.count(k) for k, r in enumerate(train_data.SKIP_REASONS)}
        assert got == want and verdicts.count(-1) == 6
    # Through the pipeline (counts travel inside the worker batches): 3 epochs of the 6 good records
    # have been consumed after 18 batches; without workers the skips lie between 2 and 3 epochs' worth.
    it = train_data.make_train_iterator(cfg, None, 0, 1)
    _take(it, 18)
    it.close()
    st = it.stats
    assert st["examples"] == 18
    if workers == 0:
        for reason, c in want.items():
            assert 2 * c <= st[f"skipped/{reason}"] <= 3 * c, (reason, st)
    else:  # each worker walks its own interleaved slice: totals near 18 * 8/6, every reason counted
        assert all(st[f"skipped/{r}"] > 0 for r, c in want.items() if c), st
        assert st["skipped/balanced_out"] == 0
        assert 8 <= sum(st[f"skipped/{r}"] for r in want) <= 40, st


# ------------------------------------------------------------------------------------- global arrays

def test_global_arrays_sharded_over_two_devices(shards):
    import jax

    from metaclip_jax.sharding import make_mesh

    mesh = make_mesh(data=2, devices=jax.devices()[:2])
    it = train_data.make_train_iterator(_cfg(shards, image_dtype="float32"), mesh, 0, 1)
    b = next(it)
    assert isinstance(b["image"], jax.Array) and b["image"].shape == (4, SIZE, SIZE, 3)
    assert b["image"].dtype == np.float32 and b["text"].shape == (4, 77)
    assert b["image"].sharding.spec[0] == "data" and len(b["image"].addressable_shards) == 2
    assert b["image"].addressable_shards[0].data.shape == (2, SIZE, SIZE, 3)
    ref = train_data.make_train_iterator(_cfg(shards), None, 0, 1)
    np.testing.assert_allclose(np.asarray(b["image"]), transforms.normalize(next(ref)["image"]), atol=1e-6)


def test_config_rejects_unknown_keys_and_expands_globs(shards, tmp_path):
    with pytest.raises(ValueError, match="unknown input pipeline config keys"):
        train_data.TrainDataConfig.from_mapping({"pathz": shards})
    folder = shards[0].rsplit("/", 1)[0]
    assert train_data.expand_paths(folder) == sorted(shards)
    assert train_data.expand_paths(folder + "/train-0000[01]-*") == sorted(shards)[:2]
    assert train_data.expand_paths(["gs://bucket/x.array_record"]) == ["gs://bucket/x.array_record"]
    with pytest.raises(FileNotFoundError):
        train_data.expand_paths(str(tmp_path / "*.array_record"))


def test_remote_globs_expand_through_epath(monkeypatch, tmp_path):
    """gs:// globs go to etils.epath from the first component with a wildcard; results sorted, scheme kept."""
    import pathlib

    from etils import epath

    names = ("b/train-00001.array_record", "b/train-00000.array_record", "b/other.txt", "c/x.array_record")
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    calls = []

    class FakeGcsPath:
        def __init__(self, path: str):
            self.path = path

        def glob(self, pattern: str):
            calls.append((self.path, pattern))
            local = pathlib.Path(self.path.replace("gs://bucket", str(tmp_path)))
            return [FakeGcsPath(str(p).replace(str(tmp_path), "gs://bucket")) for p in local.glob(pattern)]

        def __str__(self) -> str:
            return self.path

    monkeypatch.setattr(epath, "Path", FakeGcsPath)
    got = train_data.expand_paths("gs://bucket/b/train-*.array_record,gs://bucket/*/x.array_record")
    assert got == ["gs://bucket/b/train-00000.array_record", "gs://bucket/b/train-00001.array_record",
                   "gs://bucket/c/x.array_record"]
    assert calls == [("gs://bucket/b", "train-*.array_record"), ("gs://bucket", "*/x.array_record")]


@pytest.mark.reference
def test_transforms_match_torchvision_on_pil():
    from tests.reference import import_open_clip

    import_open_clip()  # registers torchvision's op schemas so torchvision imports on CPU torch
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize
    from torchvision.transforms import functional as tvf

    data = synthetic.synthetic_image(300, 200, seed=4)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    want = np.asarray(CenterCrop(64)(Resize(64, interpolation=InterpolationMode.BICUBIC)(img)))
    np.testing.assert_array_equal(transforms.eval_image(data, 64), want)

    top, left, h, w = transforms.random_resized_crop_params(300, 200, np.random.default_rng(5))
    want = np.asarray(tvf.resized_crop(img, top, left, h, w, [64, 64], InterpolationMode.BICUBIC))
    got = transforms.train_image(data, 64, np.random.default_rng(5), draft=False, resize_backend="pil")
    np.testing.assert_array_equal(got, want)


COCO_MINI = __import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco_mini"


@pytest.mark.skipif(not (COCO_MINI / "captions.json").exists(), reason="../shared/data/coco_mini not present")
def test_real_jpegs_simplejpeg_equals_pil_and_fast_path_stays_close():
    """Real COCO photos: equal pixels from both decoders at full scale; the default fast path (1/2-scale
    decode, OpenCV resize) stays within a few levels of torchvision's pixels on the same crops."""
    import json

    items = json.loads((COCO_MINI / "captions.json").read_text())[:40]
    diffs = []
    for i, it in enumerate(items):
        data = (COCO_MINI / it["file"]).read_bytes()
        exact = dict(draft=False, resize_backend="pil")
        rng = train_data.example_rng
        a = transforms.train_image(data, 224, rng(0, 0, i), jpeg_decoder="simplejpeg", **exact)
        b = transforms.train_image(data, 224, rng(0, 0, i), jpeg_decoder="pil", **exact)
        np.testing.assert_array_equal(a, b)
        fast = transforms.train_image(data, 224, rng(0, 0, i), draft_min_scale=0.9)
        diffs.append(np.abs(fast.astype(int) - b.astype(int)).mean())
    assert np.mean(diffs) < 4.5, np.mean(diffs)
