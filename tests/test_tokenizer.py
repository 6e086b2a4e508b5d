"""CLIP BPE tokenizer: spec goldens, API, truncation modes, and exactness against open_clip 3.3.0."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import pickle
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from metaclip_jax import tokenizer as T
from metaclip_jax.tokenizer import ClipTokenizer, get_tokenizer
from tests.reference import import_open_clip

SOT, EOT = 49406, 49407
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _unpadded(row: np.ndarray) -> list[int]:
    nz = np.nonzero(row)[0]
    return row[: nz[-1] + 1].tolist() if len(nz) else []


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.fixture(scope="module")
def ref():
    open_clip, _ = import_open_clip()
    return open_clip.get_tokenizer("ViT-B-32")


# ------------------------------------------------------------------------------------------------
# Goldens from specs/checkpoints_and_tokenizer.md §8.4 (hard-coded; no reference library needed).

GOLDEN = [
    ("A Photo OF a DOG", [SOT, 320, 1125, 539, 320, 1929, EOT]),
    ("a photo of a dog", [SOT, 320, 1125, 539, 320, 1929, EOT]),
    ("  hello \n\t world  ", [SOT, 3306, 1002, EOT]),
    ("", [SOT, EOT]),
]


@pytest.mark.parametrize("text,ids", GOLDEN)
def test_spec_goldens(tok, text, ids):
    out = tok(text)
    assert out.shape == (1, 77) and out.dtype == np.int32
    assert out[0, : len(ids)].tolist() == ids
    assert not out[0, len(ids) :].any()


def test_spec_cleaning_equivalences(tok):
    assert np.array_equal(tok("caf&amp;é &lt;b&gt;"), tok("caf & é < b >"))
    assert np.array_equal(tok("schÃ¶n"), tok("schön"))
    assert tok("schön")[0, :5].tolist() == [SOT, 844, 7255, 333, EOT]


def test_hundred_words_force_eot(tok):
    row = tok(" ".join(["word"] * 100))[0]
    assert len(_unpadded(row)) == 77 and row[0] == SOT and row[-1] == EOT
    assert (row[1:-1] == row[1]).all()


# ------------------------------------------------------------------------------------------------
# API and truncation.


def test_api_attributes_and_batch(tok):
    assert (tok.vocab_size, tok.sot_id, tok.eot_id, tok.pad_id) == (49408, SOT, EOT, 0)
    out = tok(["a dog", "ein Hund über", "一只狗"])
    assert out.shape == (3, 77) and out.dtype == np.int32
    assert tok([]).shape == (0, 77)
    assert np.array_equal(tok(("a dog",)), tok("a dog"))
    with pytest.raises(TypeError):
        tok(["ok", None])
    with pytest.raises(ValueError):
        ClipTokenizer(truncate="left")


def test_get_tokenizer_names():
    assert get_tokenizer().truncate == "eot" and get_tokenizer().context_length == 77
    assert get_tokenizer("ViT-B-32").truncate == "eot"
    llip = get_tokenizer("llip", context_length=64)
    assert (llip.truncate, llip.context_length) == ("plain", 64)
    with pytest.raises(NotImplementedError):
        get_tokenizer("xlm-v")
    with pytest.raises(ValueError):
        get_tokenizer("no-such-tokenizer")


def test_plain_truncation_keeps_first_ids():
    text = " ".join(f"w{i}" for i in range(60))  # 120 BPE ids
    full = [SOT, *ClipTokenizer().encode(text), EOT]
    for ctx in (2, 3, 64, 77):
        plain = ClipTokenizer(ctx, truncate="plain")(text)[0]
        eot = ClipTokenizer(ctx, truncate="eot")(text)[0]
        assert plain.tolist() == full[:ctx]
        assert eot.tolist() == full[: ctx - 1] + [EOT]
    # Short text: both modes agree and keep EOT.
    assert np.array_equal(ClipTokenizer(64, "plain")("a dog"), ClipTokenizer(64)("a dog"))


def test_pickle_and_spawned_worker(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert len(pickle.dumps(tok)) < 1000
    texts = ["A Photo OF a DOG", "schÃ¶n", "中文 😀"]
    assert np.array_equal(clone(texts), tok(texts))
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        assert np.array_equal(ex.submit(tok, texts).result(timeout=120), tok(texts))


def test_vocab_asset_is_the_clip_vocabulary():
    digest = hashlib.sha256(T.VOCAB_PATH.read_bytes()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def test_python_port_matches_rust_on_ascii(tok):
    """Both internal paths agree where both apply (ASCII), so routing cannot change ids."""
    rng = random.Random(1)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,!?'\"-_/()<>&;:"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(500)]
    texts += ["it's", "THEY'LL", "<start_of_text>x<END_OF_TEXT>", "a" * 300, "x'y'z's'd"]
    bpe, rust = T._py_bpe(), T._rust_tokenizer()
    for text in texts:
        cleaned = T.clean_text(text)
        assert bpe.encode(cleaned) == list(rust.encode(cleaned)), text


# ------------------------------------------------------------------------------------------------
# Exactness against open_clip 3.3.0 (independent reference).

_PIECES = list("abcXYZ019 \t\n\r\x0b\x0c\x1b\x1c\x1f\x7f\x00&;#<>'\"!?.,-_/\\") + [
    "&amp;", "&amp;amp;", "&lt;", "&gt;", "&#39;", "&#x2019;", "&nbsp;", "&hellip;", "&eacute;", "&amp",
    "\x1b[31m", "'s", "'S", "'ſ", "'ll", "'LL", "'ve", "ſ", "K", "Å", "é", "É", "schÃ¶n", "Ã©", "â€™",
    "ΣΑΣ", "Σ", "İ", "ß", "ẞ", "ﬁ", "ﬂ", "ＡＢＣ", "　", "\u00a0", "\u200b", "\u2028", "\u0085", "\ufeff",
    "中文", "日本語", "한국어", "😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "\u0301", "e\u0301", "\u0345", "ǅ", "Ω",
    "<start_of_text>", "<END_OF_TEXT>", "٣", "½", "²", "Ⅻ", "𝐀", "𐐀", "\U0001e900", "\ua7cb", "\U000105c0",
    "“", "”", "‘", "’", "–", "—", "…", "•", "€", "™", "\u0080", "\u009d", "Ã", "Â", "ï¿½", "�",
]  # fmt: skip

EDGE_CASES = [
    "",
    " ",
    "\n\t \r\n",
    "\u3000\u00a0\u2028",
    "Ünïcödé façade naïve coöperate",
    "Straße İstanbul ΣΊΣΥΦΟΣ",
    "猫がソファの上で寝ています",
    "한국어 캡션 테스트",
    "A dog 🐶 with a hat 🎩👍🏽 and a flag 🇯🇵",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#x2019;s &amp;amp;lt;",
    "â€œsmart quotesâ€\x9d donâ€™t cafÃ©",
    "ﬁne ﬂour ＦＵＬＬＷＩＤＴＨ",
    " ".join(f"word{i}" for i in range(120)),
    "Pneumonoultramicroscopicsilicovolcanoconiosis" * 20,
    "x" * 1000,
    "<start_of_text> literal <end_of_text> markers",
    "it's THEY'RE we'VE i'M you'LL he'D can'T it'ſ",
    "\x1b[1;31mred\x1b[0m text\x00\x07 with controls",
    "1234567890 3.14159 ½ ² ٣ ๓",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 14))) for _ in range(n)]


def _reference_rows(ref, texts: list[str], ctx: int, truncate: str) -> np.ndarray:
    if truncate == "eot":
        return ref(texts, context_length=ctx).numpy()
    out = np.zeros((len(texts), ctx), np.int64)
    for i, text in enumerate(texts):
        ids = ([SOT, *ref.encode(text), EOT])[:ctx]
        out[i, : len(ids)] = ids
    return out


def _assert_same(ours: np.ndarray, theirs: np.ndarray, texts: list[str]) -> None:
    bad = np.nonzero((ours != theirs).any(axis=1))[0]
    details = [f"{texts[i]!r}: {_unpadded(ours[i])} != {_unpadded(theirs[i])}" for i in bad[:5]]
    assert len(bad) == 0, f"{len(bad)} of {len(texts)} rows differ:\n" + "\n".join(details)


@pytest.mark.reference
def test_edge_cases_match_open_clip(tok, ref):
    _assert_same(tok(EDGE_CASES), ref(EDGE_CASES).numpy(), EDGE_CASES)


@pytest.mark.reference
@pytest.mark.parametrize("ctx", [77, 64, 16, 3, 1])
@pytest.mark.parametrize("truncate", ["eot", "plain"])
def test_random_texts_match_open_clip(ref, ctx, truncate):
    texts = _random_texts(1500, seed=ctx) + EDGE_CASES
    ours = ClipTokenizer(ctx, truncate=truncate)(texts)
    _assert_same(ours, _reference_rows(ref, texts, ctx, truncate), texts)


@pytest.mark.reference
def test_code_point_sweep_matches_open_clip(tok, ref):
    """Every 5th code point of all planes, between letters or after a quote (incl. post-Unicode-14 ones)."""
    cps = [c for c in range(0x80, 0x110000, 5) if not 0xD800 <= c < 0xE000]
    rng = random.Random(2)
    texts = [f"a{chr(c)}b" if rng.random() < 0.5 else f"'{chr(c)}!" for c in cps]
    texts = ["".join(texts[i : i + 8]) for i in range(0, len(texts), 8)]  # 8 code points per text
    _assert_same(tok(texts), ref(texts).numpy(), texts)


def _real_captions() -> list[str]:
    caps_dir = DATA / "captions"
    if not caps_dir.is_dir():
        pytest.skip(f"real captions not present ({caps_dir}); they live outside the repository")
    texts: list[str] = []
    for path in sorted(caps_dir.glob("*.json")):
        texts += [a["caption"] for a in json.loads(path.read_text(encoding="utf-8"))["annotations"]]
    for path in sorted(caps_dir.glob("*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if "\t" in line:
                texts.append(line.split("\t", 1)[1])
    if not texts:
        pytest.skip(f"no captions found in {caps_dir}")
    return texts


@pytest.mark.reference
def test_all_real_captions_match_open_clip(tok, ref):
    texts = _real_captions()
    _assert_same(tok(texts), ref(texts).numpy(), texts)
