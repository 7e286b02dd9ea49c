"""The train state: everything a step changes, and nothing it does not (frozen weights are an argument)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxtune.peft.prompts import materialize


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser steps taken
    trainable: dict  # collections dict: {"params": subset} for full/BitFit/freeze, {"lora": ...} for adapters
    opt_state: object
    rng: jax.Array  # raw uint32 key (checkpointable as a plain array)


def create(trainable: dict, optimizer, seed: int, shardings: TrainState | None = None) -> TrainState:
    """Step 0. With `shardings` (a TrainState of `NamedSharding`s, `train.sharding.run_shardings`), `trainable`
    is placed in its shards and the optimiser state is created directly in its own (never whole on one device).
    """
    if shardings is None:
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            trainable=trainable,
            opt_state=optimizer.init(trainable),
            rng=jax.random.PRNGKey(seed),
        )
    from jaxtune.train.sharding import place

    trainable = place(trainable, shardings.trainable)
    init = jax.jit(optimizer.init, in_shardings=(shardings.trainable,), out_shardings=shardings.opt_state)
    scalars = jax.jit(
        lambda: (jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed)), out_shardings=(shardings.step, shardings.rng)
    )
    step, rng = scalars()
    return TrainState(step=step, trainable=trainable, opt_state=init(trainable), rng=rng)


def merge_variables(frozen: dict, trainable: dict) -> dict:
    """Deep-merge two collection dicts into the variables `Decoder.apply` takes.

    The two hold disjoint leaves: {"params": base-minus-trainable} + {"params": trainable-subset, "lora": ...}.
    """

    def merge(a, b):
        if not isinstance(a, dict) or not isinstance(b, dict):
            raise ValueError("frozen and trainable variables overlap at a leaf")
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if k in out else v
        return out

    # P-tuning / prefix-projection encoders -> the virtual tokens / prefixes the model reads, computed here so
    # that gradients reach the encoder parameters (identity for every other method)
    return materialize(merge(frozen, trainable))
