"""`jaxtune train`: the one training loop every stage uses.

    setup (model, trainable plan, data, optimiser, jitted step) -> resume -> for each step: batch -> step ->
    log / eval / early-stop / checkpoint; SIGTERM or SIGINT -> checkpoint -> clean exit -> final eval + export.

A run killed at any point loses at most the steps since its last checkpoint: rerunning the same command resumes
(params, optimiser, RNG, step and data-iterator position), and the loss curve continues bit-identically.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path

import jax

from jaxtune import peft
from jaxtune.data import pipeline
from jaxtune.methods import METHODS
from jaxtune.methods.forward import LM
from jaxtune.parallel import describe_mesh, init_distributed, mesh_from_config, process_batch_slice
from jaxtune.train import optim, setup
from jaxtune.train import state as state_lib
from jaxtune.train.checkpoint import Checkpointer
from jaxtune.train.evaluate import eval_loss, generation_eval
from jaxtune.train.metrics import MetricsWriter
from jaxtune.train.sharding import check_batch_size, global_batch, place, run_shardings, to_host
from jaxtune.train.step import make_eval_step, make_train_step

log = logging.getLogger("jaxtune.train")


class NonFiniteLoss(RuntimeError):
    pass


class _Signals:
    """SIGTERM (preemption) / SIGINT (Ctrl-C) set a flag; the loop checkpoints after the current step."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C aborts without waiting
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def total_steps(cfg, train_it) -> int:
    t = cfg.training
    if t.max_steps > 0:
        return t.max_steps
    return max(1, math.ceil(t.num_epochs * train_it.steps_per_epoch()))


def run(cfg) -> dict:
    """Train as `cfg` (a RunConfig) says. Returns a summary (final metrics, stop reason, paths)."""
    if getattr(METHODS[cfg.stage], "rl", False):  # ppo / grpo: rollouts, then updates (train/rl_loop.py)
        from jaxtune.train import rl_loop

        return rl_loop.run(cfg)
    init_distributed(cfg.parallel)  # multi-host: before anything touches a device
    cfg, run_dir, main = setup.start_run(cfg)
    t = cfg.training
    method = METHODS[cfg.stage]

    mesh = mesh_from_config(cfg.parallel)
    log.info("%s", describe_mesh(mesh))
    for field, size in (("batch_size", t.batch_size), ("eval_batch_size", t.eval_batch_size or t.batch_size)):
        check_batch_size(size, mesh, f"training.{field}")
    if jax.process_count() > 1:
        start, stop = process_batch_slice(t.batch_size, mesh)
        log.info("process %d of %d feeds rows [%d, %d) of each global batch of %d", jax.process_index(),
                 jax.process_count(), start, stop, t.batch_size)  # fmt: skip
    model = setup.build_model(cfg, mesh=mesh)  # base weights created / loaded straight into their shards
    tokenizer = model.tokenizer
    its = pipeline.build(cfg.data, tokenizer, t.batch_size, cfg.stage, seed=cfg.seed,
                         eval_batch_size=t.eval_batch_size or t.batch_size)
    train_it, eval_it = its.train, its.eval
    eval_start = eval_it.get_state() if eval_it is not None else None
    steps = total_steps(cfg, train_it)

    rng = jax.random.PRNGKey(cfg.seed)
    m = cfg.model
    plan = peft.prepare(model, cfg.method, rng, quantization=m.quantization, double_quant=m.double_quant,
                        quant_block_size=m.quant_block_size)  # fmt: skip
    arch = model.arch.replace(peft=plan.spec, neftune_alpha=t.neftune_alpha or 0.0)
    lm = LM(arch, chunk=t.loss_chunk_size)
    trainable, frozen, multipliers = plan.trainable, plan.frozen, plan.lr_multipliers
    if hasattr(method, "prepare"):  # rm: adds the score head; dpo/kto: reference copy or precomputed log-probs
        trainable, frozen, multipliers, train_it, eval_it = method.prepare(cfg, lm, plan, tokenizer, train_it, eval_it)
    optimizer, lr = optim.build(t, trainable, steps, multipliers)
    shardings = run_shardings(mesh, arch, trainable, frozen, optimizer)
    state = state_lib.create(trainable, optimizer, cfg.seed, shardings=shardings.state)
    frozen = place(frozen, shardings.frozen)  # adapters / quantised kernels built after loading: small moves
    log.info("model %s: %s", model.arch.model_type, plan.describe())
    log.info("optimizer state: %.2f MB; %d steps of %d sequences", optim.state_bytes(state.opt_state) / 2**20, steps, t.batch_size)

    train_step = make_train_step(method, lm, cfg, optimizer, lr, accum=t.accumulation_steps, shardings=shardings)
    sharded_eval = make_eval_step(method, lm, cfg, shardings=shardings)
    eval_step = lambda trainable, frozen, batch: sharded_eval(trainable, frozen, global_batch(batch, mesh))
    ckpt = Checkpointer(run_dir / "checkpoints", t, is_async=t.async_checkpointing)
    meta = {"best": None, "best_step": None, "bad_evals": 0, "history": []}
    state, meta, latest = ckpt.resume(t.resume, state, train_it, meta)
    if latest is not None:
        log.info("resumed from %s/%d (step %d)", ckpt.dir, latest, int(state.step))

    eval_records = _eval_records(cfg) if t.eval_generate else []
    summary = {"run_dir": str(run_dir), "steps": steps}
    if t.eval_generate and latest is None:
        acc, rows = generation_eval(model.arch, state_lib.merge_variables(to_host(frozen), to_host(state.trainable)), tokenizer, eval_records,
                                    cfg.data.template, n=t.eval_generate, max_new_tokens=cfg.generation.max_new_tokens)  # fmt: skip
        summary["generate_accuracy_before"] = acc
        log.info("exact match before training: %.1f%%", 100 * acc)

    writer = MetricsWriter(run_dir, cfg.logging, steps, int(state.step), enabled=main)
    stop_reason = "completed"
    batches = iter(train_it)
    start = int(state.step)
    last_good = latest
    t0 = time.perf_counter()
    with _Signals() as signals:
        for step in range(start + 1, steps + 1):
            batch = global_batch(next(batches), mesh)  # this process's rows of the global batch
            state, metrics = train_step(state, frozen, batch)
            if step == start + 1:
                log.info("first step (incl. compilation) took %.1f s", time.perf_counter() - t0)
            metrics = jax.device_get(metrics)
            if not metrics.pop("finite"):
                if t.nan_policy == "stop":
                    raise NonFiniteLoss(
                        f"non-finite loss at step {step} (loss={metrics['loss']}, grad_norm={metrics['grad_norm']}); "
                        f"last good checkpoint: {ckpt.dir}/{last_good}" if last_good is not None else
                        f"non-finite loss at step {step}; no checkpoint was saved yet"
                    )  # fmt: skip
                log.warning("step %d: non-finite loss, update skipped (nan_policy=skip)", step)
            writer.progress(step, metrics, float(metrics["tokens"]))
            if step % cfg.logging.log_every == 0 or step == steps:
                writer.write(step, {**metrics, "data_efficiency": train_it.efficiency})  # non-pad / all tokens
            evaluated = None
            if eval_it is not None and t.eval_every and step % t.eval_every == 0 and step != steps:
                evaluated = _evaluate(eval_step, method, state, frozen, eval_it, eval_start, t, writer, step)
                if _early_stop(evaluated, meta, t, step):
                    stop_reason = "early_stopping"
            if signals.received:
                stop_reason = f"signal {signals.received}"
            periodic = t.save_every and step % t.save_every == 0
            if periodic or evaluated or stop_reason != "completed" or step == steps:
                if step == steps and eval_it is not None:
                    evaluated = _evaluate(eval_step, method, state, frozen, eval_it, eval_start, t, writer, step)
                    _early_stop(evaluated, meta, t, step)
                ckpt.save(step, state, train_it.get_state(), meta, metrics=_ckpt_metrics(evaluated, t))
                last_good = step
            if stop_reason != "completed":
                log.info("stopping at step %d: %s (checkpoint %s/%d)", step, stop_reason, ckpt.dir, step)
                break
    ckpt.close()
    writer.close()
    summary.update(stop_reason=stop_reason, step=int(state.step), best_step=meta.get("best_step"), history=meta["history"])

    if stop_reason.startswith("signal"):
        print(f"jaxtune: interrupted by {signals.received}; checkpoint saved at step {int(state.step)}. "
              f"Rerun the same command to resume.")  # fmt: skip
        return summary
    if jax.process_count() > 1 and (t.eval_generate or t.export_hf):
        # generation and export read whole arrays: gather them (every process joins; process 0 writes)
        plan.frozen, frozen = to_host(plan.frozen), to_host(frozen)
        state = state.replace(trainable=to_host(state.trainable))
    variables = state_lib.merge_variables(frozen, state.trainable)
    if t.eval_generate:
        acc, rows = generation_eval(arch, variables, tokenizer, eval_records, cfg.data.template,
                                    n=t.eval_generate, max_new_tokens=cfg.generation.max_new_tokens)  # fmt: skip
        summary["generate_accuracy_after"] = acc
        summary["samples"] = rows[:3]
    if main and t.export_hf:
        summary["export"] = str(getattr(method, "export", _export)(model, plan, state.trainable, run_dir))
    if main and cfg.logging.plot:
        from jaxtune.train import plot

        summary["plot"] = str(plot.main(run_dir))
    _print_summary(summary, meta)
    return summary


def _eval_records(cfg) -> list:
    from jaxtune.data import load

    records = []
    for src in cfg.data.eval:
        records += load(src if isinstance(src, str) else (src.path or src.name), dataset_dir=cfg.data.dataset_dir)
    return records


def _evaluate(eval_step, method, state, frozen, eval_it, eval_start, t, writer, step) -> dict:
    eval_it.set_state(eval_start)
    out = eval_loss(eval_step, method, state.trainable, frozen, eval_it, t.eval_steps)
    writer.write(step, out, split="eval")
    log.info("eval at step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in out.items()))
    return out


def _ckpt_metrics(evaluated: dict | None, t) -> dict | None:
    if not evaluated:
        return None
    key = t.best_metric.removeprefix("eval_")
    return {t.best_metric: evaluated[key]} if key in evaluated else None


def _early_stop(evaluated: dict, meta: dict, t, step: int) -> bool:
    """Track the best eval metric; True once `early_stopping_patience` evals in a row did not improve."""
    key = t.best_metric.removeprefix("eval_")
    if key not in evaluated:
        raise KeyError(f"training.best_metric={t.best_metric!r}: eval reports {sorted('eval_' + k for k in evaluated)}")
    value = float(evaluated[key])
    meta["history"].append(value)
    best = meta["best"]
    improved = best is None or (value < best if t.best_mode == "min" else value > best)
    if improved:
        meta["best"], meta["best_step"], meta["bad_evals"] = value, step, 0
    else:
        meta["bad_evals"] += 1
    return t.early_stopping_patience is not None and meta["bad_evals"] >= t.early_stopping_patience


def _export(model, plan, trainable, run_dir: Path) -> Path:
    """Full / BitFit / freeze-tuning -> an HF model directory; adapter methods -> a PEFT adapter directory
    (`jaxtune.export.export_plan`, the same as `jaxtune export RUN_DIR OUT` later)."""
    from jaxtune.export import export_plan

    return export_plan(plan, trainable, run_dir / ("hf" if "params" in trainable else "adapter"))


def _print_summary(summary: dict, meta: dict) -> None:
    lines = [f"run: {summary['run_dir']}  steps: {summary['step']}/{summary['steps']}  ({summary['stop_reason']})"]
    if meta.get("history"):
        lines.append(f"eval history ({len(meta['history'])} evals): best {meta['best']:.4f}")
    if "generate_accuracy_after" in summary:
        before = summary.get("generate_accuracy_before")
        before_txt = f"{100 * before:.1f}%" if before is not None else "n/a (resumed)"
        lines.append(f"exact-match accuracy: before {before_txt} -> after {100 * summary['generate_accuracy_after']:.1f}%")
        for prompt, ref, out in summary.get("samples", []):
            lines.append(f"  prompt: {prompt!r}  reference: {ref!r}  generated: {out!r}")
    if "export" in summary:
        lines.append(f"exported: {summary['export']}")
    if "plot" in summary:
        lines.append(f"loss curves: {summary['plot']}")
    print("\n".join(lines))
