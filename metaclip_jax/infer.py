"""Inference CLI: embed images / texts, zero-shot classify, text-to-image search.

    python -m metaclip_jax.infer embed-images --checkpoint C --images DIR|LIST.txt --output X.npy
    python -m metaclip_jax.infer embed-texts  --checkpoint C --texts FILE.txt --output X.npy
    python -m metaclip_jax.infer classify     --checkpoint C --images DIR --labels "cat,dog" \\
        [--labels-file F] [--templates "a photo of a {}."] [--top-k 5] [--output P.jsonl|P.csv]
    python -m metaclip_jax.infer search       --checkpoint C --images DIR --query "a red car" -k 5

``--checkpoint`` is anything ``checkpoint_io.load_params`` accepts, or (embedding subcommands and the
rest, for CLIP) a folder written by ``python -m metaclip_jax.export --format jax_export``. Batches have
a fixed size (the last one is padded), so each encoder compiles once. Images get the evaluation
transform of the input pipeline (shortest side bicubic + centre crop); texts the project tokenizer.
Unreadable images are skipped, counted and reported; ``embed-images`` writes the kept paths beside the
array (``X.paths.txt``) so rows can be matched to files.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_TEMPLATES = ("a photo of a {}.",)


# ------------------------------------------------------------------------------------------ encoders


class Encoder:
    """Fixed-batch image / text encoders. ``encode_*`` take exactly ``batch_size`` rows."""

    model_type: str = "clip"
    image_size: int
    context_length: int
    logit_scale: float

    def encode_images(self, images: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def encode_texts(self, tokens: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class ModelEncoder(Encoder):
    """Encoders of a checkpoint loaded with ``checkpoint_io.load_params`` (jitted once per shape)."""

    def __init__(self, loaded: Any, dtype: str | None = None):
        import jax
        from flax import nnx

        from metaclip_jax import checkpoint_io as cio

        model = cio.build_model(loaded, dtype=dtype)
        graphdef, state = nnx.split(model)
        self.model_type = loaded.model_type
        self.image_size = loaded.config.vision.image_size
        self.context_length = loaded.config.text.context_length
        self.logit_scale = float(np.exp(np.asarray(loaded.params["logit_scale"], np.float32)))
        self._img = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_image(x))
        self._txt = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_text(x))
        self._state = state

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._img(self._state, images), np.float32)

    def encode_texts(self, tokens: np.ndarray) -> np.ndarray:
        return np.asarray(self._txt(self._state, tokens), np.float32)


class ExportedEncoder(Encoder):
    """Encoders deserialized from a ``jax_export`` folder (``export_spec.json``)."""

    def __init__(self, export_dir: str | os.PathLike):
        import jax

        d = Path(export_dir)
        with open(d / "export_spec.json") as f:
            self.spec = json.load(f)
        self.model_type = self.spec.get("model_type", "clip")
        self.image_size = int(self.spec["image"]["image_size"])
        self.context_length = int(self.spec["text"]["context_length"])
        self.logit_scale = float(self.spec["logit_scale"])
        self._img = jax.export.deserialize(bytearray((d / self.spec["image"]["file"]).read_bytes()))
        self._txt = jax.export.deserialize(bytearray((d / self.spec["text"]["file"]).read_bytes()))
        self._params = None if self.spec["params"] == "baked" else dict(np.load(d / self.spec["params"]))

    def _call(self, fn: Any, x: np.ndarray) -> np.ndarray:
        out = fn.call(x) if self._params is None else fn.call(self._params, x)
        return np.asarray(out, np.float32)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        return self._call(self._img, images)

    def encode_texts(self, tokens: np.ndarray) -> np.ndarray:
        return self._call(self._txt, tokens)


def load_encoder(checkpoint: str, *, model: str | None = None, quick_gelu: bool | None = None,
                 dtype: str | None = None) -> Encoder:
    """A jax_export folder, or any checkpoint ``checkpoint_io.load_params`` accepts (CLIP models)."""
    if (Path(checkpoint) / "export_spec.json").is_file():
        enc: Encoder = ExportedEncoder(checkpoint)
        _require_clip(enc, "infer")
        return enc
    from metaclip_jax import checkpoint_io as cio

    loaded = cio.load_params(checkpoint, model=model, quick_gelu=quick_gelu)
    if loaded.config.text.vocab_size != 49408:
        raise ValueError(f"{checkpoint}: vocabulary of {loaded.config.text.vocab_size} ids (MetaCLIP 2 "
                         "worldwide / XLM-V); infer only bundles the CLIP BPE tokenizer")
    if loaded.model_type != "clip":
        raise ValueError(f"{checkpoint} holds a {loaded.model_type} model; infer embeds and scores CLIP "
                         "models (a Llip image embedding depends on the caption): use `python -m evaluate`")
    return ModelEncoder(loaded, dtype=dtype)


# -------------------------------------------------------------------------------------------- inputs


def list_images(spec: str) -> list[str]:
    """Image files under a folder (recursive, sorted), or the paths listed in a text file."""
    p = Path(spec)
    if p.is_dir():
        return sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if p.is_file():
        base = p.parent
        with open(p, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
        return [ln if os.path.isabs(ln) or "://" in ln else str(base / ln) for ln in lines]
    raise FileNotFoundError(f"--images {spec}: no such folder or list file")


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [ln.rstrip("\n") for ln in f if ln.strip()]


def _load_image(path: str, size: int) -> np.ndarray | None:
    from input_pipeline.transforms import eval_image

    try:
        with open(path, "rb") as f:
            data = f.read()
        return eval_image(data, size)
    except Exception as e:  # counted and reported; the run goes on
        print(f"skipping unreadable image {path}: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def _progress(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img" if "image" in desc else "text", file=sys.stderr,
                disable=not sys.stderr.isatty() and os.environ.get("METACLIP_PROGRESS") != "1")


def _pad(x: np.ndarray, batch_size: int) -> np.ndarray:
    if len(x) == batch_size:
        return x
    pad = np.zeros((batch_size - len(x),) + x.shape[1:], x.dtype)
    return np.concatenate([x, pad])


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def embed_images(encoder: Encoder, paths: Sequence[str], *, batch_size: int = 32, workers: int = 8,
                 normalize: bool = True) -> tuple[np.ndarray, list[str], int]:
    """(features [N_ok, D], kept paths, number of skipped images). Decoding runs in ``workers`` threads."""
    feats: list[np.ndarray] = []
    kept: list[str] = []
    bad = 0
    size = encoder.image_size
    chunks = [list(paths[i: i + batch_size]) for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max(1, workers)) as pool, _progress(len(paths), "embedding images") as bar:
        pending: Iterator[list[np.ndarray | None]] = (
            list(pool.map(lambda p: _load_image(p, size), chunk)) for chunk in chunks)
        for chunk, imgs in zip(chunks, pending):
            ok = [(p, im) for p, im in zip(chunk, imgs) if im is not None]
            bad += len(chunk) - len(ok)
            if ok:
                batch = _pad(np.stack([im for _, im in ok]), batch_size)
                feats.append(encoder.encode_images(batch)[: len(ok)])
                kept += [p for p, _ in ok]
            bar.update(len(chunk))
    if bad:
        print(f"skipped {bad} of {len(paths)} images that could not be read", file=sys.stderr)
    out = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
    return (_normalize(out) if normalize and len(out) else out), kept, bad


def tokenize(texts: Sequence[str], context_length: int) -> np.ndarray:
    from metaclip_jax.tokenizer import ClipTokenizer

    return ClipTokenizer(context_length=context_length)(list(texts))


def embed_texts(encoder: Encoder, texts: Sequence[str], *, batch_size: int = 32,
                normalize: bool = True) -> np.ndarray:
    """Features [N, D] of ``texts`` (project tokenizer, fixed batch with padding)."""
    tokens = tokenize(texts, encoder.context_length)
    feats = []
    with _progress(len(texts), "embedding texts") as bar:
        for i in range(0, len(tokens), batch_size):
            chunk = tokens[i: i + batch_size]
            feats.append(encoder.encode_texts(_pad(chunk, batch_size))[: len(chunk)])
            bar.update(len(chunk))
    out = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
    return _normalize(out) if normalize and len(out) else out


def classifier_weights(encoder: Encoder, labels: Sequence[str], templates: Sequence[str],
                       batch_size: int = 32) -> np.ndarray:
    """Zero-shot class embeddings: mean of the normalised template embeddings, renormalised [C, D]."""
    texts = [t.format(c) if "{}" in t else f"{t} {c}" for c in labels for t in templates]
    emb = embed_texts(encoder, texts, batch_size=batch_size).reshape(len(labels), len(templates), -1)
    return _normalize(emb.mean(1))


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def classify(encoder: Encoder, paths: Sequence[str], labels: Sequence[str], templates: Sequence[str], *,
             top_k: int = 5, batch_size: int = 32, workers: int = 8) -> list[dict[str, Any]]:
    """One dict per readable image: ``{"image", "label", "prob", "topk": [[label, prob], ...]}``."""
    _require_clip(encoder, "classify")
    weights = classifier_weights(encoder, labels, templates, batch_size)
    feats, kept, _ = embed_images(encoder, paths, batch_size=batch_size, workers=workers)
    rows = []
    if not kept:
        return rows
    probs = _softmax(encoder.logit_scale * feats @ weights.T)
    k = min(top_k, len(labels))
    for path, p in zip(kept, probs):
        order = np.argsort(-p, kind="stable")[:k]
        rows.append({"image": path, "label": labels[order[0]], "prob": float(p[order[0]]),
                     "topk": [[labels[j], float(p[j])] for j in order]})
    return rows


def search(encoder: Encoder, paths: Sequence[str], queries: Sequence[str], *, k: int = 5,
           batch_size: int = 32, workers: int = 8) -> list[dict[str, Any]]:
    """For each query the ``k`` most similar images: ``{"query", "rank", "image", "score"}`` (cosine)."""
    _require_clip(encoder, "search")
    feats, kept, _ = embed_images(encoder, paths, batch_size=batch_size, workers=workers)
    q = embed_texts(encoder, queries, batch_size=batch_size)
    rows = []
    if not kept:
        return rows
    sims = q @ feats.T
    for qi, query in enumerate(queries):
        order = np.argsort(-sims[qi], kind="stable")[:k]
        rows += [{"query": query, "rank": r + 1, "image": kept[j], "score": float(sims[qi, j])}
                 for r, j in enumerate(order)]
    return rows


def _require_clip(encoder: Encoder, what: str) -> None:
    if encoder.model_type != "clip":
        raise ValueError(f"{what} scores CLIP image and text embeddings; a {encoder.model_type} model scores "
                         "each (image, caption) pair jointly: use `python -m evaluate` for it")


# ---------------------------------------------------------------------------------------- output


def _write_rows(rows: list[dict[str, Any]], output: str | None, columns: Sequence[str]) -> None:
    if output and output.endswith(".csv"):
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(columns)
        for r in rows:
            w.writerow(["|".join(f"{a}:{b:.6f}" for a, b in r[c]) if c == "topk" else r[c] for c in columns])
        text = buf.getvalue()
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
    if output:
        _atomic_write(output, text.encode("utf-8"))
        print(f"wrote {len(rows)} rows to {output}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def _atomic_write(path: str, data: bytes) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _save_npy(path: str, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr.astype(np.float32))
    _atomic_write(path, buf.getvalue())


def paths_file(npy_path: str) -> str:
    """``X.npy`` -> ``X.paths.txt`` (the image path of each row)."""
    base = npy_path[:-4] if npy_path.endswith(".npy") else npy_path
    return base + ".paths.txt"


# ------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metaclip_jax.infer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--checkpoint", required=True, help="any checkpoint load_params accepts, or a "
                        "jax_export folder")
        sp.add_argument("--batch-size", type=int, default=32)
        sp.add_argument("--model", default=None, help="preset for open_clip files (e.g. ViT-B-32-quickgelu)")
        qg = sp.add_mutually_exclusive_group()
        qg.add_argument("--quickgelu", dest="quick_gelu", action="store_true", default=None)
        qg.add_argument("--no-quickgelu", dest="quick_gelu", action="store_false")
        sp.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="compute dtype")
        sp.add_argument("--workers", type=int, default=8, help="image decoding threads")

    s = sub.add_parser("embed-images", help="image embeddings -> .npy (+ .paths.txt)")
    common(s)
    s.add_argument("--images", required=True, help="folder (recursive) or text file of paths")
    s.add_argument("--output", required=True)
    s.add_argument("--no-normalize", dest="normalize", action="store_false", help="raw, not L2-normalised")

    s = sub.add_parser("embed-texts", help="text embeddings (one text per line) -> .npy")
    common(s)
    s.add_argument("--texts", required=True, help="text file, one text per line")
    s.add_argument("--output", required=True)
    s.add_argument("--no-normalize", dest="normalize", action="store_false")

    s = sub.add_parser("classify", help="zero-shot classification -> JSONL / CSV")
    common(s)
    s.add_argument("--images", required=True)
    lab = s.add_mutually_exclusive_group(required=True)
    lab.add_argument("--labels", help='comma-separated class names, e.g. "cat,dog"')
    lab.add_argument("--labels-file", help="one class name per line")
    s.add_argument("--templates", nargs="+", default=list(DEFAULT_TEMPLATES),
                   help='prompt templates with {} for the class name (default "a photo of a {}.")')
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--output", default=None, help=".jsonl or .csv (default: JSONL on stdout)")

    s = sub.add_parser("search", help="text-to-image search")
    common(s)
    s.add_argument("--images", required=True)
    s.add_argument("--query", required=True, nargs="+", help="one or more text queries")
    s.add_argument("-k", "--top-k", dest="k", type=int, default=5)
    s.add_argument("--output", default=None, help=".jsonl or .csv (default: JSONL on stdout)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        print("error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        enc = load_encoder(args.checkpoint, model=args.model, quick_gelu=args.quick_gelu, dtype=args.dtype)
        run: Callable[[], int] = {
            "embed-images": lambda: _cmd_embed_images(enc, args),
            "embed-texts": lambda: _cmd_embed_texts(enc, args),
            "classify": lambda: _cmd_classify(enc, args),
            "search": lambda: _cmd_search(enc, args),
        }[args.command]
        return run()
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _cmd_embed_images(enc: Encoder, args: argparse.Namespace) -> int:
    paths = list_images(args.images)
    feats, kept, bad = embed_images(enc, paths, batch_size=args.batch_size, workers=args.workers,
                                    normalize=args.normalize)
    _save_npy(args.output, feats)
    _atomic_write(paths_file(args.output), "".join(p + "\n" for p in kept).encode("utf-8"))
    print(f"wrote {feats.shape} embeddings to {args.output} (paths: {paths_file(args.output)}; "
          f"{bad} skipped)", file=sys.stderr)
    return 0 if kept or not paths else 1


def _cmd_embed_texts(enc: Encoder, args: argparse.Namespace) -> int:
    texts = read_lines(args.texts)
    feats = embed_texts(enc, texts, batch_size=args.batch_size, normalize=args.normalize)
    _save_npy(args.output, feats)
    print(f"wrote {feats.shape} embeddings to {args.output}", file=sys.stderr)
    return 0


def _cmd_classify(enc: Encoder, args: argparse.Namespace) -> int:
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else read_lines(args.labels_file)
    labels = [x for x in labels if x]
    if not labels:
        raise ValueError("no labels given")
    rows = classify(enc, list_images(args.images), labels, args.templates, top_k=args.top_k,
                    batch_size=args.batch_size, workers=args.workers)
    _write_rows(rows, args.output, ("image", "label", "prob", "topk"))
    return 0


def _cmd_search(enc: Encoder, args: argparse.Namespace) -> int:
    rows = search(enc, list_images(args.images), args.query, k=args.k, batch_size=args.batch_size,
                  workers=args.workers)
    _write_rows(rows, args.output, ("query", "rank", "image", "score"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
