"""Which items an epoch visits, in which order, one window at a time: a pure function of (seed, epoch, window).

The iterator asks for window `w` of epoch `e`; both orders answer deterministically, which is what makes
resume exact. Several datasets are either concatenated (no ratios) or mixed: each draw picks a dataset with
probability proportional to its ratio (`numpy.random.Generator.choice`), and a dataset drawn more often than
it has items is cycled in a fresh permutation (oversampling), as in LLaMA-Factory's `interleave_over`.

- `MemoryOrder`: items held in memory; an epoch draws sum(len) items.
- `StreamOrder`: items read from files as needed; a window of `window` items is shuffled inside itself. The
  cursor (per-source raw-record offsets and exhaustion flags, a small list) lets a restored iterator skip
  straight to its window without encoding what it skips. With ratios an epoch ends when any source runs
  out (`first_exhausted`), since lengths are unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from jaxtune.errors import RunError


def _probs(ratios, k: int):
    if ratios is None:
        return None
    p = np.asarray(ratios, np.float64)
    if p.shape != (k,) or (p < 0).any() or p.sum() <= 0:
        raise RunError(f"mixture ratios must be {k} non-negative numbers with a positive sum, got {ratios}")
    return p / p.sum()


class MemoryOrder:
    def __init__(
        self, datasets: Sequence[Sequence], ratios=None, seed: int = 0, shuffle: bool = True, window=4096
    ):
        self.datasets, self.seed, self.shuffle, self.size = datasets, seed, shuffle, int(window)
        self.p = _probs(ratios, len(datasets))
        self._cache: tuple[int, np.ndarray] | None = None

    def _perm(self, n: int, *key) -> np.ndarray:
        return np.random.default_rng([self.seed, *key]).permutation(n) if self.shuffle else np.arange(n)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """[N, 2] (dataset, index) pairs of one epoch."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        sizes = [len(d) for d in self.datasets]
        total = sum(sizes)
        if self.p is None:
            ds = np.repeat(np.arange(len(sizes)), sizes)
            idx = np.concatenate([np.arange(n) for n in sizes]) if sizes else np.zeros(0, int)
            pairs = np.stack([ds, idx], 1)[self._perm(total, epoch)]
        else:
            rng = np.random.default_rng([self.seed, epoch, 1])
            ds = rng.choice(len(sizes), size=total, p=self.p)
            idx = np.zeros(total, np.int64)
            for d, n in enumerate(sizes):
                picks = np.flatnonzero(ds == d)
                if len(picks) and not n:
                    raise RunError(f"mixture source {d} is empty but has a positive ratio")
                cycles = -(-len(picks) // n) if n else 0
                perm = np.concatenate(
                    [self._perm(n, epoch, d, c) for c in range(cycles)] or [np.zeros(0, int)]
                )
                idx[picks] = perm[: len(picks)]
            pairs = np.stack([ds, idx], 1)
        self._cache = (epoch, pairs)
        return pairs

    def window(self, epoch: int, w: int, cursor=None):
        """(items, next cursor, is the epoch's last window)."""
        pairs = self.epoch_order(epoch)[w * self.size : (w + 1) * self.size]
        items = [self.datasets[d][i] for d, i in pairs]
        return items, None, (w + 1) * self.size >= len(self.epoch_order(epoch))


class StreamOrder:
    """`opens[d](skip)` iterates source d from raw record `skip`, yielding a list of items per record
    (empty when the record was dropped, several when a long document was split).

    The cursor holds, per source, `[records started, items taken from the last one, exhausted]`.
    """

    def __init__(
        self, opens: Sequence[Callable[[int], Iterator]], ratios=None, seed=0, shuffle=True, window=4096
    ):
        self.opens, self.seed, self.shuffle, self.size = opens, seed, shuffle, int(window)
        self.p = _probs(ratios, len(opens))
        self._live = None  # (epoch, cursor, iterators, pending items) after the last window

    def _reopen(self, epoch: int, cursor: list):
        if self._live is not None and self._live[0] == epoch and self._live[1] == cursor:
            return self._live[2], self._live[3]
        its, pending = [], []
        for d, (pos, sub, done) in enumerate(cursor):
            it = None if done else self.opens[d](max(pos - 1, 0))
            items = list(next(it, [])) if it is not None and pos > 0 else []
            its.append(it)
            pending.append(items[sub:])
        return its, pending

    def window(self, epoch: int, w: int, cursor=None):
        cursor = [list(c) for c in (cursor or [[0, 0, False] for _ in self.opens])]
        its, pending = self._reopen(epoch, cursor)
        items, last = [], False

        def pull(d: int):
            # Next item of source d; None when the source is exhausted.
            while True:
                if pending[d]:
                    cursor[d][1] += 1
                    return pending[d].pop(0)
                if its[d] is None:
                    return None
                try:
                    pending[d] = list(next(its[d]))
                except StopIteration:
                    cursor[d][2], its[d] = True, None
                    return None
                cursor[d][0], cursor[d][1] = cursor[d][0] + 1, 0

        if self.p is None:
            d = 0
            while len(items) < self.size and d < len(its):
                item = pull(d)
                if item is None:
                    d += 1
                else:
                    items.append(item)
            last = all(done for _, _, done in cursor)
        else:
            for d in np.random.default_rng([self.seed, epoch, w, 1]).choice(
                len(its), size=self.size, p=self.p
            ):
                item = pull(int(d))
                if item is None:
                    last = True
                    break
                items.append(item)
        if self.shuffle:
            items = [
                items[i] for i in np.random.default_rng([self.seed, epoch, w, 2]).permutation(len(items))
            ]
        self._live = None if last else (epoch, [list(c) for c in cursor], its, pending)
        return items, cursor, last
