"""curation.metadata: loading, source readers, PMI, assembly order, and the offline build."""

from __future__ import annotations

import gzip
import json
import math
import os

import pytest

from curation import metadata as md

# ----------------------------------------------------------------------------------------------------------
# load / save


def test_load_list_and_per_language_dict(tmp_path):
    p = tmp_path / "metadata.json"
    p.write_text(json.dumps(["dog", "New York", "中国"], ensure_ascii=False), encoding="utf-8")
    assert md.load_metadata(p) == ["dog", "New York", "中国"]
    q = tmp_path / "zh.json"
    q.write_text(json.dumps({"中国": "w", "0": "n", "东京": "t"}, ensure_ascii=False), encoding="utf-8")
    assert md.load_metadata(str(q)) == ["中国", "0", "东京"]
    g = tmp_path / "m.json.gz"
    with gzip.open(g, "wt", encoding="utf-8") as f:
        json.dump(["a", "b"], f)
    assert md.load_metadata(g) == ["a", "b"]


@pytest.mark.parametrize(
    "content,match",
    [("not json", "not a JSON"), ('"a string"', "expected a JSON list"), ("[1, 2]", "entry 0 is int"),
     ('["a", null]', "entry 1 is NoneType"), ("[]", "no entries"), ("{}", "no entries")],
)
def test_load_errors(tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        md.load_metadata(p)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata file not found"):
        md.load_metadata(tmp_path / "nope.json")


def test_save_roundtrip(tmp_path):
    p = tmp_path / "sub" / "m.json"
    md.save_metadata(["b", "a", "ü"], p)
    assert md.load_metadata(p) == ["b", "a", "ü"]
    assert [f.name for f in p.parent.iterdir()] == ["m.json"]  # no temporary file left


# ----------------------------------------------------------------------------------------------------------
# source readers


def test_read_unigram_counts(tmp_path):
    p = tmp_path / "enwiki-unigram.txt"
    p.write_text("the 1000\nDog 150\n\ncat 99\nthe 5\n")
    assert md.read_unigram_counts(p) == {"the": 5, "Dog": 150, "cat": 99}
    p.write_text("the 1000\nbad line here\n")
    with pytest.raises(ValueError, match=r":2: expected 'word count'"):
        md.read_unigram_counts(p)
    p.write_text("the many\n")
    with pytest.raises(ValueError, match="not an integer"):
        md.read_unigram_counts(p)


def test_read_ngram_counts_gzip_and_plain(tmp_path):
    one = tmp_path / "1gram.txt.gz"
    with gzip.open(one, "wt") as f:
        f.write("10\tnew\n20\tyork\n0\tzero\n5\t\n7\tcity\n")
    assert md.read_1gram_counts(one) == {"new": 10, "york": 20, "city": 7}
    two = tmp_path / "2gram.txt"
    two.write_text("4\tnew\tyork\n3\tyork\tcity\n0\ta\tb\n2\t\tx\n")
    assert md.read_2gram_counts(two) == {("new", "york"): 4, ("york", "city"): 3}
    two.write_text("4\tnew york\n")
    with pytest.raises(ValueError, match="count<TAB>w1<TAB>w2"):
        md.read_2gram_counts(two)


def test_read_pageview_counts(tmp_path):
    a = tmp_path / "pageviews-20200101-000000.gz"
    with gzip.open(a, "wt") as f:
        f.write(
            "en New_York_City 120 0\n"
            "en Talk:New_York 500 0\n"  # namespace: dropped
            "en Small_page 49 0\n"  # below the hourly 50: not counted
            "en.m New_York_City 900 0\n"  # mobile: not "en "
            "de Berlin 1000 0\n"
            "en Berlin 60 0\n"
        )
    b = tmp_path / "pageviews-20200101-010000"
    b.write_text("en New_York_City 50 0\nen Small_page 49 0\nen Berlin 10 0\n")
    assert md.read_pageview_counts([a, b]) == {"New York City": 170, "Berlin": 60}


# ----------------------------------------------------------------------------------------------------------
# PMI


def _pmi_direct(uni, bi):
    n = sum(uni.values())
    out = {}
    for (a, b), c in bi.items():
        if a in uni and b in uni:
            out[(a, b)] = math.log2(c * n) - math.log2(uni[a] * uni[b])
    return out


def test_pmi_matches_direct_formula_and_order():
    uni = {"new": 100, "york": 50, "city": 80, "the": 5000, "rare": 1, "word": 1}
    bi = {("new", "york"): 40, ("york", "city"): 10, ("the", "city"): 30, ("rare", "word"): 1,
          ("new", "zzz"): 9,
          ("the", "new"): 1}
    scored = md.bigram_pmi(uni, bi)
    direct = _pmi_direct(uni, bi)
    assert len(scored) == len(direct) == 5  # ("new", "zzz") skipped: word missing from the unigrams
    for a, b, s in scored:
        assert s == pytest.approx(direct[(a, b)], abs=1e-9)
    assert [s for _, _, s in scored] == sorted((s for _, _, s in scored), reverse=True)
    assert (scored[0][0], scored[0][1]) == ("rare", "word")
    assert md.pmi_threshold_for_budget(scored, 2) == scored[1][2]
    assert md.pmi_threshold_for_budget([], 2) == math.inf


def test_pmi_matches_nltk():
    nltk = pytest.importorskip("nltk")
    import random

    from nltk.collocations import BigramAssocMeasures, BigramCollocationFinder
    from nltk.probability import FreqDist

    rng = random.Random(0)
    words = [f"w{i}" for i in range(60)]
    uni = {w: rng.randint(1, 10_000) for w in words}
    bi = {(rng.choice(words), rng.choice(words)): rng.randint(1, 500) for _ in range(400)}
    word_fd, bigram_fd = FreqDist(), FreqDist()
    for w, c in uni.items():
        word_fd[w] = c
    for k, c in bi.items():
        bigram_fd[k] = c
    ref = BigramCollocationFinder(word_fd, bigram_fd).score_ngrams(BigramAssocMeasures.pmi)
    ours = md.bigram_pmi(uni, bi)
    assert [(a, b) for a, b, _ in ours] == [k for k, _ in ref]
    for (_, _, s), (_, r) in zip(ours, ref):
        assert s == pytest.approx(r, abs=1e-12)
    del nltk


# ----------------------------------------------------------------------------------------------------------
# assembly


def test_build_order_filters_dedupe_and_budget():
    wordnet = ["dog", "hot dog", "dog", "5", "", "!", "cat"]
    uni = {"the": 500, "dog": 300, "Dog": 200, "rare": 99, "!": 1000, "zebra": 100}
    pmi_uni = {"new": 100, "york": 50, "city": 80, "the": 5000}
    bi = {("new", "york"): 40, ("york", "city"): 10, ("the", "city"): 1}
    titles = {"New York City": 500, "Berlin": 70, "Tiny": 69, "Aachen": 500, "dog": 1000}
    out = md.build_metadata(wordnet, uni, bi, titles, pmi_unigram_counts=pmi_uni, pmi_threshold=0.0)
    numbers = [str(i) for i in range(100)]
    scored = md.bigram_pmi(pmi_uni, bi)
    expected_bi = [f"{a} {b}" for a, b, s in scored if s >= 0.0]
    assert expected_bi == ["new york", "york city"]  # "the city" has a negative PMI
    assert out == numbers + ["dog", "hot dog", "cat", "the", "Dog", "zebra", *expected_bi,
                             "Aachen", "New York City", "Berlin"]
    # budget stops the list
    short = md.build_metadata(wordnet, uni, bi, titles, budget=103, pmi_unigram_counts=pmi_uni)
    assert short == numbers + ["dog", "hot dog", "cat"]
    # thresholds
    hi = md.build_metadata([], uni, bi, titles, unigram_threshold=250, pmi_threshold=1e9, title_threshold=600,
                           pmi_unigram_counts=pmi_uni)
    assert hi == numbers + ["the", "dog"]
    assert md.build_metadata([], {}, None, None) == numbers


# ----------------------------------------------------------------------------------------------------------
# offline build from installable data (requirements-metadata.txt, Debian wordnet-base)


def _have(mod):
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


needs_wordnet = pytest.mark.skipif(
    not (_have("nltk") and os.path.exists("/usr/share/wordnet/data.noun")),
    reason="needs nltk (requirements-metadata.txt) and /usr/share/wordnet (apt-get install wordnet-base)",
)


@needs_wordnet
@pytest.mark.slow
def test_wordnet_head_words_from_debian_wordnet():
    words = md.wordnet_head_words_from_dir("/usr/share/wordnet")
    assert len(words) == 117_659  # WordNet 3.0 synsets
    uniq = set(words)
    assert 85_000 < len(uniq) < 88_000  # the paper reports 86,654 WordNet entries
    assert {"dog", "new york", "able", "hot"} <= uniq  # synset names are lowercase
    assert "" in uniq  # e.g. ".22.a.01" has an empty head word; assembly drops it


def test_wordnet_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        md.wordnet_head_words_from_dir(tmp_path)


@pytest.mark.skipif(not _have("pywordfreq"), reason="needs pywordfreq (requirements-metadata.txt)")
def test_pywordfreq_unigrams():
    counts = md.pywordfreq_unigram_counts()
    assert len(counts) > 500_000
    assert counts["the"] > counts["dog"] >= 100
    assert all(" " not in w for w in list(counts)[:1000])


@pytest.mark.skipif(not _have("symspellpy"), reason="needs symspellpy (requirements-metadata.txt)")
def test_symspell_bigrams():
    uni, bi = md.symspell_bigram_counts()
    assert len(uni) > 80_000 and len(bi) > 240_000
    scored = md.bigram_pmi(uni, bi)
    assert len(scored) > 100_000 and scored[0][2] > scored[-1][2]


@pytest.mark.skipif(
    not (_have("pywordfreq") and _have("symspellpy")), reason="needs requirements-metadata.txt"
)
def test_offline_build_without_wordnet():
    entries = md.build_offline_metadata(
        budget=10**9, wordnet_dir=None, unigram_threshold=100_000, n_bigrams=500
    )
    assert len(set(entries)) == len(entries)
    assert entries[:100] == [str(i) for i in range(100)]
    assert "the" in entries[:200]
    assert sum(" " in e for e in entries) >= 450  # the top-PMI bigrams made it in, after the unigrams
    first = min(i for i, e in enumerate(entries) if " " in e)
    assert all(" " in e for e in entries[first:])  # bigrams come after the unigrams


def test_missing_optional_package_names_the_requirements_file(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "pywordfreq":
            raise ImportError("no module")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(md.MissingMetadataDependency, match="requirements-metadata.txt"):
        md.pywordfreq_unigram_counts()
