"""MetaCLIP metadata: load the released entry list, or build one from its sources (spec ``metaclip.md`` §2).

Loading (the normal case)
-------------------------
``load_metadata(path)`` reads the released MetaCLIP 1 ``metadata.json`` (a JSON list of strings; entry id =
position) or a MetaCLIP 2 per-language file (a JSON object ``entry -> source tag``; ids = key order).
Every count, probability and datacard file is keyed to the ids of the released list, and that order
cannot be regenerated (it was Python ``set`` iteration order), so load it rather than rebuilding.

Building (MetaCLIP 1 recipe, §2.1-2.2)
--------------------------------------
``build_metadata`` is a pure function over the four sources; the readers below parse the source files:

============================  ==========================================================================
source                        input format (reader)
============================  ==========================================================================
WordNet synset head words     NLTK WordNet: ``synset.name()`` up to the first ``.``, ``_`` -> space
                              (``wordnet_head_words``; WordNet 3.0 from a directory via
                              ``wordnet_head_words_from_dir``, needs nltk)
Wikipedia unigrams            text file, one ``word count`` pair per line, whitespace-separated
                              (``read_unigram_counts``); kept if count >= ``unigram_threshold`` (100)
Wikipedia bigrams             ``1gram.txt.gz``: ``count<TAB>word``; ``2gram.txt.gz``: ``count<TAB>w1<TAB>w2``
                              (``read_1gram_counts``, ``read_2gram_counts``; gzip or plain text). Bigrams
                              with a word missing from the 1-gram table are skipped. Scored with NLTK's
                              PMI (``bigram_pmi``); kept as ``"w1 w2"`` if PMI >= ``pmi_threshold`` (30)
Wikipedia titles              pageview dumps ``pageviews-YYYYMMDD-HH0000[.gz]``, lines
                              ``domain title count bytes``; only lines starting with ``"en "``; titles with
                              ``:`` dropped; ``_`` -> space; an hourly row counts only if its count >= 50;
                              totals summed (``read_pageview_counts``); kept if total >= ``title_threshold``
                              (70)
============================  ==========================================================================

Assembly: ``"0"`` .. ``"99"``, then WordNet, unigrams, bigrams, titles. Empty strings and single punctuation
characters (``string.punctuation``) are skipped, duplicates keep their first occurrence, and the list stops
at ``budget`` (500,000) entries. Unlike the reference (which went through a ``set``), the order here is
deterministic: WordNet in ``all_synsets()`` order, unigrams in file order, bigrams by decreasing PMI (ties
by ``(w1, w2)``, NLTK's ``score_ngrams`` order), titles by decreasing total views (ties by title). A rebuilt
list therefore never has the released ids: use it only for a new pool whose counts are computed with it.

Offline approximation (``build_offline_metadata``)
---------------------------------------------------
Without the Wikipedia dumps, an approximation of the released list is built from installable data:
WordNet 3.0 from Debian's ``wordnet-base`` (``/usr/share/wordnet``, read with nltk's WordNetCorpusReader
through a temporary NLTK_DATA-style folder holding copies of the files and a generated ``lexnames``),
Wikipedia unigram counts
shipped in the ``pywordfreq`` package (lowercase, HTML entities as in the dump), and optionally the
``symspellpy`` bigram dictionary (Google-Books counts) scored with PMI against symspellpy's unigram
dictionary, keeping the top-PMI bigrams that fit ``n_bigrams``. There are no titles. Casing differs
(pywordfreq is lowercase), so this is a realistic stand-in for tests and benchmarks, not the released list.
These packages are listed in ``requirements-metadata.txt``, not in the main requirements.
"""

from __future__ import annotations

import contextlib
import gzip
import html
import json
import math
import os
import shutil
import string
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_BUDGET",
    "MissingMetadataDependency",
    "bigram_pmi",
    "build_metadata",
    "build_offline_metadata",
    "load_metadata",
    "pmi_threshold_for_budget",
    "pywordfreq_unigram_counts",
    "read_1gram_counts",
    "read_2gram_counts",
    "read_pageview_counts",
    "read_unigram_counts",
    "save_metadata",
    "symspell_bigram_counts",
    "wordnet_head_words",
    "wordnet_head_words_from_dir",
]

DEFAULT_BUDGET = 500_000
REQUIREMENTS_FILE = "requirements-metadata.txt"
_FORBIDDEN = frozenset(string.punctuation)


class MissingMetadataDependency(ImportError):
    """An optional package for building metadata is not installed."""


def _require(module: str, package: str | None = None):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise MissingMetadataDependency(
            f"building metadata from installable data needs the '{package or module}' package: "
            f"pip install -r {REQUIREMENTS_FILE}"
        ) from e


# ----------------------------------------------------------------------------------------------------------
# Load / save


def load_metadata(path: str | os.PathLike) -> list[str]:
    """Entry list of a metadata file: a JSON list of strings (MetaCLIP 1 ``metadata.json``) or a JSON object
    whose keys are the entries in id order (MetaCLIP 2 ``metadata_per_lang/{lang}.json``, entry -> source)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"metadata file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as e:
        raise ValueError(f"{path}: not a JSON metadata file ({e})") from e
    if isinstance(data, dict):
        entries = list(data.keys())
    elif isinstance(data, list):
        entries = data
        for i, e in enumerate(entries):
            if not isinstance(e, str):
                raise ValueError(f"{path}: entry {i} is {type(e).__name__} ({e!r}), expected a string")
    else:
        raise ValueError(
            f"{path}: expected a JSON list of entries or an object entry -> source, got {type(data).__name__}"
        )
    if not entries:
        raise ValueError(f"{path}: metadata has no entries")
    return entries


def save_metadata(entries: Sequence[str], path: str | os.PathLike) -> None:
    """Write a JSON list (whole or not at all: temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(list(entries), f, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------------------
# Source readers


def _open_text(path: str | os.PathLike):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"source file not found: {path}")
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if gz else open(path, encoding="utf-8")


def read_unigram_counts(path: str | os.PathLike) -> dict[str, int]:
    """``word count`` per line (whitespace-separated; blank lines skipped). Later duplicates overwrite."""
    counts: dict[str, int] = {}
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise ValueError(f"{path}:{n}: expected 'word count', got {line.rstrip()!r}")
            try:
                counts[parts[0]] = int(parts[1])
            except ValueError:
                raise ValueError(f"{path}:{n}: count is not an integer: {line.rstrip()!r}") from None
    return counts


def read_1gram_counts(path: str | os.PathLike) -> dict[str, int]:
    """``count<TAB>word`` per line; empty words and non-positive counts are skipped (as the reference)."""
    counts: dict[str, int] = {}
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2:
                raise ValueError(f"{path}:{n}: expected 'count<TAB>word', got {line.rstrip()!r}")
            try:
                c = int(parts[0])
            except ValueError:
                raise ValueError(f"{path}:{n}: count is not an integer: {line.rstrip()!r}") from None
            w = parts[1].strip()
            if w and c > 0:
                counts[w] = c
    return counts


def read_2gram_counts(path: str | os.PathLike) -> dict[tuple[str, str], int]:
    """``count<TAB>w1<TAB>w2`` per line; empty words and non-positive counts are skipped."""
    counts: dict[tuple[str, str], int] = {}
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3:
                raise ValueError(f"{path}:{n}: expected 'count<TAB>w1<TAB>w2', got {line.rstrip()!r}")
            try:
                c = int(parts[0])
            except ValueError:
                raise ValueError(f"{path}:{n}: count is not an integer: {line.rstrip()!r}") from None
            w1, w2 = parts[1].strip(), parts[2].strip()
            if w1 and w2 and c > 0:
                counts[(w1, w2)] = c
    return counts


def read_pageview_counts(
    paths: Iterable[str | os.PathLike], min_hourly: int = 50, prefix: str = "en "
) -> dict[str, int]:
    """Summed views per title over hourly pageview dumps (MetaCLIP 1 rule).

    Lines ``domain title count bytes``: only those starting with ``prefix`` (desktop English), titles with
    ``:`` dropped, ``_`` -> space, and an hourly row counts only if its count >= ``min_hourly``.
    """
    totals: dict[str, int] = {}
    for path in paths:
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                if not line.startswith(prefix):
                    continue
                parts = line.strip().split(" ")
                if len(parts) != 4:
                    raise ValueError(
                        f"{path}:{n}: expected 'domain title count bytes', got {line.rstrip()!r}"
                    )
                title = parts[1].strip().replace("_", " ")
                try:
                    c = int(parts[2])
                except ValueError:
                    raise ValueError(f"{path}:{n}: count is not an integer: {line.rstrip()!r}") from None
                if c >= min_hourly and ":" not in title:
                    totals[title] = totals.get(title, 0) + c
    return totals


def wordnet_head_words(synsets: Iterable) -> list[str]:
    """Head word of each synset: ``name()`` up to the first ``.``, ``_`` -> space (in order, with repeats)."""
    out = []
    for ss in synsets:
        name = ss.name()
        out.append(name[: name.find(".")].replace("_", " "))
    return out


#: WordNet 3.0 ``lexnames`` (the Debian package does not ship it; nltk's reader needs it).
_LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
]
_WORDNET_FILES = [
    "data.adj", "data.adv", "data.noun", "data.verb", "index.adj", "index.adv", "index.noun", "index.verb",
    "adj.exc", "adv.exc", "noun.exc", "verb.exc",
]


def _lexnames_text() -> str:
    cat = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
    return "".join(f"{i:02d}\t{n}\t{cat[n.split('.')[0]]}\n" for i, n in enumerate(_LEXNAMES))


def wordnet_head_words_from_dir(wordnet_dir: str | os.PathLike = "/usr/share/wordnet") -> list[str]:
    """WordNet head words (``all_synsets()`` order) from a WordNet 3.0 folder (Debian ``wordnet-base``).

    nltk's ``WordNetCorpusReader`` is pointed at a temporary NLTK_DATA-style folder (``corpora/wordnet/``,
    added to ``nltk.data.path`` for the duration) holding copies of the database files (nltk's path sandbox
    refuses symlinks that resolve outside the corpus root) and a generated ``lexnames`` file. Needs nltk
    (``requirements-metadata.txt``).
    """
    wordnet_dir = Path(wordnet_dir)
    missing = [f for f in _WORDNET_FILES if not (wordnet_dir / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"{wordnet_dir} is not a WordNet 3.0 database (missing {', '.join(missing)}); "
            "on Debian/Ubuntu: apt-get install -y wordnet-base"
        )
    _require("nltk")
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _Reader(WordNetCorpusReader):
        # no OMW version mapping: it needs index.sense, which Debian's files do not have
        def map_wn(self, version="wordnet"):
            return None

    with tempfile.TemporaryDirectory(prefix="wordnet-") as tmp:
        root = Path(tmp) / "corpora" / "wordnet"
        root.mkdir(parents=True)
        # copies, not symlinks: nltk's path sandbox rejects files that resolve outside the corpus root
        for name in _WORDNET_FILES:
            shutil.copyfile(wordnet_dir / name, root / name)
        if not (root / "lexnames").exists():
            (root / "lexnames").write_text(_lexnames_text())
        import warnings

        import nltk.data

        # nltk only reads corpora under its data path (NLTK_DATA-style roots): add the temporary root
        nltk.data.path.insert(0, tmp)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "multilingual functions are not available"
                reader = _Reader(str(root), None)
                return wordnet_head_words(reader.all_synsets())
        finally:
            with contextlib.suppress(ValueError):
                nltk.data.path.remove(tmp)


# ----------------------------------------------------------------------------------------------------------
# PMI


def bigram_pmi(
    unigram_counts: Mapping[str, int], bigram_counts: Mapping[tuple[str, str], int]
) -> list[tuple[str, str, float]]:
    """PMI of every bigram whose two words are in ``unigram_counts``, sorted as NLTK's ``score_ngrams``.

    As ``BigramCollocationFinder(word_fd, bigram_fd).score_ngrams(BigramAssocMeasures.pmi)``:
    PMI = log2(n_ab * N) - log2(n_a * n_b), N = ``word_fd.N()`` = sum of all unigram counts, sorted by
    decreasing PMI, ties by ``(w1, w2)``. Computed in float64 numpy (no nltk needed).
    """
    total = float(sum(unigram_counts.values()))
    uni = unigram_counts
    pairs = [(a, b, c) for (a, b), c in bigram_counts.items() if a in uni and b in uni and c]
    if not pairs:
        return []
    n_ab = np.fromiter((p[2] for p in pairs), np.float64, len(pairs))
    n_a = np.fromiter((unigram_counts[p[0]] for p in pairs), np.float64, len(pairs))
    n_b = np.fromiter((unigram_counts[p[1]] for p in pairs), np.float64, len(pairs))
    pmi = np.log2(n_ab * total) - np.log2(n_a * n_b)
    scored = [(a, b, float(s)) for (a, b, _), s in zip(pairs, pmi.tolist())]
    scored.sort(key=lambda t: (-t[2], t[0], t[1]))
    return scored


def pmi_threshold_for_budget(scored: Sequence[tuple[str, str, float]], n: int) -> float:
    """The PMI of the n-th best bigram (keeps about n bigrams; ties may add a few)."""
    if not scored or n <= 0:
        return math.inf
    return scored[min(n, len(scored)) - 1][2]


# ----------------------------------------------------------------------------------------------------------
# Assembly


def _assemble(sources: Iterable[Iterable[str]], budget: int) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for src in sources:
        for e in src:
            if len(out) >= budget:
                return out
            if not e or e in _FORBIDDEN or e in seen:
                continue
            seen.add(e)
            out.append(e)
    return out


def build_metadata(
    wordnet_words: Iterable[str],
    unigram_counts: Mapping[str, int],
    bigram_counts: Mapping[tuple[str, str], int] | None,
    title_counts: Mapping[str, int] | None,
    *,
    unigram_threshold: int = 100,
    pmi_threshold: float = 30.0,
    title_threshold: int = 70,
    budget: int = DEFAULT_BUDGET,
    pmi_unigram_counts: Mapping[str, int] | None = None,
) -> list[str]:
    """MetaCLIP 1 entry list from its four sources (pure; see the module docstring for the rules).

    ``pmi_unigram_counts`` is the 1-gram table used for PMI (``1gram.txt.gz``); default ``unigram_counts``.
    """

    def unigrams() -> Iterator[str]:
        for w, c in unigram_counts.items():
            if c >= unigram_threshold:
                yield w

    def bigrams() -> Iterator[str]:
        if not bigram_counts:
            return
        for a, b, s in bigram_pmi(pmi_unigram_counts or unigram_counts, bigram_counts):
            if s < pmi_threshold:
                break
            yield f"{a} {b}"

    def titles() -> Iterator[str]:
        if not title_counts:
            return
        for t, c in sorted(title_counts.items(), key=lambda kv: (-kv[1], kv[0])):
            if c < title_threshold:
                break
            yield t

    numbers = (str(i) for i in range(100))
    return _assemble([numbers, wordnet_words, unigrams(), bigrams(), titles()], budget)


# ----------------------------------------------------------------------------------------------------------
# Offline approximation from installable packages


def pywordfreq_unigram_counts() -> dict[str, int]:
    """Wikipedia unigram counts shipped with ``pywordfreq`` (its ``word_frequencies.gz``: ``word;count``).

    HTML entities (``&amp;``) are unescaped; words containing whitespace are skipped.
    """
    _require("pywordfreq")
    import importlib.resources

    data = importlib.resources.files("pywordfreq").joinpath("word_frequencies.gz").read_bytes()
    counts: dict[str, int] = {}
    for line in gzip.decompress(data).decode("utf-8", "replace").splitlines():
        w, sep, c = line.rpartition(";")
        if not sep or not c.isdigit():
            continue
        w = html.unescape(w)
        if not w or any(ch.isspace() for ch in w):
            continue
        counts.setdefault(w, int(c))
    return counts


def symspell_bigram_counts() -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """``symspellpy``'s bundled English dictionaries: (unigram counts, bigram counts)."""
    _require("symspellpy")
    import importlib.resources

    base = importlib.resources.files("symspellpy")
    uni: dict[str, int] = {}
    for line in base.joinpath("frequency_dictionary_en_82_765.txt").read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            uni[parts[0]] = int(parts[1])
    bi: dict[tuple[str, str], int] = {}
    bigram_file = base.joinpath("frequency_bigramdictionary_en_243_342.txt")
    for line in bigram_file.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].isdigit():
            bi[(parts[0], parts[1])] = int(parts[2])
    return uni, bi


def build_offline_metadata(
    budget: int = DEFAULT_BUDGET,
    *,
    wordnet_dir: str | os.PathLike | None = "/usr/share/wordnet",
    unigram_threshold: int = 100,
    n_bigrams: int = 100_000,
) -> list[str]:
    """Approximation of the MetaCLIP 1 list from installable data (see the module docstring).

    ``wordnet_dir=None`` skips WordNet; ``n_bigrams=0`` skips bigrams. Needs ``requirements-metadata.txt``.
    """
    words = wordnet_head_words_from_dir(wordnet_dir) if wordnet_dir is not None else []
    unigrams = pywordfreq_unigram_counts()
    bigrams: dict[tuple[str, str], int] = {}
    pmi_uni: dict[str, int] | None = None
    threshold = math.inf
    if n_bigrams > 0:
        pmi_uni, bigrams = symspell_bigram_counts()
        threshold = pmi_threshold_for_budget(bigram_pmi(pmi_uni, bigrams), n_bigrams)
    return build_metadata(
        words,
        unigrams,
        bigrams,
        None,
        unigram_threshold=unigram_threshold,
        pmi_threshold=threshold,
        budget=budget,
        pmi_unigram_counts=pmi_uni,
    )
