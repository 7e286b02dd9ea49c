"""Stage kto: the mismatched pairs its KL reference point is estimated from, their independence of the batch
width, and a run end to end.

Oracle for the bucketing test: the same rows padded to two widths (data.bucket_multiple 1 and 64) must give
the same loss, z0 and metrics, since right padding changes no real token's log-prob. Oracle for the run: with a fresh LoRA (B = 0) the policy is the reference, so r = 0 and z0 = 0 for every row
and the first step's loss is exactly 1 - σ(0) = 0.5 (desirable and undesirable weights 1).
"""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from alignment_helpers import tiny_run

from jaxtune.config import load_config
from jaxtune.data.batching import collate, pad_batch
from jaxtune.data.tokenize import Example
from jaxtune.methods import kto, reference
from jaxtune.methods.forward import LM
from jaxtune.models.hf import from_hf_config
from jaxtune.train.loop import run


def example(prompt, completion):
    ids = np.asarray(prompt + completion, np.int32)
    weights = np.asarray([0.0] * len(prompt) + [1.0] * len(completion), np.float32)
    return Example(ids, weights, len(prompt))


def test_mismatched_rows_pair_each_prompt_with_the_previous_rows_completion():
    """Row 0 = prompt 0 + completion of row 2 (cyclic), row 1 = prompt 1 + completion 0, ...; targets are
    shifted inside the new row and only the borrowed completion is trained. Row 2's result would be 9 tokens
    in an 8-token batch: it is cut, and its last kept token has no target."""
    rows = [
        example([5, 6, 7], [8, 9]),
        example([10, 11], [12, 13, 14]),
        example([20, 21, 22, 23, 24, 25], [26, 27]),
    ]
    tb = pad_batch(rows, bucket_multiple=8)
    out, ok = kto.mismatched(jax_batch(tb))
    np.testing.assert_array_equal(ok, [True, True, True])
    np.testing.assert_array_equal(out.input_ids[0], [5, 6, 7, 26, 27, 0, 0, 0])
    np.testing.assert_array_equal(out.input_ids[1], [10, 11, 8, 9, 0, 0, 0, 0])
    np.testing.assert_array_equal(out.input_ids[2], [20, 21, 22, 23, 24, 25, 12, 13])
    np.testing.assert_array_equal(out.targets[0], [6, 7, 26, 27, 0, 0, 0, 0])
    np.testing.assert_array_equal(out.loss_mask[0], [0, 0, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(out.loss_mask[1], [0, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(out.loss_mask[2], [0, 0, 0, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(out.segment_ids[1], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(out.positions[2], np.arange(8))


def test_mismatched_skips_empty_rows():
    """An eval batch padded with an empty row: neither the empty row nor the row borrowing from it counts."""
    tb = pad_batch(
        [example([5, 6], [7]), example([9, 10], [11, 12]), Example(np.zeros(0, np.int32), np.zeros(0), 0)], 4
    )
    out, ok = kto.mismatched(jax_batch(tb))
    np.testing.assert_array_equal(ok, [False, True, False])
    assert float(out.loss_mask[0].sum()) == 0.0 and float(out.loss_mask[2].sum()) == 0.0


def jax_batch(tb):
    return type(tb)(
        *(jnp.asarray(x) for x in (tb.input_ids, tb.targets, tb.loss_mask, tb.segment_ids, tb.positions))
    )


def test_kl_and_loss_do_not_depend_on_bucket_multiple():
    """Row 0's prompt (10 tokens) followed by row 3's completion (4) is 14 tokens, longer than any row (12):
    with bucket_multiple 1 the batch must still be wide enough for it (it was cut to 12 before, and z0, hence
    the loss, changed with the bucketing): kto_batch pads to the longest prompt plus the longest completion,
    10 + 9. Full fine-tuning with a frozen copy as the reference, perturbed so that z0 > 0."""
    rows = [
        (example(list(range(1, 11)), [11, 12]), True),
        (example([13, 14], list(range(15, 24))), False),
        (example([24, 25, 26], [27, 28, 29]), True),
        (example([30, 31, 32, 33], [34, 35, 36, 37]), False),
    ]
    model = from_hf_config(
        {"model_type": "llama", "vocab_size": 40, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}, rng=0,
    )  # fmt: skip
    leaves, treedef = jax.tree.flatten(model.params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    ref = jax.tree.unflatten(treedef, [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    variables = {"params": model.params, reference.REFERENCE: ref}  # a peaked, wrong reference: z0 > 0
    cfg = load_config({"stage": "kto"})
    loss_fn = jax.jit(lambda v, b: kto.loss_fn(LM(model.arch), v, b, None, cfg, train=False))

    results = {}
    for multiple in (1, 64):
        batch = collate("kto", [[r] for r in rows], 4, seq_len=128, bucket_multiple=multiple)
        assert batch.batch.input_ids.shape[1] == (19 if multiple == 1 else 64)
        kl_rows, _ = kto.mismatched(jax_batch(batch.batch))
        np.testing.assert_array_equal(kl_rows.input_ids[0, :14], list(range(1, 11)) + [34, 35, 36, 37])
        loss, sums = loss_fn(variables, batch)
        results[multiple] = {"loss_sum": loss, **sums}
    assert float(results[1]["kl"]) > 0.0
    assert float(results[1]["tokens"]) == float(results[64]["tokens"])
    for k in results[1]:
        np.testing.assert_allclose(results[1][k], results[64][k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_kto_trains_end_to_end_with_lora(tmp_path, kto_file):
    cfg = tiny_run(tmp_path, "kto", [kto_file], method={"name": "lora", "rank": 4, "target_modules": "all-linear"},
                   training={"max_steps": 3, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 2e-2})  # fmt: skip
    summary = run(load_config(cfg))
    assert summary["stop_reason"] == "completed"
    rows = [json.loads(line) for line in (Path(cfg["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if r["split"] == "train"}
    assert train[1]["loss"] == pytest.approx(0.5, abs=1e-5) and train[1]["kl"] == pytest.approx(0.0, abs=1e-4)
    metrics = (
        "loss",
        "kl",
        "rewards/chosen",
        "rewards/rejected",
        "margins",
        "logps/chosen",
        "logps/rejected",
    )
    assert all(math.isfinite(train[3][k]) for k in metrics)
    assert train[3]["kl"] >= 0.0 and train[3]["loss"] != train[1]["loss"]
