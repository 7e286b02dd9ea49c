"""Full fine-tuning, BitFit and freeze-tuning: which leaves of the base params train, as path masks.

Nothing is copied: `plan.prepare` splits the base params into a trainable and a frozen pytree by these
predicates over '/'-joined parameter paths (`layers/mlp/down_proj/kernel`), and the optimiser sees only the
trainable one.

- Full: every leaf.
- BitFit (Ben Zaken et al. 2022): every bias (projection and LayerNorm biases). Projections without a bias
  (Llama, Mistral, Gemma, Qwen's o/MLP projections) get one in the `bitfit` collection, starting at zero so
  the model starts at the base, as the paper's models all had biases to tune.
- Freeze-tuning (LLaMA-Factory's `freeze`): the last N layers (`freeze_trainable_layers` > 0) or the first N
  (< 0), optionally only some modules inside them (`freeze_trainable_modules`: `all`, or names such as
  `mlp`, `self_attn`, `q_proj`, `mlp.down_proj`). The layer stack is scanned, so a leaf holds all layers;
  `PeftSpec.layer_split` runs it as two scans (`layers` = [0, k), `top_layers` = [k, L)) so the frozen group
  is a separate leaf with no weight gradient at all, rather than a gradient that is computed and masked.

`trainable_patterns` / `frozen_patterns` (regexes searched in those paths, after the split) add to / remove
from any method's selection, e.g. LoRA + `trainable_patterns: [norm]`.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxtune.peft import names
from jaxtune.peft.names import PeftConfigError
from jaxtune.peft.parts import Context, Part
from jaxtune.treepath import path_str


def build_full(ctx: Context) -> Part:
    return Part(select=lambda path: True)


def build_bitfit(ctx: Context) -> Part:
    arch = ctx.model.arch
    extra = {}
    for m in names.modules(arch):
        if m.kind != "linear" or not m.per_layer:
            continue
        if "bias" not in names.get_path(ctx.params, m.path[:-1]).get(m.name, {}):  # QLoRA may leave no leaf
            extra = names.set_path(
                extra, m.path, {"bias": jnp.zeros((arch.num_layers, m.out_features), arch.weight_dtype)}
            )
    trainable = {"bitfit": extra} if extra else {}
    return Part(trainable=trainable, select=lambda path: path.endswith("/bias") or path == "bias")


def freeze_split(ctx: Context) -> tuple[int, str]:
    """(layer_split, name of the trainable stack) for freeze_trainable_layers."""
    n, total = ctx.cfg.freeze_trainable_layers, ctx.model.arch.num_layers
    if abs(n) >= total:
        return 0, "layers"
    return (total - n, "top_layers") if n > 0 else (-n, "layers")


def build_freeze(ctx: Context) -> Part:
    split, stack = freeze_split(ctx)
    modules = ctx.cfg.freeze_trainable_modules
    names.check_unfused(ctx.model.arch, [m for m in modules if m != "all"], "freeze_trainable_modules")
    patterns = [
        re.compile(rf"(^|/){re.escape(m).replace(chr(92) + '.', '/')}(/|$)") for m in modules if m != "all"
    ]

    def select(path: str) -> bool:
        if not path.startswith(f"{stack}/"):
            return False
        inner = path[len(stack) + 1 :]
        return "all" in modules or any(p.search(inner) for p in patterns)

    return Part(select=select, spec={"layer_split": split}, info={"freeze": (split, stack)})


def split_layers(tree: dict, k: int) -> dict:
    """{"layers": [L, ...]} -> {"layers": [:k], "top_layers": [k:]} in one collection (no-op when k = 0)."""
    if not k or "layers" not in tree:
        return tree
    out = dict(tree)
    stack = out.pop("layers")
    out["layers"] = jax.tree.map(lambda x: x[:k], stack)
    out["top_layers"] = jax.tree.map(lambda x: x[k:], stack)
    return out


def join_layers(tree: dict) -> dict:
    """Inverse of `split_layers` (leaves present in both stacks are concatenated back)."""
    if "top_layers" not in tree:
        return tree
    out = dict(tree)
    top = out.pop("top_layers")
    out["layers"] = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out["layers"], top)
    return out


def partition(params: dict, predicate) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts of the leaves where predicate('/'-path) is True / False."""
    flat = traverse_util.flatten_dict(params)
    trainable = {k: v for k, v in flat.items() if predicate(path_str(k))}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def pattern_predicate(trainable_patterns, frozen_patterns, selects):
    """One predicate: (any method's selection or a trainable pattern) and no frozen pattern."""
    tp = [re.compile(p) for p in trainable_patterns]
    fp = [re.compile(p) for p in frozen_patterns]

    def predicate(path: str) -> bool:
        chosen = any(s(path) for s in selects) or any(p.search(path) for p in tp)
        return chosen and not any(p.search(path) for p in fp)

    return predicate


def check_nonempty(trainable_params: dict, what: str) -> None:
    if not traverse_util.flatten_dict(trainable_params):
        raise PeftConfigError(
            f"{what} selects no parameter; parameter paths look like layers/mlp/up_proj/kernel"
        )
