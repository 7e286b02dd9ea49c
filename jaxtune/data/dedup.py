"""Duplicate removal: exact (hash of the normalised text) and near (MinHash + LSH banding).

Near-duplicates are found as in Broder (1997) and the usual LSH recipe (Leskovec et al., "Mining of Massive
Datasets", ch. 3): shingles -> 128 MinHash values -> 16 bands of 8 rows; records sharing a band are
candidates, kept as duplicates when their estimated Jaccard similarity reaches `threshold`. Shingles are
5-word windows, or 5-character windows for text without spaces (Chinese, Japanese). Hashes are crc32 and
fixed-seed affine maps, so results do not depend on PYTHONHASHSEED. The first occurrence is kept.
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

_NUM_PERM, _BANDS = 128, 16
_PRIME = np.uint64((1 << 61) - 1)
_RNG = np.random.default_rng(1234)
_A = _RNG.integers(1, 1 << 32, _NUM_PERM, dtype=np.uint64)
_B = _RNG.integers(0, 1 << 32, _NUM_PERM, dtype=np.uint64)
_WS = re.compile(r"\s+")


def canonical(text: str) -> str:
    """What counts as 'the same text': case-folded, whitespace collapsed."""
    return _WS.sub(" ", text.casefold()).strip()


def exact_key(text: str) -> str:
    return hashlib.sha1(canonical(text).encode("utf-8", "surrogatepass")).hexdigest()


def shingles(text: str, n: int = 5) -> set[str]:
    text = canonical(text)
    words = text.split(" ")
    if len(words) >= max(n, len(text) // 20):  # spaced text: word shingles
        units, sep = words, " "
    else:  # unspaced scripts: character shingles
        units, sep = list(text.replace(" ", "")), ""
    if len(units) <= n:
        return {sep.join(units)}
    return {sep.join(units[i : i + n]) for i in range(len(units) - n + 1)}


def minhash(text: str) -> np.ndarray:
    """[128] uint64 signature."""
    h = np.fromiter((zlib.crc32(s.encode("utf-8", "surrogatepass")) for s in shingles(text)), np.uint64)
    # (a * x + b) mod p with x, a < 2**32: the product fits in uint64 exactly.
    return ((_A[:, None] * h[None, :] + _B[:, None]) % _PRIME).min(axis=1)


def near_duplicates(texts: list[str], threshold: float = 0.8) -> list[int]:
    """Indices of texts that nearly duplicate an earlier one."""
    sigs = [minhash(t) for t in texts]
    rows = _NUM_PERM // _BANDS
    buckets: dict[tuple[int, bytes], int] = {}
    dupes = []
    for i, sig in enumerate(sigs):
        keys = [(b, sig[b * rows : (b + 1) * rows].tobytes()) for b in range(_BANDS)]
        match = next(
            (
                buckets[k]
                for k in keys
                if k in buckets and float((sigs[buckets[k]] == sig).mean()) >= threshold
            ),
            None,
        )
        if match is not None:
            dupes.append(i)
            continue
        for k in keys:
            buckets.setdefault(k, i)
    return dupes


def exact_duplicates(texts: list[str]) -> list[int]:
    seen, dupes = set(), []
    for i, t in enumerate(texts):
        k = exact_key(t)
        if k in seen:
            dupes.append(i)
        seen.add(k)
    return dupes
