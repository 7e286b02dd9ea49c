"""The reference policy of DPO-style losses (DPO, IPO, hinge, robust, KTO; PPO and GRPO can use the same).

Three ways to get reference log-probs, picked by `reference_mode`:

- `adapters_off` (PEFT runs, the default there): the same base weights applied without the adapter collections
  (`methods.forward.without_adapters`). No second copy of the weights; exactly the base model's log-probs.
- `frozen_copy` (full fine-tuning, BitFit, freeze-tuning): a copy of the *trainable* base leaves as they were
  before step 1, stored in the frozen variables under the collection `reference`; the rest of the base is
  frozen anyway and shared. Costs one extra copy of the trained leaves (TRL keeps a whole second model).
- `precomputed` (`dpo.precompute_ref_log_probs`): one pass over every train and eval row before training
  (TRL's `precompute_ref_log_probs`); the results are stored per row, keyed by a hash of the row's tokens and
  loss weights, and attached to each batch (`WithReference`), so training holds no reference weights at all and
  shuffling, epochs and resume need no bookkeeping (a row's reference log-prob depends only on its tokens).

The reference pass always runs in eval mode (no dropout) under `stop_gradient`.
"""

from __future__ import annotations

import hashlib
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.config import config_error
from jaxtune.errors import RunError
from jaxtune.models.adapters_hook import without_adapters

log = logging.getLogger("jaxtune.train")

REFERENCE = "reference"  # frozen collection holding the initial values of the trainable base leaves


def reference_mode(cfg, trainable: dict) -> str:
    """'adapters_off' | 'frozen_copy' | 'precomputed' for a run (RunConfig `cfg`) whose trainable collections
    are `trainable`."""
    dpo_cfg = cfg.dpo
    trains_base = "params" in trainable
    if dpo_cfg.reference == "adapters_off" and trains_base:
        raise config_error(
            cfg, "dpo.reference",
            "dpo.reference=adapters_off: this run trains base parameters (full, BitFit, freeze-tuning or "
            "method.trainable_patterns), so the model without adapters is not the initial model; use "
            "dpo.reference=frozen_copy (or auto)", RunError,
        )  # fmt: skip
    if dpo_cfg.precompute_ref_log_probs:
        return "precomputed"
    return "frozen_copy" if trains_base else "adapters_off"


def add_frozen_copy(frozen: dict, trainable: dict) -> dict:
    """`frozen` plus a real copy (the train state is donated, so aliases would die) of the trainable base leaves."""
    copy = jax.tree.map(jnp.copy, trainable["params"])
    return {**frozen, REFERENCE: copy}


def _overlay(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _overlay(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def split(variables: dict) -> tuple[dict, dict]:
    """(policy variables, reference variables) from what the train step passes to a loss.

    The policy never sees the `reference` collection; the reference is the policy's base with the initial
    trainable leaves put back (frozen copy) and every adapter collection dropped."""
    policy = {k: v for k, v in variables.items() if k != REFERENCE}
    ref = without_adapters(policy)
    if REFERENCE in variables:
        ref = {**ref, "params": _overlay(ref["params"], variables[REFERENCE])}
    return policy, jax.tree.map(jax.lax.stop_gradient, ref)


# ------------------------------------------------------------------------------------------- precomputed


def row_keys(*batches) -> list[bytes]:
    """One key per row over the given TokenBatches (e.g. chosen and rejected): the real tokens and loss weights.

    Padding is excluded, so the same row bucketed to another length has the same key."""
    keys = []
    for i in range(batches[0].input_ids.shape[0]):
        h = hashlib.blake2b(digest_size=16)
        for tb in batches:
            n = int((np.asarray(tb.segment_ids[i]) > 0).sum())
            h.update(np.asarray(tb.input_ids[i, :n], np.int32).tobytes())
            h.update(np.asarray(tb.loss_mask[i, :n], np.float32).tobytes())
            h.update(b"|")
        keys.append(h.digest())
    return keys


class WithReference:
    """An iterator of batches with their precomputed reference values attached by `attach(batch, values)`.

    Everything else (get_state / set_state / steps_per_epoch / seed ...) is the wrapped iterator's."""

    def __init__(self, it, table: dict, parts, attach):
        self.it, self.table, self.parts, self.attach = it, table, parts, attach
        self.empty = np.zeros_like(next(iter(table.values()))) if table else np.zeros(0, np.float32)

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        values = []
        parts = self.parts(batch)
        real = (np.asarray(parts[0].segment_ids) > 0).any(-1)  # eval batches are padded with empty rows
        for key, is_real in zip(row_keys(*parts), real):
            if not is_real:
                values.append(self.empty)  # no pair: masked out of every sum (`pair_mask`)
                continue
            if key not in self.table:
                raise RunError(
                    "a batch row has no precomputed reference log-prob (the data changed after the reference "
                    "pass?); rerun without resuming, or set dpo.precompute_ref_log_probs=false"
                )  # fmt: skip
            values.append(self.table[key])
        return self.attach(batch, np.asarray(values, np.float32))

    def __getattr__(self, name):
        return getattr(self.it, name)


def all_rows(*iterators) -> list:
    """Every item the given in-memory iterators can yield (train items of all sources, eval items)."""
    items = []
    for it in iterators:
        if it is None:
            continue
        datasets = getattr(it.order, "datasets", None)
        if datasets is None:
            raise RunError(
                "dpo.precompute_ref_log_probs needs the whole dataset in memory: set data.streaming=false, or "
                "turn precomputation off (the reference is then computed every step)"
            )  # fmt: skip
        items += [item for d in datasets for item in d]
    return items


def precompute(fn, variables, template_it, items: list, batch_size: int, parts) -> dict:
    """{row key: fn(variables, batch)[row]} over `items`, batched like `template_it` (one pass, no drop).

    `fn(variables, batch) -> [B, K]` is jitted once per bucketed shape; `parts(batch)` gives the TokenBatches
    a row key is made of."""
    from jaxtune.data.iterator import BatchIterator
    from jaxtune.data.order import MemoryOrder

    it = BatchIterator(
        MemoryOrder([items], shuffle=False), template_it.kind, batch_size, seq_len=template_it.seq_len,
        bucket_multiple=template_it.bucket_multiple, shuffle=False, epochs=1, drop_last=False,
    )  # fmt: skip
    jitted = jax.jit(fn)
    table = {}
    for batch in it:
        values = np.asarray(jax.device_get(jitted(variables, batch)))
        tbs = parts(batch)
        for key, row, seg in zip(row_keys(*tbs), values, np.asarray(tbs[0].segment_ids)):
            if (seg > 0).any():  # the last batch is padded with empty rows
                table[key] = row
    log.info("precomputed reference log-probs for %d distinct rows (%d items)", len(table), len(items))
    return table
