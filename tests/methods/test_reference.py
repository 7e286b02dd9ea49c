"""The DPO reference: adapters switched off (LoRA), a frozen copy (full fine-tuning) and precomputed log-probs.

Oracles: the base model's own log-probs (no PEFT anywhere), computed separately; for a fresh LoRA (B = 0) the
policy equals the reference, so the DPO loss is exactly log 2 with zero rewards.
"""

import math
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import peft
from jaxtune.config import load_config
from jaxtune.data.batch import PreferenceBatch
from jaxtune.data.pipeline import iterators
from jaxtune.demo import char_tokenizer
from jaxtune.methods import Prepare, dpo, reference
from jaxtune.methods.forward import LM
from jaxtune.models.hf import from_hf_config
from jaxtune.train import optim, state
from jaxtune.train.step import make_train_step

LORA = {"method": "lora", "rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


@pytest.fixture(scope="module")
def setup(preference_files):
    tok = char_tokenizer()
    model = from_hf_config(
        {"model_type": "llama", "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}, rng=0, tokenizer=tok,
    )  # fmt: skip
    its = iterators(
        [str(preference_files[1])], tok, 8, "pair", cutoff_len=48, bucket_multiple=8, shuffle=False
    )
    return model, tok, its, next(iter(its.train))


@partial(jax.jit, static_argnums=0)
def _base_logps(arch_lm, params, batch):
    both = dpo.pair_batch(batch.chosen, batch.rejected)
    logps, _ = dpo.sequence_logps_of(arch_lm, {"params": params}, both)
    b = batch.chosen.input_ids.shape[0]
    return jnp.stack([logps[:b], logps[b:]], -1)


def base_logps(model, batch):
    """The base model's summed log-probs of chosen and rejected [B, 2], no PEFT and no jaxtune.methods.reference."""
    return _base_logps(LM(model.arch), model.params, batch)


# what DPO's loss calls for its reference (split -> adapters off / frozen copy -> log-probs), jitted as in training
reference_logps = jax.jit(dpo._reference_pair_logps, static_argnums=0)


def perturbed(tree, scale=0.3, seed=1):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    )


def test_lora_reference_is_exactly_the_base_model(setup):
    model, _, _, batch = setup
    plan = peft.prepare(model, LORA, 0)
    assert reference.reference_mode(load_config({}), plan.trainable) == "adapters_off"
    trained = perturbed(plan.trainable)  # B != 0: the adapters now change the outputs
    variables = peft.merge_variables(plan.frozen, trained)
    lm = LM(plan.arch)
    ref = reference_logps(lm, variables, batch)
    chex.assert_trees_all_equal(ref, base_logps(model, batch))  # bit for bit
    policy_logps = jax.jit(
        lambda v, b: dpo.sequence_logps_of(lm, reference.split(v)[0], dpo.pair_batch(b.chosen, b.rejected))
    )
    policy, _ = policy_logps(variables, batch)
    assert not np.allclose(np.asarray(policy), np.asarray(ref).T.reshape(-1), atol=1e-3)


def test_fresh_lora_policy_equals_reference_so_loss_is_log2(setup):
    """LoRA starts at B = 0: z = 0 for every pair, so L = -log σ(0) = log 2 and every reward is 0."""
    model, _, _, batch = setup
    plan = peft.prepare(model, LORA, 0)
    cfg = load_config({"stage": "dpo"})
    loss_fn = jax.jit(lambda v, b: dpo.loss_fn(LM(plan.arch), v, b, None, cfg, False))
    loss, sums = loss_fn(peft.merge_variables(plan.frozen, plan.trainable), batch)
    n = float(dpo.denominator(batch))
    assert float(loss) / n == pytest.approx(math.log(2), rel=1e-6)
    assert float(sums["margins"]) == 0.0 and float(sums["rewards/chosen"]) == 0.0


def test_full_finetuning_reference_is_a_frozen_copy_that_survives_donated_steps(setup):
    """Two optimiser steps move the policy; the reference (a copy of the initial trainable leaves, under the
    frozen collection `reference`) still gives the initial model's log-probs exactly."""
    model, _, _, batch = setup
    expected = base_logps(model, batch)
    plan = peft.prepare(model, {"method": "full"}, 0)
    cfg = load_config({"stage": "dpo", "method": {"name": "full"},
                       "training": {"batch_size": 8, "learning_rate": 1e-2, "lr_scheduler": "constant"}})  # fmt: skip
    assert reference.reference_mode(cfg, plan.trainable) == "frozen_copy"
    prep = dpo.prepare(Prepare(cfg, LM(plan.arch), model, plan, plan.trainable, plan.frozen, plan.lr_multipliers))
    trainable, frozen, multipliers = prep.trainable, prep.frozen, prep.multipliers
    assert set(frozen) == {"params", reference.REFERENCE}
    opt, lr = optim.build(cfg.training, trainable, 10, multipliers)
    step = make_train_step(dpo.DPO, LM(plan.arch), cfg, opt, lr)
    st = state.create(jax.tree.map(jnp.copy, trainable), opt, seed=0)  # the fixture's model stays usable
    losses = []
    for _ in range(2):
        st, metrics = step(st, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference at step 1
    assert losses[1] < losses[0]
    variables = peft.merge_variables(frozen, st.trainable)
    chex.assert_trees_all_equal(reference_logps(LM(plan.arch), variables, batch), expected)


def test_precomputed_reference_is_attached_per_row_and_gives_the_same_loss(setup, preference_files):
    model, tok, _, _ = setup
    plan = peft.prepare(model, LORA, 0)
    plan.trainable = perturbed(plan.trainable)
    cfg = load_config(
        {"stage": "dpo", "dpo": {"precompute_ref_log_probs": True}, "training": {"batch_size": 8}}
    )
    # a shuffled train iterator and an eval iterator: rows must be found by content, not by position
    train, heldout = (str(p) for p in preference_files)
    its = iterators(
        [train], tok, 8, "pair", eval=[heldout], cutoff_len=48, bucket_multiple=8, seed=3, max_samples=64
    )
    lm = LM(plan.arch)
    prep = dpo.prepare(Prepare(cfg, lm, model, plan, plan.trainable, plan.frozen, plan.lr_multipliers, its.train, its.eval))
    frozen, train_it = prep.frozen, prep.train_it
    assert frozen is plan.frozen  # nothing of the reference is kept for training
    batch = next(train_it)
    assert isinstance(batch, dpo.RefPreferenceBatch)
    variables = peft.merge_variables(plan.frozen, plan.trainable)
    on_the_fly = reference_logps(lm, variables, batch)
    chex.assert_trees_all_close(jnp.asarray(batch.ref_logps), on_the_fly, rtol=1e-5, atol=1e-4)
    plain = PreferenceBatch(batch.chosen, batch.rejected)
    loss = jax.jit(lambda v, b: dpo.loss_fn(lm, v, b, None, cfg, False))
    a, b = loss(variables, batch), loss(variables, plain)
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-5)
    assert train_it.get_state()["row"] == 8  # the wrapper is the iterator for the loop (state, resume, ...)
