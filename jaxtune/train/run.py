"""`build_run(cfg) -> Run`: the one place a run is built; the loops, export, estimate and generate consume it.

    run = build_run(cfg)                    # training: distributed init, run dir, mesh, model in its shards,
                                            # data, PEFT plan, the method's prepare, optimiser, shardings,
                                            # state, jitted steps, checkpoint resume
    run = build_run(cfg, abstract=True)     # a restore target: the same trainable tree (shapes only), the real
                                            # base weights, no data, no run-dir side effects
    run = build_run(cfg, abstract=True, weights=False)   # shapes only, nothing read but config.json
    run, step = load_run("runs/x")          # abstract run + the trained tree of its latest checkpoint

Because every consumer builds the run here, the trainable tree a checkpoint holds (PEFT collections, RM's score
head, PPO's value model ...) is the tree every reader restores: nothing can be rebuilt differently twice.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from jaxtune import peft
from jaxtune.config_rules import config_error, locating
from jaxtune.data import pipeline
from jaxtune.errors import MissingError, RunError
from jaxtune.methods import METHODS, Method, Prepare, Prepared, Schedule
from jaxtune.methods.forward import LM
from jaxtune.parallel import describe_mesh, init_distributed, mesh_from_config, place, process_batch_slice
from jaxtune.train import optim, setup
from jaxtune.train import state as state_lib
from jaxtune.train.checkpoint import Checkpointer
from jaxtune.train.sharding import RunShardings, check_batch_size, global_batch, run_shardings
from jaxtune.train.step import make_eval_step, make_train_step

log = logging.getLogger("jaxtune.train")


@dataclass
class Run:
    cfg: Any  # RunConfig, builtin data resolved
    method: Method
    model: Any  # the base Model (params = frozen base weights; shapes only when built with weights=False)
    plan: Any  # the PEFT Plan
    lm: LM  # the policy forward (architecture with the PEFT spec)
    state: state_lib.TrainState  # arrays in their shards; ShapeDtypeStructs when abstract
    frozen: dict  # never differentiated, never checkpointed (base weights, reference copy, quantised kernels)
    steps: int  # optimiser steps (SFT family) or rollout iterations (RL) of the whole run
    schedule: Schedule | None = None  # RL: one iteration's prompts, rows, mini-batches, passes
    context: Any = None  # RL: the rollout context
    step_model: Any = None  # what train_step applies loss_fn with (PPO: policy + value); None: lm
    train_it: Any = None
    eval_it: Any = None
    mesh: Any = None
    shardings: RunShardings | None = None
    optimizer: Any = None
    lr: Any = None
    train_step: Any = None
    eval_step: Any = None  # (trainable, frozen, host batch) -> (metric sums, denominator)
    checkpointer: Checkpointer | None = None
    meta: dict = dataclasses.field(default_factory=dict)  # checkpointed loop state (best eval, KL coefficient)
    resumed: int | None = None  # the checkpoint step this run continues from
    run_dir: Path | None = None
    main: bool = True  # process 0: writes logs, metrics, exports

    @property
    def policy_trainable(self) -> dict:
        """The trained tree without the method's private collections (PPO's value model): what is exported."""
        private = self.method.rl.private if self.method.rl else ()
        return {k: v for k, v in self.state.trainable.items() if k not in private}


def total_steps(cfg, train_it) -> int:
    t = cfg.training
    if t.max_steps > 0:
        return t.max_steps
    return max(1, math.ceil(t.num_epochs * train_it.steps_per_epoch()))


def initial_meta(cfg, method: Method) -> dict:
    if method.rl:
        return {"history": [], **method.rl.initial_meta(cfg)}
    return {"best": None, "best_step": None, "bad_evals": 0, "history": []}


def _rl_accumulation(cfg, schedule: Schedule) -> int:
    micro = cfg.training.micro_batch_size
    if micro is None:
        return 1
    if schedule.mini_batch % micro:
        raise config_error(
            cfg, "training.micro_batch_size",
            f"training.micro_batch_size={micro} must divide the RL mini-batch of {schedule.mini_batch} sequences "
            f"(stage {cfg.stage}: see {schedule.field})", RunError,
        )  # fmt: skip
    return schedule.mini_batch // micro


def _check_single_process(cfg) -> None:
    if jax.process_count() > 1:
        raise RunError(
            f"stage {cfg.stage} (RL) does not support multi-process runs yet ({jax.process_count()} processes): "
            "launch it as one process on one host (it uses all of that host's devices through parallel.data / "
            "parallel.fsdp / parallel.tensor); multi-process training is available for the non-RL stages"
        )


def _located(cfg, e: Exception) -> Exception:
    """A PEFT error about `cfg.method` as `config_error` words it: the method key it names (its first word, e.g.
    target_modules=..., else method.name) with its file and line or override."""
    text = str(e)
    first = re.match(r"\w+", text)
    fields = {f.name for f in dataclasses.fields(cfg.method)}
    key = first.group() if first and first.group() in fields else "name"
    detail = f"method.{text}" if key != "name" else f"method.name={'+'.join((cfg.method.name, *cfg.method.combine))}: {text}"
    return config_error(cfg, f"method.{key}", detail, type(e))


def _adapt(cfg, method: Method, model, train_it=None, eval_it=None, abstract: bool = False):
    """The PEFT plan, the policy LM and the method's prepare -> (plan, lm, Prepared)."""
    m, t = cfg.model, cfg.training
    try:
        plan = peft.prepare(model, cfg.method, jax.random.PRNGKey(cfg.seed), quantization=m.quantization,
                            double_quant=m.double_quant, quant_block_size=m.quant_block_size)  # fmt: skip
    except peft.PeftConfigError as e:  # a method setting this model cannot take: name its key and line
        raise _located(cfg, e) from None
    neftune = 0.0 if method.rl else (t.neftune_alpha or 0.0)  # noise on the embeddings of SFT-style stages only
    moe = {}  # mixture of experts: the router loss weights, from the run config over the checkpoint's
    if model.arch.num_experts:
        aux = model.arch.router_aux_loss_coef if m.moe_aux_loss_coef is None else m.moe_aux_loss_coef
        moe = dict(router_aux_loss_coef=float(aux), router_z_loss_coef=float(m.moe_z_loss_coef))
    lm = LM(model.arch.replace(peft=plan.spec, neftune_alpha=neftune, **moe), chunk=t.loss_chunk_size)
    prepared = Prepared(plan.trainable, plan.frozen, plan.lr_multipliers, train_it, eval_it)
    if method.prepare is not None:
        prepared = method.prepare(Prepare(cfg, lm, model, plan, prepared.trainable, prepared.frozen,
                                          prepared.multipliers, train_it, eval_it, abstract))  # fmt: skip
    return plan, lm, prepared


def _adapt_shapes(cfg, method: Method, model):
    """`_adapt` traced with `jax.eval_shape`: no weight is read or created, the trees come back as shapes."""
    side = {}

    def trace(params):
        plan, lm, prepared = _adapt(cfg, method, dataclasses.replace(model, params=params), abstract=True)
        side.update(plan=plan, lm=lm, prepared=prepared)
        return prepared.trainable, prepared.frozen

    trainable, frozen = jax.eval_shape(trace, model.params)
    prepared = dataclasses.replace(side["prepared"], trainable=trainable, frozen=frozen)
    plan = dataclasses.replace(side["plan"], trainable=trainable, frozen=frozen, model=model, info={})
    return plan, side["lm"], prepared


def build_run(cfg, *, abstract: bool = False, weights: bool = True) -> Run:
    """Everything `cfg` (a RunConfig) needs to train (module docstring); `abstract`: a restore target."""
    method = METHODS[cfg.stage]
    if abstract:
        return _abstract_run(cfg, method, weights)
    with locating(cfg):  # its errors name the parallel / training key they are about, and its line
        init_distributed(cfg.parallel)  # multi-host: before anything touches a device
    if method.rl:
        _check_single_process(cfg)
    cfg, run_dir, main = setup.start_run(cfg)
    t = cfg.training
    schedule = method.rl.schedule(cfg) if method.rl else None
    with locating(cfg):  # a batch that does not split over the mesh: named with its line
        mesh = mesh_from_config(cfg.parallel)
        log.info("%s", describe_mesh(mesh))
        if schedule is not None:
            accum = _rl_accumulation(cfg, schedule)
            check_batch_size(schedule.mini_batch, mesh, schedule.field)
            if accum > 1:
                check_batch_size(t.micro_batch_size, mesh, "training.micro_batch_size")
            batch_size = schedule.prompts
        else:
            accum = t.accumulation_steps
            for field, size in (("batch_size", t.batch_size), ("eval_batch_size", t.eval_batch_size or t.batch_size)):
                check_batch_size(size, mesh, f"training.{field}")
            if accum > 1:  # each micro-batch is split over the same devices (else its rows are copied to all)
                check_batch_size(t.micro_batch_size, mesh, "training.micro_batch_size")
            batch_size = t.batch_size
            if jax.process_count() > 1:
                start, stop = process_batch_slice(t.batch_size, mesh)
                log.info("process %d of %d feeds rows [%d, %d) of each global batch of %d", jax.process_index(),
                         jax.process_count(), start, stop, t.batch_size)  # fmt: skip
    model = setup.build_model(cfg, mesh=mesh)  # base weights created / loaded straight into their shards
    its = pipeline.build(cfg.data, model.tokenizer, batch_size, method.data_kind, seed=cfg.seed,
                         eval_batch_size=t.eval_batch_size or batch_size)  # fmt: skip
    steps = total_steps(cfg, its.train)
    plan, lm, p = _adapt(cfg, method, model, its.train, its.eval)
    updates = steps * schedule.updates if schedule is not None else steps  # the lr schedule runs over updates
    optimizer, lr = optim.build(t, p.trainable, updates, p.multipliers)
    shardings = run_shardings(mesh, lm.arch, p.trainable, p.frozen, optimizer)
    state = state_lib.create(p.trainable, optimizer, cfg.seed, shardings=shardings.state)
    frozen = place(p.frozen, shardings.frozen)  # adapters / quantised kernels built after loading: small moves
    log.info("model %s: %s", model.arch.model_type, plan.describe())
    if schedule is not None:
        log.info("%d rollout iterations of %d prompts -> %d sequences, %d updates each of %d sequences",
                 steps, schedule.prompts, schedule.rows, schedule.updates, schedule.mini_batch)  # fmt: skip
    else:
        log.info("optimizer state: %.2f MB; %d steps of %d sequences", optim.state_bytes(state.opt_state) / 2**20,
                 steps, t.batch_size)  # fmt: skip
    step_model = p.step_model or lm
    train_step = make_train_step(method, step_model, cfg, optimizer, lr, accum=accum, shardings=shardings)
    eval_step = None
    if schedule is None:
        sharded_eval = make_eval_step(method, lm, cfg, shardings=shardings)
        eval_step = lambda trainable, frozen, batch: sharded_eval(trainable, frozen, global_batch(batch, mesh))
    ckpt = Checkpointer(run_dir / "checkpoints", t, is_async=t.async_checkpointing)
    state, meta, latest = ckpt.resume(t.resume, state, p.train_it, initial_meta(cfg, method))
    if latest is not None:
        log.info("resumed from %s/%d (%s %d)", ckpt.dir, latest, "iteration" if schedule else "step", latest)
    return Run(
        cfg=cfg, method=method, model=model, plan=plan, lm=lm, state=state, frozen=frozen, steps=steps,
        schedule=schedule, context=p.context, step_model=p.step_model, train_it=p.train_it, eval_it=p.eval_it,
        mesh=mesh, shardings=shardings, optimizer=optimizer, lr=lr, train_step=train_step, eval_step=eval_step,
        checkpointer=ckpt, meta=meta, resumed=latest, run_dir=run_dir, main=main,
    )  # fmt: skip


def _abstract_run(cfg, method: Method, weights: bool) -> Run:
    if weights:
        model = setup.build_model(cfg)
        plan, lm, p = _adapt(cfg, method, model, abstract=True)
    else:
        model = setup.abstract_model(cfg)
        plan, lm, p = _adapt_shapes(cfg, method, model)
    t = cfg.training
    steps = max(t.max_steps, 1)  # the optimiser state's shapes do not depend on the schedule's length
    optimizer, lr = optim.build(t, p.trainable, steps, p.multipliers)
    state = jax.eval_shape(lambda tr: state_lib.create(tr, optimizer, cfg.seed), p.trainable)
    schedule = method.rl.schedule(cfg) if method.rl else None
    return Run(
        cfg=cfg, method=method, model=model, plan=plan, lm=lm, state=state, frozen=p.frozen, steps=steps,
        schedule=schedule, context=p.context, step_model=p.step_model, optimizer=optimizer, lr=lr,
        meta=initial_meta(cfg, method),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- restore


def resolve(path) -> tuple[Path, int | None]:
    """A run directory, its `checkpoints/` folder, or one step folder -> (run_dir, step or None = latest)."""
    p = Path(path).absolute()
    if p.name.isdigit() and p.parent.name == "checkpoints":
        return p.parent.parent, int(p.name)
    if p.name == "checkpoints":
        return p.parent, None
    if (p / "checkpoints").is_dir() or (p / "config.yaml").exists():
        return p, None
    raise MissingError(
        f"{path}: not a jaxtune run directory (expected {p}/checkpoints/ and {p}/config.yaml) nor a "
        "checkpoints/<step> folder"
    )


def load_run(path, config=None) -> tuple[Run, int]:
    """(the run rebuilt abstractly with its trained tree restored, the checkpoint step) of a run directory."""
    from jaxtune.config import load_config

    run_dir, step = resolve(path)
    config_path = Path(config) if config else run_dir / "config.yaml"
    if not config_path.exists():
        raise MissingError(f"{config_path}: no run config; pass the one the run used with --config")
    cfg = load_config(config_path)
    run = build_run(cfg, abstract=True)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.training, is_async=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise MissingError(f"{run_dir}/checkpoints holds no checkpoint (did the run save one?)")
        state, _, meta = ckpt.restore(step, run.state)
    finally:
        ckpt.close()
    run = dataclasses.replace(run, state=state, meta=meta, resumed=step, run_dir=run_dir)
    return run, step
