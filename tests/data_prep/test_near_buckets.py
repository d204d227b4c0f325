"""near_dedup's LSH buckets with a map-side combine (data_prep.near `_band_rows` /
`_bucket_pairs`): one row per bucket per block crosses the shuffle, and the candidate pairs are
exactly those of one row per member: (the bucket's lowest g, every other member)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_prep.near import _band_rows, _bucket_pairs, _unique_pairs

BANDS, ROWS = 4, 2
PERM = BANDS * ROWS


def _sigs(n: int, seed: int) -> pd.DataFrame:
    """Signatures over a small alphabet, so that buckets collide often, some across blocks."""
    rng = np.random.default_rng(seed)
    sig = rng.integers(0, 3, (n, PERM), dtype=np.uint32)
    sig[rng.random(n) < 0.3] = 7  # one bucket per band that holds 30% of the documents
    g = rng.permutation(np.arange(n, dtype=np.int64) * 3 + 5)  # not 0..n-1, not in order
    return pd.DataFrame({"g": g, "has": rng.random(n) > 0.1,
                         "sig": [r.tobytes() for r in sig]})


def _pairs_one_row_per_member(df: pd.DataFrame) -> set[int]:
    """The pairs as near_dedup made them before the combine: per band, group documents by the
    band's values; pair the lowest g of each group with each other member."""
    df = df[df["has"]]
    sig = np.frombuffer(b"".join(df["sig"].tolist()), np.uint32).reshape(len(df), PERM)
    out = set()
    for band in range(BANDS):
        groups: dict[bytes, list[int]] = {}
        for row, g in zip(sig[:, band * ROWS:(band + 1) * ROWS], df["g"], strict=True):
            groups.setdefault(row.tobytes(), []).append(int(g))
        for members in groups.values():
            lo = min(members)
            out |= {(lo << 32) | m for m in members if m != lo}
    return out


@pytest.mark.parametrize("blocks", [1, 3, 10])
def test_combined_buckets_give_the_same_pairs(blocks: int) -> None:
    df = _sigs(400, seed=blocks)
    cuts = np.linspace(0, len(df), blocks + 1).astype(int)
    rows = pd.concat([_band_rows(df.iloc[a:b], BANDS, ROWS, PERM)
                      for a, b in zip(cuts[:-1], cuts[1:], strict=True)], ignore_index=True)
    # a bucket crosses as one row per block it met: far fewer rows than (document, band)
    assert len(rows) < 0.5 * int(df["has"].sum()) * BANDS
    assert rows.groupby("key").size().max() <= blocks
    reduced = _bucket_pairs(rows.sort_values("key", kind="stable", ignore_index=True))
    got = _unique_pairs(reduced)
    want = _pairs_one_row_per_member(df)
    assert len(got) == len(want) and len(want) > 100
    assert set(((got["a"].to_numpy() << 32) | got["b"].to_numpy()).tolist()) == want


def test_no_document_with_shingles_gives_no_rows_and_no_pairs() -> None:
    empty = _band_rows(_sigs(5, 0).assign(has=False), BANDS, ROWS, PERM)
    assert empty.num_rows == 0 and empty.column_names == ["key", "g", "more"]
    assert _bucket_pairs(empty.to_pandas()).num_rows == 0
