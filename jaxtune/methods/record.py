"""`Method`: what a training stage is, as one frozen record (DESIGN.md, style 3).

Every stage is a file of `methods/` that exports one `Method`; `methods.METHODS` maps `config.Stage` values to
them. The trainer reads only these fields, so nothing is probed with `hasattr` and a new stage is one file and
one entry:

    data_kind    what the data pipeline makes for it: "text" (every token trained), "lm" (prompt masked),
                 "pair" (chosen / rejected), "kto" (labelled completions), "prompt" (RL prompts)
    loss_fn      (lm, variables, batch, rng, cfg, train) -> (summed loss, metric sums); pure
    denominator  batch -> what the summed loss is divided by over the whole optimiser step (tokens, pairs ...)
    finalize     (sums, denominator) -> reported metrics; `finalize` below unless a stage needs its own
    prepare      optional, `Prepare -> Prepared`, once before the step is built: extra trainable leaves (RM's
                 score head, PPO's value model), the reference (a frozen copy, precomputed log-probs), the
                 rollout context. Under `Prepare.abstract` it must give the same trainable structure and may
                 skip everything a restore does not need (no data, no reward model, no reference pass).
    export       optional, `(model, plan, trainable, out) -> Path`: the stage's natural export (RM writes a
                 *ForSequenceClassification model); None: `jaxtune.export.export_plan(..., "auto")`
    rl           the RL part (`RL`), for stages trained by rollouts then updates (train/rl_loop.py)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax.numpy as jnp

from jaxtune.data.items import DATA_KINDS


def finalize(sums: dict, denom) -> dict:
    """Metric sums -> means per denominator unit; `tokens` stays a count (the progress bar's tokens/s; the
    denominator itself when the loss counts none), and `nll` also gives `perplexity`."""
    out = {k: v / denom for k, v in sums.items() if k != "tokens"}
    out["tokens"] = sums.get("tokens", denom)
    if "nll" in out:
        out["perplexity"] = jnp.exp(out["nll"])
    return out


class Schedule(NamedTuple):
    """One RL iteration: `prompts` prompts -> `rows` sequences, used for `epochs` passes of `rows / mini_batch`
    optimiser updates of `mini_batch` sequences each. `field` is the config key that sets the mini-batch
    (what to change when it does not split over the mesh)."""

    prompts: int
    rows: int
    mini_batch: int
    epochs: int
    field: str

    @property
    def updates(self) -> int:
        return self.epochs * (self.rows // self.mini_batch)


@dataclass(frozen=True)
class Prepare:
    """What a method's `prepare` sees: the run config, the policy `LM`, the base `Model`, the PEFT `Plan`,
    the trainable / frozen / lr-multiplier trees so far, and the data iterators (None when abstract)."""

    cfg: Any
    lm: Any
    model: Any
    plan: Any
    trainable: dict
    frozen: dict
    multipliers: dict
    train_it: Any = None
    eval_it: Any = None
    abstract: bool = False


@dataclass(frozen=True)
class Prepared:
    trainable: dict
    frozen: dict
    multipliers: dict
    train_it: Any = None
    eval_it: Any = None
    context: Any = None  # RL: the rollout context (methods/rollout.RolloutContext)
    step_model: Any = None  # what the update step's loss_fn is applied with (PPO: policy + value); None: lm


@dataclass(frozen=True)
class RL:
    """The RL part of a stage: one iteration = `rollout`, then `schedule.updates` steps of `loss_fn`."""

    schedule: Callable[[Any], Schedule]  # cfg -> Schedule
    rollout: Callable  # (context, variables, prompts, rng, cfg, meta) -> (batch, stats)
    initial_meta: Callable[[Any], dict] = lambda cfg: {}  # checkpointed controller state (PPO's kl_coef)
    update_meta: Callable | None = None  # (meta, stats, cfg) -> None, after every iteration
    private: tuple[str, ...] = ()  # trainable collections that are not the policy (PPO's `value`): not exported


@dataclass(frozen=True)
class Method:
    name: str
    data_kind: str
    loss_fn: Callable
    denominator: Callable
    finalize: Callable = finalize
    prepare: Callable[[Prepare], Prepared] | None = None
    export: Callable | None = None
    rl: RL | None = None

    def __post_init__(self):
        if self.data_kind not in DATA_KINDS:
            raise ValueError(f"method {self.name}: data_kind {self.data_kind!r} is not one of {DATA_KINDS}")
