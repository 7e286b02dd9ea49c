"""Batches: shifted targets, packing equivalence and efficiency, bucketing, left padding, truncation."""

from __future__ import annotations

import logging

import chex
import numpy as np

from jaxtune import data
from jaxtune.data import batching
from jaxtune.data.items import Encoder
from jaxtune.data.pipeline import iterators
from jaxtune.data.tokenize import Example


def ex(ids, trained_from: int, weight: float = 1.0) -> Example:
    ids = np.asarray(ids, np.int32)
    w = np.where(np.arange(len(ids)) >= trained_from, weight, 0.0).astype(np.float32)
    return Example(ids, w, trained_from)


def test_token_batch_shifts_inside_segments():
    """Row [a a a | b b] packed into T=8: targets are the next token of the same document only.

    doc a = [11, 12, 13] with 12, 13 trained; doc b = [21, 22] with 22 trained (weight 2):
      input_ids   11 12 13 21 22  0  0  0
      targets     12 13  0 22  0  0  0  0   (13 -> 21 would cross documents: no target)
      loss_mask    1  1  0  2  0  0  0  0   (weight of the target token)
      segment_ids  1  1  1  2  2  0  0  0
      positions    0  1  2  0  1  0  0  0
    """
    b = batching.token_batch([[ex([11, 12, 13], 1), ex([21, 22], 1, 2.0)]], 8)
    np.testing.assert_array_equal(b.input_ids[0], [11, 12, 13, 21, 22, 0, 0, 0])
    np.testing.assert_array_equal(b.targets[0], [12, 13, 0, 22, 0, 0, 0, 0])
    np.testing.assert_array_equal(b.loss_mask[0], [1, 1, 0, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(b.segment_ids[0], [1, 1, 1, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(b.positions[0], [0, 1, 2, 0, 1, 0, 0, 0])
    chex.assert_type(
        [b.input_ids, b.targets, b.segment_ids, b.positions, b.loss_mask], [np.int32] * 4 + [np.float32]
    )


def test_left_padding_for_generation():
    b = batching.pad_batch([ex([5, 6, 7], 3), ex([8], 1)], bucket_multiple=4, pad_side="left")
    np.testing.assert_array_equal(b.input_ids, [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(b.positions, [[0, 0, 1, 2], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b.segment_ids, [[0, 1, 1, 1], [0, 0, 0, 1]])


def alpaca_examples(tok, shared_dir, cutoff_len=2048, n=None):
    records = data.load(shared_dir / "alpaca_en_demo.json")[:n]
    enc = Encoder(tok, "lm", cutoff_len=cutoff_len)
    return [it for r in records for it in enc(r)]


def test_packed_segments_equal_unpacked_samples(chatml_tok, shared_dir):
    """Each packed segment's (input_ids, targets, loss_mask, positions) equals its sample padded alone."""
    exs = alpaca_examples(chatml_tok, shared_dir, n=60)
    rows = [[exs[i] for i in row] for row in batching.pack([len(e) for e in exs], 1024)]
    packed = batching.token_batch(rows, 1024)
    seen = 0
    for r, row in enumerate(rows):
        t = 0
        for s, e in enumerate(row, start=1):
            alone = batching.token_batch([[e]], len(e))
            sl = slice(t, t + len(e))
            assert (packed.segment_ids[r, sl] == s).all()
            for name in ("input_ids", "targets", "loss_mask", "positions"):
                np.testing.assert_array_equal(
                    getattr(packed, name)[r, sl], getattr(alone, name)[0], err_msg=name
                )
            t += len(e)
            seen += 1
        assert (packed.segment_ids[r, t:] == 0).all() and (packed.loss_mask[r, t:] == 0).all()
    assert seen == len(exs)
    # Trained targets are exactly the response tokens of each sample (unshifted labels, shifted by one).
    e = exs[0]
    alone = batching.token_batch([[e]], len(e))
    assert alone.loss_mask[0].sum() == e.weights[1:].sum() == (np.asarray(data.encode(
        data.load(shared_dir / "alpaca_en_demo.json")[0], chatml_tok)[1]) != -100).sum()  # fmt: skip


def test_packing_efficiency_alpaca_2048(chatml_tok, shared_dir):
    records = data.load(shared_dir / "alpaca_en_demo.json")
    it = iterators(str(shared_dir / "alpaca_en_demo.json"), chatml_tok, 4, "lm", cutoff_len=2048, packing=True,
                   epochs=1)  # fmt: skip
    batches = list(it.train)
    assert all(b.input_ids.shape == (4, 2048) for b in batches)
    print(
        f"\npacking efficiency on the Alpaca demo at 2048: {it.train.efficiency:.2%} over {len(batches)} batches"
    )
    assert it.train.efficiency >= 0.95
    # Every sample is in some row: yielded, or in the incomplete last batch that training drops.
    docs = sum(int(b.segment_ids.max(axis=1).sum()) for b in batches)
    assert docs + it.train.dropped_items == len(records) and it.train.dropped_rows < 4


def test_bucketed_lengths_give_few_shapes(chatml_tok, shared_dir):
    it = iterators(str(shared_dir / "alpaca_en_demo.json"), chatml_tok, 8, "lm", cutoff_len=1000,
                   bucket_multiple=128, epochs=1).train  # fmt: skip
    shapes = {b.input_ids.shape[1] for b in it}
    assert all(t % 128 == 0 or t == 1000 for t in shapes)  # multiples of 128, capped at cutoff_len
    assert len(shapes) <= 8
    assert batching.bucket_len(65, 64) == 128 and batching.bucket_len(990, 64, cap=1000) == 1000


def test_truncation_cuts_prompt_first_and_warns(llama3_tok, caplog):
    long_prompt = " ".join(["word"] * 300)
    rec = data.Conversation(
        (data.Message("user", long_prompt), data.Message("assistant", "short answer")), file="f", row=0
    )
    full = Encoder(llama3_tok, "lm", cutoff_len=10_000)(rec)[0]
    with caplog.at_level(logging.WARNING, logger="jaxtune.data"):
        (cut,) = Encoder(llama3_tok, "lm", cutoff_len=64)(rec)
    assert len(cut) == 64
    resp = len(full) - full.prompt_len
    np.testing.assert_array_equal(cut.ids[-resp:], full.ids[-resp:])  # response kept whole
    np.testing.assert_array_equal(cut.weights[-resp:], full.weights[-resp:])
    assert cut.ids[0] == llama3_tok.bos_token_id  # BOS kept, oldest prompt tokens cut
    np.testing.assert_array_equal(
        cut.ids[1 : 64 - resp], full.ids[full.prompt_len - (63 - resp) : full.prompt_len]
    )
    # The pipeline counts and logs it.
    import json
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write(json.dumps({"instruction": long_prompt, "input": "", "output": "short answer"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="jaxtune.data"):
        it = iterators(f.name, llama3_tok, 1, "lm", cutoff_len=64).train
    assert it.report.truncated == 1 and "1 samples were longer than cutoff_len=64" in caplog.text


def test_truncation_keeps_a_minimum_prompt_when_the_response_is_huge():
    e = ex(np.arange(1, 101), 20)  # 20 prompt tokens, 80 response tokens
    cut = batching.truncate(e, 40)
    assert len(cut) == 40 and cut.prompt_len == 10  # a quarter of the budget stays prompt
    np.testing.assert_array_equal(cut.ids, np.r_[11:21, 21:51])


def test_pretraining_documents_are_chunked(chatml_tok, shared_dir):
    it = iterators(str(shared_dir / "c4_demo.jsonl"), chatml_tok, 2, "text", cutoff_len=128,
                   packing=True, epochs=1).train  # fmt: skip
    b = next(it)
    assert b.input_ids.shape == (2, 128) and it.report.chunked > 0
    assert (b.loss_mask[b.segment_ids > 0].mean()) > 0.9  # every non-final token of a document is a target


def test_prompt_and_preference_batches():
    pb = batching.prompt_batch([(np.array([1, 2, 3], np.int32), "4"), (np.array([5], np.int32), None)], 4)
    np.testing.assert_array_equal(pb.prompts.input_ids, [[0, 1, 2, 3], [0, 0, 0, 5]])
    assert pb.answers == ("4", None) and pb.prompts.loss_mask.sum() == 0
    pair = batching.preference_batch([(ex([1, 2, 3], 2), ex([1, 2, 3, 4, 5], 2))], 4)
    assert pair.chosen.input_ids.shape == pair.rejected.input_ids.shape == (1, 8)
