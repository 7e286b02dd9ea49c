"""Cleaning: normalisation, empty and duplicate removal, splits, length filters, mixture ratios."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from jaxtune.data import dedup, prepare
from jaxtune.data.items import Encoder
from jaxtune.data.order import MemoryOrder
from jaxtune.data.records import Conversation, Message, Text


def chat(q: str, a: str, row: int = 0) -> Conversation:
    return Conversation((Message("user", q), Message("assistant", a)), file="f", row=row)


def test_normalisation():
    rec = chat("  Cafe\u0301\r\nline two \r\n", "\ufeffanswer\r")
    out = prepare.normalize(rec)
    assert out.messages[0].content == "Caf\u00e9\nline two" and out.messages[1].content == "answer"
    assert prepare.normalize(Text("  x\r\ny  ")).text == "x\ny"


def test_empty_and_exact_duplicates_are_filtered_and_counted():
    recs = [chat("q", "a", 0), chat("Q ", " a", 1), chat("q2", "   ", 2), chat("q3", "b", 3), Text("", row=4)]
    kept, report = prepare.clean(recs, dedup="exact")
    assert [r.row for r in kept] == [0, 3]
    assert report.filtered == {"empty": 2, "exact duplicate": 1} and (report.loaded, report.kept) == (5, 2)
    assert any("exact duplicate" in line for line in report.lines())


def test_near_duplicates():
    base = " ".join(f"word{i}" for i in range(200))
    edited = base.replace("word100", "changed")  # one word of 200 differs
    other = " ".join(f"other{i}" for i in range(200))
    assert dedup.near_duplicates([base, other, edited]) == [2]
    kept, report = prepare.clean([Text(base, row=0), Text(other, row=1), Text(edited, row=2)], dedup="near")
    assert [r.row for r in kept] == [0, 1] and report.filtered["near duplicate"] == 1
    # Chinese text without spaces is shingled by characters.
    zh = "细胞理论是生物科学的一个理论，它认为所有生命体都是由微小的基本单元细胞所构成。" * 3
    assert dedup.near_duplicates([zh, zh.replace("生物", "生命", 1)]) == [1]


def test_split_by_ratio_and_count():
    recs = list(range(100))
    train, val, test = prepare.split(recs, 0.1, 0.05, seed=0)
    assert (len(train), len(val), len(test)) == (85, 10, 5)
    assert sorted(train + val + test) == recs and train == sorted(train)
    train2, val2, _ = prepare.split(recs, 7, seed=0)
    assert len(val2) == 7 and prepare.split(recs, 0.1, 0.05, seed=0) == (train, val, test)
    with pytest.raises(ValueError, match="no training data"):
        prepare.split(recs, 100)


def test_length_filters(chatml_tok):
    long = chat("q " * 200, "a")
    short, ok = chat("hi", "yo"), chat("hello there, how are you?", "fine, thank you")
    n_short = len(Encoder(chatml_tok, "lm")(short)[0])
    enc = Encoder(chatml_tok, "lm", cutoff_len=64, overlength="drop", min_length=n_short + 1)
    assert enc(long) == [] and enc(short) == [] and len(enc(ok)) == 1
    assert enc.report.filtered == {
        "longer than cutoff_len=64": 1,
        f"shorter than min_length={n_short + 1}": 1,
    }


def test_mixture_ratios_and_oversampling():
    big, small = list(range(1000)), [f"s{i}" for i in range(50)]
    order = MemoryOrder([big, small], ratios=[0.8, 0.2], seed=0, window=10_000)
    epoch = order.epoch_order(0)
    counts = collections.Counter(epoch[:, 0].tolist())
    assert len(epoch) == 1050 and abs(counts[1] / 1050 - 0.2) < 0.03  # drawn by ratio
    small_idx = epoch[epoch[:, 0] == 1, 1]
    assert counts[1] > 50 and set(small_idx.tolist()) == set(range(50))  # cycled: every item, several times
    assert not np.array_equal(order.epoch_order(1), epoch)  # a new order every epoch
