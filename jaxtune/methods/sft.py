"""Supervised fine-tuning and continued pre-training (stages `sft` and `pt`): masked token cross-entropy.

The loss is normalised per trained token over the whole optimiser step — all accumulation micro-batches and
all data-parallel replicas — not as a mean of per-micro-batch means, which would over-weight short batches.
The step divides the summed token losses by `denominator(batch)` of the full global batch.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxtune.data.batch import TokenBatch
from jaxtune.methods.forward import with_moe
from jaxtune.methods.logps import token_losses
from jaxtune.methods.record import Method


def denominator(batch: TokenBatch):
    """Trained tokens (weighted by loss_mask) in the batch."""
    return batch.loss_mask.sum()


def loss_fn(lm, variables, batch: TokenBatch, rng, cfg, train: bool = True):
    """(sum of weighted token losses, metric sums). `cfg` is the run config (z-loss, label smoothing)."""
    stats, moe_losses = lm.stats_moe(variables, batch, rng, train=train)
    mask = batch.loss_mask.astype(jnp.float32)
    losses = token_losses(stats, cfg.training.label_smoothing, cfg.training.z_loss)
    loss = (losses * mask).sum()
    sums = {
        "loss": loss,
        "nll": (-stats.logp * mask).sum(),
        "accuracy": (stats.correct * mask).sum(),
    }
    return with_moe(lm.arch, moe_losses, loss, sums, denominator(batch))


PT = Method("pt", "text", loss_fn, denominator)  # continued pre-training: every token of the text trains
SFT = Method("sft", "lm", loss_fn, denominator)  # the prompt is masked (data.train_on_prompt to train it)
