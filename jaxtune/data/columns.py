"""Items <-> flat arrays: how a tokenised cache stores the items of each batch kind, and reads them back lazily.

Every item kind is a few columns. A ragged column (token ids, label weights, answer bytes) is one flat array
of all items' values plus `offsets` ([N + 1] int64, item i is `flat[offsets[i]:offsets[i + 1]]`); a scalar
column (prompt_len, KTO label, "no answer") is one value per item.

| batch kind | columns                                                                   |
|------------|---------------------------------------------------------------------------|
| lm         | ids (int32), weights (float32), prompt_len                                |
| pair       | chosen.ids, chosen.weights, chosen.prompt_len, rejected.* (the same)      |
| kto        | ids, weights, prompt_len, label (bool)                                    |
| prompt     | ids (int32), answer (utf-8 bytes), answer_none (bool: the answer is None) |

`Mapped` is the read side: a Sequence whose `__getitem__` builds one item from slices of memory-mapped arrays,
equal to the item the encoder made (same values and dtypes), so `MemoryOrder` and the batcher use it unchanged
and only the pages an epoch touches become resident.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxtune.data.tokenize import Example

_EX = (("ids", np.int32, True), ("weights", np.float32, True), ("prompt_len", np.int64, False))
COLUMNS = {  # batch kind -> (name, dtype, ragged)
    "lm": _EX,
    "pair": tuple((f"{side}.{n}", t, r) for side in ("chosen", "rejected") for n, t, r in _EX),
    "kto": _EX + (("label", np.bool_, False),),
    "prompt": (("ids", np.int32, True), ("answer", np.uint8, True), ("answer_none", np.bool_, False)),
}
TOKEN_COLUMNS = ("ids", "chosen.ids", "rejected.ids")  # what counts as the tokens of a set
_UTF8 = ("utf-8", "surrogatepass")


def _example(prefix: str, ex: Example) -> dict:
    for name, arr, dtype in (("ids", ex.ids, np.int32), ("weights", ex.weights, np.float32)):
        if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.ndim != 1:
            # The batcher would see other dtypes than the un-cached run: a bug in the encoder, not in the data.
            raise TypeError(f"Example.{name} must be a 1-D {np.dtype(dtype).name} array, got {arr!r}")
    return {prefix + "ids": ex.ids, prefix + "weights": ex.weights, prefix + "prompt_len": ex.prompt_len}


def row(kind: str, item) -> dict:
    """One item's column values."""
    if kind == "lm":
        return _example("", item)
    if kind == "pair":
        return {**_example("chosen.", item[0]), **_example("rejected.", item[1])}
    if kind == "kto":
        return {**_example("", item[0]), "label": bool(item[1])}
    ids, answer = item
    if not isinstance(ids, np.ndarray) or ids.dtype != np.int32:
        raise TypeError(f"prompt ids must be an int32 array, got {ids!r}")
    blob = np.frombuffer(("" if answer is None else answer).encode(*_UTF8), np.uint8)
    return {"ids": ids, "answer": blob, "answer_none": answer is None}


def write_chunk(kind: str, items: list, stem: Path) -> dict[str, int]:
    """Write `items` as raw column files `<stem>.<column>.bin` (ragged ones also `<stem>.<column>.len.bin`,
    int64 lengths); return each file's element count."""
    rows = [row(kind, it) for it in items]
    counts = {}
    for name, dtype, ragged in COLUMNS[kind]:
        values = [r[name] for r in rows]
        if ragged:
            lengths = np.asarray([len(v) for v in values], np.int64)
            flat = np.concatenate(values).astype(dtype, copy=False) if values else np.zeros(0, dtype)
            _raw(stem, f"{name}.len", lengths, counts)
            _raw(stem, name, flat, counts)
        else:
            _raw(stem, name, np.asarray(values, dtype).reshape(len(values)), counts)
    return counts


def _raw(stem: Path, name: str, arr: np.ndarray, counts: dict) -> None:
    with open(f"{stem}.{name}.bin", "wb") as f:
        f.write(np.ascontiguousarray(arr).tobytes())
    counts[name] = int(arr.size)


def files(kind: str, part: str) -> list[tuple[str, np.dtype]]:
    """The final array files of one set: (file name, dtype)."""
    out = []
    for name, dtype, ragged in COLUMNS[kind]:
        out.append((f"{part}.{name}.npy", np.dtype(dtype)))
        if ragged:
            out.append((f"{part}.{name}.offsets.npy", np.dtype(np.int64)))
    return out


class Mapped(Sequence):
    """The items of one set, built lazily from (memory-mapped) column arrays."""

    def __init__(self, kind: str, arrays: dict[str, np.ndarray]):
        # np.asarray: plain ndarray views of the maps, so slices are ndarrays like the encoder's (no copy).
        self.kind, self.a = kind, {k: np.asarray(v) for k, v in arrays.items()}
        self.n = len(self.a[COLUMNS[kind][-1][0]])

    def __len__(self) -> int:
        return self.n

    def _slice(self, name: str, i: int) -> np.ndarray:
        off = self.a[name + ".offsets"]
        return self.a[name][off[i] : off[i + 1]]

    def _ex(self, p: str, i: int) -> Example:
        return Example(
            self._slice(p + "ids", i), self._slice(p + "weights", i), int(self.a[p + "prompt_len"][i])
        )

    def __getitem__(self, i):
        i = operator.index(i)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"item {i} of {self.n}")
        if self.kind == "lm":
            return self._ex("", i)
        if self.kind == "pair":
            return self._ex("chosen.", i), self._ex("rejected.", i)
        if self.kind == "kto":
            return self._ex("", i), bool(self.a["label"][i])
        answer = None if self.a["answer_none"][i] else self._slice("answer", i).tobytes().decode(*_UTF8)
        return self._slice("ids", i), answer
