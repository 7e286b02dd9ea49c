"""The resumable batch iterator: windows of items -> rows (packed or single) -> typed batches.

Its position is a small JSON-able dict, `{"epoch", "window", "row", "cursor", "seed"}`, saved with the
checkpoint (`get_state`) and restored in a fresh iterator (`set_state`): the next batch is then exactly the
one an uninterrupted run would have produced, because every window's items, packing and row order are pure
functions of (seed, epoch, window).

Training iterators drop the incomplete last batch of each epoch (one shape per run; the count is in
`dropped_rows`, `dropped_items`); evaluation iterators make one pass and pad the last batch with empty rows (loss_mask 0).
"""

from __future__ import annotations

import copy
import logging

import numpy as np

from jaxtune.data.batching import collate, item_len, pack
from jaxtune.errors import RunError

log = logging.getLogger("jaxtune.data")


class BatchIterator:
    def __init__(
        self,
        order,
        kind: str,
        batch_size: int,
        *,
        packing: bool = False,
        seq_len: int | None = None,
        bucket_multiple: int = 64,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = None,
        drop_last: bool = True,
    ):
        if packing and (kind != "lm" or not seq_len):
            raise RunError("packing needs 'lm' batches (text or lm data) and a seq_len (cutoff_len)")
        if batch_size < 1:
            raise RunError(f"batch_size must be >= 1, got {batch_size}")
        self.order, self.kind, self.batch_size = order, kind, batch_size
        self.packing, self.seq_len, self.bucket_multiple = packing, seq_len, bucket_multiple
        self.seed, self.shuffle, self.epochs, self.drop_last = seed, shuffle, epochs, drop_last
        self.epoch, self.window, self.row, self.cursor = 0, 0, 0, None
        self.dropped_rows = self.dropped_items = 0
        self.tokens = self.padded = 0  # totals over yielded batches, for packing efficiency
        self._rows = self._next_cursor = None
        self._last = False
        self.report = self.policy = None  # set by pipeline.iterators: what cleaning did, and the skips
        self.cache = None  # set by pipeline.iterators: the tokenised cache its items are mapped from

    # ---- position ----------------------------------------------------------------------------------------
    def get_state(self) -> dict:
        return {
            "epoch": self.epoch,
            "window": self.window,
            "row": self.row,
            "cursor": copy.deepcopy(self.cursor),
            "seed": self.seed,
        }

    def set_state(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise RunError(
                f"iterator state was saved with seed {state['seed']}, this run uses seed {self.seed}"
            )
        self.epoch, self.window, self.row = int(state["epoch"]), int(state["window"]), int(state["row"])
        self.cursor = copy.deepcopy(state.get("cursor"))
        self._rows = None

    def reset(self) -> None:
        """Back to the start of epoch 0 (e.g. before each evaluation pass)."""
        self.set_state({"epoch": 0, "window": 0, "row": 0, "cursor": None, "seed": self.seed})

    # ---- iteration ---------------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def _load_window(self) -> None:
        items, self._next_cursor, self._last = self.order.window(self.epoch, self.window, self.cursor)
        if self.packing:
            lengths = [item_len(self.kind, it) for it in items]
            rows = [[items[i] for i in row] for row in pack(lengths, self.seq_len)]
            if self.shuffle:  # best-fit orders rows by size; shuffle them back
                perm = np.random.default_rng([self.seed, self.epoch, self.window, 3]).permutation(len(rows))
                rows = [rows[i] for i in perm]
        else:
            rows = [[it] for it in items]
        self._rows = rows

    def _advance_window(self) -> bool:
        """Move past the current window; True when that ended the epoch."""
        ended = self._last
        if ended:
            self.epoch, self.window, self.cursor = self.epoch + 1, 0, None
        else:
            self.window, self.cursor = self.window + 1, self._next_cursor
        self.row, self._rows = 0, None
        return ended

    def __next__(self):
        rows: list = []
        empty_epochs = 0
        while len(rows) < self.batch_size:
            if self.epochs is not None and self.epoch >= self.epochs:
                break
            if self._rows is None:
                self._load_window()
            take = self._rows[self.row : self.row + self.batch_size - len(rows)]
            rows += take
            self.row += len(take)
            if self.row >= len(self._rows) and self._advance_window():
                epoch_rows = len(rows)
                if rows and len(rows) < self.batch_size and self.drop_last:
                    self.dropped_rows += len(rows)
                    self.dropped_items += sum(map(len, rows))
                    rows = []
                if not rows:
                    empty_epochs += 1
                    if empty_epochs > 1:
                        raise RunError(self._too_little(epoch_rows))
                if not self.drop_last and rows:
                    break
        if not rows:
            raise StopIteration
        batch = collate(self.kind, rows, self.batch_size, self.seq_len, self.packing, self.bucket_multiple)
        self._count(batch)
        return batch

    def _too_little(self, rows: int) -> str:
        what = "packed rows" if self.packing else "examples"
        where = f"; after loading and filtering: {self.report.per_file()}" if self.report is not None else ""
        return (
            f"the dataset yields no complete batch: an epoch has {rows} {what}, fewer than the batch size "
            f"{self.batch_size}{where}. Add data, lower the batch size, or relax the filters"
        )

    def _count(self, batch) -> None:
        tb = (
            getattr(batch, "batch", None)
            or getattr(batch, "chosen", None)
            or getattr(batch, "prompts", None)
            or batch
        )
        self.tokens += int((tb.segment_ids > 0).sum())
        self.padded += int(tb.segment_ids.size)

    @property
    def efficiency(self) -> float:
        """Non-pad tokens / all tokens over the batches yielded so far."""
        return self.tokens / self.padded if self.padded else 0.0

    def rows_per_epoch(self, epoch: int = 0) -> int:
        """Rows one epoch yields (packing included), by building its windows; streaming sources are read."""
        saved = (self.epoch, self.window, self.row, self.cursor, self._rows, self._next_cursor, self._last)
        self.epoch, self.window, self.cursor, total = epoch, 0, None, 0
        try:
            while True:
                self._load_window()
                total += len(self._rows)
                if self._last:
                    return total
                self.window, self.cursor = self.window + 1, self._next_cursor
        finally:
            self.epoch, self.window, self.row, self.cursor, self._rows, self._next_cursor, self._last = saved

    def steps_per_epoch(self, epoch: int = 0) -> int:
        rows = self.rows_per_epoch(epoch)
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)
