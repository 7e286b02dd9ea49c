"""PPO (stage `ppo`) for language models: Ziegler et al. 2019 / Ouyang et al. 2022 (InstructGPT), with the
details of Huang et al. 2024 ("The N+ implementation details of RLHF with PPO") as TRL's `PPOTrainer` has them.

Rollout (no gradient), per prompt x and sampled completion y = y_1..y_n:

    s     = RM(x, y) (`ppo.reward_model`: a stage-rm export / any HF *ForSequenceClassification dir) or
            reward_fn(x, y) (`ppo.reward_fn`: a builtin of methods/rewards.py or "module:function")
    k_t   = log π_old(y_t) - log π_ref(y_t)                    per-token KL (k1 estimator, TRL's default)
    r_t   = -β k_t  (+ s at t = n)                             KL-penalised reward, β = kl_coef
    V_t   = value head on the value model's hidden state before y_t
    δ_t   = r_t + γ V_{t+1} - V_t,   A_t = δ_t + γλ A_{t+1}    GAE (Schulman et al. 2016), V = A = 0 after y_n
    R_t   = A_t + V_t;  A whitened over the batch's completion tokens (`ppo.whiten_advantages`)

Update: `ppo.ppo_epochs` passes over shuffled mini-batches of `ppo.mini_batch_size` sequences, each one step of

    ρ_t = π_θ(y_t) / π_old(y_t)
    L_pg = mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1 - ε, 1 + ε))                         ε = ppo.clip_range
    L_v  = 0.5 mean_t max((V_φ,t - R_t)², (V_old,t + clip(V_φ,t - V_old,t, ±ε_v) - R_t)²)  ε_v = ppo.value_clip
    L    = L_pg + c_v L_v                                                             c_v = ppo.vf_coef

with means over all completion tokens of the mini-batch (TRL's `masked_mean`). β is fixed, or adaptive
(`ppo.adaptive_kl`, Ziegler et al. 2019 sec. 2.2): e = clip(KL / target - 1, ±0.2), β ← β (1 + e n / horizon),
with KL = mean over sequences of Σ_t k_t and n the sequences of the rollout.

Value model (`ppo.value_model`):
  lora    the reference base (the same frozen weights: adapters off, or the initial weights under full
          fine-tuning) with a LoRA adapter of its own (rank / alpha / target modules of `method`) and a `score`
          head (models/score.py, the head stage rm trains): policy and value share the base, not their adapters.
  shared  the `score` head on the policy's own final hidden states (one forward; the value loss also trains the
          policy's trainable parameters).
Logged: reward, kl, kl_coef, entropy (mean -log π_old of the sampled tokens: a Monte-Carlo estimate of the
per-token entropy), policy_loss, value_loss, clip_fraction, value_clip_fraction, approx_kl, values, returns.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import partial

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
from jaxtune.models.decoder import Decoder
from jaxtune.models.score import init_score, sequence_scores, token_scores

log = logging.getLogger("jaxtune.train")


@dataclass(frozen=True)
class ActorCritic:
    """What the update step applies (hashable: static in jit): the policy and the value model."""

    policy: LM
    value: LM | None  # None: the value head reads the policy's hidden states ("shared")


@flax.struct.dataclass
class Batch:
    tokens: TokenBatch  # [B, T] prompt + completion; loss_mask marks the completion's positions
    old_logps: jax.Array  # [B, T] log π_old(target)
    old_values: jax.Array  # [B, T] V_old at each position
    advantages: jax.Array  # [B, T] (whitened) GAE advantages, 0 outside the completion
    returns: jax.Array  # [B, T] A + V_old


# ------------------------------------------------------------------------------------------------ math


def gae(rewards, values, mask, gamma: float, lam: float):
    """[B, T] per-token rewards, values and completion mask (contiguous per row) -> (advantages, returns)."""
    rewards, values, mask = (np.asarray(x, np.float64) for x in (rewards, values, mask))
    adv = np.zeros_like(rewards)
    running = np.zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        nxt = mask[:, t + 1] if t + 1 < rewards.shape[1] else np.zeros_like(running)
        next_value = values[:, t + 1] * nxt if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * nxt * running) * mask[:, t]
        adv[:, t] = running
    return adv.astype(np.float32), ((adv + values) * mask).astype(np.float32)


def whiten(x, mask, eps: float = 1e-8):
    """Masked (x - mean) / std over all masked entries (TRL `masked_whiten`, shift_mean=True)."""
    x, mask = np.asarray(x, np.float64), np.asarray(mask, np.float64)
    n = max(mask.sum(), 1.0)
    mean = (x * mask).sum() / n
    var = (np.square(x - mean) * mask).sum() / n
    return (((x - mean) / np.sqrt(var + eps)) * mask).astype(np.float32)


def token_rewards(score, logps, ref_logps, mask, kl_coef: float):
    """r_t = -β (log π_old - log π_ref) on completion tokens, plus the sequence score at the last one."""
    mask = np.asarray(mask, np.float32)
    kl = (np.asarray(logps) - np.asarray(ref_logps)) * mask
    r = -kl_coef * kl
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)  # [B] last completion position
    has = mask.any(1)
    r[np.arange(len(r))[has], last[has]] += np.asarray(score, np.float32)[has]
    return r, kl


def objective(logp, values, batch: Batch, clip: float, value_clip: float, vf_coef: float):
    """Per-token (loss, policy loss, value loss, clipped?, value clipped?) [B, T] (module docstring)."""
    adv, ret, old_v = batch.advantages, batch.returns, batch.old_values
    ratio = jnp.exp(logp - batch.old_logps)
    pg1, pg2 = -adv * ratio, -adv * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    pg = jnp.maximum(pg1, pg2)
    v_clipped = old_v + jnp.clip(values - old_v, -value_clip, value_clip)
    vf1, vf2 = jnp.square(values - ret), jnp.square(v_clipped - ret)
    vf = 0.5 * jnp.maximum(vf1, vf2)
    return pg + vf_coef * vf, pg, vf, (pg2 > pg1), (vf2 > vf1), ratio


# ------------------------------------------------------------------------------------------------ models


def schedule(cfg) -> Schedule:
    p = cfg.ppo
    prompts = p.rollout_batch_size or cfg.training.batch_size
    mini = p.mini_batch_size or prompts
    if prompts % mini:
        raise config_error(cfg, "ppo.mini_batch_size",
                           f"ppo.mini_batch_size={mini} must divide the rollout batch of {prompts} prompts", RunError)
    default = "ppo.rollout_batch_size" if p.rollout_batch_size else "training.batch_size"
    field = "ppo.mini_batch_size" if p.mini_batch_size else f"ppo.mini_batch_size (default: {default})"
    return Schedule(prompts=prompts, rows=prompts, mini_batch=mini, epochs=p.ppo_epochs, field=field)


def initial_meta(cfg) -> dict:
    return {"kl_coef": float(cfg.ppo.kl_coef)}


def update_meta(meta: dict, stats: dict, cfg) -> None:
    """The adaptive KL controller (Ziegler et al. 2019, sec. 2.2); a fixed coefficient stays as it is."""
    p = cfg.ppo
    if p.adaptive_kl:
        error = float(np.clip(stats["kl"] / p.target_kl - 1.0, -0.2, 0.2))
        meta["kl_coef"] *= 1.0 + error * stats["sequences"] / p.kl_horizon


def value_arch(policy_arch, spec):
    """The value model's architecture: the reference base with the value LoRA's scales."""
    ref = ro.reference_arch(policy_arch)
    peft = dataclasses.replace(ref.peft, lora_scale=spec.lora_scale, lora_dropout=0.0, dora=False)
    return ref.replace(peft=peft)


def _value_lora(cfg, model, split: int):
    """A fresh LoRA adapter for the value model (B = 0), shaped like the policy's frozen base."""
    from jaxtune import peft
    from jaxtune.peft.select import split_layers

    m = cfg.method
    lora_methods = ("lora", "qlora", "dora")
    targets = (
        m.target_modules
        if (m.name in lora_methods or set(m.combine) & set(lora_methods))
        else ("qkv_proj",) if model.arch.fused_qkv else ("q_proj", "v_proj")  # phi3: q, k, v are one module
    )
    vcfg = {"method": "lora", "rank": m.rank, "alpha": m.alpha, "target_modules": targets, "rslora": m.rslora}
    vplan = peft.prepare(model, vcfg, jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 11))
    return split_layers(vplan.trainable["lora"], split), vplan.spec


def _reward_model(cfg, tokenizer):
    """A jitted scorer of joined TokenBatches with the reward model directory `ppo.reward_model` (shared
    tokenizer). Every problem with that directory is an error naming the key, its line and the directory."""
    from jaxtune.errors import JaxtuneError
    from jaxtune.models.hf import load_model

    path = cfg.ppo.reward_model
    try:
        rm = load_model(path, tokenizer=False)
    except JaxtuneError as e:  # the directory's own error (it names the directory or file), located
        raise config_error(cfg, "ppo.reward_model", f"ppo.reward_model={path}: {e}", type(e)) from None
    if "score" not in rm.params:
        raise config_error(cfg, "ppo.reward_model",
                           f"ppo.reward_model={path}: no `score` head there; export a reward model with stage rm",
                           RunError)  # fmt: skip
    if rm.arch.vocab_size < len(tokenizer):
        raise config_error(
            cfg, "ppo.reward_model",
            f"ppo.reward_model={path}: vocabulary of {rm.arch.vocab_size} tokens, but the policy's tokenizer has "
            f"{len(tokenizer)}; the reward model must share the policy's tokenizer", RunError,
        )  # fmt: skip
    arch = rm.arch.replace(remat="none")

    @jax.jit
    def score(params, batch: TokenBatch):
        hidden = Decoder(arch).apply({"params": params}, batch.input_ids, batch.segment_ids, batch.positions)
        return sequence_scores(arch, params, hidden, batch.segment_ids)

    return lambda batch: np.asarray(score(rm.params, batch), np.float32)


def prepare(p: Prepare) -> Prepared:
    """The reference (adapters off, or a frozen copy of the trained base leaves), the value head / adapter as
    trainables, and the rollout context (reward model or function, value model)."""
    cfg, lm, model = p.cfg, p.lm, p.model
    frozen = p.frozen
    if "params" in p.trainable and not p.abstract:  # full / BitFit / freeze: the reference keeps the start
        frozen = add_frozen_copy(frozen, p.trainable)
    extra, reward = {}, None
    if p.abstract:
        pass  # a restore: no reward model or function is called
    elif cfg.ppo.reward_model:
        extra["reward_model"] = _reward_model(cfg, model.tokenizer)
    else:
        reward = rewards_lib.resolve(cfg.ppo.reward_fn, "ppo.reward_fn")
    head = init_score(lm.arch, jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 13))
    value = {"score": head}
    value_lm = None
    if cfg.ppo.value_model == "lora":
        lora, spec = _value_lora(cfg, model, lm.arch.peft.layer_split)
        value["lora"] = lora
        value_lm = LM(value_arch(lm.arch, spec), lm.chunk)
    trainable = {**p.trainable, "value": value}
    multipliers = {**p.multipliers, "value": jax.tree.map(lambda _: 1.0, value)}
    models = ActorCritic(lm, value_lm)
    ctx = ro.RolloutContext(
        lm=lm, ref_lm=LM(ro.reference_arch(lm.arch), lm.chunk), tokenizer=model.tokenizer,
        generation=cfg.generation, stop_ids=ro.stop_ids_of(model.tokenizer, model.hf_config), reward=reward,
        extra=extra, train_lm=models,
    )  # fmt: skip
    return Prepared(trainable, frozen, multipliers, p.train_it, p.eval_it, context=ctx, step_model=models)


def forward(policy_lm: LM, value_lm: LM | None, variables: dict, tokens: TokenBatch, temperature: float, rng=None,
            train: bool = False):  # fmt: skip
    """(log π(target) [B, T], V [B, T]) under the policy and the value model."""
    return forward_moe(policy_lm, value_lm, variables, tokens, temperature, rng, train)[:2]


def forward_moe(policy_lm: LM, value_lm: LM | None, variables: dict, tokens: TokenBatch, temperature: float,
                rng=None, train: bool = False):  # fmt: skip
    """`forward` and the policy's MoE router losses (None for a dense policy)."""
    policy, ref = ro.policy_and_reference(variables)
    value = variables["value"]
    hidden, moe_losses = policy_lm.hidden_moe(policy, tokens, rng, train)  # [B, T, D]
    logp = ro.stats_from_hidden(policy_lm, policy, hidden, tokens.targets, temperature).logp
    if value_lm is None:  # shared: the head reads the policy's hidden states
        return logp, token_scores(policy_lm.arch, value, hidden), moe_losses
    v_hidden = value_lm.hidden({**ref, "lora": value["lora"]}, tokens)  # base frozen, value LoRA trainable
    return logp, token_scores(value_lm.arch, value, v_hidden), moe_losses


@partial(jax.jit, static_argnames=("lm", "value_lm", "temperature"))
def _old(lm, value_lm, variables, tokens, temperature):
    return jax.lax.stop_gradient(forward(lm, value_lm, variables, tokens, temperature))


def rollout(ctx: ro.RolloutContext, variables: dict, prompts: PromptBatch, rng, cfg, meta: dict):
    """Completions, their scores, per-token KL-penalised rewards, values, GAE advantages and returns."""
    p = cfg.ppo
    temp = float(cfg.generation.temperature) or 1.0
    policy, ref = ro.policy_and_reference(variables)
    ids, mask, tokens, keep = ro.sample_completions(ctx, policy, prompts.prompts, rng)
    score = ro.rewards(ctx, prompts, ids, mask, tokens, keep)
    batch = ro.join(ids, mask, tokens, keep)
    models = ctx.train_lm
    old, values = (np.asarray(x) for x in _old(models.policy, models.value, variables, batch, temp))
    ref_logps = np.asarray(ro.token_logps(ctx.ref_lm, ref, batch, temp))
    m = batch.loss_mask
    values = values * m
    r, kl = token_rewards(score, old, ref_logps, m, meta["kl_coef"])
    adv, ret = gae(r, values, m, p.gamma, p.lam)
    if p.whiten_advantages:
        adv = whiten(adv, m)
    stats = {
        "reward": float(score.mean()),
        "kl": float(kl.sum(1).mean()),
        "entropy": ro.masked_mean(-old, m),
        "completion_length": float(keep.sum(1).mean()),
        "sequences": float(len(score)),
    }
    return Batch(batch, old, values, adv, ret), stats


# ------------------------------------------------------------------------------------------------ loss


def denominator(batch: Batch):
    """Completion tokens in the batch: both losses are means over them."""
    return batch.tokens.loss_mask.sum()


def loss_fn(models: ActorCritic, variables, batch: Batch, rng, cfg, train: bool = True):
    p = cfg.ppo
    temp = float(cfg.generation.temperature) or 1.0
    logp, values, moe_losses = forward_moe(models.policy, models.value, variables, batch.tokens, temp, rng, train)
    loss, pg, vf, clipped, v_clipped, ratio = objective(
        logp, values, batch, p.clip_range, p.value_clip, p.vf_coef
    )
    m = batch.tokens.loss_mask
    total = lambda x: (x * m).sum()
    sg = jax.lax.stop_gradient
    sums = {
        "loss": total(loss),
        "policy_loss": sg(total(pg)),
        "value_loss": sg(total(vf)),
        "clip_fraction": total(clipped.astype(jnp.float32)),
        "value_clip_fraction": total(v_clipped.astype(jnp.float32)),
        "approx_kl": sg(total(0.5 * jnp.square(logp - batch.old_logps))),
        "values": sg(total(values)),
        "returns": total(batch.returns),
        "tokens": m.sum(),
    }
    return with_moe(models.policy.arch, moe_losses, total(loss), sums, denominator(batch))


PPO = Method(
    "ppo", "prompt", loss_fn, denominator, prepare=prepare,
    rl=RL(schedule, rollout, initial_meta=initial_meta, update_meta=update_meta, private=("value",)),
)  # fmt: skip
