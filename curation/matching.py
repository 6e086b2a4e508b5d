"""Sub-string matching of texts against MetaCLIP metadata (spec ``metaclip.md`` §3).

Semantics (identical to the reference, quirks included): a text matches entry ``e`` iff the *spaced entry*
is a substring of the *spaced text* (``spacing``). The result per text is the sorted set of matched entry ids.

- ``spacing`` wraps the seven characters ``, . ; : ? ! ``` in spaces, turns ``\\t \\n \\r`` into spaces and
  pads the text with one space on each side. No lowercasing, no Unicode normalisation, no whitespace
  collapsing.
- v1 (MetaCLIP 1): every entry becomes ``" " + entry + " "``.
- v2 (MetaCLIP 2): a space is added on a side only if the entry's character at that end is not
  "CJK-or-similar" (``is_cjk_or_similar``), so CJK entries match without word boundaries.
- Entries with identical spaced forms all match (like the naive reference). pyahocorasick's ``add_word``
  would keep only the last id of such duplicates; released metadata has none.

Fast path (``Matcher.match_batch``). Texts are processed in batches: the batch is joined with a NUL separator,
spaced once, UTF-8 encoded and handled with numpy only, so no Python object is created per match or per token:

1. A spaced entry that starts and ends with a space (every v1 entry, most v2 entries) matches iff its
   interior, split on single spaces, equals a run of consecutive space-delimited tokens of the spaced text.
   Tokens are read as byte ranges between spaces. Each token gets an exact key (tokens of <= 7 bytes: their
   bytes packed into a uint64 with the length in the top byte) or a 64-bit hash (longer tokens, verified
   byte-exactly in 8-byte chunks against the candidate vocabulary token). Keys are looked up in a vectorised
   open-addressing hash table giving exact token ids; a token trie (level by level, again with a vectorised
   hash table) finds all runs that spell an entry: all overlapping and nested matches count.
2. Spaced entries that do not start and end with a space (v2 CJK/punctuation ends) go through a pyahocorasick
   automaton over the joined text, with hits crossing a text boundary dropped.

The per-text results are deduplicated and returned as CSR ``(offsets int64[n+1], entry_ids uint32[m])``.
A text that itself contains NUL is matched alone (no separator needed). ``Matcher.match`` (one text, and
``match_batch`` of up to 16 texts) walks the same trie in plain Python. Property tests check every path
against ``naive_match`` on random and real text.

Processes. Build the ``Matcher`` once per process and never pickle it through queues. ``MatchPool`` forks
workers after the build (the matcher is inherited) and also matches in the calling process; where fork is
not available, each worker builds its own from the entry list (``init_worker``). A runner with its own pool
can use ``init_worker`` as the pool initializer and ``worker_match_batch`` as the task.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import string
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "CJK_OR_SIMILAR_RANGES",
    "EXTRA_PUNCTUATION",
    "MatchPool",
    "Matcher",
    "MultiLangMatcher",
    "csr_to_lists",
    "init_worker",
    "is_cjk_or_similar",
    "naive_match",
    "parallel_match_batch",
    "spaced_entry",
    "spaced_entry_v1",
    "spaced_entry_v2",
    "spacing",
    "worker_match_batch",
]

# ----------------------------------------------------------------------------------------------------------
# Normalisation (spec §3.1, §3.2)

WRAPPED_CHARS = (",", ".", ";", ":", "?", "!", "`")
SPACED_CHARS = ("\t", "\n", "\r")

#: Code point ranges (inclusive) that count as "CJK-or-similar" for v2 entry spacing.
CJK_OR_SIMILAR_RANGES: tuple[tuple[int, int, str], ...] = (
    (0x4E00, 0x9FFF, "CJK Unified Ideographs"),
    (0x3400, 0x4DBF, "CJK Unified Ideographs Extension A"),
    (0x20000, 0x2A6DF, "CJK Unified Ideographs Extension B"),
    (0x2A700, 0x2B73F, "CJK Unified Ideographs Extension C"),
    (0x2B740, 0x2B81F, "CJK Unified Ideographs Extension D"),
    (0x2B820, 0x2CEAF, "CJK Unified Ideographs Extension E"),
    (0x2CEB0, 0x2EBEF, "CJK Unified Ideographs Extension F"),
    (0xF900, 0xFAFF, "CJK Compatibility Ideographs"),
    (0x2E80, 0x2EFF, "CJK Radicals Supplement"),
    (0x2F00, 0x2FDF, "Kangxi Radicals"),
    (0x2FF0, 0x2FFF, "Ideographic Description Characters"),
    (0x0E00, 0x0E7F, "Thai"),
    (0x0E80, 0x0EFF, "Lao"),
    (0x1000, 0x109F, "Myanmar (Burmese)"),
    (0x1780, 0x17FF, "Khmer"),
    (0x0F00, 0x0FFF, "Tibetan"),
)

#: Full-width / typographic punctuation treated like ``string.punctuation`` by the v2 rule.
EXTRA_PUNCTUATION = frozenset("，。、；：？！“”‘’（）【】《》〈〉「」『』～—")
_PUNCTUATION = frozenset(string.punctuation) | EXTRA_PUNCTUATION


def spacing(text: str) -> str:
    """The reference text normalisation (spec §3.1)."""
    s = " " + text + " "
    for c in WRAPPED_CHARS:
        s = s.replace(c, " " + c + " ")
    for c in SPACED_CHARS:
        s = s.replace(c, " ")
    return s


def is_cjk_or_similar(char: str) -> bool:
    """True for CJK ideographs/radicals, Thai, Lao, Burmese, Khmer, Tibetan and any punctuation."""
    cp = ord(char)
    for lo, hi, _ in CJK_OR_SIMILAR_RANGES:
        if lo <= cp <= hi:
            return True
    return char in _PUNCTUATION


def spaced_entry_v1(entry: str) -> str:
    """MetaCLIP 1: ``" " + entry + " "``."""
    return " " + entry + " "


def spaced_entry_v2(entry: str) -> str:
    """MetaCLIP 2: pad a side with a space only if the entry's end character there is not CJK-or-similar.

    The reference indexes ``entry[0]`` and fails on an empty entry; here an empty entry gets both spaces.
    """
    if not entry:
        return "  "
    s = entry
    if not is_cjk_or_similar(s[0]):
        s = " " + s
    if not is_cjk_or_similar(s[-1]):
        s = s + " "
    return s


def spaced_entry(entry: str, mode: str = "v1") -> str:
    if mode == "v1":
        return spaced_entry_v1(entry)
    if mode == "v2":
        return spaced_entry_v2(entry)
    raise ValueError(f"unknown matching mode {mode!r}: expected 'v1' or 'v2'")


def naive_match(text: str, spaced_entries: Sequence[str]) -> list[int]:
    """Reference: ids of all spaced entries that are substrings of ``spacing(text)`` (one check per entry)."""
    s = spacing(text)
    return [i for i, e in enumerate(spaced_entries) if e in s]


def csr_to_lists(offsets: np.ndarray, ids: np.ndarray) -> list[list[int]]:
    """CSR ``(offsets, ids)`` to one Python list of ids per text."""
    flat = ids.tolist()
    o = offsets.tolist()
    return [flat[o[i] : o[i + 1]] for i in range(len(o) - 1)]


# ----------------------------------------------------------------------------------------------------------
# Vectorised building blocks

_U64 = np.uint64
_MASKS = np.array([(1 << (8 * n)) - 1 for n in range(8)] + [(1 << 64) - 1], dtype=np.uint64)
_K0 = 0x9E3779B97F4A7C15
_K1 = 0xBF58476D1CE4E5B9
_SEP = "\x00"
_SEP_BYTE = 0
_EMPTY_ROW = (np.zeros(1, np.int64), np.zeros(0, np.uint32))


def _unaligned_u64(buf: np.ndarray) -> np.ndarray:
    """``W[i]`` = the 8 bytes ``buf[i:i+8]`` as a little-endian uint64, i <= len(data) (see ``_padded``)."""
    n = len(buf) - 8
    return np.ndarray((n,), dtype="<u8", buffer=buf, offset=0, strides=(1,))


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for each (s, c)."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(counts)
    return np.repeat(starts - (ends - counts), counts) + np.arange(total, dtype=np.int64)


def _has_duplicates(a: np.ndarray) -> bool:
    b = np.sort(a)
    return bool(len(b) > 1 and (b[1:] == b[:-1]).any())


def _mix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> _U64(31))
    h = h * _U64(_K1)
    return h ^ (h >> _U64(29))


def _token_keys(W: np.ndarray, starts: np.ndarray, lengths: np.ndarray, seed: int, max_len: int):
    """Keys for the tokens ``buf[starts[k] : starts[k] + lengths[k]]``.

    Tokens of <= 7 bytes: exact key (bytes | length << 56). Longer tokens (and shorter than ``max_len``): a
    64-bit hash with bit 63 set, to be verified. Tokens longer than ``max_len`` get no key (flag False).
    Returns ``(keys uint64, ok bool)``.
    """
    with np.errstate(over="ignore"):
        lengths_u = lengths.astype(np.uint64)
        # exact keys for all tokens first (correct for <= 7 bytes), then hashes for the longer ones
        keys = (W[starts] & _MASKS[np.minimum(lengths, 7)]) | (lengths_u << _U64(56))
        ok = lengths <= max_len
        l_idx = np.flatnonzero(lengths > 7)
        if len(l_idx):
            l_idx = l_idx[ok[l_idx]]
            st = starts[l_idx]
            ln = lengths[l_idx]
            h = (lengths_u[l_idx] + _U64(seed)) * _U64(_K0)
            j = 0
            live = np.arange(len(l_idx))
            while len(live):
                rem = ln[live] - 8 * j
                chunk = W[st[live] + 8 * j] & _MASKS[np.minimum(rem, 8)]
                h[live] = _mix(h[live] ^ chunk)
                j += 1
                live = live[rem > 8]
            keys[l_idx] = h | _U64(1 << 63)
    return keys, ok


class _HashTable:
    """Static open-addressing hash table uint64 key -> int64 value, with vectorised lookups."""

    def __init__(self, keys: np.ndarray, values: np.ndarray):
        keys = np.asarray(keys, np.uint64)
        values = np.asarray(values, np.int64)
        if _has_duplicates(keys):
            raise ValueError("duplicate keys")
        bits = max(4, int(np.ceil(np.log2(max(2 * len(keys), 16)))))
        self.shift = _U64(64 - bits)
        self.mask = (1 << bits) - 1
        size = 1 << bits
        self.tkeys = np.zeros(size, np.uint64)
        self.tvals = np.full(size, -1, np.int64)
        order = np.argsort(keys)
        self.skeys, self.svals = keys[order], values[order]
        slot = self._slot(keys)
        pending = np.arange(len(keys))
        while len(pending):
            s = slot[pending]
            free = self.tvals[s] < 0
            # place the first pending key for each free slot
            cand = pending[free]
            cs = s[free]
            _, first = np.unique(cs, return_index=True)
            placed = cand[first]
            self.tkeys[slot[placed]] = keys[placed]
            self.tvals[slot[placed]] = values[placed]
            done = np.zeros(len(keys), bool)
            done[placed] = True
            pending = pending[~done[pending]]
            slot[pending] = (slot[pending] + 1) & self.mask
        # key and value side by side: one cache line per probe
        tab = np.empty((size, 2), np.int64)
        tab[:, 0] = self.tkeys.view(np.int64)
        tab[:, 1] = self.tvals
        self.flat = tab.reshape(-1)
        del self.tkeys, self.tvals

    def _slot(self, keys: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return ((keys * _U64(_K0)) >> self.shift).astype(np.int64)

    def lookup(self, q: np.ndarray) -> np.ndarray:
        """Value of each key, -1 where absent."""
        slot = self._slot(q)
        qi = q.view(np.int64)
        at = slot * 2
        k = self.flat.take(at)
        v = self.flat.take(at + 1)
        hit = k == qi
        out = np.where(hit, v, -1)
        live = np.flatnonzero((v >= 0) & ~hit)  # occupied by another key: probe on
        for _ in range(2):
            if not len(live):
                return out
            s = (slot[live] + 1) & self.mask
            slot[live] = s
            k = self.flat.take(s * 2)
            v = self.flat.take(s * 2 + 1)
            hit = (v >= 0) & (k == qi[live])
            out[live[hit]] = v[hit]
            live = live[(v >= 0) & ~hit]
        if len(live):
            # the few keys in long probe chains: binary search (bounds the number of numpy calls)
            ql = q[live]
            i = np.minimum(np.searchsorted(self.skeys, ql), len(self.skeys) - 1)
            found = self.skeys[i] == ql
            out[live[found]] = self.svals[i[found]]
        return out


def _encode(s: str) -> bytes:
    return s.encode("utf-8", "surrogatepass")


def _padded(b: bytes) -> np.ndarray:
    buf = np.zeros(len(b) + 16, np.uint8)
    buf[: len(b)] = np.frombuffer(b, np.uint8)
    return buf


class _TokenTrie:
    """Token-aligned spaced patterns: interiors split on single spaces, as a trie over exact token ids."""

    def __init__(self, token_lists: Sequence[list[str]], pattern_ids: np.ndarray | Sequence[list[int]]):
        """``token_lists[p]``: tokens of distinct pattern p; ``pattern_ids[p]``: its entry ids (a list), or
        one id per pattern (an int array)."""
        flat = [t for toks in token_lists for t in toks]
        words = list(dict.fromkeys(flat))
        index = {w: i for i, w in enumerate(words)}
        self._index = index  # token -> id, also used by the one-text path
        self._py = None
        self.n_vocab = len(words)
        tids = np.fromiter(map(index.__getitem__, flat), np.int64, len(flat))
        n_tok = np.fromiter(map(len, token_lists), np.int64, len(token_lists))
        first = np.zeros(len(token_lists), np.int64)
        np.cumsum(n_tok[:-1], out=first[1:])
        # vocabulary bytes, keys and chunks (for exact verification of long tokens)
        vbytes = [_encode(w) for w in words]
        vlen = np.fromiter(map(len, vbytes), np.int64, len(vbytes))
        self.vlen = vlen
        self.max_len = int(vlen.max())
        vstart = np.zeros(len(vlen), np.int64)
        np.cumsum(vlen[:-1], out=vstart[1:])
        W = _unaligned_u64(_padded(b"".join(vbytes)))
        for seed in range(64):  # re-seed on a (very unlikely) hash collision between long vocabulary tokens
            keys, _ = _token_keys(W, vstart, vlen, seed, self.max_len)
            if not _has_duplicates(keys):
                break
        else:  # pragma: no cover
            raise RuntimeError("could not find a collision-free token hash seed")
        self.seed = seed
        self.vocab_table = _HashTable(keys, np.arange(self.n_vocab))
        long_ids = np.flatnonzero(vlen > 7)
        n_chunks = np.zeros(self.n_vocab, np.int64)
        n_chunks[long_ids] = (vlen[long_ids] + 7) // 8
        self.chunk_off = np.zeros(self.n_vocab + 1, np.int64)
        np.cumsum(n_chunks, out=self.chunk_off[1:])
        chunks = np.zeros(int(self.chunk_off[-1]), np.uint64)
        for j in range(int(n_chunks.max())):
            sel = long_ids[n_chunks[long_ids] > j]
            rem = vlen[sel] - 8 * j
            chunks[self.chunk_off[sel] + j] = W[vstart[sel] + 8 * j] & _MASKS[np.minimum(rem, 8)]
        self.chunks = chunks
        # trie over token ids, built level by level: level-1 nodes are indexed by token id through
        # root_child, deeper transitions (node * V + token id -> child) go to a hash table
        V = self.n_vocab + 1
        self.V = V
        t0 = tids[first]
        uniq0, inv0 = np.unique(t0, return_inverse=True)
        self.root_child = np.full(self.n_vocab, -1, np.int64)
        self.root_child[uniq0] = np.arange(len(uniq0))
        node = inv0.astype(np.int64)  # current node of every pattern
        n_nodes = len(uniq0)
        t_keys, t_vals = [], []
        live = np.flatnonzero(n_tok > 1)
        k = 1
        while len(live):
            key = node[live] * V + tids[first[live] + k]
            uniq, inv = np.unique(key, return_inverse=True)
            t_keys.append(uniq)
            t_vals.append(np.arange(n_nodes, n_nodes + len(uniq)))
            node[live] = n_nodes + inv
            n_nodes += len(uniq)
            k += 1
            live = live[n_tok[live] > k]
        if t_keys:
            tk = np.concatenate(t_keys)
            self.trans = _HashTable(tk.astype(np.uint64), np.concatenate(t_vals))
        else:
            self.trans = None
        self.has_children = np.zeros(n_nodes + 1, bool)
        if t_keys:
            self.has_children[tk // V] = True
        # entries per node (distinct patterns end at distinct nodes; several ids only for duplicates)
        single_ids = isinstance(pattern_ids, np.ndarray)
        if single_ids:
            n_ids = np.ones(len(pattern_ids), np.int64)
        else:
            n_ids = np.fromiter(map(len, pattern_ids), np.int64, len(pattern_ids))
        counts = np.zeros(n_nodes, np.int64)
        counts[node] = n_ids
        self.eoff = np.zeros(n_nodes + 1, np.int64)
        np.cumsum(counts, out=self.eoff[1:])
        eids = np.zeros(int(self.eoff[-1]), np.uint32)
        if single_ids:
            eids[self.eoff[node]] = pattern_ids
        elif (n_ids == 1).all():
            eids[self.eoff[node]] = np.fromiter((ids[0] for ids in pattern_ids), np.int64, len(pattern_ids))
        else:
            for p_node, ids in zip(node.tolist(), pattern_ids):
                eids[self.eoff[p_node] : self.eoff[p_node] + len(ids)] = sorted(ids)
        self.eids = eids
        # fast emission: the single entry id of a node (-1: none or several)
        self.node_eid = np.full(n_nodes, -1, np.int64)
        single = np.flatnonzero(counts == 1)
        self.node_eid[single] = eids[self.eoff[single]]
        self.node_multi = counts > 1
        self.has_dups = bool(self.node_multi.any())

    def match_one(self, tokens: list[str]) -> list[int]:
        """Entry ids (unsorted, with repeats) for the interior tokens of one spaced text, in plain Python:
        cheaper than the vectorised path for a handful of texts."""
        if self._py is None:
            trans = {}
            if self.trans is not None:
                trans = dict(zip(self.trans.skeys.tolist(), self.trans.svals.tolist()))
            multi = {int(n): self.eids[self.eoff[n] : self.eoff[n + 1]].tolist()
                     for n in np.flatnonzero(self.node_multi)}
            tables = (self.root_child.tolist(), self.node_eid.tolist(), self.has_children.tolist())
            self._py = (*tables, trans, multi)
        root, node_eid, has_children, trans, multi = self._py
        get = self._index.get
        tids = [get(t, -1) for t in tokens]
        n, V = len(tids), self.V
        out: list[int] = []
        for i, t in enumerate(tids):
            if t < 0:
                continue
            node, j = root[t], i
            while node >= 0:
                e = node_eid[node]
                if e >= 0:
                    out.append(e)
                elif node in multi:
                    out.extend(multi[node])
                j += 1
                if not has_children[node] or j >= n or tids[j] < 0:
                    break
                node = trans.get(node * V + tids[j], -1)
        return out

    def token_ids(self, W: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Exact vocabulary id of each token, -1 if the token is not in the vocabulary."""
        keys, ok = _token_keys(W, starts, lengths, self.seed, self.max_len)
        vid = self.vocab_table.lookup(keys)
        vid[~ok] = -1
        # exact verification of long tokens (hash keys)
        chk = np.flatnonzero((vid >= 0) & (lengths > 7))
        if len(chk):
            v = vid[chk]
            good = self.vlen[v] == lengths[chk]
            vid[chk[~good]] = -1
            chk, v = chk[good], v[good]
            st = starts[chk]
            ln = lengths[chk]
            live = np.arange(len(chk))
            j = 0
            while len(live):
                rem = ln[live] - 8 * j
                c = W[st[live] + 8 * j] & _MASKS[np.minimum(rem, 8)]
                eq = c == self.chunks[self.chunk_off[v[live]] + j]
                vid[chk[live[~eq]]] = -1
                live = live[eq & (rem > 8)]
                j += 1
        return vid

    def match(self, vid: np.ndarray, text_of_tok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All (text index, entry id) for runs of tokens spelling a pattern. ``vid`` = -1 breaks runs."""
        starts_out, eids_out = [], []
        vid_pad = np.concatenate([vid, [-1]])
        pos = np.flatnonzero(vid >= 0)
        node = self.root_child.take(vid.take(pos))
        keep = node >= 0
        pos, node = pos[keep], node[keep]
        level = 0
        while len(pos):
            # emit: nearly every node has at most one entry (node_eid); duplicates go through the CSR
            e = self.node_eid.take(node)
            m = e >= 0
            starts_out.append(pos[m] - level)
            eids_out.append(e[m].astype(np.uint32))
            if self.has_dups:
                d = np.flatnonzero(self.node_multi.take(node))
                if len(d):
                    nd = node[d]
                    cnt = self.eoff[nd + 1] - self.eoff[nd]
                    eids_out.append(self.eids[_ranges(self.eoff[nd], cnt)])
                    starts_out.append(np.repeat(pos[d] - level, cnt))
            if self.trans is None:
                break
            m = self.has_children.take(node)
            pos = pos[m] + 1
            node = node[m]
            nv = vid_pad.take(pos)
            m = nv >= 0
            pos, node, nv = pos[m], node[m], nv[m]
            with np.errstate(over="ignore"):
                node = self.trans.lookup((node * self.V + nv).astype(np.uint64))
            m = node >= 0
            pos, node = pos[m], node[m]
            level += 1
        if not starts_out:
            return np.zeros(0, np.int64), np.zeros(0, np.uint32)
        st = np.concatenate(starts_out)
        return text_of_tok.take(st), np.concatenate(eids_out)


def _csr(n: int, tidx: np.ndarray, eids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ids per text from unsorted (text, id) pairs."""
    key = (tidx.astype(np.int64) << 32) | eids.astype(np.int64)
    key = np.sort(key, kind="stable")  # timsort: the pairs arrive as a few sorted runs
    if len(key):
        keep = np.empty(len(key), bool)
        keep[0] = True
        np.not_equal(key[1:], key[:-1], out=keep[1:])
        key = key[keep]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(key >> 32, minlength=n), out=offsets[1:])
    return offsets, (key & 0xFFFFFFFF).astype(np.uint32)


# ----------------------------------------------------------------------------------------------------------
# Matcher


class Matcher:
    """Match texts against one metadata list (entry id = position in ``entries``).

    ``mode`` is ``"v1"`` (MetaCLIP 1 entry spacing) or ``"v2"`` (MetaCLIP 2, CJK-aware). Build once per
    process; use ``MatchPool`` for several processes.
    """

    def __init__(self, entries: Sequence[str], mode: str = "v1", batch_size: int = 8192):
        if mode not in ("v1", "v2"):
            raise ValueError(f"unknown matching mode {mode!r}: expected 'v1' or 'v2'")
        self.mode = mode
        self.batch_size = int(batch_size)
        self.small_batch = 16  # up to this many texts, match_batch uses the one-text path
        self.entries = list(entries)
        if not all(isinstance(e, str) for e in self.entries):
            i = next(i for i, e in enumerate(self.entries) if not isinstance(e, str))
            raise TypeError(f"metadata entry {i} is {type(self.entries[i]).__name__}, expected str")
        self.n_entries = len(self.entries)
        if self.n_entries >= 2**32:
            raise ValueError("at most 2**32 - 1 entries")
        spaced_fn = spaced_entry_v1 if mode == "v1" else spaced_entry_v2
        self.spaced_entries = list(map(spaced_fn, self.entries))
        unique = len(set(self.spaced_entries)) == self.n_entries
        free: list[tuple[str, list[int]]] = []
        if unique and mode == "v1":  # the usual case: every v1 spaced form is token-aligned
            tok_lists = [e.split(" ") for e in self.entries]
            tok_ids: np.ndarray | list[list[int]] = np.arange(self.n_entries, dtype=np.int64)
        else:
            groups: dict[str, list[int]] = {}
            for i, s in enumerate(self.spaced_entries):
                groups.setdefault(s, []).append(i)
            tok_lists, tok_ids = [], []
            for s, ids in groups.items():
                if len(s) >= 2 and s[0] == " " and s[-1] == " ":
                    tok_lists.append(s[1:-1].split(" "))
                    tok_ids.append(ids)
                else:
                    free.append((s, ids))
        self._trie = _TokenTrie(tok_lists, tok_ids) if len(tok_lists) else None
        self._free = None
        if free:
            import ahocorasick  # pyahocorasick

            automaton = ahocorasick.Automaton()
            self._free_ids = []
            for k, (s, ids) in enumerate(free):
                automaton.add_word(s, (k, len(s)))
                self._free_ids.append(ids)
            automaton.make_automaton()
            self._free = automaton

    def __getstate__(self):
        raise TypeError(
            "Matcher is not picklable on purpose: build it once per worker process "
            "(see MatchPool / init_worker)"
        )

    # -- public API ------------------------------------------------------------------------------------------

    def match(self, text: str) -> list[int]:
        """Sorted unique ids of the entries matching one text (``[]`` for a non-str text).

        Plain Python over the same trie (about as fast as the one-text automaton); for many texts use
        ``match_batch``, which is several times faster per text."""
        if not isinstance(text, str):
            return []
        s = spacing(text)
        out = self._trie.match_one(s.split(" ")[1:-1]) if self._trie is not None else []
        if self._free is not None:
            for _end, (k, _len) in self._free.iter(s):
                out.extend(self._free_ids[k])
        return sorted(set(out))

    def match_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """CSR ``(offsets int64[n+1], entry_ids uint32[m])``: the ids of text i are
        ``entry_ids[offsets[i]:offsets[i+1]]``, sorted and unique. Non-str texts (None, bytes, ...) get an
        empty row."""
        texts = list(texts)
        n = len(texts)
        valid = [isinstance(t, str) for t in texts]
        if not all(valid):
            idx = [i for i, v in enumerate(valid) if v]
            sub_off, sub_ids = self.match_batch([texts[i] for i in idx])
            counts = np.zeros(n, np.int64)
            counts[idx] = np.diff(sub_off)
            offsets = np.zeros(n + 1, np.int64)
            np.cumsum(counts, out=offsets[1:])
            return offsets, sub_ids
        if n <= self.small_batch:  # a handful of texts: the vectorised path's fixed cost is not worth it
            rows = [self.match(t) for t in texts]
            offsets = np.zeros(n + 1, np.int64)
            np.cumsum(np.fromiter(map(len, rows), np.int64, n), out=offsets[1:])
            return offsets, np.fromiter((i for r in rows for i in r), np.uint32, int(offsets[-1]))
        parts_off, parts_ids = [], []
        base = 0
        bs = self.batch_size
        for s in range(0, n, bs):
            off, ids = self._match_chunk(texts[s : s + bs])
            parts_off.append(off[1:] + base)
            parts_ids.append(ids)
            base += len(ids)
        if not parts_off:
            return _EMPTY_ROW[0].copy(), _EMPTY_ROW[1].copy()
        return np.concatenate([np.zeros(1, np.int64), *parts_off]), np.concatenate(parts_ids)

    # -- internals -------------------------------------------------------------------------------------------

    def _match_chunk(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        n = len(texts)
        joined = _SEP.join(texts)
        if joined.count(_SEP) != n - 1:
            # some text contains NUL: match those alone, the rest as a batch
            has = [_SEP in t for t in texts]
            rest = [t for t, h in zip(texts, has) if not h]
            r_off, r_ids = self._match_chunk(rest) if rest else _EMPTY_ROW
            r_rows = csr_to_lists(r_off, r_ids)
            rows, it = [], iter(r_rows)
            for t, h in zip(texts, has):
                rows.append(self._match_joined(t, 1, separated=False)[1].tolist() if h else next(it))
            counts = np.fromiter(map(len, rows), np.int64, n)
            offsets = np.zeros(n + 1, np.int64)
            np.cumsum(counts, out=offsets[1:])
            flat = [i for r in rows for i in r]
            return offsets, np.array(flat, np.uint32)
        return self._match_joined(joined, n, separated=True)

    def _match_joined(self, joined: str, n: int, separated: bool) -> tuple[np.ndarray, np.ndarray]:
        # spacing of every text at once: separators become " \x00 ", so each text gets its padding spaces
        s = " " + (joined.replace(_SEP, " " + _SEP + " ") if separated else joined) + " "
        for c in WRAPPED_CHARS:
            s = s.replace(c, " " + c + " ")
        for c in SPACED_CHARS:
            s = s.replace(c, " ")
        ts, es = [], []
        if self._trie is not None:
            b = _encode(s)
            buf = _padded(b)
            arr = buf[: len(b)]
            W = _unaligned_u64(buf)
            sp = np.flatnonzero(arr == 32)
            starts = sp[:-1] + 1
            lengths = sp[1:] - starts
            vid = self._trie.token_ids(W, starts, lengths)
            if separated and n > 1:
                is_sep = (lengths == 1) & (arr[np.minimum(starts, len(arr) - 1)] == _SEP_BYTE)
                vid[is_sep] = -1
                text_of_tok = np.cumsum(is_sep)
            else:
                text_of_tok = np.zeros(len(starts), np.int64)
            t, e = self._trie.match(vid, text_of_tok)
            ts.append(t)
            es.append(e)
        if self._free is not None:
            t, e = self._match_free(s, separated and n > 1)
            ts.append(t)
            es.append(e)
        return _csr(n, np.concatenate(ts), np.concatenate(es))

    def _match_free(self, s: str, separated: bool) -> tuple[np.ndarray, np.ndarray]:
        hits = list(self._free.iter(s))
        if not hits:
            return np.zeros(0, np.int64), np.zeros(0, np.uint32)
        ends = np.fromiter((h[0] for h in hits), np.int64, len(hits))
        kl = np.array([h[1] for h in hits], np.int64).reshape(-1, 2)
        k, ln = kl[:, 0], kl[:, 1]
        if separated:
            cps = np.frombuffer(s.encode("utf-32-le", "surrogatepass"), np.uint32)
            seps = np.flatnonzero(cps == 0)
            t_end = np.searchsorted(seps, ends)
            t_start = np.searchsorted(seps, ends - ln + 1)
            keep = t_end == t_start
            k, t_end = k[keep], t_end[keep]
        else:
            t_end = np.zeros(len(k), np.int64)
        counts = np.fromiter((len(self._free_ids[i]) for i in k.tolist()), np.int64, len(k))
        eids = np.fromiter((i for kk in k.tolist() for i in self._free_ids[kk]), np.uint32, int(counts.sum()))
        return np.repeat(t_end, counts), eids


# ----------------------------------------------------------------------------------------------------------
# MetaCLIP 2: one matcher per language


class MultiLangMatcher:
    """Per-language matchers (MetaCLIP 2, spec §3.5), built lazily on first use.

    ``per_lang_entries`` maps a metadata language key to its entry list, or to a path of a metadata file
    (loaded with ``curation.metadata.load_metadata`` on first use). A text whose language has no metadata uses
    ``"other"`` when present, else it gets no matches.
    """

    def __init__(self, per_lang_entries: Mapping[str, Sequence[str] | str | os.PathLike], mode: str = "v2"):
        self._sources = dict(per_lang_entries)
        self.mode = mode
        self._matchers: dict[str, Matcher] = {}

    @property
    def languages(self) -> list[str]:
        return list(self._sources)

    def resolve(self, lang: str | None) -> str | None:
        if lang in self._sources:
            return lang
        return "other" if "other" in self._sources else None

    def matcher(self, lang: str) -> Matcher:
        m = self._matchers.get(lang)
        if m is None:
            src = self._sources[lang]
            if isinstance(src, str | os.PathLike):
                from curation.metadata import load_metadata

                src = load_metadata(src)
            m = self._matchers[lang] = Matcher(src, mode=self.mode)
        return m

    def build_all(self) -> None:
        """Build every language's matcher now (e.g. before forking workers)."""
        for lang in self._sources:
            self.matcher(lang)

    def match(self, text: str, lang: str | None) -> list[int]:
        off, ids = self.match_batch([text], [lang])
        return ids.tolist()

    def match_batch(self, texts: Sequence[str], langs: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """CSR over ``texts`` in input order; text i is matched against the metadata of ``langs[i]``."""
        texts = list(texts)
        langs = list(langs)
        if len(texts) != len(langs):
            raise ValueError(f"{len(texts)} texts but {len(langs)} languages")
        n = len(texts)
        groups: dict[str, list[int]] = {}
        for i, lang in enumerate(langs):
            key = self.resolve(lang)
            if key is not None:
                groups.setdefault(key, []).append(i)
        counts = np.zeros(n, np.int64)
        rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for key, idx in groups.items():
            off, ids = self.matcher(key).match_batch([texts[i] for i in idx])
            idx_a = np.asarray(idx, np.int64)
            counts[idx_a] = np.diff(off)
            rows.append((idx_a, off, ids))
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        out = np.zeros(int(offsets[-1]), np.uint32)
        for idx_a, off, ids in rows:
            c = np.diff(off)
            out[_ranges(offsets[idx_a], c)] = ids
        return offsets, out


# ----------------------------------------------------------------------------------------------------------
# Worker processes: build once per process, never ship the automaton through queues

_WORKER_MATCHER: Matcher | None = None


def init_worker(entries: Sequence[str] | str | os.PathLike, mode: str = "v1") -> None:
    """Pool initializer: build this worker's matcher from an entry list or a metadata file path."""
    global _WORKER_MATCHER
    if isinstance(entries, str | os.PathLike):
        from curation.metadata import load_metadata

        entries = load_metadata(entries)
    _WORKER_MATCHER = Matcher(entries, mode=mode)


def _set_worker_matcher(matcher: Matcher | None) -> None:
    global _WORKER_MATCHER
    _WORKER_MATCHER = matcher


def worker_match_batch(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Match with the matcher of this worker process (set by ``init_worker`` or inherited through fork)."""
    if _WORKER_MATCHER is None:
        raise RuntimeError("no matcher in this process: use init_worker or MatchPool")
    return _WORKER_MATCHER.match_batch(texts)


def _concat_csr(parts: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    offs, ids, base = [np.zeros(1, np.int64)], [], 0
    for off, i in parts:
        offs.append(off[1:] + base)
        ids.append(i)
        base += len(i)
    return np.concatenate(offs), (np.concatenate(ids) if ids else np.zeros(0, np.uint32))


class MatchPool:
    """``processes`` processes matching with one matcher built once: the calling process and
    ``processes - 1`` workers.

    With the ``fork`` start method (Linux) the workers inherit the parent's ``matcher`` (copy-on-write,
    nothing pickled); otherwise each worker builds its own from ``matcher.entries``. Texts are cut into
    chunks of ``chunk_size``; a chunk goes to a worker while fewer than ``queued_per_worker`` chunks wait
    for each worker, else the calling process matches it itself, so the work follows whichever process is
    faster (useful on a shared machine); at the end the caller also takes over the chunks a worker has not
    finished yet instead of waiting. ``processes <= 1`` runs in-process. Use as a context manager.
    """

    def __init__(
        self, matcher: Matcher, processes: int = 2, chunk_size: int = 8192, queued_per_worker: int = 2
    ):
        self.matcher = matcher
        self.processes = int(processes)
        self.chunk_size = int(chunk_size)
        self.queued_per_worker = max(1, int(queued_per_worker))
        self._pool = None
        self._workers = max(0, self.processes - 1)
        if self._workers:
            if "fork" in mp.get_all_start_methods():
                # kept set while the pool lives, so that a replaced worker inherits it too
                _set_worker_matcher(matcher)
                self._pool = mp.get_context("fork").Pool(self._workers)
            else:  # pragma: no cover - platforms without fork
                self._pool = mp.get_context("spawn").Pool(
                    self._workers, initializer=init_worker, initargs=(matcher.entries, matcher.mode)
                )

    def _run(self, chunks: Iterable[Sequence[str]]) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        """CSR per chunk, in order; chunks are shared between the workers and this process."""
        if self._pool is None:
            yield from map(self.matcher.match_batch, chunks)
            return
        max_out = self.queued_per_worker * self._workers
        done: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        pending: dict[int, tuple[object, Sequence[str]]] = {}
        nxt = 0  # next chunk index to yield
        for i, chunk in enumerate(chunks):
            for j in [j for j, (r, _) in pending.items() if r.ready()]:
                done[j] = pending.pop(j)[0].get()
            if len(pending) < max_out:
                pending[i] = (self._pool.apply_async(worker_match_batch, (chunk,)), chunk)
            else:
                done[i] = self.matcher.match_batch(chunk)
            while nxt in done:
                yield done.pop(nxt)
                nxt += 1
        # tail: rather than wait for a busy worker, match its not-yet-finished chunks here too (last first;
        # the worker's copy of a chunk done here is discarded)
        for j in sorted(pending, reverse=True):
            r, chunk = pending[j]
            done[j] = r.get() if r.ready() else self.matcher.match_batch(chunk)
        while nxt in done:
            yield done.pop(nxt)
            nxt += 1

    def match_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """As ``Matcher.match_batch`` (same output), over all the processes."""
        if self._pool is None:
            return self.matcher.match_batch(texts)
        texts = list(texts)
        cs = self.chunk_size
        return _concat_csr(self._run(texts[s : s + cs] for s in range(0, len(texts), cs)))

    def imap(self, batches: Iterable[Sequence[str]]) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        """CSR per input batch, in input order (batches are matched in parallel)."""
        return self._run(list(b) for b in batches)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None
            if _WORKER_MATCHER is self.matcher:
                _set_worker_matcher(None)

    def __enter__(self) -> MatchPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parallel_match_batch(
    matcher: Matcher, texts: Sequence[str], processes: int = 2, chunk_size: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """One-shot ``MatchPool(matcher, processes).match_batch(texts)``."""
    with MatchPool(matcher, processes, chunk_size) as pool:
        return pool.match_batch(texts)

