from __future__ import annotations

import random

import numpy as np
import pytest

from data_prep.dedup import exact_duplicates, near_duplicates
from data_prep.document import Document
from data_prep.minhash import (
    WORD_RE,
    MinHasher,
    UnionFind,
    _ngram_shingles,
    _word_char_table,
    band_candidates,
    candidate_probability,
    choose_bands_rows,
    estimated_jaccard,
    jaccard,
    parallel_signatures,
    shingle_hashes,
    shingle_sets,
    survivor,
    words_of,
)

VOCAB = [f"w{i}" for i in range(50_000)]


def random_text(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def mutate(words: list[str], rng: random.Random, k: int) -> list[str]:
    """Replace k random positions with fresh words."""
    out = list(words)
    for i in rng.sample(range(len(out)), k):
        out[i] = f"fresh{rng.randrange(10**9)}"
    return out


def set_jaccard(a: str, b: str, n: int = 5) -> float:
    """Reference Jaccard on Python sets of word n-gram tuples."""
    def grams(t):
        w = words_of(t)
        return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}

    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def test_permutations_are_multiply_add_shift_without_overflow():
    """h_i(x) = ((a_i x + b_i) mod 2^64) >> 32, checked against Python integers at the extremes."""
    h = MinHasher(num_perm=16, seed=3)
    h.a[0] = h.b[0] = (1 << 64) - 1  # the largest multiplier and offset the family allows
    h.a[1], h.b[1] = 1, 0
    x = np.array([0, 1, 12345, (1 << 32) - 1, (1 << 31) + 7], dtype=np.uint64)
    got = h.permuted(x)
    assert got.shape == (5, 16) and int(got.max()) < 1 << 32
    for i, xi in enumerate(x.tolist()):
        for j in range(16):
            want = ((int(h.a[j]) * xi + int(h.b[j])) % (1 << 64)) >> 32
            assert int(got[i, j]) == want
    # the minimum is taken over the 64-bit values: the same as the minimum of the shifted ones
    np.testing.assert_array_equal(h.signature_of_shingles(x), got.min(axis=0).astype(np.uint32))


def _reference_shingles(text: str, n: int = 5) -> np.ndarray:
    """minhash's documented shingle hash, one word and one n-gram at a time in Python integers:
    word = fmix64(sum_i cp_i * B^i mod 2^64), n-gram = fmix64(sum_k w_k POLY^(len-1-k)) >> 32."""
    m64 = (1 << 64) - 1

    def fmix(h: int) -> int:
        h ^= h >> 33
        h = (h * 0xFF51AFD7ED558CCD) & m64
        h ^= h >> 33
        h = (h * 0xC4CEB9FE1A85EC53) & m64
        return h ^ (h >> 33)

    wh = [fmix(sum(ord(c) * pow(0x100000001B3, i, 1 << 64) for i, c in enumerate(w)) & m64)
          for w in words_of(text)]
    if not wh:
        return np.empty(0, dtype=np.uint64)
    k = min(n, len(wh))
    out = set()
    for s in range(len(wh) - k + 1):
        h = 0
        for w in wh[s : s + k]:
            h = (h * 0x9E3779B97F4A7C15 + w) & m64
        out.add(fmix(h) >> 32)
    return np.array(sorted(out), dtype=np.uint64)


TRICKY = [
    "", "   ...  ", "one", "two words", "a b c d", "a b c d e", "a b c d e f",
    "Straße İstanbul ΣΑΣ ΟΔΟΣ naïve café x_y 12 ½ ٣ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 😀emoji “quoted” end",
    "lone \ud800surrogate in a text with more than five words",
    "tab\tseparated\nnew line\r\nwindows—dash–en x",
]


def test_shingle_hashes_match_the_reference_and_the_batch():
    rng = random.Random(6)
    texts = TRICKY + [" ".join(random_text(rng, rng.randrange(0, 60))) for _ in range(30)]
    for t in texts:
        np.testing.assert_array_equal(shingle_hashes(t), _reference_shingles(t), err_msg=t)
        np.testing.assert_array_equal(shingle_hashes(t, 2), _reference_shingles(t, 2), err_msg=t)
    # all texts shingled in one pass: each text's part is what it gets alone
    allx, counts = _ngram_shingles(texts, 5)
    assert counts.sum() == len(allx)
    for t, part in zip(texts, np.split(allx, np.cumsum(counts)[:-1]), strict=True):
        np.testing.assert_array_equal(np.unique(part), shingle_hashes(t))
    for sets in (shingle_sets(texts), shingle_sets(texts, batch_chars=100)):
        assert len(sets) == len(texts)
        for t, got in zip(texts, sets, strict=True):
            np.testing.assert_array_equal(got, shingle_hashes(t))
    with pytest.raises(ValueError, match="ngram=0"):
        shingle_hashes("a b", 0)


def test_long_batches_compute_powers_beyond_the_kept_table(monkeypatch):
    import data_prep.minhash as mh

    rng = random.Random(9)
    texts = [" ".join(random_text(rng, 300)) for _ in range(3)]
    want = [shingle_hashes(t) for t in texts]
    monkeypatch.setattr(mh, "_powers", np.ones(1, dtype=np.uint64))
    monkeypatch.setattr(mh, "_POWERS_KEPT", 100)  # every batch is longer than the table
    assert [len(x) for x in (mh._char_powers(10), mh._char_powers(1000))] == [11, 1001]
    assert len(mh._powers) <= 100
    for got, w in zip(shingle_sets(texts), want, strict=True):
        np.testing.assert_array_equal(got, w)


def test_word_characters_are_re_word_characters():
    """The code point table that splits words is re's `\\w`, over the whole Basic Multilingual
    Plane and a sample of the others."""
    cps = list(range(0x10000)) + list(range(0x10000, 0x110000, 97))
    table = _word_char_table(0x10FFFF)
    want = [bool(WORD_RE.fullmatch(chr(c))) for c in cps]
    assert table[cps].tolist() == want


def test_estimated_jaccard_is_unbiased():
    """Over 400 random pairs of shingle sets with Jaccard spread over [0, 1], the fraction of
    agreeing positions of 128-permutation signatures has mean error within +-0.01 of the true
    Jaccard (the standard error of that mean is about 0.002), and a spread within 25% of the
    binomial one, sqrt(J (1 - J) / 128), that independent permutations give."""
    rng = np.random.default_rng(8)
    h = MinHasher(num_perm=128, seed=11)
    err, var = [], []
    for _ in range(400):
        n = int(rng.integers(50, 400))
        shared = int(rng.integers(0, n + 1))
        pool = rng.choice(1 << 32, size=2 * n, replace=False).astype(np.uint64)
        a, b = pool[:n], np.concatenate([pool[:shared], pool[n : 2 * n - shared]])
        j = shared / (2 * n - shared)
        est = estimated_jaccard(h.signature_of_shingles(a), h.signature_of_shingles(b))
        err.append(est - j)
        var.append(j * (1 - j) / 128)
    err_a = np.array(err)
    assert abs(err_a.mean()) <= 0.01, err_a.mean()
    ratio = err_a.std() / np.sqrt(np.mean(var))
    assert 0.8 <= ratio <= 1.25, ratio


def test_shingle_hash_sets_match_python_sets():
    rng = random.Random(0)
    for overlap in (10, 100, 300):
        a = random_text(rng, 400)
        b = a[:overlap] + random_text(rng, 400 - overlap)
        ta, tb = " ".join(a), " ".join(b)
        assert jaccard(shingle_hashes(ta), shingle_hashes(tb)) == pytest.approx(set_jaccard(ta, tb), abs=1e-3)


def test_estimated_jaccard_of_texts_within_4_standard_errors():
    """Through the whole text path: each estimate within 4 binomial standard errors,
    4 * sqrt(J (1 - J) / 128) (<= 0.18), plus one position, of the true Jaccard; a pair fails
    by chance with probability about 6e-5."""
    rng = random.Random(1)
    h = MinHasher(num_perm=128, seed=7)
    for k in (0, 5, 20, 40, 80, 150, 300, 400):
        a = random_text(rng, 500)
        b = mutate(a, rng, k)
        ta, tb = " ".join(a), " ".join(b)
        true = set_jaccard(ta, tb)
        sig, has = h.signatures([ta, tb])
        assert has.all()
        tol = 4 * (true * (1 - true) / 128) ** 0.5 + 1 / 128
        assert abs(estimated_jaccard(sig[0], sig[1]) - true) <= tol, (k, true)


def test_batched_signatures_equal_single_and_parallel():
    rng = random.Random(2)
    texts = [" ".join(random_text(rng, rng.randrange(0, 3000))) for _ in range(20)] + ["", "one two"]
    # odd block size: documents straddle blocks; a small batch: texts are shingled in several
    h = MinHasher(num_perm=64, chunk_rows=257, batch_chars=5000)
    sig, has = h.signatures(texts)
    for i, t in enumerate(texts):
        sh = shingle_hashes(t)
        assert has[i] == (len(sh) > 0)
        if len(sh):
            np.testing.assert_array_equal(sig[i], h.signature_of_shingles(sh))
    psig, phas = parallel_signatures(h, texts, workers=2, batch_docs=5, min_chars_per_worker=0)
    np.testing.assert_array_equal(psig, sig)
    np.testing.assert_array_equal(phas, has)


def test_no_process_pool_for_less_text_than_it_pays_for(monkeypatch):
    import data_prep.minhash as mh

    rng = random.Random(12)
    texts = [" ".join(random_text(rng, 200)) for _ in range(10)]  # about 14k characters
    h = MinHasher(num_perm=32)
    want = h.signatures(texts)

    class NoPool:
        def __init__(self, *a, **k):
            raise AssertionError("a process pool was started")

    monkeypatch.setattr(mh, "ProcessPoolExecutor", NoPool)
    got = parallel_signatures(h, texts, workers=2, batch_docs=2)  # default: 8M chars a worker
    np.testing.assert_array_equal(got[0], want[0])
    got = parallel_signatures(h, texts, workers=2, batch_docs=2, min_chars_per_worker=10_000)
    np.testing.assert_array_equal(got[0], want[0])  # 14k // 10k = 1 worker: still no pool
    with pytest.raises(AssertionError, match="process pool"):
        parallel_signatures(h, texts, workers=2, batch_docs=2, min_chars_per_worker=5_000)


@pytest.mark.parametrize("threshold,expected", [(0.7, (14, 9)), (0.8, (9, 13))])
def test_bands_rows_for_threshold(threshold, expected):
    b, r = choose_bands_rows(threshold, 128)
    assert (b, r) == expected and b * r <= 128
    # the S-curve's steepest point sits near the threshold ...
    assert abs((1 / b) ** (1 / r) - threshold) < 0.06
    # ... pairs well above it are almost always candidates, pairs well below almost never
    assert candidate_probability(threshold + 0.1, b, r) > 0.85
    assert candidate_probability(threshold - 0.3, b, r) < 0.02
    # and it is no worse than its neighbours under the weighted FP + FN area
    def err(b, r):
        s = np.linspace(0, 1, 2001)
        p = candidate_probability(s, b, r)
        lo, hi = s <= threshold, s >= threshold
        return np.trapezoid(p[lo], s[lo]) / 2 + np.trapezoid(1 - p[hi], s[hi]) / 2

    for db, dr in [(1, 0), (-1, 0), (0, 1), (0, -1)]:
        if 0 < b + db and 0 < r + dr and (b + db) * (r + dr) <= 128:
            assert err(b, r) <= err(b + db, r + dr) + 1e-4


def test_planted_clusters_recall_and_precision():
    rng = random.Random(3)
    ids, texts, cluster_of = [], [], []
    for c in range(40):  # 40 clusters of 4 near-duplicates (Jaccard >= 0.9)
        base = random_text(rng, 600)
        for m in range(4):
            ids.append(f"c{c:02d}-{m}")
            texts.append(" ".join(mutate(base, rng, 2) if m else base))
            cluster_of.append(c)
    for u in range(200):  # unrelated documents
        ids.append(f"u{u:03d}")
        texts.append(" ".join(random_text(rng, 300)))
        cluster_of.append(-1 - u)
    # a few pairs of medium similarity (Jaccard ~0.3) that must stay apart
    for u in range(10):
        base = random_text(rng, 300)
        for m in range(2):
            ids.append(f"m{u}-{m}")
            texts.append(" ".join(base[:150] + random_text(rng, 150) if m else base))
            cluster_of.append(-1000 - 2 * u - m)
    res = near_duplicates(ids, texts, threshold=0.8, num_perm=128, workers=1)
    sh = [shingle_hashes(t) for t in texts]
    found = {i: i for i in range(len(ids))}
    index = {d: i for i, d in enumerate(ids)}
    for cl in res.clusters:
        members = [index[cl["survivor"]]] + [index[m] for m, _ in cl["members"]]
        for m in members:
            found[m] = members[0]
        for x in members:  # no merged pair below Jaccard 0.5
            for y in members:
                if x < y:
                    assert jaccard(sh[x], sh[y]) >= 0.5, (ids[x], ids[y])
    true_pairs = [(x, y) for x in range(len(ids)) for y in range(x + 1, len(ids))
                  if cluster_of[x] == cluster_of[y]]
    assert all(jaccard(sh[x], sh[y]) >= 0.9 for x, y in true_pairs)
    recall = sum(found[x] == found[y] for x, y in true_pairs) / len(true_pairs)
    assert recall >= 0.95
    assert not [d for d in res.drop if not d.startswith("c")]  # unrelated documents all kept


def test_verification_rejects_dissimilar_candidates():
    rng = random.Random(4)
    base = random_text(rng, 200)
    texts = [" ".join(base), " ".join(base[:120] + random_text(rng, 80))]  # Jaccard ~0.4
    loose = near_duplicates(["a", "b"], texts, bands=64, rows=1, workers=1)  # any shared minimum
    assert loose.stats["candidate_pairs"] == 1 and len(loose.drop) == 1
    strict = near_duplicates(["a", "b"], texts, bands=64, rows=1, verify=True, threshold=0.8, workers=1)
    assert strict.stats["pairs_rejected_by_verification"] == 1 and not strict.drop


def test_survivor_rule_is_longest_then_smallest_id_and_order_free():
    rng = random.Random(5)
    base = random_text(rng, 400)
    docs = {
        "b-short": " ".join(base),
        "c-long": " ".join(base + ["extra"]),
        "a-long": " ".join(base + ["tail1"]),  # as long as c-long, smaller id
        "d-short": " ".join(base[:-1] + ["other"]),
    }
    for seed in range(3):
        items = list(docs.items())
        random.Random(seed).shuffle(items)
        res = near_duplicates([k for k, _ in items], [v for _, v in items], workers=1)
        assert len(res.clusters) == 1 and res.clusters[0]["survivor"] == "a-long"
        assert set(res.drop) == {"b-short", "c-long", "d-short"}
    assert survivor([0, 1, 2], [10, 30, 30], ["z", "y", "x"]) == 2


def test_exact_duplicates_keep_smallest_id():
    docs = [Document(i, t, "s") for i, t in [("b", "same"), ("a", "same"), ("c", "other"), ("d", "same")]]
    res = exact_duplicates(docs)
    assert res.drop == {"b": "a", "d": "a"} and res.groups == [["a", "b", "d"]]


def test_union_find_and_band_candidates():
    uf = UnionFind(5)
    uf.union(3, 4)
    uf.union(4, 1)
    assert uf.find(3) == uf.find(1) == 1 and uf.find(0) == 0
    sig = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [7, 7, 3, 4], [5, 5, 5, 5]], dtype=np.uint32)
    assert band_candidates(sig, bands=2, rows=2) == [(0, 1), (0, 2)]
