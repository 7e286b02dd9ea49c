"""GRPO (stage `grpo`): group relative policy optimisation (Shao et al. 2024, DeepSeekMath, sec. 4.1.2 / 4.1.3).

For each prompt q the current policy π_old samples G = `grpo.num_generations` completions o_1..o_G, scored by
rule-based reward functions (`grpo.reward_fns`: names in methods/rewards.py, or "module:function"; summed).
With outcome supervision every token of o_i gets the group-normalised reward as its advantage:

    Â_i,t = (r_i - mean(r)) / (std(r) + 1e-4)        std unbiased, as TRL; grpo.scale_rewards=false: no division
                                                     (Dr. GRPO, Liu et al. 2025)

and the policy maximises eq. 3, here as a loss (TRL `GRPOTrainer._compute_loss`, loss_type="grpo"):

    L = 1/G Σ_i 1/|o_i| Σ_t [ -min(ρ_i,t Â_i,t, clip(ρ_i,t, 1-ε, 1+ε) Â_i,t) + β D_i,t ]
    ρ_i,t = π_θ(o_i,t | q, o_i,<t) / π_old(o_i,t | q, o_i,<t)
    D_i,t = π_ref/π_θ - log(π_ref/π_θ) - 1     eq. 4: the k3 estimator of KL(π_θ || π_ref), unbiased and >= 0

ε = `grpo.clip_range`, β = `grpo.beta`. Each rollout batch is used for μ = `grpo.num_iterations` passes (Alg. 1)
over mini-batches of `grpo.mini_batch_size` completions (default: all of them). With μ = 1 and one mini-batch
the ratio is exactly 1 at the update, and the gradient is the policy gradient Σ ∇log π · Â / |o| plus the KL
term's. The reference is the policy with adapters off (PEFT) or the initial weights (full fine-tuning).
"""

from __future__ import annotations

import logging

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.config import config_error
from jaxtune.data.batch import PromptBatch, TokenBatch
from jaxtune.errors import RunError
from jaxtune.methods import rewards as rewards_lib
from jaxtune.methods import rollout as ro
from jaxtune.methods.forward import LM, with_moe
from jaxtune.methods.record import RL, Method, Prepare, Prepared, Schedule
from jaxtune.methods.reference import add_frozen_copy

log = logging.getLogger("jaxtune.train")


@flax.struct.dataclass
class Batch:
    tokens: TokenBatch  # [B, T] prompt + completion; loss_mask marks the completion's positions
    old_logps: jax.Array  # [B, T] log π_old(target) when sampled
    ref_logps: jax.Array  # [B, T] log π_ref(target)
    advantages: jax.Array  # [B] group-normalised reward of the completion


def group_advantages(rewards: np.ndarray, group: int, scale: bool = True) -> np.ndarray:
    """[B * G] rewards (groups contiguous) -> [B * G] advantages (module docstring)."""
    r = np.asarray(rewards, np.float64).reshape(-1, group)  # [B, G]
    adv = r - r.mean(1, keepdims=True)
    if scale:
        adv = adv / (r.std(1, ddof=1, keepdims=True) + 1e-4)
    return adv.reshape(-1).astype(np.float32)


def k3(logp, ref_logp):
    """Per-token KL(π || π_ref) estimate exp(ref - logp) - (ref - logp) - 1 (Schulman 2020; DeepSeekMath eq. 4)."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def schedule(cfg) -> Schedule:
    """Prompts per rollout, completions (rows) per rollout, rows per optimiser update, passes per rollout."""
    g = cfg.grpo
    rows = cfg.training.batch_size * g.num_generations
    mini = g.mini_batch_size or rows
    if rows % mini:
        raise config_error(
            cfg, "grpo.mini_batch_size",
            f"grpo.mini_batch_size={mini} must divide training.batch_size x grpo.num_generations={rows}", RunError,
        )  # fmt: skip
    field = "grpo.mini_batch_size" + ("" if g.mini_batch_size else " (default: training.batch_size x grpo.num_generations)")
    return Schedule(prompts=cfg.training.batch_size, rows=rows, mini_batch=mini, epochs=g.num_iterations, field=field)


def prepare(p: Prepare) -> Prepared:
    """The reference (adapters off, or a frozen copy of the trained base leaves) and the rollout context
    (reward functions resolved now, so a typo fails before any work)."""
    cfg, lm, model = p.cfg, p.lm, p.model
    frozen = p.frozen
    if "params" in p.trainable and not p.abstract:  # full / BitFit / freeze: the reference keeps the start
        frozen = add_frozen_copy(frozen, p.trainable)
    ctx = ro.RolloutContext(
        lm=lm, ref_lm=LM(ro.reference_arch(lm.arch), lm.chunk), tokenizer=model.tokenizer,
        generation=cfg.generation, stop_ids=ro.stop_ids_of(model.tokenizer, model.hf_config),
        reward=None if p.abstract else rewards_lib.combined(cfg.grpo.reward_fns, "grpo.reward_fns"),
    )  # fmt: skip
    return Prepared(p.trainable, frozen, p.multipliers, p.train_it, p.eval_it, context=ctx)


def rollout(
    ctx: ro.RolloutContext, variables: dict, prompts: PromptBatch, rng, cfg, meta=None
) -> tuple[Batch, dict]:
    """G completions per prompt, their rewards and advantages, and the log-probs the loss compares against."""
    g = cfg.grpo.num_generations
    policy, ref = ro.policy_and_reference(variables)
    ids, mask, tokens, keep = ro.sample_completions(ctx, policy, prompts.prompts, rng, repeat=g)
    reward = ro.rewards(ctx, prompts, ids, mask, tokens, keep, repeat=g)
    batch = ro.join(ids, mask, tokens, keep)
    temp = float(cfg.generation.temperature) or 1.0
    old = ro.token_logps(ctx.lm, policy, batch, temp)
    ref_logps = ro.token_logps(ctx.ref_lm, ref, batch, temp) if cfg.grpo.beta else old
    adv = group_advantages(reward, g, cfg.grpo.scale_rewards)
    lengths = keep.sum(-1)
    stats = {
        "reward": float(reward.mean()),
        "reward_std": float(reward.reshape(-1, g).std(1, ddof=1).mean()),
        "completion_length": float(lengths.mean()),
        "stopped": float(
            np.isin(tokens[np.arange(len(tokens)), np.maximum(lengths - 1, 0)], ctx.stop_ids).mean()
        ),
    }
    return Batch(batch, old, ref_logps, jnp.asarray(adv)), stats


def denominator(batch: Batch):
    """Completions in the batch: eq. 3 averages per completion, then over completions."""
    return (batch.tokens.loss_mask.sum(-1) > 0).sum()


def objective(logp, old_logps, ref_logps, advantages, mask, clip: float, beta: float):
    """Eq. 3 with eq. 4 per completion: (Σ_t loss_t / |o_i| [B], policy part [B], KL part [B], clipped part [B])."""
    n = jnp.maximum(mask.sum(-1), 1.0)  # [B] |o_i|
    ratio = jnp.exp(logp - old_logps)
    adv = advantages[:, None]  # [B, 1]
    clipped = jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    policy = -jnp.minimum(ratio * adv, clipped * adv)  # [B, T]
    kl = k3(logp, ref_logps)
    per_seq = lambda x: (x * mask).sum(-1) / n
    was_clipped = (jnp.abs(ratio - clipped) > 0).astype(jnp.float32)
    return per_seq(policy + beta * kl), per_seq(policy), per_seq(kl), per_seq(was_clipped)


def loss_fn(lm, variables, batch: Batch, rng, cfg, train: bool = True):
    """(sum over completions of their mean token loss, metric sums) — eq. 3 with eq. 4 (module docstring)."""
    g = cfg.grpo
    policy, _ = ro.policy_and_reference(variables)
    temp = float(cfg.generation.temperature) or 1.0
    stats, moe_losses = ro.stats_moe(lm, policy, batch.tokens, temp, rng, train)
    logp = stats.logp  # [B, T]
    mask = batch.tokens.loss_mask
    loss, pg, kl, clipped = objective(logp, batch.old_logps, batch.ref_logps, batch.advantages, mask,
                                      g.clip_range, g.beta)  # fmt: skip
    sg = jax.lax.stop_gradient
    sums = {
        "loss": loss.sum(),
        "policy_loss": sg(pg.sum()),
        "kl": sg(kl.sum()),
        "clip_fraction": sg(clipped.sum()),
        "tokens": mask.sum(),
    }
    return with_moe(lm.arch, moe_losses, loss.sum(), sums, denominator(batch))


GRPO = Method("grpo", "prompt", loss_fn, denominator, prepare=prepare, rl=RL(schedule, rollout))
