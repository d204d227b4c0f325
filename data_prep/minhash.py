"""MinHash signatures and LSH banding for near-duplicate detection.

MinHash (Broder, "On the resemblance and containment of documents", 1997): for a random
hash function h, the probability that min h(A) == min h(B) over two shingle sets A and B equals
their Jaccard similarity |A & B| / |A | B|. With `num_perm` independent hash functions the
fraction of agreeing signature positions is an unbiased estimate of that similarity.

Shingles are word n-grams (default 5) of the lower-cased text, where a word is a run of `\\w`
characters. Each word is hashed with xxh3-64, an n-gram hash combines its word hashes with a
polynomial in wrapping uint64 arithmetic followed by a murmur3-style finaliser, and keeps the
top 32 bits. The permutations are the universal family h_i(x) = ((a_i x + b_i) mod p) mod 2^32
with p = 2^61 - 1 (a Mersenne prime), a_i in [1, 2^32), b_i in [0, 2^32) drawn from a seeded
generator. Because x < 2^32, a_i x + b_i <= (2^32-1)^2 + 2^32 - 1 < 2^64: the uint64 product never
overflows, and the reduction mod 2^61-1 is done exactly with shifts and masks.

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
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import xxhash

MERSENNE_61 = np.uint64((1 << 61) - 1)
MASK_32 = np.uint64(0xFFFFFFFF)
WORD_RE = re.compile(r"\w+")
_POLY = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier for combining word hashes


def words_of(text: str) -> list[str]:
    return WORD_RE.findall(text.lower())


def _fmix64(h: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finaliser, vectorised (uint64 arithmetic wraps modulo 2^64)."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def shingle_hashes(text: str, ngram: int = 5) -> np.ndarray:
    """32-bit hashes (as uint64) of the word n-grams of `text`; sorted and unique.

    A text with fewer than `ngram` words is one shingle of all its words; no words, no shingles.
    """
    words = words_of(text)
    if not words:
        return np.empty(0, dtype=np.uint64)
    wh = np.fromiter(
        (xxhash.xxh3_64_intdigest(w.encode("utf-8", "surrogatepass")) for w in words),
        np.uint64,
        len(words),
    )
    n = min(ngram, len(wh))
    count = len(wh) - n + 1
    h = np.zeros(count, dtype=np.uint64)
    for k in range(n):
        h = h * _POLY + wh[k : k + count]
    return np.unique(_fmix64(h) >> np.uint64(32))


def _mod_mersenne61_inplace(y: np.ndarray) -> np.ndarray:
    """y mod (2^61 - 1) for uint64 y, exact, overwriting y: since 2^61 = 1 (mod p),
    y = (y & p) + (y >> 61) (mod p), and that sum is < p + 8, so one conditional subtraction
    finishes the reduction."""
    r = y & MERSENNE_61
    y >>= np.uint64(61)
    r += y
    np.subtract(r, MERSENNE_61, out=r, where=r >= MERSENNE_61)
    return r


@dataclass
class MinHasher:
    """Computes `num_perm`-long uint32 MinHash signatures of word n-gram shingle sets."""

    num_perm: int = 128
    ngram: int = 5
    seed: int = 1
    chunk_rows: int = 1024  # shingles per vectorised block; 1 MiB blocks stay in cache

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.a = rng.integers(1, 1 << 32, size=self.num_perm, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 32, size=self.num_perm, dtype=np.uint64)

    def permuted(self, x: np.ndarray) -> np.ndarray:
        """(len(x), num_perm) matrix of h_i(x_j) (uint64 values < 2^32); x must be < 2^32."""
        y = np.multiply.outer(x, self.a)
        y += self.b  # a*x + b <= (2^32-1)^2 + 2^32-1 < 2^64: no overflow
        r = _mod_mersenne61_inplace(y)
        r &= MASK_32
        return r

    def signature_of_shingles(self, shingles: np.ndarray) -> np.ndarray:
        sig = np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint32)
        for i in range(0, len(shingles), self.chunk_rows):
            block = self.permuted(shingles[i : i + self.chunk_rows]).min(axis=0)
            np.minimum(sig, block.astype(np.uint32), out=sig)
        return sig

    def signatures(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Signatures of `texts` as a (len(texts), num_perm) uint32 array, and a boolean mask of
        the texts that had at least one shingle (the others' rows are all 0xFFFFFFFF).

        All shingles of the batch are concatenated and permuted in blocks; the minimum per
        document is a `np.minimum.reduceat` over each document's segment of a block.
        """
        sh = [shingle_hashes(t, self.ngram) for t in texts]
        has = np.array([len(s) > 0 for s in sh], dtype=bool)
        sig = np.full((len(texts), self.num_perm), 0xFFFFFFFF, dtype=np.uint32)
        idx = np.flatnonzero(has)
        if not len(idx):
            return sig, has
        lens = np.array([len(sh[i]) for i in idx])
        off = np.concatenate([[0], np.cumsum(lens)])
        allx = np.concatenate([sh[i] for i in idx])
        sub = sig[idx]
        for c0 in range(0, len(allx), self.chunk_rows):
            c1 = min(c0 + self.chunk_rows, len(allx))
            i0 = int(np.searchsorted(off, c0, side="right")) - 1  # doc holding row c0
            i1 = int(np.searchsorted(off, c1, side="left"))  # one past the doc holding c1-1
            starts = np.maximum(off[i0:i1] - c0, 0)
            block = np.minimum.reduceat(self.permuted(allx[c0:c1]), starts, axis=0)
            np.minimum(sub[i0:i1], block.astype(np.uint32), out=sub[i0:i1])
        sig[idx] = sub
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
) -> tuple[np.ndarray, np.ndarray]:
    """`hasher.signatures(texts)` computed in `workers` processes, `batch_docs` texts a job; with
    `progress`, a tqdm bar in this (the main) process counts the documents done."""
    from tqdm import tqdm

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


def choose_bands_rows(
    threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5
) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising
    fp_weight * integral_0^t P(s) ds + fn_weight * integral_t^1 (1 - P(s)) ds."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold={threshold}; must be in (0, 1)")
    lo = np.linspace(0.0, threshold, 201)
    hi = np.linspace(threshold, 1.0, 201)
    best, best_err = (1, 1), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _trapezoid(candidate_probability(lo, b, r), lo)
            fn = _trapezoid(1.0 - candidate_probability(hi, b, r), hi)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err - 1e-12:
                best, best_err = (b, r), err
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
    `false_rates`); ties: the smaller FP, then fewer bands. With verification on, a false
    candidate costs one exact Jaccard, a false negative a duplicate kept."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold={threshold}; must be in (0, 1)")
    if not 0.0 < fp_budget <= 1.0:
        raise ValueError(f"fp_budget={fp_budget}; must be in (0, 1]")
    best, best_key = None, None
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp, fn = false_rates(threshold, b, r, 401)
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
