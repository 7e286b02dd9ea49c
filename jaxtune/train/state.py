"""The train state: everything a step changes, and nothing it does not (frozen weights are an argument)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxtune.parallel.distributed import place


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
    trainable = place(trainable, shardings.trainable)
    init = jax.jit(optimizer.init, in_shardings=(shardings.trainable,), out_shardings=shardings.opt_state)
    scalars = jax.jit(
        lambda: (jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed)), out_shardings=(shardings.step, shardings.rng)
    )
    step, rng = scalars()
    return TrainState(step=step, trainable=trainable, opt_state=init(trainable), rng=rng)
