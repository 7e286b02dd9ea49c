"""The optax chain: clip -> optimiser (weight decay masked off norms and biases) -> per-parameter lr multipliers.

Parameter groups are expressed as regexes over parameter paths ("params/layers/mlp/down_proj/kernel",
"lora/layers/self_attn/q_proj/lora_b"), as big_vision does, and turned into trees of booleans / floats.
An lr multiplier scales the final update, which for Adam-style optimisers (and decoupled weight decay,
itself multiplied by the lr) is exactly a per-group learning rate; a multiplier of 0 freezes that part, and
a multiplier may be an array (freeze-tuning of some layers of a stacked [L, ...] kernel).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxtune.treepath import path_str


def tree_paths(tree):
    """Same structure as `tree`, each leaf replaced by its "a/b/c" path."""
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p), tree)


def regex_mask(tree, patterns, default: bool) -> object:
    """Leaf -> (any pattern matches its path) != default ... i.e. True where `default` holds and no pattern hits."""
    compiled = [re.compile(p) for p in patterns]
    return jax.tree.map(lambda p: default != any(c.search(p) for c in compiled), tree_paths(tree))


def schedule(cfg, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0, then cosine / linear decay to min_lr_ratio * lr, or constant."""
    peak = cfg.learning_rate
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
    decay_steps = max(total_steps - warmup, 1)
    if cfg.lr_scheduler == "cosine":
        main = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.lr_scheduler == "linear":
        main = optax.linear_schedule(peak, peak * cfg.min_lr_ratio, decay_steps)
    else:
        main = optax.constant_schedule(peak)
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


class _Empty(NamedTuple):
    pass


def scale_by_tree(multipliers) -> optax.GradientTransformation:
    """Multiply each update leaf by its multiplier (a float or a broadcastable array)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

    return optax.GradientTransformation(lambda _: _Empty(), update)


def lr_multipliers(trainable, cfg, plan_multipliers=None):
    """Plan multipliers (LoRA+, freeze-tuning) times the config's regex groups; None when all are 1."""
    paths = tree_paths(trainable)
    mults = plan_multipliers if plan_multipliers is not None else jax.tree.map(lambda _: 1.0, trainable)
    groups = [(re.compile(p), m) for p, m in cfg.lr_multipliers.items()]

    def combine(path, base):
        for pattern, m in groups:
            if pattern.search(path):
                base = base * m
        return base

    mults = jax.tree.map(combine, paths, mults)
    trivial = all(isinstance(m, float | int) and m == 1 for m in jax.tree.leaves(mults))
    return None if trivial else mults


def build(cfg, trainable, total_steps: int, plan_multipliers=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`cfg` is the TrainingConfig. Returns (optimizer, lr schedule)."""
    lr = schedule(cfg, total_steps)
    decay = regex_mask(trainable, cfg.no_decay_patterns, default=True)  # True = apply weight decay
    wd = cfg.weight_decay
    if cfg.optimizer == "adamw":
        opt = optax.adamw(lr, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps, weight_decay=wd, mask=decay)
    elif cfg.optimizer == "lion":
        opt = optax.lion(lr, cfg.adam_beta1, cfg.adam_beta2, weight_decay=wd, mask=decay)
    elif cfg.optimizer == "adafactor":
        opt = optax.adafactor(lr, weight_decay_rate=wd or None, weight_decay_mask=decay)
    else:
        opt = optax.chain(optax.add_decayed_weights(wd, decay), optax.sgd(lr, momentum=cfg.adam_beta1 or None))
    parts = []
    if cfg.max_grad_norm:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(opt)
    mults = lr_multipliers(trainable, cfg, plan_multipliers)
    if mults is not None:
        parts.append(scale_by_tree(mults))
    return optax.chain(*parts), lr


def state_bytes(opt_state) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state) if hasattr(x, "dtype")))
