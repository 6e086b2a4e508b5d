"""Run exported metaclip-jax encoders with only jax, numpy and PIL (no metaclip-jax import).

    python run_exported.py EXPORT_DIR --images a.jpg b.png --texts "a photo of a cat" "a dog" \\
        [--output features.npz] [--batch-size 32]

``EXPORT_DIR`` is what ``python -m metaclip_jax.export --format jax_export`` wrote: the serialized
``image_encoder.jaxexport`` / ``text_encoder.jaxexport`` (symbolic batch), ``export_spec.json`` (input
specs), the CLIP BPE vocabulary and, when parameters are not baked in, ``params.npz``. Images get the
eval transform (shortest side to the model size, bicubic, centre crop); texts get a compact CLIP BPE
tokenizer, exact for ASCII text (the full tokenizer also runs ftfy; see docs/export.md). Prints the
cosine-similarity matrix, and with ``--output`` writes raw ``image_features`` / ``text_features``.
This file is self-contained on purpose: copy it next to an export and use it anywhere.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import html
import json
import os
import re
import sys

import jax
import numpy as np
from PIL import Image

# ------------------------------------------------------------------------------------ tokenizer


@functools.lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


class ClipBPE:
    """open_clip's ``SimpleTokenizer`` (lowercase, ``[SOT] ids [EOT]``, zero-padded, EOT truncation)."""

    # open_clip's pattern with \p{L} -> [^\W\d_], \p{N} -> \d, [^\s\p{L}\p{N}] -> [^\s\w]|_ (stdlib re)
    _pat = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d"
                      r"|(?:[^\s\w]|_)+", re.IGNORECASE)

    def __init__(self, vocab_path: str, context_length: int = 77, sot: int = 49406, eot: int = 49407):
        with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
            merges = f.read().split("\n")[1: 49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        vocab = list(_bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.context_length, self.sot, self.eot = context_length, sot, eot
        self.cache: dict[str, list[str]] = {}

    def _bpe(self, token: str) -> list[str]:
        if token in self.cache:
            return self.cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        text = " ".join(html.unescape(html.unescape(text)).split()).lower()
        b2u = _bytes_to_unicode()
        ids = []
        for tok in self._pat.findall(text):
            tok = "".join(b2u[b] for b in tok.encode("utf-8"))
            ids += [self.encoder[t] for t in self._bpe(tok)]
        return ids

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.context_length), np.int32)
        for i, t in enumerate(texts):
            ids = [self.sot] + self.encode(t) + [self.eot]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot
            out[i, : len(ids)] = ids
        return out


# ------------------------------------------------------------------------------------------- images


def load_image(path: str, size: int) -> np.ndarray:
    """RGB, shortest side to ``size`` (bicubic), centre crop -> uint8 [size, size, 3]."""
    img = Image.open(path)
    img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "LA", "RGBA") else img.convert("RGB")
    w, h = img.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = round((nh - size) / 2.0), round((nw - size) / 2.0)
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ running


class ExportedModel:
    """The two deserialized encoders of an export folder."""

    def __init__(self, export_dir: str):
        with open(os.path.join(export_dir, "export_spec.json")) as f:
            self.spec = json.load(f)

        def read(name: str) -> bytes:
            with open(os.path.join(export_dir, name), "rb") as f:
                return f.read()

        self.image_fn = jax.export.deserialize(bytearray(read(self.spec["image"]["file"])))
        self.text_fn = jax.export.deserialize(bytearray(read(self.spec["text"]["file"])))
        self.params = None
        if self.spec["params"] != "baked":
            self.params = dict(np.load(os.path.join(export_dir, self.spec["params"])))
        t = self.spec["text"]
        self.tokenizer = ClipBPE(os.path.join(export_dir, t["vocab_file"]), t["context_length"],
                                 t["sot_id"], t["eot_id"])

    def _call(self, fn, x: np.ndarray) -> np.ndarray:
        return np.asarray(fn.call(x) if self.params is None else fn.call(self.params, x))

    def encode_images(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        return np.concatenate([self._call(self.image_fn, images[i: i + batch_size])
                               for i in range(0, len(images), batch_size)])

    def encode_texts(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        tokens = self.tokenizer(texts)
        return np.concatenate([self._call(self.text_fn, tokens[i: i + batch_size])
                               for i in range(0, len(tokens), batch_size)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir")
    p.add_argument("--images", nargs="*", default=[])
    p.add_argument("--texts", nargs="*", default=[])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output", default=None, help="write image_features / text_features / tokens (.npz)")
    args = p.parse_args(argv)
    model = ExportedModel(args.export_dir)
    size = model.spec["image"]["image_size"]
    out: dict[str, np.ndarray] = {}
    if args.images:
        out["image_features"] = model.encode_images(np.stack([load_image(x, size) for x in args.images]),
                                                    args.batch_size)
    if args.texts:
        out["tokens"] = model.tokenizer(args.texts)
        out["text_features"] = model.encode_texts(args.texts, args.batch_size)
    if args.output:
        np.savez(args.output, **out)
    if args.images and args.texts:
        norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
        sim = norm(out["image_features"]) @ norm(out["text_features"]).T
        probs = np.exp(model.spec["logit_scale"] * sim)
        probs /= probs.sum(-1, keepdims=True)
        for path, row in zip(args.images, probs):
            best = int(row.argmax())
            print(f"{path}\t{args.texts[best]}\t{row[best]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
