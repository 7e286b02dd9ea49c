"""`make_train_step`: one jitted, donated function per run — (state, frozen, batch) -> (state', metrics).

Every config choice is resolved before `jax.jit`. Gradients are taken w.r.t. `state.trainable` only, so no
weight gradient is ever computed for a frozen kernel. Gradient accumulation is a `lax.scan` over micro-batches
inside the step; each micro-batch's summed loss is divided by the *global* batch's denominator (trained
tokens for SFT), so accumulation equals one big batch exactly, uneven token counts included.

Sharded (`shardings=`, a `train.sharding.RunShardings`): the same function is jitted with explicit in/out
shardings — state and frozen weights as the rules place them, the batch split `batch -> (data, fsdp)`, metrics
replicated — and traced under the mesh, so the decoder's logical activation constraints apply. It is still one
SPMD program over the *global* batch: the denominator is a global sum and the gradient of the global summed
loss is reduced across data-parallel replicas by XLA, so every mesh computes the single-device step's numbers
(tests/parallel/test_sharded_training.py checks this on 8 devices).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import optax

from jaxtune.parallel.rules import constrain
from jaxtune.peft.plan import merge_variables
from jaxtune.train.state import TrainState


def micro_batches(batch, accum: int):
    """[B, ...] -> [accum, B / accum, ...] taking rows i, i + accum, ... so each micro-batch keeps the
    batch-axis sharding (every device contributes rows to every micro-batch)."""

    def split(x):
        return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def _tracing_mesh(shardings):
    """The mesh the step is traced under (`set_mesh` is not allowed inside jit; the abstract mesh is)."""
    if shardings is None:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(shardings.mesh.abstract_mesh)


def _jit(fn, shardings, in_shardings, out_shardings, **kw):
    if shardings is None:
        return jax.jit(fn, **kw)

    def traced(*args):
        with _tracing_mesh(shardings):
            return fn(*args)

    return jax.jit(traced, in_shardings=in_shardings, out_shardings=out_shardings, **kw)


def make_train_step(method, lm, cfg, optimizer, lr_schedule, accum: int = 1, shardings=None):
    """`step(state, frozen, batch) -> (state', metrics)`, jitted once, `state` donated, `frozen` not."""
    nan_policy = cfg.training.nan_policy

    def micro_loss(trainable, frozen, mb, rng, denom):
        loss_sum, sums = method.loss_fn(lm, merge_variables(frozen, trainable), mb, rng, cfg)
        return loss_sum / denom, sums

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, frozen, batch):
        denom = jnp.maximum(method.denominator(batch).astype(jnp.float32), 1.0)
        rng, step_rng = jax.random.split(state.rng)

        def body(grads, xs):
            mb, i = xs
            # keep every device's rows in every micro-batch (a no-op without a mesh)
            mb = jax.tree.map(lambda x: constrain(x, ("batch",)), mb)
            (_, sums), g = grad_fn(state.trainable, frozen, mb, jax.random.fold_in(step_rng, i), denom)
            return jax.tree.map(jnp.add, grads, g), sums

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.trainable)
        grads, sums = jax.lax.scan(body, zeros, (micro_batches(batch, accum), jnp.arange(accum)))
        sums = jax.tree.map(lambda s: s.sum(0), sums)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.trainable)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = method.finalize(sums, denom)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        if nan_policy == "skip":
            # keep the previous weights and optimiser moments when this step's loss or gradient is not finite
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            trainable, opt_state = keep(trainable, state.trainable), keep(opt_state, state.opt_state)
        metrics.update(grad_norm=grad_norm, lr=lr_schedule(state.step), finite=finite)
        new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, rng=rng)
        return new, metrics

    if shardings is None:
        return _jit(step, None, None, None, donate_argnums=(0,))
    ins = (shardings.state, shardings.frozen, shardings.batch)
    return _jit(step, shardings, ins, (shardings.state, shardings.replicated), donate_argnums=(0,))


def make_eval_step(method, lm, cfg, shardings=None):
    """Metric sums over one batch (no gradients, no dropout); the loop adds them up and finalises."""

    def step(trainable, frozen, batch):
        _, sums = method.loss_fn(lm, merge_variables(frozen, trainable), batch, None, cfg, train=False)
        return sums, method.denominator(batch).astype(jnp.float32)

    if shardings is None:
        return _jit(step, None, None, None)
    ins = (shardings.state.trainable, shardings.frozen, shardings.batch)
    return _jit(step, shardings, ins, shardings.replicated)
