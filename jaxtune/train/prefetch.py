"""Batches ready before the step asks: a producer thread pulls host batches, places them on the mesh, queues them.

    with Prefetcher(run.train_it, run.mesh, count=steps - start, depth=t.prefetch) as batches:
        produced = next(batches)      # .batch: global arrays; .data_state: the iterator's state *after* this batch

The producer reads ahead by up to `depth` batches, so the iterator's live position is ahead of the step; each
batch carries the iterator state (and packing efficiency) snapshotted right after it was read, and the loop saves
the one of the batch its step consumed: resume stays exact. An exception in the producer (a DataError in some row)
is re-raised in the consumer with its own type and message. `close()` (the `with` exit: end, signal, error) stops
the thread and waits for it. `depth=0` reads synchronously in the caller, as a loop without a producer would.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any

from jaxtune.train.sharding import global_batch

_END = object()
_POLL_S = 0.1  # how often a blocked producer / consumer looks at the stop flag / the thread


@dataclasses.dataclass
class Produced:
    batch: Any  # on the mesh (global arrays)
    data_state: Any  # the train iterator's get_state() right after this batch
    efficiency: float  # the iterator's non-pad token fraction over the batches up to this one


@dataclasses.dataclass
class _Failure:
    error: BaseException


class Prefetcher:
    """Up to `depth` placed batches queued ahead of the consumer; `count` batches in all (the steps left)."""

    def __init__(self, it, mesh, count: int, depth: int, place=global_batch):
        self.it, self.mesh, self.count, self.depth, self.place = it, mesh, count, depth, place
        self.source = iter(it)
        self.produced = 0
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if depth > 0 and count > 0:
            self._queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._produce, name="jaxtune-prefetch", daemon=True)
            self._thread.start()

    # ---- producer ----------------------------------------------------------------------------------------
    def _one(self) -> Produced:
        host = next(self.source)  # StopIteration: the data ran out before the steps did
        state, efficiency = self.it.get_state(), self.it.efficiency  # snapshot now: the producer reads on
        return Produced(self.place(host, self.mesh), state, efficiency)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for _ in range(self.count):
                if self._stop.is_set():
                    return
                if not self._put(self._one()):
                    return
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Failure(e))

    # ---- consumer ----------------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> Produced:
        if self.produced >= self.count:
            raise StopIteration
        if self._queue is None:
            item = self._one()
        else:
            item = self._get()
        self.produced += 1
        return item

    def _get(self) -> Produced:
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread ended without handing over a batch") from None
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        if item is _END:
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the producer (it may be blocked on a full queue or inside `next`) and wait for it."""
        self._stop.set()
        if self._thread is None:
            return
        while self._thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()  # make room so a blocked put sees the stop flag
            except queue.Empty:
                pass
            self._thread.join(timeout=_POLL_S)
        self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
