"""Virtual-token methods see each sample exactly as alone, however the batch is laid out.

Two documents (5 and 7 tokens) are scored unpadded one at a time, left-padded together in one [2, 7] batch,
and packed into one [1, 12] row (segment ids 1 and 2). Per document, the summed token loss must agree: the
virtual tokens / prefixes are visible to every document and to no padding, real positions start after them
in every document (HF numbers tokens after P virtual ones), and the label mask covers real tokens only.
"""

import jax
import numpy as np
import pytest
from peft_helpers import FAST, token_batch

from jaxtune import peft
from jaxtune.data.batch import TokenBatch
from jaxtune.methods.forward import LM
from jaxtune.peft import merge_variables

# P-tuning reaches the model as prompt tuning's embeddings (its encoder runs before the decoder), and LoRA + prefix
# as prefix tuning's keys / values: the decoder paths below cover them.
METHODS = {
    "prompt": {"method": "prompt", "num_virtual_tokens": 3},
    "prefix_projection": {"method": "prefix", "num_virtual_tokens": 3, "prefix_projection": True},
    "ptuning_v2": {"method": "ptuning_v2", "num_virtual_tokens": 3},
}
LENGTHS = (5, 7)


def _docs():
    rng = np.random.RandomState(0)
    return [rng.randint(1, 64, n).astype(np.int32) for n in LENGTHS]


def _batch(rows_ids, rows_seg) -> TokenBatch:
    """Token ids and segment ids per row -> a TokenBatch whose targets stay inside each document."""
    seg = np.asarray(rows_seg, np.int32)
    b = token_batch(seg)
    ids = np.asarray(rows_ids, np.int32)
    same_next = np.zeros_like(seg, bool)
    same_next[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    targets = np.where(same_next, np.roll(ids, -1, 1), 0).astype(np.int32)
    return TokenBatch(ids, targets, same_next.astype(np.float32), seg, b.positions)


def layouts():
    """{layout: (batch, [(row, segment id) of document 0, of document 1])}."""
    (a, b), (na, nb) = _docs(), LENGTHS
    width = max(LENGTHS)
    left = [[0] * (width - na) + list(a), [0] * (width - nb) + list(b)]
    left_seg = [[0] * (width - na) + [1] * na, [0] * (width - nb) + [1] * nb]
    return {
        "alone_0": (_batch([a], [[1] * na]), [(0, 1), None]),
        "alone_1": (_batch([b], [[1] * nb]), [None, (0, 1)]),
        "left_padded": (_batch(left, left_seg), [(0, 1), (1, 1)]),
        "packed": (_batch([list(a) + list(b)], [[1] * na + [2] * nb]), [(0, 1), (0, 2)]),
    }


def doc_losses(plan, trainable, batch, where) -> list:
    """Summed token NLL of each document, through the trainer's variables (encoders materialised)."""
    lm = LM(plan.arch)

    def nll(trainable, frozen, batch):
        stats = lm.stats(merge_variables(frozen, trainable), batch)
        return -stats.logp * batch.loss_mask  # [B, T]

    compiled = jax.jit(nll).trace(trainable, plan.frozen, batch).lower().compile(FAST)
    per_token = np.asarray(compiled(trainable, plan.frozen, batch))
    return [None if w is None else per_token[w[0]][batch.segment_ids[w[0]] == w[1]].sum() for w in where]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_padding_and_packing_give_each_document_its_own_loss(name, llama):
    plan = peft.prepare(llama, METHODS[name], 0)
    # move prompts / prefixes / encoders off init so that a wrongly visible or missing virtual token shows
    trainable = jax.tree.map(lambda x: x * 1.5 + 0.1, plan.trainable)
    got = {layout: doc_losses(plan, trainable, batch, where) for layout, (batch, where) in layouts().items()}
    alone = [got["alone_0"][0], got["alone_1"][1]]
    for layout in ("left_padded", "packed"):
        np.testing.assert_allclose(got[layout], alone, rtol=2e-5, err_msg=layout)
    # the virtual tokens matter: without them each document's loss is different
    if "without" not in _base:
        base = peft.prepare(llama, {"method": "full"}, 0)
        _base["without"] = doc_losses(base, base.trainable, *layouts()["packed"])
    assert np.all(np.abs(np.asarray(_base["without"]) - np.asarray(alone)) > 1e-3)


_base = {}
