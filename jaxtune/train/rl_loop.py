"""`jaxtune train` for the RL stages (ppo, grpo): rollouts from the policy, then clipped policy updates.

    setup (model, PEFT plan, reference, method context, optimiser, jitted step) -> resume -> per iteration:
    prompts -> method.rollout (sample with the KV cache, reward, old / reference log-probs, advantages)
    -> epochs x shuffled mini-batches of `train_step` -> log / checkpoint;  SIGTERM / SIGINT -> checkpoint
    -> exit;  at the end: eval reward of greedy answers (before vs after) and export.

The update is train/step.py's `make_train_step` over the method's `Batch` pytree (its `loss_fn`, `denominator`,
`finalize`), and checkpoints, metrics and signal handling are the SFT loop's (train/loop.py). One rollout
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

from jaxtune import peft
from jaxtune.data import pipeline
from jaxtune.methods import METHODS
from jaxtune.methods import rollout as ro
from jaxtune.methods.forward import LM
from jaxtune.methods.reference import add_frozen_copy
from jaxtune.parallel import describe_mesh, init_distributed, mesh_from_config
from jaxtune.train import optim, setup
from jaxtune.train import state as state_lib
from jaxtune.train.checkpoint import Checkpointer
from jaxtune.train.loop import _export, _Signals, total_steps
from jaxtune.train.metrics import MetricsWriter
from jaxtune.train.sharding import check_batch_size, global_batch, place, run_shardings
from jaxtune.train.step import make_train_step

log = logging.getLogger("jaxtune.train")


def accumulation(cfg, mini_batch: int) -> int:
    micro = cfg.training.micro_batch_size
    if micro is None:
        return 1
    if mini_batch % micro:
        raise ValueError(
            f"training.micro_batch_size={micro} must divide the RL mini-batch of {mini_batch} sequences "
            f"(stage {cfg.stage}: see ppo.mini_batch_size / grpo.mini_batch_size)"
        )
    return mini_batch // micro


def mini_batch_field(cfg) -> str:
    """The config field that sets the RL mini-batch (what to change when it does not split over the mesh)."""
    if cfg.stage == "grpo":
        if cfg.grpo.mini_batch_size:
            return "grpo.mini_batch_size"
        return "grpo.mini_batch_size (default: training.batch_size x grpo.num_generations)"
    if cfg.ppo.mini_batch_size:
        return "ppo.mini_batch_size"
    default = "ppo.rollout_batch_size" if cfg.ppo.rollout_batch_size else "training.batch_size"
    return f"ppo.mini_batch_size (default: {default})"


def check_single_process(cfg) -> None:
    if jax.process_count() > 1:
        raise ValueError(
            f"stage {cfg.stage} (RL) does not support multi-process runs yet ({jax.process_count()} processes): "
            "launch it as one process on one host (it uses all of that host's devices through parallel.data / "
            "parallel.fsdp / parallel.tensor); multi-process training is available for the non-RL stages"
        )


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
    """Train stage ppo / grpo as `cfg` says. Returns a summary (eval reward before / after, last metrics)."""
    init_distributed(cfg.parallel)  # before anything touches a device
    check_single_process(cfg)
    cfg, run_dir, main = setup.start_run(cfg)
    t = cfg.training
    method = METHODS[cfg.stage]
    sched = method.schedule(cfg)
    accum = accumulation(cfg, sched["mini_batch"])

    mesh = mesh_from_config(cfg.parallel)
    log.info("%s", describe_mesh(mesh))
    check_batch_size(sched["mini_batch"], mesh, mini_batch_field(cfg))
    if accum > 1:
        check_batch_size(t.micro_batch_size, mesh, "training.micro_batch_size")
    model = setup.build_model(cfg, mesh=mesh)  # base weights created / loaded straight into their shards
    its = pipeline.build(cfg.data, model.tokenizer, sched["prompts"], cfg.stage, seed=cfg.seed,
                         eval_batch_size=t.eval_batch_size or sched["prompts"])  # fmt: skip
    train_it, eval_it = its.train, its.eval
    steps = total_steps(cfg, train_it)
    rng = jax.random.PRNGKey(cfg.seed)
    m = cfg.model
    plan = peft.prepare(model, cfg.method, rng, quantization=m.quantization, double_quant=m.double_quant,
                        quant_block_size=m.quant_block_size)  # fmt: skip
    lm = LM(model.arch.replace(peft=plan.spec), chunk=t.loss_chunk_size)
    trainable, frozen, multipliers = plan.trainable, plan.frozen, plan.lr_multipliers
    if "params" in trainable:  # full / BitFit / freeze-tuning: the reference keeps the initial trained leaves
        frozen = add_frozen_copy(frozen, trainable)
    ctx, trainable, frozen, multipliers = method.setup(cfg, lm, model, trainable, frozen, multipliers)
    updates = sched["epochs"] * (sched["rows"] // sched["mini_batch"])
    optimizer, lr = optim.build(t, trainable, steps * updates, multipliers)
    shardings = run_shardings(mesh, lm.arch, trainable, frozen, optimizer)
    state = state_lib.create(trainable, optimizer, cfg.seed, shardings=shardings.state)
    frozen = place(frozen, shardings.frozen)  # the base is there already; e.g. the reference copy moves
    log.info("model %s: %s", model.arch.model_type, plan.describe())
    log.info("%d rollout iterations of %d prompts -> %d sequences, %d updates each of %d sequences",
             steps, sched["prompts"], sched["rows"], updates, sched["mini_batch"])  # fmt: skip
    train_step = make_train_step(
        method, ctx.train_lm or lm, cfg, optimizer, lr, accum=accum, shardings=shardings
    )

    ckpt = Checkpointer(run_dir / "checkpoints", t, is_async=t.async_checkpointing)
    meta = {"history": [], **getattr(method, "initial_meta", lambda cfg: {})(cfg)}
    state, meta, latest = ckpt.resume(t.resume, state, train_it, meta)
    if latest is not None:
        log.info("resumed from %s/%d (iteration %d)", ckpt.dir, latest, latest)
    start = latest or 0
    summary = {"run_dir": str(run_dir), "steps": steps}
    if latest is None:
        before = eval_reward(ctx, peft.merge_variables(frozen, trainable), eval_it, t.eval_generate)
        summary["eval_reward_before"] = before
        if before is not None:
            log.info("eval reward of greedy answers before training: %.4f", before)

    writer = MetricsWriter(run_dir, cfg.logging, steps, start, enabled=main)
    stop_reason, metrics = "completed", {}
    batches = iter(train_it)
    t0 = time.perf_counter()
    with _Signals() as signals:
        for it in range(start + 1, steps + 1):
            prompts = next(batches)
            variables = peft.merge_variables(frozen, state.trainable)
            batch, stats = method.rollout(ctx, variables, prompts, jax.random.fold_in(rng, it), cfg, meta)
            updates_metrics = []
            for epoch in range(sched["epochs"]):
                order = np.random.default_rng([cfg.seed, it, epoch]).permutation(sched["rows"])
                for lo in range(0, sched["rows"], sched["mini_batch"]):
                    idx = order[lo : lo + sched["mini_batch"]]
                    state, out = train_step(state, frozen, global_batch(rows(batch, idx), mesh))
                    updates_metrics.append(jax.device_get(out))
            if it == start + 1:
                log.info("first iteration (incl. compilation) took %.1f s", time.perf_counter() - t0)
            if not all(u.pop("finite") for u in updates_metrics) and t.nan_policy == "stop":
                raise FloatingPointError(
                    f"non-finite loss at rollout iteration {it}; last checkpoint: {ckpt.dir}"
                )
            metrics = {k: float(np.mean([u[k] for u in updates_metrics])) for k in updates_metrics[0]}
            metrics.update(stats)
            if hasattr(method, "update_meta"):  # PPO's adaptive KL controller
                method.update_meta(meta, stats, cfg)
                metrics["kl_coef"] = meta["kl_coef"]
            writer.progress(it, metrics, metrics.get("tokens", 0.0))
            if it % cfg.logging.log_every == 0 or it == steps:
                writer.write(it, metrics)
            meta["history"].append(round(stats["reward"], 6))
            if signals.received:
                stop_reason = f"signal {signals.received}"
            if (t.save_every and it % t.save_every == 0) or stop_reason != "completed" or it == steps:
                ckpt.save(it, state, train_it.get_state(), meta)
            if stop_reason != "completed":
                log.info("stopping at iteration %d: %s (checkpoint %s/%d)", it, stop_reason, ckpt.dir, it)
                break
    ckpt.close()
    writer.close()
    summary.update(stop_reason=stop_reason, last=metrics, reward_history=meta["history"])
    if stop_reason.startswith("signal"):
        print(
            f"jaxtune: interrupted by {signals.received}; checkpoint saved. Rerun the same command to resume."
        )
        return summary
    variables = peft.merge_variables(frozen, state.trainable)
    after = eval_reward(ctx, variables, eval_it, t.eval_generate)
    summary["eval_reward_after"] = after
    policy_trainable = {k: v for k, v in state.trainable.items() if k != "value"}
    if main and t.export_hf:
        summary["export"] = str(_export(model, plan, policy_trainable, run_dir))
    _print_summary(summary)
    return summary


def _print_summary(summary: dict) -> None:
    lines = [f"run: {summary['run_dir']}  iterations: {summary['steps']}  ({summary['stop_reason']})"]
    history = summary["reward_history"]
    if history:
        k = max(1, len(history) // 5)
        lines.append(f"rollout reward: first {np.mean(history[:k]):.4f} -> last {np.mean(history[-k:]):.4f}")
    if summary.get("eval_reward_after") is not None:
        before = summary.get("eval_reward_before")
        before_txt = f"{before:.4f}" if before is not None else "n/a (resumed)"
        lines.append(f"eval reward (greedy): before {before_txt} -> after {summary['eval_reward_after']:.4f}")
    if "export" in summary:
        lines.append(f"exported: {summary['export']}")
    print("\n".join(lines))
