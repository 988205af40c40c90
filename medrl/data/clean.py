"""Cleaning: text normalisation, the token estimate by bytes, exact and near-duplicate detection, decontamination.

Everything here is pure and works on compact numpy columns, so ``prepare`` keeps no record text in memory.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import unicodedata

import numpy as np

# ---------------------------------------------------------------------------------------------- normalisation
_INVISIBLE = re.compile(r"[\ufeff\u200b\u200c\u200d\u2060\u00ad]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
_EOL_SPACES = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")
_DIRTY = re.compile(r"[\ufeff\u200b\u200c\u200d\u2060\u00ad\r\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\t\u00a0\u1680"
                    r"\u2000-\u200a\u202f\u205f\u3000]")
_DIRTY_PAIRS = ("  ", " \n", "\n ", "\n\n\n")
_NON_WORD = re.compile(r"[\W_]+")
_SEGMENT = re.compile(r"[\n\x00]+")


def normalize_text(text: str) -> str:
    """NFC; drop BOMs, zero-width and control characters; CRLF -> LF; collapse spaces (ideographic space
    included) and blank-line runs; strip. Full-width Chinese punctuation is kept (NFKC would turn it into ASCII)."""
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    if _DIRTY.search(text) is None and not any(pair in text for pair in _DIRTY_PAIRS):  # nothing below would change it
        return text.strip()
    text = _INVISIBLE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _EOL_SPACES.sub("\n", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


def skeleton(text: str) -> str:
    """The compact form of a text (dedupe keys; answers matched against options or references): NFKC,
    case-folded, without whitespace and punctuation."""
    return _NON_WORD.sub("", unicodedata.normalize("NFKC", text).casefold())


def key64(text: str) -> int:
    """A stable 64-bit key (blake2b), the same in every process."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


# ---------------------------------------------------------------------------------------------- token counting
def estimate_tokens_by_bytes(text: str) -> int:
    """Tokens of a text from its UTF-8 length alone, for bulk data without a tokenizer: every non-ASCII character
    counts 1/1.5 token (Qwen's BPE packs ~1.5 Chinese characters per token), every ASCII character 1/4. Not the
    reward plane's ``medrl.reward.text.estimate_tokens`` (per character class, the length rule's and the judge
    cost's count): that one costs tens of times more per text, which bulk preparation does not need."""
    chars = len(text)
    non_ascii = (len(text.encode("utf-8")) - chars) // 2  # a CJK character is 3 bytes in UTF-8: 2 extra bytes
    non_ascii = min(non_ascii, chars)
    return math.ceil(non_ascii / 1.5 + (chars - non_ascii) / 4)


# ---------------------------------------------------------------------------------------------- MinHash
class MinHasher:
    """MinHash signatures over character shingles, vectorised per batch (numpy, deterministic across runs)."""

    def __init__(self, num_perm: int = 32, shingle: int = 5, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.num_perm, self.shingle = num_perm, shingle
        self.a = rng.integers(1, 2**62, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**62, size=num_perm, dtype=np.uint64)
        self._powers = np.array([1000003 ** (shingle - 1 - j) % 2**64 for j in range(shingle)], dtype=np.uint64)

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_perm) uint16 signatures (b-bit MinHash: the top 16 bits of each minimum, which halves the
        memory and biases the Jaccard estimate by ~1/65536). All shingles of the batch are hashed in one vectorised
        pass; texts shorter than a shingle are padded with NULs to one shingle."""
        k = self.shingle
        if not texts:
            return np.zeros((0, self.num_perm), dtype=np.uint16)
        texts = [t if len(t) >= k else t + "\x00" * (k - len(t)) for t in texts]
        lens = np.array([len(t) for t in texts], dtype=np.int64)
        cps = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        n = cps.size - k + 1
        h = np.zeros(n, dtype=np.uint64)
        out = np.empty((len(texts), self.num_perm), dtype=np.uint16)
        with np.errstate(over="ignore"):
            for j in range(k):
                h += cps[j:j + n] * self._powers[j]
            ends = np.cumsum(lens)
            owner = np.searchsorted(ends, np.arange(n), side="right")  # the text each window starts in
            h = h[np.arange(n) + k <= ends[owner]]  # drop windows running into the next text
            first = np.r_[0, np.cumsum(lens - k + 1)[:-1]]  # index of each text's first shingle
            for p in range(self.num_perm):
                permuted = (h * self.a[p] + self.b[p]) >> np.uint64(48)
                out[:, p] = np.minimum.reduceat(permuted, first).astype(np.uint16)
        return out


# ---------------------------------------------------------------------------------------------- dedupe
def _first_of_groups(keys: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort by (key, rank); return (positions in sort order, the representative = best-ranked of each key group)."""
    order = np.lexsort((rank, keys))
    sorted_keys = keys[order]
    starts = np.ones(order.size, dtype=bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    start_pos = np.maximum.accumulate(np.where(starts, np.arange(order.size), 0))
    return order, order[start_pos]


def exact_duplicates(keys: np.ndarray, rank: np.ndarray, protected: np.ndarray) -> np.ndarray:
    """For each row, the row it duplicates (-1 if none). The best-ranked row of a key is kept; protected rows
    (eval items) are never marked."""
    dup_of = np.full(keys.size, -1, dtype=np.int64)
    if keys.size:
        order, rep = _first_of_groups(keys, rank)
        hit = (rep != order) & ~protected[order]
        dup_of[order[hit]] = rep[hit]
    return dup_of


def near_duplicates(sig: np.ndarray, rows: np.ndarray, rank: np.ndarray, protected: np.ndarray, threshold: float,
                    bands: int = 8, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """LSH over ``bands`` bands of the signatures of ``rows``; a row is a near-duplicate of the best-ranked row
    sharing a band with it when their estimated Jaccard similarity is >= threshold. Returns (dup_of or -1,
    similarity), both indexed like ``sig``. Works in place on the full arrays (no copy of the signatures)."""
    dup_of = np.full(sig.shape[0], -1, dtype=np.int64)
    sim = np.zeros(sig.shape[0], dtype=np.float32)
    width = sig.shape[1] // bands
    mult = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5],
                    dtype=np.uint64)[np.arange(width) % 4]
    for b in range(bands if rows.size else 0):
        with np.errstate(over="ignore"):
            keys = (sig[rows, b * width:(b + 1) * width].astype(np.uint64) * mult).sum(axis=1)
        order, rep = _first_of_groups(keys, rank[rows])
        members, reps = rows[order], rows[rep]
        cand = (members != reps) & ~protected[members] & (dup_of[members] < 0)
        members, reps = members[cand], reps[cand]
        for start in range(0, members.size, chunk):  # bounded temporary memory
            m, r = members[start:start + chunk], reps[start:start + chunk]
            jac = (sig[m] == sig[r]).mean(axis=1)
            hit = jac >= threshold
            dup_of[m[hit]] = r[hit]
            sim[m[hit]] = jac[hit]
    return dup_of, sim


# ---------------------------------------------------------------------------------------------- decontamination
MAX_CANDIDATES = 64
"""Eval lines examined per probe window when stock phrasing is on (a window in more lines than this is common)."""


class Decontaminator:
    """Finds any shared run of ``run_chars`` characters (case-insensitive) between a text and the eval texts.

    Texts are compared line by line (runs never cross a line break or a field boundary, so templates such as
    "?\n\nContext:\n" cannot join two short common phrases into a hit). Eval lines are indexed by every window of
    k = run_chars // 2 characters. A shared run of 2k characters always contains a k-window of the checked line
    starting at a multiple of k, so only those windows are looked up; each hit is extended left and right in both
    lines to measure the true shared run.

    Stock phrasing is not leakage: with ``phrase_items`` set, a window that occurs in at least that many distinct
    eval texts (repeated texts count once) is *common* (exam boilerplate such as "Which of the following is the
    most appropriate next step in management?"), and a shared run counts only when at least k of its characters
    lie outside every common window (specific wording, not a stock phrase with a few characters of context). A
    copied question still shares its specific wording (case details, numbers, option texts), whose windows are
    rare."""

    def __init__(self, run_chars: int = 64, phrase_items: int | None = None):
        self.run_chars, self.k, self.phrase_items = run_chars, run_chars // 2, phrase_items
        self._lines: list[str] = []
        self._owner: list[int] = []
        self._labels: list[str] = []
        self._text_keys: list[int] = []
        self._hashes: list[np.ndarray] = []
        self._hash = self._line = self._pos = None
        self._common: list[np.ndarray] = []
        self.common_windows = 0
        self._pow = np.array([pow(1000003, self.k - 1 - j, 2**64) for j in range(self.k)], dtype=np.uint64)

    @staticmethod
    def _split(text: str) -> list[str]:
        return [seg for seg in _SEGMENT.split(text.lower()) if seg]

    def _window_hashes(self, windows: np.ndarray) -> np.ndarray:
        """Polynomial hashes (mod 2^64) of (m, k) code points; equal windows hash equal in every process."""
        with np.errstate(over="ignore"):
            return (windows * self._pow).sum(axis=1).view(np.int64)

    @staticmethod
    def _codepoints(text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)

    def add(self, label: str, text: str) -> None:
        k = self.k
        self._labels.append(label)
        self._text_keys.append(key64(skeleton(text)))  # repeated eval texts count once as phrasing evidence
        for seg in self._split(text):
            n = len(seg) - k + 1
            if n <= 0:
                continue
            line = len(self._lines)
            self._lines.append(seg)
            self._owner.append(len(self._labels) - 1)
            h = self._window_hashes(np.lib.stride_tricks.sliding_window_view(self._codepoints(seg), k))
            self._hashes.append(np.stack([h, np.full(n, line), np.arange(n)]))

    def freeze(self, final: bool = True) -> "Decontaminator":
        """Build the lookup index; ``final=False`` keeps the window table so more texts can be added and the index
        frozen again."""
        table = np.concatenate(self._hashes, axis=1) if self._hashes else np.zeros((3, 0), dtype=np.int64)
        self._hashes = [] if final else [table]
        order = np.argsort(table[0], kind="stable")
        self._hash, self._line, self._pos = table[0][order], table[1][order], table[2][order]
        common = np.zeros(table.shape[1], dtype=bool)  # in table order: line by line, window by window
        if self.phrase_items is not None and table.shape[1]:
            text_key = np.asarray(self._text_keys, dtype=np.uint64).view(np.int64)
            owner = text_key[np.asarray(self._owner, dtype=np.int64)[table[1]]]
            by = np.lexsort((owner, table[0]))  # by window hash, then by distinct eval text
            h, o = table[0][by], owner[by]
            new_hash = np.r_[True, h[1:] != h[:-1]]
            new_text = new_hash | np.r_[True, o[1:] != o[:-1]]
            group = np.cumsum(new_hash) - 1
            texts = np.bincount(group, weights=new_text)  # distinct eval texts holding each window
            common[by] = texts[group] >= self.phrase_items
            self.common_windows = int(common.sum())
        ends = np.cumsum([len(seg) - self.k + 1 for seg in self._lines])
        self._common = np.split(common, ends[:-1]) if len(self._lines) else []
        return self

    def find_many(self, texts: list[str]) -> list[str | None]:
        """Per text, the label of an eval text sharing a run of >= run_chars characters with it, or None (one
        sorted-array lookup for the whole batch)."""
        found: list[str | None] = [None] * len(texts)
        if not self._hash.size:
            return found
        k = self.k
        where = [(t, seg, q) for t, text in enumerate(texts) for seg in self._split(text) if len(seg) >= self.run_chars
                 for q in range(0, len(seg) - k + 1, k)]
        if not where:
            return found
        probe = self._window_hashes(self._codepoints("".join(seg[q:q + k] for _, seg, q in where)).reshape(-1, k))
        lo = np.searchsorted(self._hash, probe, side="left")
        hi = np.searchsorted(self._hash, probe, side="right")
        for i in np.flatnonzero(hi > lo):
            t, seg, q = where[i]
            if found[t] is None:
                line = self._extend(seg, q, range(lo[i], hi[i]))
                if line is not None:
                    found[t] = self._labels[self._owner[line]]
        return found

    def _extend(self, seg: str, q: int, candidates: range) -> int | None:
        """The eval line whose k-window equals ``seg[q:q+k]`` and whose shared run around it is long enough."""
        k, reach = self.k, self.run_chars - self.k
        if self.phrase_items is not None and len(candidates) > MAX_CANDIDATES:
            # only a common window has this many eval lines: a copied text is found through its rare windows
            candidates = candidates[:MAX_CANDIDATES]
        for j in candidates:
            other, pos = self._lines[self._line[j]], int(self._pos[j])
            if other[pos:pos + k] != seg[q:q + k]:
                continue  # hash collision
            right = len(os.path.commonprefix([seg[q + k:q + k + reach], other[pos + k:pos + k + reach]]))
            left = len(os.path.commonprefix([seg[max(0, q - reach):q][::-1], other[max(0, pos - reach):pos][::-1]]))
            if left + k + right < self.run_chars:
                continue
            line = int(self._line[j])
            if self._specific_chars(line, pos - left, left + k + right) < k:
                continue  # the shared run is stock phrasing
            return line
        return None

    def _specific_chars(self, line: int, start: int, length: int) -> int:
        """Characters of ``line[start:start+length]`` that no common window covers."""
        flags = self._common[line]
        if not flags.any():
            return length
        first = max(0, start - self.k + 1)
        covered = np.zeros(length, dtype=bool)
        for s in (np.flatnonzero(flags[first:start + length]) + first).tolist():
            covered[max(0, s - start):s - start + self.k] = True
        return int(length - covered.sum())
