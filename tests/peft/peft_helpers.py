"""Shared pieces of the PEFT tests: tiny models, token batches and a jitted training step over a `Plan`.

The tiny models use distinct sizes on purpose (hidden 32, q/o 32x32, k/v 32x16, MLP 32x48 / 48x32, head 32x64,
embedding 64x32) so that a weight-gradient matmul for a frozen kernel is recognisable by its output shape.

Compilation dominates these tests' time, so jitted functions are compiled with XLA's cheap CPU backend settings
(`FAST`: no LLVM optimisation). That changes how fast the code runs, not what it computes.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.config import load_config
from jaxtune.data.batch import TokenBatch
from jaxtune.methods import sft
from jaxtune.methods.forward import LM
from jaxtune.models.model import forward, prepare_inputs, split_adapters, with_peft
from jaxtune.train import optim, state
from jaxtune.train.step import make_train_step

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)  # fmt: skip
TINY = {
    "llama": dict(model_type="llama", **SIZES),  # no biases anywhere (BitFit must add them)
    "qwen2": dict(model_type="qwen2", **SIZES),  # q/k/v biases only
}


FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_compiled = {}


def fast(jitted, *args):
    """`jitted` traced for `args` and compiled with `FAST` -> (traced, compiled); call compiled with the
    non-static arguments."""
    traced = jitted.trace(*args)
    return traced, traced.lower().compile(FAST)


def logits(model, ids, adapters=None, attention_mask=None, segment_ids=None, positions=None) -> np.ndarray:
    """`model.logits(...)` compiled with `FAST` (one compilation per architecture, spec and shape)."""
    inputs = prepare_inputs(ids, attention_mask, segment_ids, positions)
    variables, spec = split_adapters(adapters)
    arch = with_peft(model.arch, spec)
    leaves = (model.params, variables, *inputs)
    key = (arch, jax.tree.structure(leaves), tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(leaves)))
    if key not in _compiled:
        _compiled[key] = fast(forward, arch, model.params, variables, *inputs)[1]
    return np.asarray(_compiled[key](model.params, variables, *inputs))


def token_batch(rows, vocab=64) -> TokenBatch:
    """Rows of segment ids ([B, T], 0 = padding) -> a TokenBatch with random ids, targets shifted inside each
    segment and every target trained."""
    seg = np.asarray(rows, np.int32)
    rng = np.random.RandomState(seg.sum())
    ids = rng.randint(1, vocab, seg.shape).astype(np.int32) * (seg > 0)
    same_next = np.zeros_like(seg, bool)
    same_next[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    targets = np.where(same_next, np.roll(ids, -1, 1), 0).astype(np.int32)
    pos = np.zeros_like(seg)
    for b in range(seg.shape[0]):
        for t in range(1, seg.shape[1]):
            pos[b, t] = pos[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
    return TokenBatch(ids, targets, same_next.astype(np.float32), seg, pos * (seg > 0))


def train_batch() -> TokenBatch:
    """4 rows: full, right-padded, left-padded, two packed documents."""
    t = 12
    rows = [[1] * t, [1] * 9 + [0] * 3, [0] * 4 + [1] * 8, [1] * 5 + [2] * 7]
    return token_batch(rows)


def run_config(**training):
    base = dict(batch_size=4, learning_rate=1e-2, max_grad_norm=0.0, lr_scheduler="constant")
    return load_config({"training": {**base, **training}})


def make_step(plan, batch, **training):
    """(traced step, compiled step, fresh TrainState) for a Plan: the trainer's `make_train_step` with its
    optimiser (LoRA+ multipliers included), traced and compiled for `batch`."""
    cfg = run_config(**training)
    opt, lr = optim.build(cfg.training, plan.trainable, 10, plan.lr_multipliers)
    step = make_train_step(sft.SFT, LM(plan.arch), cfg, opt, lr)
    trainable = jax.tree.map(jnp.array, plan.trainable)  # the state is donated: keep the plan's arrays
    st = state.create(trainable, opt, seed=0)
    traced, compiled = fast(step, st, plan.frozen, batch)
    return traced, compiled, st


def as_numpy(tree):
    return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)
