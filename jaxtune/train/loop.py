"""`jaxtune train`: the loop of the SFT-family stages (pt, sft, rm, dpo, kto) over a `Run` (train/run.py).

    build_run -> for each step: batch -> step -> log / eval / early-stop / checkpoint;
    SIGTERM or SIGINT -> checkpoint -> stop (the CLI exits 143 / 130);  at the end: final eval, exact-match
    generation, export.

The RL stages (ppo, grpo) loop over rollouts instead (train/rl_loop.py); `run(cfg)` picks by the method record.
A run killed at any point loses at most the steps since its last checkpoint: rerunning the same command resumes
(params, optimiser, RNG, step and data-iterator position), and the loss curve continues bit-identically.
"""

from __future__ import annotations

import logging
import time

import jax

from jaxtune.config import config_error
from jaxtune.errors import NonFiniteLoss, RunError
from jaxtune.methods import METHODS
from jaxtune.peft import merge_variables
from jaxtune.train.evaluate import eval_loss, generation_eval
from jaxtune.train.lifecycle import Signals, due, finish, interrupted
from jaxtune.train.metrics import MetricsWriter
from jaxtune.train.prefetch import Prefetcher
from jaxtune.train.run import Run, build_run
from jaxtune.train.sharding import to_host
from jaxtune.train.status import RunStatus

log = logging.getLogger("jaxtune.train")

__all__ = ["NonFiniteLoss", "run", "train"]


def run(cfg) -> dict:
    """Train as `cfg` (a RunConfig) says. Returns a summary (final metrics, stop reason, paths)."""
    with RunStatus(cfg) as status:  # <output_dir>/status.json: running -> finished / stopped / failed
        if METHODS[cfg.stage].rl is not None:  # ppo / grpo: rollouts, then updates
            from jaxtune.train import rl_loop

            return status.end(rl_loop.train(status.built(build_run(cfg))))
        return status.end(train(status.built(build_run(cfg))))
    return status.summary  # SIGTERM during setup / compilation / export: stopped, resumable


def train(run: Run) -> dict:
    """The SFT-family loop over a built run."""
    cfg, t, ckpt = run.cfg, run.cfg.training, run.checkpointer
    state, frozen, meta, steps = run.state, run.frozen, run.meta, run.steps
    eval_it = run.eval_it
    eval_start = eval_it.get_state() if eval_it is not None else None
    eval_records = _eval_records(cfg) if t.eval_generate else []
    tokenizer = run.model.tokenizer
    summary = {"run_dir": str(run.run_dir), "steps": steps}
    if t.eval_generate and run.resumed is None:
        variables = merge_variables(to_host(frozen), to_host(state.trainable))
        acc, _ = generation_eval(run.lm.arch, variables, tokenizer, eval_records, cfg.data.template,
                                 n=t.eval_generate, max_new_tokens=cfg.generation.max_new_tokens,
                                 template_kwargs=cfg.data.template_kwargs)  # fmt: skip
        if acc is None:
            raise config_error(cfg.training, "eval_generate", "training.eval_generate: the eval data holds no "
                               "conversation that ends in an assistant reply to compare answers with")  # fmt: skip
        summary["generate_accuracy_before"] = acc
        log.info("exact match before training: %.1f%%", 100 * (acc or 0.0))

    def evaluate(step):
        eval_it.set_state(eval_start)
        out = eval_loss(run.eval_step, run.method, state.trainable, frozen, eval_it, t.eval_steps)
        writer.write(step, out, split="eval")
        log.info("eval at step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in out.items()))
        return out

    writer = MetricsWriter(run.run_dir, cfg.logging, steps, int(state.step), enabled=run.main)
    stop_reason = "completed"
    start = int(state.step)
    last_good = run.resumed
    clock = {"t0": time.perf_counter()}
    clock["done"] = clock["t0"]

    def settle(step, metrics, produced):
        """Step `step` finished: read its metrics (blocks until it has), NaN policy, progress, metrics.jsonl."""
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        if step == start + 1:
            log.info("first step (incl. compilation) took %.1f s", now - clock["t0"])
        metrics["step_time_s"], clock["done"] = now - clock["done"], now  # wall time since the previous step
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
            writer.write(step, {**metrics, "data_efficiency": produced.efficiency})  # non-pad / all tokens

    pending = None  # (step, device metrics, produced batch): read once the next step is dispatched
    with Signals() as signals, Prefetcher(run.train_it, run.mesh, steps - start, t.prefetch) as batches:
        for step in range(start + 1, steps + 1):
            try:
                produced = next(batches)  # this process's rows of the global batch, already on the mesh
            except StopIteration:
                raise RunError(f"the training data ran out before step {step} of {steps}") from None
            state, metrics = run.train_step(state, frozen, produced.batch)  # dispatched; runs while we go on
            if pending is not None:
                settle(*pending)  # the previous step's metrics, read while this step runs
                pending = None
            evaluating = eval_it is not None and t.eval_every and step % t.eval_every == 0 and step != steps
            if not (evaluating or signals.received or due(run, step, stop_reason)):
                pending = (step, metrics, produced)  # nothing needs this step's state before the next step
                continue
            # eval / checkpoint / stop use this step's state, which the next step would donate: settle it now
            settle(step, metrics, produced)
            evaluated = None
            if evaluating:
                evaluated = evaluate(step)
                if _early_stop(evaluated, meta, t, step):
                    stop_reason = "early_stopping"
            if signals.received:
                stop_reason = f"signal {signals.received}"
            if due(run, step, stop_reason, evaluated):
                if step == steps and eval_it is not None:
                    evaluated = evaluate(step)
                    _early_stop(evaluated, meta, t, step)
                # the iterator state after the batch this step consumed, not after what the producer read ahead
                ckpt.save(step, state, produced.data_state, meta, metrics=_ckpt_metrics(evaluated, t))
                last_good = step
            if stop_reason != "completed":
                log.info("stopping at step %d: %s (checkpoint %s/%d)", step, stop_reason, ckpt.dir, step)
                break
    ckpt.close()
    writer.close()
    run.state = state
    summary.update(stop_reason=stop_reason, step=int(state.step), best_step=meta.get("best_step"), history=meta["history"])
    if meta.get("best_step") is not None:
        summary.update(best_metric=t.best_metric, best_value=meta["best"])
        kept = ckpt.dir / str(meta["best_step"])
        log.info("best %s %.4f at step %d%s", t.best_metric, meta["best"], meta["best_step"],
                 f" (checkpoint {kept})" if kept.is_dir() else " (no checkpoint of that step was kept)")  # fmt: skip

    if stop_reason.startswith("signal"):
        interrupted(signals, f"step {int(state.step)}")
        return summary
    if jax.process_count() > 1 and (t.eval_generate or t.export_hf):
        # generation and export read whole arrays: gather them (every process joins; process 0 writes)
        run.plan.frozen, run.frozen = to_host(run.plan.frozen), to_host(frozen)
        run.state = state = state.replace(trainable=to_host(state.trainable))
    if t.eval_generate:
        variables = merge_variables(run.frozen, state.trainable)
        acc, rows = generation_eval(run.lm.arch, variables, tokenizer, eval_records, cfg.data.template,
                                    n=t.eval_generate, max_new_tokens=cfg.generation.max_new_tokens,
                                    template_kwargs=cfg.data.template_kwargs)  # fmt: skip
        summary["generate_accuracy_after"] = acc
        summary["samples"] = rows[:3]
    return finish(run, summary, _summary_lines(summary, meta))


def _eval_records(cfg) -> list:
    from jaxtune.data.pipeline import eval_records

    records = eval_records(cfg.data, seed=cfg.seed)
    if not records:
        raise config_error(cfg.training, "eval_generate", f"training.eval_generate={cfg.training.eval_generate} "
                           "needs eval data: give data.eval, or hold some of train out with data.val_size")  # fmt: skip
    return records


def _ckpt_metrics(evaluated: dict | None, t) -> dict | None:
    if not evaluated:
        return None
    key = t.best_metric.removeprefix("eval_")
    return {t.best_metric: evaluated[key]} if key in evaluated else None


def _early_stop(evaluated: dict, meta: dict, t, step: int) -> bool:
    """Track the best eval metric; True once `early_stopping_patience` evals in a row did not improve."""
    key = t.best_metric.removeprefix("eval_")
    if key not in evaluated:
        reports = sorted("eval_" + k for k in evaluated)
        raise config_error(t, "best_metric", f"training.best_metric={t.best_metric!r}: eval reports {reports}", RunError)
    value = float(evaluated[key])
    meta["history"].append(value)
    best = meta["best"]
    improved = best is None or (value < best if t.best_mode == "min" else value > best)
    if improved:
        meta["best"], meta["best_step"], meta["bad_evals"] = value, step, 0
    else:
        meta["bad_evals"] += 1
    return t.early_stopping_patience is not None and meta["bad_evals"] >= t.early_stopping_patience


def _summary_lines(summary: dict, meta: dict) -> list[str]:
    lines = [f"run: {summary['run_dir']}  steps: {summary['step']}/{summary['steps']}  ({summary['stop_reason']})"]
    if meta.get("history"):
        at = f" at step {meta['best_step']}" if meta.get("best_step") is not None else ""
        lines.append(f"eval history ({len(meta['history'])} evals): best {meta['best']:.4f}{at}")
    if "generate_accuracy_after" in summary:
        before = summary.get("generate_accuracy_before")
        before_txt = f"{100 * before:.1f}%" if before is not None else "n/a (resumed)"
        lines.append(f"exact-match accuracy: before {before_txt} -> after {100 * summary['generate_accuracy_after']:.1f}%")
        for prompt, ref, out in summary.get("samples", []):
            lines.append(f"  prompt: {prompt!r}  reference: {ref!r}  generated: {out!r}")
    return lines
