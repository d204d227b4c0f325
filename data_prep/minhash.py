"""MinHash signatures and LSH banding for near-duplicate detection.

MinHash (Broder, "On the resemblance and containment of documents", 1997): for a random
hash function h, the probability that min h(A) == min h(B) over two shingle sets A and B equals
their Jaccard similarity |A & B| / |A | B|. With `num_perm` independent hash functions the
fraction of agreeing signature positions is an unbiased estimate of that similarity.

Shingles are word n-grams (default 5) of the lower-cased text, where a word is a run of `\\w`
characters. A word's hash is murmur3's 64-bit finaliser of a polynomial over its code points, an
n-gram hash combines its word hashes with a polynomial in wrapping uint64 arithmetic followed by
the same finaliser, and keeps the top 32 bits (`_ngram_shingles`: a batch of texts at once, in
numpy, with no Python object per word). The permutations are the multiply-add-shift family
h_i(x) = ((a_i x + b_i) mod 2^64) >> 32 with a_i, b_i uniform 64-bit integers from a seeded
generator (Dietzfelbinger 1996): strongly universal for 32-bit x, and the uint64 product simply
wraps, so no modular reduction is needed (see `MinHasher`).

LSH banding (Leskovec, Rajaraman, Ullman, *Mining of Massive Datasets*, ch. 3): split the
signature into `bands` bands of `rows` rows; two documents become a candidate pair when all
rows of at least one band agree. For Jaccard s the probability is 1 - (1 - s^r)^b, an S-curve
whose steepest point is near (1/b)^(1/r). Two ways to pick b, r (b*r <= num_perm):

* `choose_bands_rows` (without verification): minimise the weighted area of false positives (the
  curve below the threshold) plus false negatives (one minus the curve above it), the criterion
  datasketch also uses. A false candidate is merged, so both errors cost alike.
* `choose_bands_rows_for_recall` (with verification): a false candidate costs only one exact
  Jaccard, so minimise the false negatives, FN = mean over s in [t, 1] of 1 - P(s), under a
  verification budget, FP = mean over s in [0, t] of P(s) <= fp_budget (the false-positive
  candidate rate of a pair whose similarity is uniform below the threshold). At t = 0.8 and 128
  permutations, the weighted area picks 9 x 13: P(0.8) = 0.40, 68% of the pairs at 0.8-0.9 become
  candidates, FP = 0.032; a budget of 0.2 picks 13 x 7: P(0.8) = 0.95, FN = 0.006, FP = 0.196.

Candidates are clustered with union-find. In each cluster one document survives: the longest
(most UTF-8 bytes), ties broken by the smallest id, a rule that does not depend on input order.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

MASK_32 = np.uint64(0xFFFFFFFF)
WORD_RE = re.compile(r"\w+")
_POLY = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier for combining word hashes
_CHAR_BASE = 0x100000001B3  # odd multiplier of the per-word polynomial over code points
_MOD64 = 1 << 64


def words_of(text: str) -> list[str]:
    return WORD_RE.findall(text.lower())


def _fmix64(h: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finaliser, vectorised (uint64 arithmetic wraps modulo 2^64)."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


_word_char = np.zeros(0, dtype=bool)  # code point -> matches `\w`; grown a Unicode plane at a time


def _word_char_table(max_cp: int) -> np.ndarray:
    """A boolean table over code points 0..max_cp (at least) of which are `\\w` characters.

    For `str` patterns `re`'s `\\w` is `c.isalnum() or c == "_"` (CPython's SRE_UNI_IS_WORD), so
    the table is built from that, 65,536 code points (one plane, ~5 ms) at a time, only up to the
    highest plane a text has used.
    """
    global _word_char
    while len(_word_char) <= max_cp:
        lo = len(_word_char)
        plane = [(c.isalnum() or c == "_") for c in map(chr, range(lo, lo + 0x10000))]
        _word_char = np.concatenate([_word_char, np.array(plane, dtype=bool)])
    return _word_char


_powers = np.ones(1, dtype=np.uint64)  # B^0, B^1, ... (wrapping uint64), grown on demand
_POWERS_KEPT = 1 << 22  # the most powers kept between calls (32 MiB)


def _char_powers(n: int) -> np.ndarray:
    """B^0 .. B^n, from a table kept between calls while it has at most _POWERS_KEPT entries."""
    global _powers
    if len(_powers) <= n:
        pw = np.full(max(n + 1, 2 * len(_powers)), _CHAR_BASE, dtype=np.uint64)
        pw[0] = 1
        pw = np.cumprod(pw)
        if len(pw) > _POWERS_KEPT:
            return pw[: n + 1]
        _powers = pw
    return _powers[: n + 1]


def _ngram_shingles(texts: Sequence[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """The word n-gram shingle hashes of all `texts` in one vectorised pass: (hashes, counts),
    hashes (uint64 values < 2^32) concatenated document after document, in text order, repeats
    kept; counts[i] of them belong to texts[i].

    Words are the `\\w+` runs of each lower-cased text, exactly `words_of`. The texts are joined
    by "\\n" (not a word character, so no word spans two texts) and read as UTF-32 code points;
    a word's hash is murmur3's finaliser of the polynomial sum_i cp_i * B^i over its code points
    (B odd, mod 2^64): with prefix sums S_k = sum_{j<k} cp_j B^j over the whole batch, the
    word at [s, e) is (S_e - S_s) * B^-s, computed as (S_e - S_s) * B^(N-s) * B^-N so that only
    non-negative powers are tabulated. An n-gram's hash combines its word hashes as
    sum_k w_k * POLY^(n-1-k), then the finaliser, top 32 bits. A text with fewer than `ngram`
    words is one shingle of all its words; no words, no shingles.
    """
    if ngram < 1:
        raise ValueError(f"ngram={ngram}; must be >= 1")
    lowered = [t.lower() for t in texts]
    doc_len = np.fromiter((len(t) + 1 for t in lowered), np.int64, len(lowered))
    doc_start = np.concatenate([[0], np.cumsum(doc_len)[:-1]]) if len(lowered) else doc_len
    joined = "\n".join(lowered)
    cp = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    n_chars = len(cp)
    empty = np.empty(0, dtype=np.uint64)
    if not n_chars:
        return empty, np.zeros(len(texts), dtype=np.int64)
    is_word = np.zeros(n_chars + 2, dtype=bool)  # padded with a non-word at either end
    np.take(_word_char_table(int(cp.max())), cp, out=is_word[1:-1])
    change = np.flatnonzero(is_word[1:] != is_word[:-1])  # alternately word start, word end
    w_start, w_end = change[0::2], change[1::2]
    counts_w = np.zeros(len(texts), dtype=np.int64)
    if not len(w_start):
        return empty, counts_w
    # powers B^0 .. B^N (wrapping uint64), then the prefix sums S_0 .. S_N
    pw = _char_powers(n_chars)
    s = np.empty(n_chars + 1, dtype=np.uint64)
    s[0] = 0
    np.multiply(cp, pw[:-1], out=s[1:])
    np.add.accumulate(s, out=s)
    inv_n = np.uint64(pow(_CHAR_BASE, -n_chars, _MOD64))
    wh = _fmix64((s[w_end] - s[w_start]) * pw[n_chars - w_start] * inv_n)
    # the text each word belongs to, and each text's first word
    doc_of = np.searchsorted(doc_start, w_start, side="right") - 1
    counts_w = np.bincount(doc_of, minlength=len(texts)).astype(np.int64)
    first_w = np.concatenate([[0], np.cumsum(counts_w)[:-1]])
    n_words = len(wh)
    # full n-grams: windows that start and end in the same text
    parts: list[np.ndarray] = []
    doc_parts: list[np.ndarray] = []
    if n_words >= ngram:
        m = n_words - ngram + 1
        h = np.zeros(m, dtype=np.uint64)
        for k in range(ngram):
            h = h * _POLY + wh[k : k + m]
        ok = doc_of[:m] == doc_of[ngram - 1 :]
        parts.append(h[ok])
        doc_parts.append(doc_of[:m][ok])
    # texts with 1 .. ngram-1 words: one shingle of all their words
    short = np.flatnonzero((counts_w > 0) & (counts_w < ngram))
    if len(short):
        h1 = np.zeros(len(short), dtype=np.uint64)
        for k in range(ngram - 1):
            more = k < counts_w[short]
            h1[more] = h1[more] * _POLY + wh[first_w[short[more]] + k]
        parts.append(h1)
        doc_parts.append(short)
    h = np.concatenate(parts)
    doc = np.concatenate(doc_parts)
    if len(parts) > 1:  # short texts were appended after the rest: restore text order
        order = np.argsort(doc, kind="stable")
        h, doc = h[order], doc[order]
    counts = np.bincount(doc, minlength=len(texts)).astype(np.int64)
    return _fmix64(h) >> np.uint64(32), counts


def _char_batches(texts: Sequence[str], batch_chars: int) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges of `texts` of about `batch_chars` characters each (at least one
    text each), for vectorised passes of bounded memory."""
    t0 = 0
    while t0 < len(texts):
        t1, size = t0, 0
        while t1 < len(texts) and (t1 == t0 or size + len(texts[t1]) <= batch_chars):
            size += len(texts[t1])
            t1 += 1
        yield t0, t1
        t0 = t1


def shingle_hashes(text: str, ngram: int = 5) -> np.ndarray:
    """32-bit hashes (as uint64) of the word n-grams of `text`; sorted and unique.

    A text with fewer than `ngram` words is one shingle of all its words; no words, no shingles.
    """
    return np.unique(_ngram_shingles([text], ngram)[0])


def shingle_sets(
    texts: Sequence[str], ngram: int = 5, batch_chars: int = 1 << 18
) -> list[np.ndarray]:
    """`shingle_hashes` of each of `texts`, computed `batch_chars` characters at a time."""
    out: list[np.ndarray] = []
    for t0, t1 in _char_batches(texts, batch_chars):
        x, counts = _ngram_shingles(texts[t0:t1], ngram)
        out += [np.unique(part) for part in np.split(x, np.cumsum(counts)[:-1])]
    return out


@dataclass
class MinHasher:
    """Computes `num_perm`-long uint32 MinHash signatures of word n-gram shingle sets.

    Permutation i is the multiply-add-shift hash h_i(x) = ((a_i x + b_i) mod 2^64) >> 32 of a
    32-bit shingle hash x, with a_i, b_i uniform 64-bit: a strongly universal family onto 32
    bits (Dietzfelbinger, "Universal hashing and k-wise independent random variables via integer
    arithmetic without primes", STACS 1996; Thorup, "High speed hashing for integers and
    strings", 2015, sec. 3.3). The product wraps in uint64 arithmetic, so no modular reduction
    is needed; and since the shift is monotone, min_x h_i(x) = (min_x (a_i x + b_i mod 2^64)) >>
    32: the minimum is taken over the 64-bit values and only the minima are shifted.
    """

    num_perm: int = 128
    ngram: int = 5
    seed: int = 1
    chunk_rows: int = 8192  # shingles per vectorised block (num_perm x chunk_rows uint64)
    batch_chars: int = 1 << 18  # characters of text hashed in one vectorised pass

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.a = rng.integers(0, 1 << 64, size=self.num_perm, dtype=np.uint64, endpoint=False)
        self.b = rng.integers(0, 1 << 64, size=self.num_perm, dtype=np.uint64, endpoint=False)

    def permuted(self, x: np.ndarray) -> np.ndarray:
        """(len(x), num_perm) matrix of h_i(x_j) (uint64 values < 2^32); x must be < 2^32."""
        y = np.multiply.outer(np.asarray(x, dtype=np.uint64), self.a)
        y += self.b  # wraps modulo 2^64
        return y >> np.uint64(32)

    def signature_of_shingles(self, shingles: np.ndarray) -> np.ndarray:
        sig = np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint32)
        for i in range(0, len(shingles), self.chunk_rows):
            block = self.permuted(shingles[i : i + self.chunk_rows]).min(axis=0)
            np.minimum(sig, block.astype(np.uint32), out=sig)
        return sig

    def _min_over_segments(
        self, x: np.ndarray, counts: np.ndarray, out: np.ndarray, buf: np.ndarray
    ) -> None:
        """out[d] = min(out[d], signature of the d-th segment of x), for the segments of
        `counts` (all > 0) laid end to end: the (num_perm x block) matrix of a_i x + b_i is
        built in `buf` a block of shingles at a time (no fresh allocation per block), reduced
        per segment with np.minimum.reduceat, and only the minima are shifted."""
        off = np.concatenate([[0], np.cumsum(counts)])
        a, b = self.a[:, None], self.b[:, None]
        for c0 in range(0, len(x), self.chunk_rows):
            c1 = min(c0 + self.chunk_rows, len(x))
            i0 = int(np.searchsorted(off, c0, side="right")) - 1  # segment holding x[c0]
            i1 = int(np.searchsorted(off, c1, side="left"))  # one past the one holding x[c1-1]
            starts = np.maximum(off[i0:i1] - c0, 0)
            y = buf[:, : c1 - c0]
            np.multiply(a, x[c0:c1], out=y)  # wraps modulo 2^64
            y += b
            block = (np.minimum.reduceat(y, starts, axis=1) >> np.uint64(32)).astype(np.uint32)
            np.minimum(out[i0:i1], block.T, out=out[i0:i1])

    def signatures(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Signatures of `texts` as a (len(texts), num_perm) uint32 array, and a boolean mask of
        the texts that had at least one shingle (the others' rows are all 0xFFFFFFFF).

        Texts are shingled together, about `batch_chars` characters at a time
        (`_ngram_shingles`); a shingle repeated in a text is permuted again, which costs less
        than removing the repeats, and does not change a minimum.
        """
        sig = np.full((len(texts), self.num_perm), 0xFFFFFFFF, dtype=np.uint32)
        has = np.zeros(len(texts), dtype=bool)
        buf = np.empty((self.num_perm, self.chunk_rows), dtype=np.uint64)
        for t0, t1 in _char_batches(texts, self.batch_chars):
            x, counts = _ngram_shingles(texts[t0:t1], self.ngram)
            nz = np.flatnonzero(counts)
            has[t0:t1] = counts > 0
            if len(nz):
                sub = sig[t0 + nz]
                self._min_over_segments(x, counts[nz], sub, buf)
                sig[t0 + nz] = sub
        return sig, has


def _signatures_job(args: tuple[MinHasher, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    hasher, texts = args
    return hasher.signatures(texts)


def parallel_signatures(
    hasher: MinHasher,
    texts: Sequence[str],
    workers: int = 1,
    batch_docs: int = 64,
    progress: bool = False,
    min_chars_per_worker: int = 1 << 23,
) -> tuple[np.ndarray, np.ndarray]:
    """`hasher.signatures(texts)` computed in up to `workers` processes, `batch_docs` texts a
    job; with `progress`, a tqdm bar in this (the main) process counts the documents done.

    A process pool costs about 0.05 s to start and feed (measured on the 2-core development VM)
    and one core hashes about 60M characters/s, so each worker is given at least
    `min_chars_per_worker` characters (8M: about 0.13 s of work): fewer workers, or none (this
    process alone), for less text than that. 0 always uses `workers`."""
    from tqdm import tqdm

    if workers > 1 and min_chars_per_worker > 0:
        chars = sum(len(t) for t in texts)
        workers = max(1, min(workers, chars // min_chars_per_worker))
    batches = [list(texts[i : i + batch_docs]) for i in range(0, len(texts), batch_docs)]
    bar = tqdm(total=len(texts), desc="near_dedup signatures", unit="doc", disable=not progress)
    results = []
    with bar:
        if workers <= 1 or len(batches) <= 1:
            for b in batches:
                results.append(hasher.signatures(b))
                bar.update(len(b))
        else:
            with ProcessPoolExecutor(workers) as pool:
                for b, res in zip(
                    batches, pool.map(_signatures_job, [(hasher, b) for b in batches]), strict=True
                ):
                    results.append(res)
                    bar.update(len(b))
    if not results:
        return np.empty((0, hasher.num_perm), np.uint32), np.empty(0, bool)
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique arrays (shingle sets)."""
    if not len(a) and not len(b):
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def candidate_probability(s: np.ndarray | float, bands: int, rows: int) -> np.ndarray | float:
    """P(two documents with Jaccard s share at least one band) = 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - np.power(s, rows)) ** bands


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


def _band_row_grid(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (bands, rows) with bands*rows <= num_perm, bands-major, as two int arrays."""
    pairs = [(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)]
    grid = np.array(pairs, dtype=np.int64)
    return grid[:, 0], grid[:, 1]


def _areas(
    threshold: float, bands: np.ndarray, rows: np.ndarray, points: int
) -> tuple[np.ndarray, np.ndarray]:
    """For each (bands[k], rows[k]): the trapezoid areas under P(s) over [0, t] and under
    1 - P(s) over [t, 1], `points` points each, all pairs at once."""
    lo = np.linspace(0.0, threshold, points)
    hi = np.linspace(threshold, 1.0, points)
    b, r = bands[:, None].astype(float), rows[:, None].astype(float)
    p_lo = 1.0 - (1.0 - lo[None, :] ** r) ** b
    q_hi = (1.0 - hi[None, :] ** r) ** b  # 1 - P(s)
    fp = np.sum((p_lo[:, 1:] + p_lo[:, :-1]) * np.diff(lo), axis=1) / 2.0
    fn = np.sum((q_hi[:, 1:] + q_hi[:, :-1]) * np.diff(hi), axis=1) / 2.0
    return fp, fn


def choose_bands_rows(
    threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5
) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising
    fp_weight * integral_0^t P(s) ds + fn_weight * integral_t^1 (1 - P(s)) ds."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold={threshold}; must be in (0, 1)")
    bands, rows = _band_row_grid(num_perm)
    fp, fn = _areas(threshold, bands, rows, 201)
    err = (fp_weight * fp + fn_weight * fn).tolist()
    best, best_err = (1, 1), float("inf")
    for b, r, e in zip(bands.tolist(), rows.tolist(), err, strict=True):
        if e < best_err - 1e-12:
            best, best_err = (b, r), e
    return best


def false_rates(threshold: float, bands: int, rows: int, points: int = 2001) -> tuple[float, float]:
    """(FP, FN): the mean candidate probability over s in [0, t] and the mean probability of not
    being a candidate over s in [t, 1] (trapezoid rule on `points` points each)."""
    lo = np.linspace(0.0, threshold, points)
    hi = np.linspace(threshold, 1.0, points)
    fp = _trapezoid(candidate_probability(lo, bands, rows), lo) / threshold
    fn = _trapezoid(1.0 - candidate_probability(hi, bands, rows), hi) / (1.0 - threshold)
    return fp, fn


def choose_bands_rows_for_recall(
    threshold: float, num_perm: int, fp_budget: float = 0.2
) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising FN subject to FP <= fp_budget (see
    `false_rates`, here on 401 points); ties: the smaller FP, then fewer bands. With
    verification on, a false candidate costs one exact Jaccard, a false negative a duplicate
    kept."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold={threshold}; must be in (0, 1)")
    if not 0.0 < fp_budget <= 1.0:
        raise ValueError(f"fp_budget={fp_budget}; must be in (0, 1]")
    bands, rows = _band_row_grid(num_perm)
    fp_area, fn_area = _areas(threshold, bands, rows, 401)
    fps, fns = (fp_area / threshold).tolist(), (fn_area / (1.0 - threshold)).tolist()
    best, best_key = None, None
    for b, r, fp, fn in zip(bands.tolist(), rows.tolist(), fps, fns, strict=True):
        key = (round(fn, 9), round(fp, 9), b)
        if fp <= fp_budget and (best_key is None or key < best_key):
            best, best_key = (b, r), key
    if best is None:
        raise ValueError(f"fp_budget={fp_budget}: no bands x rows <= {num_perm} stays under it")
    return best


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p[root] != root:
            root = p[root]
        while p[x] != root:  # path compression
            p[x], x = root, p[x]
        return int(root)

    def union(self, x: int, y: int) -> bool:
        rx, ry = self.find(x), self.find(y)
        if rx == ry:
            return False
        if rx < ry:
            self.parent[ry] = rx
        else:
            self.parent[rx] = ry
        return True


def band_candidates(sig: np.ndarray, bands: int, rows: int) -> list[tuple[int, int]]:
    """Pairs (first, other) of row indices that share all `rows` values of some band, where
    `first` is the lowest index in that band bucket; sorted, without repeats."""
    pairs: set[tuple[int, int]] = set()
    n = len(sig)
    if n < 2:
        return []
    for band in range(bands):
        block = np.ascontiguousarray(sig[:, band * rows : (band + 1) * rows])
        keys = block.view(np.dtype((np.void, block.dtype.itemsize * rows))).ravel()
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        new_group = np.concatenate([[True], sk[1:] != sk[:-1]])
        group_first = order[np.maximum.accumulate(np.where(new_group, np.arange(n), 0))]
        dup = ~new_group
        for a, b in zip(group_first[dup].tolist(), order[dup].tolist(), strict=True):
            pairs.add((a, b))
    return sorted(pairs)


def survivor(members: Sequence[int], nbytes: Sequence[int], ids: Sequence[str]) -> int:
    """The member that survives its cluster: most bytes, then smallest id."""
    return min(members, key=lambda i: (-nbytes[i], ids[i]))
