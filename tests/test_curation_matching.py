"""curation.matching: the spec §3 semantics, and the fast batch path against the naive reference."""

from __future__ import annotations

import json
import os
import pickle
import random
import string

import numpy as np
import pytest

from curation import matching
from curation.matching import (
    Matcher,
    MatchPool,
    MultiLangMatcher,
    csr_to_lists,
    is_cjk_or_similar,
    naive_match,
    spaced_entry_v1,
    spaced_entry_v2,
    spacing,
)

DATA = "/work/shared/data/captions"


def naive_rows(texts, spaced):
    return [naive_match(t, spaced) if isinstance(t, str) else [] for t in texts]


def assert_same_as_naive(m: Matcher, texts):
    """Both paths (vectorised batch and one-text) against the naive reference."""
    want = naive_rows(texts, m.spaced_entries)
    small = m.small_batch
    try:
        m.small_batch = 0  # force the vectorised path even for a few texts
        off, ids = m.match_batch(texts)
    finally:
        m.small_batch = small
    assert off.dtype == np.int64 and ids.dtype == np.uint32
    assert len(off) == len(texts) + 1 and off[0] == 0 and off[-1] == len(ids)
    got = csr_to_lists(off, ids)
    for t, g, w in zip(texts, got, want):
        assert g == w, (t, g, w)
    for t, w in zip(texts, want):
        assert m.match(t) == w, (t, m.match(t), w)
    off, ids = m.match_batch(texts[:5])  # small batch: the one-text path
    assert csr_to_lists(off, ids) == want[:5]


# ----------------------------------------------------------------------------------------------------------
# §3.1 / §3.2


def test_spacing_reference():
    assert spacing("A dog, in New York City!") == " A dog ,  in New York City !  "
    assert spacing("St. Louis") == " St .  Louis "
    assert spacing("a\tb\nc\rd") == " a b c d "
    assert spacing("x`y;z:w?") == " x ` y ; z : w ?  "
    assert spacing("") == "  "
    assert spacing("New  York") == " New  York "  # no whitespace collapsing
    assert spacing("Ünïcode") == " Ünïcode "  # no normalisation


def test_spaced_entries():
    assert spaced_entry_v1("dog") == " dog "
    assert spaced_entry_v1("中国") == " 中国 "
    assert spaced_entry_v2("dog") == " dog "
    assert spaced_entry_v2("中国") == "中国"
    assert spaced_entry_v2("中国 dog") == "中国 dog "
    assert spaced_entry_v2("dog 中国") == " dog 中国"
    assert spaced_entry_v2("C++") == " C++"
    assert spaced_entry_v2("(dog)") == "(dog)"
    assert spaced_entry_v2("「東京」") == "「東京」"
    assert spaced_entry_v2("ภาษาไทย") == "ภาษาไทย"
    assert spaced_entry_v2("") == "  "


@pytest.mark.parametrize(
    "char,expected",
    [("中", True), ("㐀", True), ("\U00020000", True), ("豈", True), ("⺀", True), ("⼀", True), ("⿰", True),
     ("ก", True), ("ກ", True), ("က", True), ("ក", True), ("ཀ", True), ("，", True), ("。", True), ("—", True),
     ("!", True), ("~", True), ("a", False), ("é", False), ("あ", False), ("한", False), (" ", False)],
)
def test_is_cjk_or_similar(char, expected):
    # note: hiragana/hangul are not in the reference's ranges, so Japanese kana entries get spaces
    assert is_cjk_or_similar(char) is expected


# ----------------------------------------------------------------------------------------------------------
# §3.3 table, every row


TABLE_ENTRIES = ["dog", "New York", "York City", "York", "St. Louis", "t-shirt", "cat"]


def _ids(names):
    return sorted(TABLE_ENTRIES.index(n) for n in names)


@pytest.mark.parametrize("mode", ["v1", "v2"])
@pytest.mark.parametrize(
    "text,matched",
    [
        ("A dog, in New York City!", ["dog", "New York", "York City", "York"]),  # rows 1 and 2
        ("dog dog dog", ["dog"]),  # set semantics: one match
        ("St. Louis", []),  # entry keeps "St." but the text is split around "."
        ("my dog's toy", []),  # glued to '
        ("(dog)", []),  # glued to parentheses
        ('dog"', []),  # glued to "
        ("T-shirt", []),  # case-sensitive
        ("New  York", ["York"]),  # whitespace not collapsed: "New York" does not match
        ("Dog", []),
        ("dog.cat", ["dog", "cat"]),  # "." is split off
        ("dog-cat", []),
        ("dog\tcat\n", ["dog", "cat"]),
    ],
)
def test_quirks_table(mode, text, matched):
    m = Matcher(TABLE_ENTRIES, mode=mode)
    assert m.match(text) == _ids(matched)
    assert naive_match(text, m.spaced_entries) == _ids(matched)
    assert_same_as_naive(m, [text, text + " " + text])


def test_entries_with_wrapped_punctuation_never_match():
    m = Matcher(["St. Louis", "a,b", "why?", "x:y", "ok"])
    for text in ["St. Louis", "a,b", "why?", "x:y", " St. Louis ", "St.  Louis"]:
        assert m.match(text) == []
    assert m.match("ok.") == [4]


def test_v2_cjk_matches_without_word_boundaries():
    entries = ["中国", "东京", "北京大学", "dog", "大学", "C++", "「東京」", "ภาษา", "中国 dog"]
    m = Matcher(entries, mode="v2")
    assert m.match("我爱中国。") == [0]
    assert m.match("北京大学的学生") == [2, 4]  # nested matches count
    assert m.match("中国dog") == [0]  # "dog" glued to CJK has no space: no match
    assert m.match("中国 dog") == [0, 3, 8]
    assert m.match("I like C++!") == [5]
    assert m.match("在「東京」") == [6]
    assert m.match("เรียนภาษาไทย") == [7]
    v1 = Matcher(entries, mode="v1")
    assert v1.match("我爱中国。") == []
    assert v1.match("中国 dog") == [0, 3, 8]
    texts = ["我爱中国。", "北京大学的学生", "中国dog", "中国 dog", "I like C++!", "在「東京」",
             "东京 东京东京"]
    assert_same_as_naive(m, texts)
    assert_same_as_naive(v1, texts)


def test_duplicates_empty_and_odd_entries_follow_naive():
    entries = ["dog", "dog", "", " lead", "trail ", "x  y", "tab\there", "a\x00b", "ok",
               "averyveryverylongtoken",
               "averyveryverylongtokeN", "é" * 20]
    texts = ["dog", "", "New  York", " lead  trail  x  y", "tab\there", "a\x00b ok", "averyveryverylongtoken",
             "averyveryverylongtokeN averyveryverylongtokenn", "é" * 20, "é" * 21, None, 3, b"dog", "\x00",
             "ok\x00ok"]
    for mode in ("v1", "v2"):
        m = Matcher(entries, mode=mode)
        assert_same_as_naive(m, texts)
        assert m.match("dog") == [0, 1]
        assert m.match(None) == []


def test_lone_surrogates_and_non_bmp():
    entries = ["dog", "\ud800", "a\udfffb", "😀", "x😀y z"]
    texts = ["\ud800 dog", "a\udfffb", "😀 dog 😀", "x😀y z", "x😀y  z", "\ud800\udc00"]
    for mode in ("v1", "v2"):
        assert_same_as_naive(Matcher(entries, mode=mode), texts)


def test_non_str_rows_and_empty_input():
    m = Matcher(["dog"])
    off, ids = m.match_batch([None, "dog", 1.5, "dog dog"])
    assert off.tolist() == [0, 0, 1, 1, 2] and ids.tolist() == [0, 0]
    off, ids = m.match_batch([])
    assert off.tolist() == [0] and ids.tolist() == []


def test_batch_boundaries_do_not_matter():
    entries = ["a b", "b", "b c", "c"]
    texts = ["a", "b", "c", "a b", "b c", "c a", "b"] * 5
    rows = [Matcher(entries, batch_size=bs).match_batch(texts) for bs in (1, 2, 3, 7, 1000)]
    for off, ids in rows[1:]:
        assert off.tolist() == rows[0][0].tolist() and ids.tolist() == rows[0][1].tolist()
    assert_same_as_naive(Matcher(entries, batch_size=3), texts)


def test_unknown_mode_and_bad_entries():
    with pytest.raises(ValueError, match="mode"):
        Matcher(["a"], mode="v3")
    with pytest.raises(TypeError, match="entry 1"):
        Matcher(["a", 3])


def test_matcher_is_not_pickled():
    with pytest.raises(TypeError, match="once per worker"):
        pickle.dumps(Matcher(["a"]))


# ----------------------------------------------------------------------------------------------------------
# Property tests against the naive reference


def _random_vocab(rng: random.Random, n: int) -> list[str]:
    alphabet = string.ascii_letters + "éüßçñ中国東京ภาษา" + "-'()\"/&+"
    words = set()
    while len(words) < n:
        k = rng.choice([1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 17, 25])
        words.add("".join(rng.choice(alphabet) for _ in range(k)))
    return sorted(words)


def _random_entries(rng: random.Random, vocab: list[str], n: int) -> list[str]:
    out = []
    for _ in range(n):
        k = rng.choice([1, 1, 1, 2, 2, 3, 4])
        e = " ".join(rng.choice(vocab) for _ in range(k))
        r = rng.random()
        if r < 0.03:
            e = e + rng.choice(",.;:?!`")
        elif r < 0.05:
            e = " " + e
        elif r < 0.07:
            e = e.replace(" ", "  ", 1)
        elif r < 0.09 and len(e) > 1:
            e = e[:-1]  # a prefix of a vocabulary word
        out.append(e)
    out += out[:5]  # duplicates
    return out


def _random_texts(rng: random.Random, vocab: list[str], n: int) -> list[str]:
    noise = [" ", " ", " ", "  ", ",", ", ", ".", ". ", "!", "?", ";", ":", "`", "\t", "\n", "\r", "'",
             "(", ")",
             '"', "-", "中", "。", "x"]
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 14)):
            parts.append(rng.choice(vocab) if rng.random() < 0.7 else rng.choice(noise))
            if rng.random() < 0.7:
                parts.append(" ")
        texts.append("".join(parts))
    return texts


@pytest.mark.parametrize("mode", ["v1", "v2"])
def test_random_text_against_naive(mode):
    rng = random.Random(1234 if mode == "v1" else 4321)
    vocab = _random_vocab(rng, 300)
    entries = _random_entries(rng, vocab, 1500)
    texts = _random_texts(rng, vocab, 3000)
    m = Matcher(entries, mode=mode, batch_size=500)
    assert_same_as_naive(m, texts)


def test_long_tokens_are_verified_exactly():
    # long vocabulary tokens and text tokens that share their length and first 8-byte chunks
    rng = random.Random(7)
    base = ["".join(rng.choice("ab") for _ in range(k)) for k in (8, 9, 15, 16, 17, 24, 31, 33, 64, 100)]
    entries = base + [b + " " + base[0] for b in base]
    texts = []
    for b in base:
        texts.append(b)
        texts.append(b[:-1] + ("a" if b[-1] == "b" else "b"))  # last byte differs
        texts.append(b + " " + base[0])
        texts.append(b + b)
    assert_same_as_naive(Matcher(entries), texts)


@pytest.mark.skipif(not os.path.exists(DATA), reason="shared caption data not present")
def test_real_captions_against_naive():
    from collections import Counter

    with open(os.path.join(DATA, "flickr8k_captions.txt"), encoding="utf-8") as f:
        caps = [line.split("\t", 1)[1].rstrip("\n") for line in f if "\t" in line]
    with open(os.path.join(DATA, "coco_captions_val2017.json"), encoding="utf-8") as f:
        caps += [a["caption"] for a in json.load(f)["annotations"][:5000]]
    rng = random.Random(0)
    pool = caps[300:]
    words = Counter(w for c in pool[:20000] for w in spacing(c).split())
    bigrams = Counter(
        " ".join(p) for c in pool[:5000] for p in zip(spacing(c).split()[:-1], spacing(c).split()[1:])
    )
    entries = [w for w, _ in words.most_common(4000)] + [b for b, _ in bigrams.most_common(1000)]
    entries += [e.capitalize() for e in entries[:200]]
    texts = rng.sample(caps, 400)
    m = Matcher(entries)
    assert_same_as_naive(m, texts)
    off, _ = m.match_batch(texts)
    assert np.diff(off).mean() > 3  # real text matches several entries


# ----------------------------------------------------------------------------------------------------------
# MetaCLIP 2 per-language matching


def test_multilang_routes_by_language_and_builds_lazily(tmp_path):
    zh = tmp_path / "zh.json"
    zh.write_text(json.dumps({"中国": "w", "东京": "t"}, ensure_ascii=False), encoding="utf-8")
    ml = MultiLangMatcher({"en": ["dog", "mit"], "de": ["mit", "Hund"], "zh": str(zh), "other": ["dog"]})
    assert ml._matchers == {}
    texts = ["a dog mit", "Hund mit dog", "我爱中国", "dog", "dog", None]
    langs = ["en", "de", "zh", "fr", None, "en"]
    off, ids = ml.match_batch(texts, langs)
    assert csr_to_lists(off, ids) == [[0, 1], [0, 1], [0], [0], [0], []]
    assert set(ml._matchers) == {"en", "de", "zh", "other"}
    assert ml.match("中国", "zh") == [0]
    no_other = MultiLangMatcher({"en": ["dog"]})
    off, ids = no_other.match_batch(["dog", "dog"], ["fr", "en"])
    assert csr_to_lists(off, ids) == [[], [0]]
    assert "fr" not in no_other._matchers
    no_other.build_all()
    assert set(no_other._matchers) == {"en"}
    with pytest.raises(ValueError, match="languages"):
        no_other.match_batch(["a"], [])


# ----------------------------------------------------------------------------------------------------------
# Processes


def test_match_pool_equals_single_process():
    rng = random.Random(3)
    vocab = _random_vocab(rng, 200)
    m = Matcher(_random_entries(rng, vocab, 500))
    texts = _random_texts(rng, vocab, 700)
    want = m.match_batch(texts)
    with MatchPool(m, processes=2, chunk_size=100) as pool:
        got = pool.match_batch(texts)
        parts = list(pool.imap([texts[:10], texts[10:20]]))
    assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()
    assert csr_to_lists(*parts[0]) == csr_to_lists(*m.match_batch(texts[:10]))
    got1 = matching.parallel_match_batch(m, texts, processes=1)
    assert got1[1].tolist() == want[1].tolist()


def test_init_worker_builds_from_entries_or_file(tmp_path):
    p = tmp_path / "metadata.json"
    p.write_text(json.dumps(["dog", "cat"]))
    try:
        matching.init_worker(str(p))
        assert csr_to_lists(*matching.worker_match_batch(["a cat", "dog"])) == [[1], [0]]
        matching.init_worker(["x"], mode="v2")
        assert csr_to_lists(*matching.worker_match_batch(["x"])) == [[0]]
    finally:
        matching._set_worker_matcher(None)
    with pytest.raises(RuntimeError, match="init_worker"):
        matching.worker_match_batch(["x"])
