"""`jaxtune train` for the RL stages (ppo, grpo): rollouts from the policy, then clipped policy updates.

    build_run (model, PEFT plan, the method's prepare: reference, rollout context; optimiser, jitted step,
    resume) -> per iteration: prompts -> method.rl.rollout (sample with the KV cache, reward, old / reference
    log-probs, advantages)
    -> epochs x shuffled mini-batches of `train_step` -> log / checkpoint;  SIGTERM / SIGINT -> checkpoint
    -> exit;  at the end: eval reward of greedy answers (before vs after) and export.

The update is train/step.py's `make_train_step` over the rollout's batch pytree (the method record's `loss_fn`,
`denominator`, `finalize`); signals, save cadence and the end (export, curves.png) are train/lifecycle.py's,
shared with the SFT-family loop. One rollout
iteration is one "step" of `training.max_steps` (or of `num_epochs` over the prompts) and of `save_every`; the
learning-rate schedule runs over the optimiser updates, `epochs x rows / mini_batch` per iteration. Rollout
randomness is `fold_in(seed, iteration)` and mini-batch order `(seed, iteration, epoch)`, so a resumed run
repeats an uninterrupted one. The reference policy is the base with adapters off under PEFT, and a frozen copy
of the trained leaves under full fine-tuning / BitFit / freeze-tuning (methods/reference.py).

Devices: one process, on the mesh `parallel` describes (as the SFT loop): the base is loaded into its shards,
train state and frozen weights are placed by `run_shardings`, and each mini-batch is split `batch -> (data,
fsdp)` into the sharded `train_step`. Rollouts (sampling, rewards, old / reference log-probs) are plain `jax.jit`
over the same sharded variables, so XLA propagates their layout; their results come back whole to the host
(one process: every shard is addressable). Several processes (multi-host) are refused up front for now.
"""

from __future__ import annotations

import logging
import time

import jax
import numpy as np

from jaxtune.errors import NonFiniteLoss
from jaxtune.methods import rollout as ro
from jaxtune.peft import merge_variables
from jaxtune.train.lifecycle import Signals, due, finish, interrupted
from jaxtune.train.metrics import MetricsWriter
from jaxtune.train.run import Run, build_run
from jaxtune.train.sharding import global_batch
from jaxtune.train.status import RunStatus

log = logging.getLogger("jaxtune.train")


def rows(tree, idx):
    """The rows `idx` of every array of a batch pytree."""
    return jax.tree.map(lambda x: np.asarray(x)[idx], tree)


def eval_reward(ctx, variables, eval_it, n: int) -> float | None:
    """Mean reward of greedy completions to the first `n` eval prompts (the same prompts every time)."""
    if eval_it is None or not n:
        return None
    eval_it.set_state({"epoch": 0, "window": 0, "row": 0, "cursor": None, "seed": eval_it.seed})
    policy, _ = ro.policy_and_reference(variables)
    values: list[float] = []
    for prompts in eval_it:
        real = np.flatnonzero(np.asarray(prompts.prompts.segment_ids).any(-1))[: n - len(values)]
        if real.size == 0:
            break
        tokens = rows(prompts.prompts, real)
        prompts = prompts.replace(prompts=tokens, answers=tuple(prompts.answers[i] for i in real))
        ids, mask, out, keep = ro.sample_completions(ctx, policy, tokens, jax.random.PRNGKey(0), greedy=True)
        values += ro.rewards(ctx, prompts, ids, mask, out, keep).tolist()
        if len(values) >= n:
            break
    return float(np.mean(values)) if values else None


def run(cfg) -> dict:
    """Train stage ppo / grpo as `cfg` says (`build_run` + `train`), recorded in status.json (train/status.py)."""
    with RunStatus(cfg) as status:
        return status.end(train(status.built(build_run(cfg))))
    return status.summary  # SIGTERM outside the iterations: stopped, resumable


def train(run: Run) -> dict:
    """Rollout iterations over a built RL run. Returns a summary (eval reward before / after, last metrics)."""
    cfg, t, ckpt, ctx, rl, sched = run.cfg, run.cfg.training, run.checkpointer, run.context, run.method.rl, run.schedule
    state, frozen, meta, steps = run.state, run.frozen, run.meta, run.steps
    rng = jax.random.PRNGKey(cfg.seed)
    start = run.resumed or 0
    summary = {"run_dir": str(run.run_dir), "steps": steps}
    if run.resumed is None:
        before = eval_reward(ctx, merge_variables(frozen, state.trainable), run.eval_it, t.eval_generate)
        summary["eval_reward_before"] = before
        if before is not None:
            log.info("eval reward of greedy answers before training: %.4f", before)

    writer = MetricsWriter(run.run_dir, cfg.logging, steps, start, enabled=run.main)
    stop_reason, metrics = "completed", {}
    batches = iter(run.train_it)
    t0, it = time.perf_counter(), start
    with Signals() as signals:
        for it in range(start + 1, steps + 1):
            prompts = next(batches)
            variables = merge_variables(frozen, state.trainable)
            batch, stats = rl.rollout(ctx, variables, prompts, jax.random.fold_in(rng, it), cfg, meta)
            updates_metrics = []
            for epoch in range(sched.epochs):
                order = np.random.default_rng([cfg.seed, it, epoch]).permutation(sched.rows)
                for lo in range(0, sched.rows, sched.mini_batch):
                    idx = order[lo : lo + sched.mini_batch]
                    state, out = run.train_step(state, frozen, global_batch(rows(batch, idx), run.mesh))
                    updates_metrics.append(jax.device_get(out))
            if it == start + 1:
                log.info("first iteration (incl. compilation) took %.1f s", time.perf_counter() - t0)
            if not all(u.pop("finite") for u in updates_metrics) and t.nan_policy == "stop":
                raise NonFiniteLoss(f"non-finite loss at rollout iteration {it}; last checkpoint: {ckpt.dir}")
            metrics = {k: float(np.mean([u[k] for u in updates_metrics])) for k in updates_metrics[0]}
            metrics.update(stats)
            if rl.update_meta is not None:  # PPO's adaptive KL controller
                rl.update_meta(meta, stats, cfg)
                metrics["kl_coef"] = meta["kl_coef"]
            writer.progress(it, metrics, metrics.get("tokens", 0.0))
            if it % cfg.logging.log_every == 0 or it == steps:
                writer.write(it, metrics)
            meta["history"].append(round(stats["reward"], 6))
            if signals.received:
                stop_reason = f"signal {signals.received}"
            if due(run, it, stop_reason):
                ckpt.save(it, state, run.train_it.get_state(), meta)
            if stop_reason != "completed":
                log.info("stopping at iteration %d: %s (checkpoint %s/%d)", it, stop_reason, ckpt.dir, it)
                break
    ckpt.close()
    writer.close()
    run.state = state
    summary.update(stop_reason=stop_reason, step=it, last=metrics, reward_history=meta["history"])
    if stop_reason.startswith("signal"):
        interrupted(signals, f"iteration {it}")
        return summary
    summary["eval_reward_after"] = eval_reward(ctx, merge_variables(frozen, state.trainable), run.eval_it,
                                               t.eval_generate)  # fmt: skip
    return finish(run, summary, _summary_lines(summary))


def _summary_lines(summary: dict) -> list[str]:
    lines = [f"run: {summary['run_dir']}  iterations: {summary['steps']}  ({summary['stop_reason']})"]
    history = summary["reward_history"]
    if history:
        k = max(1, len(history) // 5)
        lines.append(f"rollout reward: first {np.mean(history[:k]):.4f} -> last {np.mean(history[-k:]):.4f}")
    if summary.get("eval_reward_after") is not None:
        before = summary.get("eval_reward_before")
        before_txt = f"{before:.4f}" if before is not None else "n/a (resumed)"
        lines.append(f"eval reward (greedy): before {before_txt} -> after {summary['eval_reward_after']:.4f}")
    return lines
