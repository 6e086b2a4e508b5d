"""Evaluators: classifier construction, chunked retrieval, Llip adapter, registry, standalone CLI."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image, ImageDraw

from evaluate import metrics, registry, retrieval, tasks, zeroshot
from evaluate.scoring import CLIP_SCORING, ScoringModel, scoring_for
from metaclip_jax.sharding import make_mesh
from metaclip_jax.tokenizer import ClipTokenizer

COLORS = {"red": (220, 30, 30), "green": (30, 190, 30), "blue": (30, 30, 220)}


def mesh2():
    return make_mesh(devices=jax.devices()[:2])


@pytest.fixture(scope="module")
def tiny_clip():
    from metaclip_jax.models import presets
    from metaclip_jax.models.clip import CLIP

    return CLIP(presets.get_config("test-tiny"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """An image folder with one coloured disc per image, and a caption set (JSONL + COCO JSON)."""
    root = str(tmp_path_factory.mktemp("evaldata"))
    for name, col in COLORS.items():
        d = os.path.join(root, "colors", "test", name)
        os.makedirs(d)
        for i in range(3):
            im = Image.new("RGB", (36 + 4 * i, 32), (255, 255, 255))
            ImageDraw.Draw(im).ellipse([4, 4, 28, 28], fill=col)
            im.save(os.path.join(d, f"{i}.png"))
    os.makedirs(os.path.join(root, "captions", "images"))
    rows, coco = [], {"images": [], "annotations": []}
    names = list(COLORS)
    for i in range(3):
        name = names[i]
        im = Image.new("RGB", (40, 40 + i), (255, 255, 255))
        ImageDraw.Draw(im).rectangle([6, 6, 30, 30], fill=COLORS[name])
        im.save(os.path.join(root, "captions", "images", f"{i}.png"))
        caps = [f"a {name} square", f"{name}"] + ([f"something {name}"] if i % 2 else [])
        rows.append(json.dumps({"image": f"images/{i}.png", "captions": caps}))
        coco["images"].append({"id": i, "file_name": f"{i}.png"})
        coco["annotations"] += [{"id": 10 * i + j, "image_id": i, "caption": c} for j, c in enumerate(caps)]
    with open(os.path.join(root, "captions", "captions.jsonl"), "w") as f:
        f.write("\n".join(rows) + "\n")
    with open(os.path.join(root, "captions", "annotations.json"), "w") as f:
        json.dump(coco, f)
    return root


# ------------------------------------------------------------------------------------ tasks / prompts

def test_task_table_and_prompt_sources(tmp_path) -> None:
    assert len(tasks.METACLIP_SUITE) == 26 == len(tasks.SUITES["metaclip26"])
    assert tasks.get_task("FGVCAircraft").main_metric == "mean_per_class_recall"
    assert tasks.get_task("k700").main_metric == "top1_top5_mean"
    assert tasks.get_task("HatefulMemes").main_metric == "roc_auc"
    assert tasks.get_task("imagenet1k").name == "imagenet"
    assert tasks.expand_tasks("imagenet,retrieval")[:2] == ["imagenet", "coco"]
    cb = tasks.clip_benchmark_templates()
    if cb:  # clip-benchmark installed (--no-deps): its counts, and where MetaCLIP's differ
        assert len(cb["imagenet1k"]) == 80 and len(cb["cifar10"]) == 18
        diff = tasks.template_count_differences()
        assert diff["resisc45"] == (18, 4) and diff["pcam"] == (1, 2)
        assert "fgvc_aircraft" not in diff and "stl10" not in diff
        names, tmpl, origin = tasks.resolve_prompts(tasks.get_task("imagenet"))
        assert len(names) == 1000 and len(tmpl) == 80 and origin["templates"] == "clip_benchmark"
    # MetaCLIP-format files: keyed by MetaCLIP names, synonym lists, "{}" templates
    fer = "FacialEmotionRecognition2013"
    (tmp_path / "labels.json").write_text(json.dumps({fer: [["angry", "mad"], "happy"]}))
    (tmp_path / "templates.json").write_text(json.dumps({fer: ["a {} face.", "{}!"]}))
    labels_file, tmpl_file = str(tmp_path / "labels.json"), str(tmp_path / "templates.json")
    names, tmpl, origin = tasks.resolve_prompts(tasks.get_task("fer2013"), None, labels_file, tmpl_file)
    assert origin == {"classnames": "file", "templates": "file"}
    prompts, owner = tasks.expand_prompts(names, tmpl)
    assert prompts == ["a angry face.", "a mad face.", "angry!", "mad!", "a happy face.", "happy!"]
    assert owner == [0, 0, 0, 0, 1, 1]
    assert tasks.format_prompt('a "{c}" sign {x}', "stop") == 'a "stop" sign {x}'
    spec = tasks.DataSpec.parse("tfds:imagenet2012,validation", "/d")
    assert (spec.kind, spec.path, spec.split, spec.data_dir) == ("tfds", "imagenet2012", "validation", "/d")
    spec = tasks.DataSpec.parse("karpathy:/c/dataset_coco.json,/c,test")
    assert (spec.kind, spec.extra, spec.split) == ("karpathy", ("/c",), "test")
    with pytest.raises(ValueError):
        tasks.DataSpec.parse("nope:x")


def test_karpathy_reader(tmp_path) -> None:
    data = {"images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test",
         "sentences": [{"raw": " x "}, {"raw": "y"}]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "train", "sentences": [{"raw": "z"}]}]}
    p = tmp_path / "dataset_coco.json"
    p.write_text(json.dumps(data))
    src = tasks.karpathy_captions(str(p), "/root", "test")
    assert src.image_paths == ["/root/val2014/a.jpg"] and src.captions == [["x", "y"]]


# ------------------------------------------------------------------------------------ classifier

def test_classifier_matches_numpy(tiny_clip) -> None:
    """Spec §2.2: normalise each prompt embedding, average over templates x synonyms, renormalise."""
    names = ["cat", ["dog", "puppy"], "red car"]
    templates = ["a photo of a {c}.", "a {c}", "itap of my {c}"]
    tok = ClipTokenizer()
    side = zeroshot.build_classifier(tiny_clip, CLIP_SCORING, names, templates, tok, batch_size=4,
                                     mesh=mesh2())
    want = []
    for label in names:
        syn = label if isinstance(label, list) else [label]
        e = np.asarray(tiny_clip.encode_text(jnp.asarray(tok([t.replace("{c}", s) for t in templates
                                                                 for s in syn]))))
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        m = e.mean(0)
        want.append(m / np.linalg.norm(m))
    np.testing.assert_allclose(np.asarray(side), np.stack(want), atol=2e-5)


# ------------------------------------------------------------------------------------ retrieval

@pytest.mark.parametrize("use_mesh", [False, True])
def test_retrieval_chunked_matches_unchunked_and_brute_force(use_mesh: bool) -> None:
    rng = np.random.default_rng(0)
    n_img = 23
    owner = np.repeat(np.arange(n_img), rng.integers(1, 6, n_img)).astype(np.int32)
    img = rng.normal(size=(n_img, 16)).astype(np.float32)
    txt = (img[owner] + 1.2 * rng.normal(size=(len(owner), 16))).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    mesh = mesh2() if use_mesh else None
    small = retrieval.retrieval_ranks_chunked(None, CLIP_SCORING, img, txt, owner, image_chunk=5,
                                              text_chunk=7, mesh=mesh)
    whole = retrieval.retrieval_ranks_chunked(None, CLIP_SCORING, img, txt, owner, image_chunk=1000,
                                              text_chunk=1000, mesh=mesh)
    full = metrics.retrieval_ranks(img @ txt.T, owner)
    for a, b, c in zip(small, whole, full):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    scores = img @ txt.T
    for k in (1, 5):
        i2t_hit = [any(owner[j] == i for j in np.argsort(-scores[i])[:k]) for i in range(n_img)]
        t2i_hit = [owner[j] in np.argsort(-scores[:, j])[:k] for j in range(len(owner))]
        assert metrics.recall_at_k(small[0], k) == pytest.approx(np.mean(i2t_hit))
        assert metrics.recall_at_k(small[1], k) == pytest.approx(np.mean(t2i_hit))


# ------------------------------------------------------------------------------------ Llip adapter

def numpy_llip_score(kmat, vmat, q, z, out_proj, tau, heads):
    """Spec llip.md §2.3, written as loops. ``kmat, vmat [Ni, K, D]``, ``q [Nt, D]``, ``z [Nt, D]``; head h
    is the feature slice ``[h*D/H, (h+1)*D/H)``; ``out_proj`` is applied as ``concat_h(o) @ W``."""
    ni, k, d = kmat.shape
    dh = d // heads
    s = np.zeros((ni, len(q)))
    for i in range(ni):
        for j in range(len(q)):
            o = []
            for h in range(heads):
                sl = slice(h * dh, (h + 1) * dh)
                kk, vv, qq = kmat[i, :, sl], vmat[i, :, sl], q[j, sl]
                a = kk @ qq / tau
                w = np.exp(a - a.max())
                w /= w.sum()
                o.append(w @ vv)
            zz = np.concatenate(o) @ out_proj
            s[i, j] = zz @ z[j] / np.linalg.norm(zz) / np.linalg.norm(z[j])
    return s


def _merge_heads(x):
    """The real model's head-split tensors in the reference's [.., D] layout: ``[B, H, K, d] -> [B, K, H*d]``
    (keys / values), ``[B, H, d] -> [B, H*d]`` (queries)."""
    x = np.asarray(x, np.float64)
    if x.ndim == 4:
        x = x.transpose(0, 2, 1, 3)
    return x.reshape(*x.shape[:-2], -1)


def test_llip_adapter_classifier_and_pairs() -> None:
    """The generic evaluator paths (build_classifier, score / score_pairs, chunked retrieval) on the real
    Llip model through ``scoring_for`` (its ``LlipHeadScoring``), against independent computations."""
    from metaclip_jax.models.llip import Llip, LlipHeadScoring, get_llip_config

    model = Llip(get_llip_config("llip-test-tiny"), rngs=nnx.Rngs(1))
    cfg = model.cfg
    heads, size = cfg.num_heads, cfg.vision.image_size
    scoring = scoring_for(model)
    assert isinstance(scoring, LlipHeadScoring) and isinstance(scoring, ScoringModel)
    assert scoring.has_temperature and scoring_for(model) is scoring
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 255, (5, size, size, 3), dtype=np.uint8))
    tok = ClipTokenizer()
    names = ["cat", "dog", "car", "tree"]
    img_side = scoring.image_embed(model, images)
    assert img_side[0].shape == (5, heads, cfg.num_tokens, cfg.embed_dim // heads)
    kmat, vmat = (_merge_heads(x) for x in img_side)
    w_o = np.asarray(model.out_proj[...], np.float64)
    p = model.head_params()
    prompts = jnp.asarray(tok([f"a photo of a {n}." for n in names]))
    q, z = model.encode_text_query(prompts)
    text_side = scoring.text_embed(model, prompts)
    # one template: the classifier equals direct pair scoring (spec evaluation.md §12.5)
    cls_side = zeroshot.build_classifier(model, scoring, names, ["a photo of a {c}."], tok, batch_size=2)
    for tau in (1.0, 5.0):
        logits = np.asarray(scoring.score(model, img_side, cls_side, tau))
        want = numpy_llip_score(kmat, vmat, _merge_heads(q), np.asarray(z, np.float64), w_o, tau, heads)
        np.testing.assert_allclose(logits, want, atol=1e-4)
        direct = np.asarray(model.pair_logits_direct(*img_side, q, z, tau=tau))
        np.testing.assert_allclose(logits, (direct - float(p["bias"])) / float(p["scale"]), atol=1e-4)
        for c in range(len(names)):
            one = jax.tree.map(lambda x, c=c: jnp.repeat(x[c:c + 1], 5, 0), text_side)
            pair = scoring.score_pairs(model, img_side, one, tau)
            np.testing.assert_allclose(np.asarray(pair), logits[:, c], atol=1e-5)
    assert not np.allclose(np.asarray(scoring.score(model, img_side, cls_side, 1.0)),
                           np.asarray(scoring.score(model, img_side, cls_side, 5.0)), atol=1e-4)
    # several templates: query = mean of q, target = normalise(mean of normalised z)
    tmpl = ["a {c}.", "the {c}!", "itap of a {c}"]
    cls_side = zeroshot.build_classifier(model, scoring, names, tmpl, tok, batch_size=4)
    q, z = model.encode_text_query(jnp.asarray(tok([t.replace("{c}", n) for n in names for t in tmpl])))
    q = np.asarray(q).reshape(4, 3, *q.shape[1:]).mean(1)
    z = np.asarray(z).reshape(4, 3, -1)
    z = (z / np.linalg.norm(z, axis=-1, keepdims=True)).mean(1)
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(cls_side[0]), q, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cls_side[1]), z, atol=1e-5)
    # chunked Llip retrieval equals the ranks from the full score matrix
    text_side = scoring.text_embed(model, jnp.asarray(tok(["a", "b c", "d", "e f g", "h", "i", "j"])))
    owner = np.array([0, 0, 1, 2, 3, 4, 4], np.int32)
    host = jax.tree.map(np.asarray, (img_side, text_side))
    ranks = retrieval.retrieval_ranks_chunked(model, scoring, host[0], host[1], owner, image_chunk=2,
                                              text_chunk=3, temperature=3.0)
    full = np.asarray(scoring.score(model, img_side, text_side, 3.0))
    want = numpy_llip_score(kmat, vmat, _merge_heads(text_side[0]), np.asarray(text_side[1], np.float64),
                            w_o, 3.0, heads)
    np.testing.assert_allclose(full, want, atol=1e-4)
    for a, b in zip(ranks, metrics.retrieval_ranks(full, owner)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------ end to end

class ColorModel(nnx.Module):
    """Embeddings built to be perfectly separable: image = centred mean colour, text = colour word."""

    def __init__(self, tokenizer: ClipTokenizer):
        self.cfg = SimpleNamespace(vision=SimpleNamespace(image_size=16))
        ids = [tokenizer.encode(c)[0] for c in COLORS]
        self.ids = nnx.Variable(jnp.asarray(ids, jnp.int32))

    def encode_image(self, images: jax.Array) -> jax.Array:
        x = images.astype(jnp.float32).mean(axis=(1, 2))
        return x - x.mean(-1, keepdims=True)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        return (tokens[:, :, None] == self.ids[...][None, None, :]).any(1).astype(jnp.float32)


def test_separable_embeddings_give_100_percent(data_dir) -> None:
    model = ColorModel(ClipTokenizer())
    ev = registry.build_evaluator("colors", {"dataset": f"folder:{data_dir}/colors/test", "batch_size": 4,
                                             "templates": ["a photo of a {c} thing."]}, mesh2())
    assert ev.classnames == ["blue", "green", "red"]  # folder names, sorted
    m = ev.run(model)
    assert m["colors/top1"] == 100.0 and m["colors/mean_per_class_recall"] == 100.0
    assert m["colors/num_examples"] == 9 and np.isnan(m["colors/top5"])
    ev = registry.build_evaluator("captions", {"type": "retrieval",
                                               "dataset": f"coco:{data_dir}/captions/annotations.json,"
                                                          f"{data_dir}/captions/images",
                                               "batch_size": 4, "image_chunk": 4, "text_chunk": 4}, None)
    m = ev.run(model)
    # every caption names its image's colour (and only that image has it)
    assert m["captions/image_to_text_R@1"] == 100.0 and m["captions/text_to_image_R@1"] == 100.0
    assert m["captions/num_images"] == 3 and m["captions/num_captions"] == 7


@pytest.mark.slow
def test_real_llip_model_through_evaluators(data_dir) -> None:
    """metaclip_jax.models.llip.Llip plugs in through its own scoring(): τ sweep, pair-score parity."""
    llip = pytest.importorskip("metaclip_jax.models.llip")
    model = llip.Llip(llip.get_llip_config("llip-test-tiny"), rngs=nnx.Rngs(0))
    scoring = scoring_for(model)
    assert scoring.has_temperature and scoring_for(model) is scoring
    tok = ClipTokenizer()
    names = ["red", "green", "blue"]
    images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8))
    img_side = scoring.image_embed(model, images)
    cls_side = zeroshot.build_classifier(model, scoring, names, ["a photo of a {c}."], tok, batch_size=2)
    q, zt = model.encode_text_query(jnp.asarray(tok([f"a photo of a {n}." for n in names])))
    p = model.head_params()
    direct = (np.asarray(model.pair_logits_direct(*img_side, q, zt, tau=3.0)) - float(p["bias"])) / float(
        p["scale"])
    np.testing.assert_allclose(np.asarray(scoring.score(model, img_side, cls_side, 3.0)), direct, atol=1e-4)
    ev = registry.build_evaluator("colors", {"dataset": f"folder:{data_dir}/colors/test", "batch_size": 4,
                                             "templates": ["a photo of a {c}.", "a {c} disc."],
                                             "temperatures": "1,5"})
    m = ev.run(model)
    assert {"colors/tau1/top1", "colors/tau5/top1"} <= set(m) and 0 <= m["colors/tau5/top1"] <= 100
    ev = registry.build_evaluator("captions", {"dataset": f"captions:{data_dir}/captions/captions.jsonl",
                                               "batch_size": 4, "image_chunk": 2, "text_chunk": 4})
    m = ev.run(model)
    assert m["captions/num_captions"] == 7 and 0 <= m["captions/mean_R@1"] <= 100


def test_tfds_array_record_task(tmp_path) -> None:
    """A TFDS array_record build found under data_dir; class names from its ClassLabel feature."""
    import io

    tfds = pytest.importorskip("tensorflow_datasets")

    def png(color: tuple[int, int, int]) -> bytes:
        im = Image.new("RGB", (20, 24), (255, 255, 255))
        ImageDraw.Draw(im).ellipse([2, 2, 18, 18], fill=color)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    class TinyColors(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        __module__ = "__main__"  # no checksums lookup beside a packaged module

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=list(COLORS))}))

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            for i in range(6):
                yield i, {"image": io.BytesIO(png(list(COLORS.values())[i % 3])), "label": i % 3}

    TinyColors(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    entry = {"dataset": "tfds:tiny_colors,test", "data_dir": str(tmp_path), "batch_size": 4,
             "templates": ["{c}"]}
    ev = registry.build_evaluator("tiny_colors", entry)
    assert ev.classnames == list(COLORS) and ev.prompt_origin["classnames"] == "dataset"
    m = ev.run(ColorModel(ClipTokenizer()))
    assert m["tiny_colors/top1"] == 100.0 and m["tiny_colors/num_examples"] == 6


def test_registry_config_and_errors(tiny_clip, data_dir) -> None:
    cfg = {"eval": {"colors": {"dataset": f"folder:{data_dir}/colors/test", "every_steps": 100,
                               "templates": ["{c}"]},
                    "captions": {"type": "retrieval", "data_dir": data_dir, "ks": "1,5"}}}
    evs = registry.build_evaluators(cfg)
    assert [e.name for e in evs] == ["colors", "captions"]
    assert evs[0].should_run(200) and not evs[0].should_run(150) and not evs[0].should_run(0)
    assert evs[1].should_run(7, last_step=True) and not evs[1].should_run(100)
    assert evs[1].ks == (1, 5) and len(evs[1].texts) == 7
    # the training loop's call: a list of named entries, a graphdef, pure-dict params
    graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: type(tiny_clip)(tiny_clip.cfg, rngs=nnx.Rngs(0))),
                               nnx.Param, ...)
    evs = registry.build_evaluators(
        {"eval": [{"name": "colors", "dataset": f"folder:{data_dir}/colors/test", "templates": ["{c}"],
                   "batch_size": 8}]}, mesh2(), graphdef=graphdef, defaults={"every_steps": 10})
    params = nnx.state(tiny_clip, nnx.Param).to_pure_dict()
    assert registry.run_evaluators(evs, params, step=5) == {}
    res = registry.run_evaluators(evs, params, step=20)
    assert res["colors/num_examples"] == 9 and 0 <= res["colors/top1"] <= 100
    with pytest.raises(ValueError, match="unknown key"):
        registry.build_evaluators({"eval": {"x": {"dataset": f"folder:{data_dir}/colors/test", "bogus": 1}}})
    with pytest.raises(FileNotFoundError):
        registry.build_evaluators({"eval": {"imagenet": {"data_dir": data_dir}}})


def test_cli_end_to_end(tiny_clip, data_dir, tmp_path) -> None:
    """A random test-tiny model saved as an open_clip safetensors file, evaluated through the CLI."""
    from safetensors.numpy import save_file

    from evaluate.__main__ import main
    from metaclip_jax.open_clip_interop import model_params_dict, params_to_open_clip

    ckpt = tmp_path / "tiny.safetensors"
    save_file(params_to_open_clip(model_params_dict(tiny_clip), tiny_clip.cfg), str(ckpt))
    out = tmp_path / "out"
    (tmp_path / "tmpl.json").write_text(json.dumps({"colors": ["a {} disc.", "a photo of {}."]}))
    res = main(["--checkpoint", str(ckpt), "--model", "test-tiny", "--no-quickgelu",
                "--tasks", "colors,captions",
                "--data-dir", data_dir, "--output", str(out), "--batch-size", "4", "--devices", "2",
                "--templates", str(tmp_path / "tmpl.json"), "--image-chunk", "4", "--text-chunk", "8",
                "--no-progress"])
    saved = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("# Evaluation")
    assert saved["tasks"]["colors"]["num_classes"] == 3 and saved["tasks"]["colors"]["num_templates"] == 2
    m = saved["tasks"]["colors"]["metrics"]
    assert m["colors/num_examples"] == 9 and 0 <= m["colors/top1"] <= 100 and m["colors/top5"] is None
    r = saved["tasks"]["captions"]["metrics"]
    assert r["captions/num_images"] == 3 and r["captions/num_captions"] == 7
    for k in (1, 5, 10):
        assert 0 <= r[f"captions/image_to_text_R@{k}"] <= 100
        assert 0 <= r[f"captions/text_to_image_R@{k}"] <= 100
    assert r["captions/image_to_text_R@10"] == 100.0  # 7 captions: k=10 always hits
    assert saved["zeroshot_count"] == 1 and res["zeroshot_average"] == pytest.approx(m["colors/score"])
    # the same model through the registry on one device gives the same numbers
    ev = registry.build_evaluator("colors", {"dataset": f"folder:{data_dir}/colors/test", "batch_size": 4,
                                             "templates_file": str(tmp_path / "tmpl.json")})
    assert ev.run(tiny_clip)["colors/top1"] == pytest.approx(m["colors/top1"])
