"""CLIP BPE tokenizer with ids identical to open_clip 3.3.0 ``get_tokenizer("ViT-B-32")``.

Pipeline (open_clip ``SimpleTokenizer``, ``clean="lower"``; MetaCLIP is identical):
``ftfy.fix_text`` -> ``html.unescape`` twice -> whitespace collapse + strip -> lowercase -> regex
pre-tokenisation -> byte-level BPE -> ``[SOT] + ids + [EOT]``, right-padded with 0.

Two exact paths, chosen per text:

* **Rust** (``instant-clip-tokenizer``, compiled, batch): used when the text is pure ASCII *after* our
  cleaning. The Rust tokenizer only lowercases (no ftfy / html / whitespace cleaning), so we clean in
  Python first. Printable ASCII without ``&`` is provably unchanged by the cleaning (ftfy, html and
  whitespace steps are no-ops on it; only tokenisation-irrelevant whitespace differs), so it is fed raw
  and skips the slow ftfy call. On ASCII the Rust regex and open_clip's regex (``regex.IGNORECASE``)
  split identically and lowercasing is identical.
* **Python** (a port of open_clip's ``SimpleTokenizer.encode`` with a word cache): texts that are
  non-ASCII after cleaning. This sidesteps differences between the Rust and Python Unicode tables,
  Rust's case-sensitive contraction match (open_clip's ``'s`` also matches ``'ſ`` under IGNORECASE)
  and Rust's second lowercasing.

The Python path needs the vocabulary ``assets/bpe_simple_vocab_16e6.txt.gz`` (OpenAI CLIP, MIT), loaded
lazily on the first non-ASCII text. Nothing is fetched from the network and torch is not needed.

Truncation: ``truncate="eot"`` (open_clip / MetaCLIP) cuts to ``context_length`` and overwrites the
last slot with EOT; ``truncate="plain"`` (Llip checkpoints) keeps the first ``context_length`` ids.

Instances hold only ``context_length`` and ``truncate``; the compiled tokenizer and vocabulary are built
lazily once per process, so a ``ClipTokenizer`` pickles cheaply into spawned Grain workers.
"""

from __future__ import annotations

import functools
import gzip
import html
import itertools
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex

__all__ = ["ClipTokenizer", "get_tokenizer"]

VOCAB_PATH = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
SOT_ID = 49406
EOT_ID = 49407
PAD_ID = 0
_TRUNCATE_MODES = ("eot", "plain")
_WORD_CACHE_MAX = 200_000

# Printable ASCII plus tab/newline/CR, without "&": ftfy, html.unescape and whitespace collapse cannot
# change tokenisation of such text (see module docstring), so it goes to Rust uncleaned.
_NEEDS_CLEANING = re.compile(r"[^\t\n\r\x20-\x25\x27-\x7e]")


def clean_text(text: str) -> str:
    """open_clip's ``clean="lower"``: ftfy, html.unescape x2, whitespace collapse + strip, lowercase."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def _needs_cleaning(text: str) -> bool:
    if text.isascii() and text.isprintable():
        return "&" in text
    return not text.isascii() or _NEEDS_CLEANING.search(text) is not None


@functools.cache
def _rust_tokenizer():
    import instant_clip_tokenizer

    tok = instant_clip_tokenizer.Tokenizer()
    if (tok.start_of_text(), tok.end_of_text()) != (SOT_ID, EOT_ID):  # pragma: no cover - package drift
        raise RuntimeError("instant-clip-tokenizer has an unexpected vocabulary")
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class _PyBPE:
    """Faithful port of open_clip ``SimpleTokenizer.encode`` (without cleaning) with a bounded cache."""

    def __init__(self, vocab_path: Path = VOCAB_PATH):
        with gzip.open(vocab_path) as f:
            merges = f.read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges[1 : 49152 - 256 - 2 + 1]]
        byte_encoder = _bytes_to_unicode()
        vocab = list(byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        if len(vocab) != VOCAB_SIZE:  # pragma: no cover - corrupt file
            raise RuntimeError(f"{vocab_path}: expected {VOCAB_SIZE} tokens, got {len(vocab)}")
        self.encoder = {t: i for i, t in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.byte_table = [byte_encoder[b] for b in range(256)]
        self.special = {"<start_of_text>": SOT_ID, "<end_of_text>": EOT_ID}
        self.pat = regex.compile(
            r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.cache: dict[str, tuple[int, ...]] = {}

    def _bpe(self, token: str) -> list[str]:
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        ranks = self.bpe_ranks
        inf = float("inf")
        while len(word) > 1:
            pairs = set(itertools.pairwise(word))
            bigram = min(pairs, key=lambda p: ranks.get(p, inf))
            if bigram not in ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(first)
                    i += 1
            word = tuple(new_word)
        return list(word)

    def word_ids(self, word: str) -> tuple[int, ...]:
        ids = self.cache.get(word)
        if ids is None:
            if word in self.special:
                ids = (self.special[word],)
            else:
                table = self.byte_table
                mapped = "".join(table[b] for b in word.encode("utf-8"))
                ids = tuple(self.encoder[t] for t in self._bpe(mapped))
            if len(self.cache) >= _WORD_CACHE_MAX:
                self.cache.clear()
            self.cache[word] = ids
        return ids

    def encode(self, cleaned: str) -> list[int]:
        out: list[int] = []
        for word in self.pat.findall(cleaned):
            out.extend(self.word_ids(word))
        return out


_PY_BPE: _PyBPE | None = None
_PY_BPE_LOCK = threading.Lock()


def _py_bpe() -> _PyBPE:
    global _PY_BPE
    if _PY_BPE is None:
        with _PY_BPE_LOCK:
            if _PY_BPE is None:
                _PY_BPE = _PyBPE()
    return _PY_BPE


class ClipTokenizer:
    """CLIP BPE tokenizer: ``tok(texts) -> np.int32[N, context_length]``, open_clip-identical ids.

    Args:
      context_length: row length (77 for CLIP / MetaCLIP; Llip L/14-K32 uses 64).
      truncate: ``"eot"`` (open_clip: cut and overwrite the last slot with EOT) or ``"plain"``
        (Llip: keep the first ``context_length`` ids, EOT may be cut off).
    """

    vocab_size: int = VOCAB_SIZE
    sot_id: int = SOT_ID
    eot_id: int = EOT_ID
    pad_id: int = PAD_ID

    def __init__(self, context_length: int = 77, truncate: str = "eot"):
        if int(context_length) < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        if truncate not in _TRUNCATE_MODES:
            raise ValueError(f"truncate must be one of {_TRUNCATE_MODES}, got {truncate!r}")
        self.context_length = int(context_length)
        self.truncate = truncate

    def __repr__(self) -> str:
        return f"ClipTokenizer(context_length={self.context_length}, truncate={self.truncate!r})"

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text after open_clip cleaning, without SOT/EOT and without truncation."""
        cleaned = clean_text(text)
        if cleaned.isascii():
            return list(_rust_tokenizer().encode(cleaned))
        return _py_bpe().encode(cleaned)

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Tokenize one text or a batch; returns ``np.int32[N, context_length]`` (N=1 for a str)."""
        if isinstance(texts, str):
            texts = [texts]
        n, ctx = len(texts), self.context_length
        out = np.zeros((n, ctx), dtype=np.int32)
        rust_idx: list[int] = []
        rust_txt: list[str] = []
        py_idx: list[int] = []
        py_txt: list[str] = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
            if _needs_cleaning(text):
                text = clean_text(text)
                if not text.isascii():
                    py_idx.append(i)
                    py_txt.append(text)
                    continue
            rust_idx.append(i)
            rust_txt.append(text)
        if rust_txt:
            if ctx >= 3:
                # Rust keeps [SOT] + ids[: ctx - 2] + [EOT] (== open_clip's "eot" rule). For "plain",
                # ask for one more slot and drop it: the first ctx ids are then the untruncated ones.
                width = ctx if self.truncate == "eot" else ctx + 1
                rows = _rust_tokenizer().tokenize_batch(rust_txt, context_length=width)
                out[rust_idx] = rows[:, :ctx]
            else:  # tiny contexts: the Rust API requires >= 3
                enc = _rust_tokenizer().encode
                for i, text in zip(rust_idx, rust_txt):
                    self._fill(out[i], list(enc(text)))
        if py_txt:
            bpe = _py_bpe()
            for i, text in zip(py_idx, py_txt):
                self._fill(out[i], bpe.encode(text))
        return out

    def _fill(self, row: np.ndarray, ids: list[int]) -> None:
        tokens = [SOT_ID, *ids, EOT_ID]
        if len(tokens) > self.context_length:
            tokens = tokens[: self.context_length]
            if self.truncate == "eot":
                tokens[-1] = EOT_ID
        row[: len(tokens)] = tokens


_NAMES = {
    "clip": "eot",
    "openai": "eot",
    "metaclip": "eot",
    "open_clip": "eot",
    "llip": "plain",
}


def get_tokenizer(name: str = "clip", context_length: int = 77) -> ClipTokenizer:
    """Tokenizer by family name.

    ``"clip"`` / ``"openai"`` / ``"metaclip"`` / ``"open_clip"`` and open_clip model names such as
    ``"ViT-B-32"`` give the EOT-forcing CLIP tokenizer; ``"llip"`` (or any name starting with ``llip``)
    gives plain truncation. MetaCLIP 2 tokenizers (XLM-V, mT5) are not supported yet.
    """
    key = name.lower()
    compact = key.replace("_", "").replace("-", "")
    if any(k in compact for k in ("xlm", "mt5", "worldwide", "metaclip2")):
        raise NotImplementedError(
            f"{name!r}: MetaCLIP 2 tokenizers (XLM-V / mT5) need Hugging Face tokenizer files and are not "
            "supported yet; see docs/tokenizer.md"
        )
    if key in _NAMES:
        return ClipTokenizer(context_length, truncate=_NAMES[key])
    if key.startswith("llip"):
        return ClipTokenizer(context_length, truncate="plain")
    if key.startswith(("vit-", "vit_", "metaclip")):
        return ClipTokenizer(context_length, truncate="eot")
    raise ValueError(f"unknown tokenizer name {name!r}; use 'clip' or 'llip'")
