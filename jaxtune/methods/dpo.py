"""Preference optimisation on chosen/rejected pairs (stage `dpo`): DPO, cDPO, robust DPO, IPO, hinge, SimPO, ORPO.

Every loss is a function of four per-pair numbers: the policy's log-probs of the chosen and rejected responses
(pc, pr: sums of token log-probs over the trained tokens, or their per-token means where marked "mean") and the
reference's (rc, rr). With z = (pc - rc) - (pr - rr), the implicit rewards are β (pc - rc) and β (pr - rr).

| loss_type | loss per pair                                                      | source (TRL function)                   |
|-----------|--------------------------------------------------------------------|-----------------------------------------|
| sigmoid   | -(1-ε) log σ(βz) - ε log σ(-βz)                                    | DPO, Rafailov et al. 2023, Eq. 7; ε > 0: |
|           |                                                                    | cDPO, Mitchell 2023, Eq. 3 (dpo_loss)   |
| robust    | [-(1-ε) log σ(βz) + ε log σ(-βz)] / (1 - 2ε)                        | Chowdhury et al. 2024, the unbiased loss|
|           |                                                                    | of Sec. 3 (dpo_loss, "robust")          |
| hinge     | max(0, 1 - βz)                                                     | SLiC-HF, Zhao et al. 2023; RSO, Liu et  |
|           |                                                                    | al. 2024 (dpo_loss, "hinge")            |
| ipo       | (z - 1/(2β))², log-probs as per-token means; rewards from sums     | Azar et al. 2023, Eq. 17, β = τ         |
|           | (see Metrics)                                                      | (dpo_loss, "ipo")                       |
| simpo     | -(1-ε) log σ(β(pc - pr) - γ) - ε log σ(γ - β(pc - pr)), means,     | Meng et al. 2024, Eq. 6                 |
|           | no reference; rewards β pc, β pr                                   | (CPOTrainer.cpo_loss, "simpo")          |
| orpo      | α NLL - λ log σ(log odds(pc) - log odds(pr)), means, no reference; | Hong et al. 2024, Eqs. 6-7              |
|           | log odds(p) = p - log(1 - e^p); rewards λ pc, λ pr; NLL below      | (ORPOTrainer.odds_ratio_loss)           |

ORPO's NLL (`dpo.orpo_nll`): "sequence" (default, TRL's `ORPOTrainer.concatenated_forward`, decoder-only): the
mean NLL of every predicted token of the chosen rows, prompt included (every real token but a row's first),
over all chosen tokens of the micro-batch, with weight 1 (message loss weights do not apply); each pair's
loss carries that one number, so the mean over pairs is TRL's `nll - mean(λ log σ)`. "response" (the paper's
Eq. 2): each chosen response's mean token NLL, -pc, averaged over pairs.

Gradients (what the tests check against autodiff): with s = σ(βz), ∂L/∂pc = -∂L/∂pr = ∂L/∂z, and
sigmoid ∂L/∂z = -β[(1-ε)(1-s) - ε s]; robust -β[(1-ε)(1-s) + ε s] / (1-2ε); hinge -β·[βz < 1];
ipo 2(z - 1/(2β)) (then ÷ token count for a mean); SimPO as sigmoid with βz -> β(pc - pr) - γ; ORPO
(orpo_nll=response) ∂L/∂pc = -α - λ σ(-Δ) / (1 - e^pc), ∂L/∂pr = λ σ(-Δ) / (1 - e^pr), Δ = log odds(pc) -
log odds(pr).

TRL names: the table's `dpo_loss` is TRL < 1.0's `DPOTrainer.dpo_loss`; in TRL 1.16 these losses live in
`DPOTrainer._compute_loss`, whose "sigmoid" ignores label_smoothing, so cDPO (sigmoid with ε > 0) matches
`CPOTrainer.cpo_loss(loss_type="sigmoid")` there. TRL's SimPO is `CPOTrainer` with `cpo_alpha=0` (no NLL
term). tests/methods/test_trl_oracle.py runs this module's `loss_fn` and TRL's trainers on the same tokens and
compares losses and every metric below.

Differences from TRL: the loss is a mean over pairs of the whole optimiser step (accumulation equals one big
batch), except ORPO's "sequence" NLL, a token mean per micro-batch (as TRL with gradient accumulation), which
the step averages over micro-batches by their pair counts. `loss_type: kto` is stage `kto` (`methods/kto.py`).

Reference log-probs (sigmoid, robust, hinge, ipo) come from `methods/reference.py`: adapters switched off
under PEFT, a frozen copy of the trained leaves under full fine-tuning, or precomputed before training.

Metrics, as TRL's trainer for the loss type logs them (means over pairs): loss, rewards/chosen,
rewards/rejected, margins (their difference; TRL: rewards/margins), accuracy (chosen reward > rejected; TRL:
rewards/accuracies), logps/chosen, logps/rejected. Rewards and logps come from the summed log-probs for the
DPOTrainer losses (sigmoid, robust, hinge and ipo: TRL logs β × summed log-ratios even though the IPO loss
uses means; `dpo.ipo_rewards: mean` logs IPO's means instead), from the per-token means for simpo and orpo.
ORPO adds nll (its NLL term; TRL: nll_loss) and perplexity, log_odds_ratio (mean log σ(Δ), TRL's name) and
log_odds_chosen (mean Δ).
"""

from __future__ import annotations

import logging

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.data.batch import TokenBatch
from jaxtune.errors import RunError
from jaxtune.methods import reference
from jaxtune.methods.forward import with_moe
from jaxtune.methods.logps import sequence_logps
from jaxtune.methods.record import Method, Prepare, Prepared

log = logging.getLogger("jaxtune.train")

REFERENCE_FREE = ("simpo", "orpo")
MEAN_LOGPS = ("ipo", "simpo", "orpo")  # length-normalised log-probs, as the papers (and TRL) use


@flax.struct.dataclass
class RefPreferenceBatch:
    """A PreferenceBatch with precomputed reference log-probs: ref_logps[b] = (chosen, rejected) sums."""

    chosen: TokenBatch
    rejected: TokenBatch
    ref_logps: np.ndarray  # [B, 2] float32


# ----------------------------------------------------------------------------------------------- losses


def sigmoid_loss(z, beta: float, eps: float = 0.0):
    """DPO (eps = 0) and conservative DPO: -(1-ε) log σ(βz) - ε log σ(-βz)."""
    return -(1 - eps) * jax.nn.log_sigmoid(beta * z) - eps * jax.nn.log_sigmoid(-beta * z)


def robust_loss(z, beta: float, eps: float):
    """Robust DPO: the DPO loss de-biased for a label-flip rate ε: [-(1-ε) log σ(βz) + ε log σ(-βz)] / (1-2ε)."""
    return (-(1 - eps) * jax.nn.log_sigmoid(beta * z) + eps * jax.nn.log_sigmoid(-beta * z)) / (1 - 2 * eps)


def hinge_loss(z, beta: float):
    """max(0, 1 - βz)."""
    return jax.nn.relu(1 - beta * z)


def ipo_loss(z, beta: float):
    """(z - 1/(2β))², z from per-token mean log-probs."""
    return jnp.square(z - 1 / (2 * beta))


def simpo_loss(pc, pr, beta: float, gamma: float, eps: float = 0.0):
    """-(1-ε) log σ(β(pc - pr) - γ) - ε log σ(-(β(pc - pr) - γ)); pc, pr per-token means."""
    x = beta * (pc - pr) - gamma
    return -(1 - eps) * jax.nn.log_sigmoid(x) - eps * jax.nn.log_sigmoid(-x)


def log1mexp(x):
    """log(1 - e^x) for x < 0, accurate near 0 and for very negative x (Mächler 2012)."""
    x = jnp.minimum(x, -1e-7)  # a mean token log-prob is < 0; this keeps log(0) out
    return jnp.where(x > -0.6931, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def log_odds_ratio(pc, pr):
    """log odds(pc) - log odds(pr), odds(p) = e^p / (1 - e^p)."""
    return (pc - pr) - (log1mexp(pc) - log1mexp(pr))


def orpo_loss(pc, pr, alpha: float, lam: float, nll=None):
    """α nll - λ log σ(log odds ratio); `nll` defaults to -pc (the chosen response's mean token NLL)."""
    nll = -pc if nll is None else nll
    return alpha * nll - lam * jax.nn.log_sigmoid(log_odds_ratio(pc, pr))


def pair_losses(pc, pr, rc, rr, cfg, nll=None):
    """Per-pair losses [B] for `cfg` (a DPOConfig) from the log-probs the loss type uses (MEAN_LOGPS: means).

    `nll` [B]: ORPO's NLL term per pair (see the module docstring); None: -pc."""
    kind, beta, eps = cfg.loss_type, cfg.beta, cfg.label_smoothing
    if kind == "simpo":
        return simpo_loss(pc, pr, beta, cfg.simpo_gamma, eps)
    if kind == "orpo":
        return orpo_loss(pc, pr, cfg.orpo_alpha, cfg.orpo_beta, nll)
    z = (pc - rc) - (pr - rr)
    if kind == "sigmoid":
        return sigmoid_loss(z, beta, eps)
    if kind == "robust":
        return robust_loss(z, beta, eps)
    if kind == "hinge":
        return hinge_loss(z, beta)
    if kind == "ipo":
        return ipo_loss(z, beta)
    raise RunError(f"dpo.loss_type={kind!r} is not a pairwise loss (kto is stage: kto)")


def pair_rewards(pc, pr, rc, rr, cfg):
    """(chosen, rejected) implicit rewards [B], no gradient: β (p - ref), or for the reference-free losses
    β p (SimPO) and λ p (ORPO), from the log-probs given (the reported ones: see `reports_means`)."""
    sg = jax.lax.stop_gradient
    if cfg.loss_type in REFERENCE_FREE:
        coef = cfg.orpo_beta if cfg.loss_type == "orpo" else cfg.beta
        return sg(coef * pc), sg(coef * pr)
    return sg(cfg.beta * (pc - rc)), sg(cfg.beta * (pr - rr))


def reports_means(cfg) -> bool:
    """Whether rewards and logps/* are logged from per-token means (TRL's CPO/ORPO trainers; IPO on request)."""
    return cfg.loss_type in REFERENCE_FREE or (cfg.loss_type == "ipo" and cfg.ipo_rewards == "mean")


# ----------------------------------------------------------------------------------------------- method


def pair_batch(chosen: TokenBatch, rejected: TokenBatch) -> TokenBatch:
    """Chosen rows then rejected rows, [2B, T]: one forward pass for both (TRL's concatenated_forward)."""
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), chosen, rejected)


def pair_mask(batch) -> jax.Array:
    """[B] 1.0 for real pairs (eval batches are padded with empty rows)."""
    return (batch.chosen.loss_mask.sum(-1) > 0).astype(jnp.float32)


def denominator(batch):
    """Pairs in the batch: the loss is a mean over pairs."""
    return pair_mask(batch).sum()


def trained_logps(stats, tb: TokenBatch):
    """Summed trained-token log-probs [rows] and trained-token counts (loss weights) [rows]."""
    return sequence_logps(stats, tb.loss_mask), tb.loss_mask.sum(-1)


def sequence_logps_of(lm, variables, both: TokenBatch, rng=None, train: bool = False):
    """Summed trained-token log-probs [2B] and trained-token counts [2B] of a `pair_batch`."""
    return trained_logps(lm.stats(variables, both, rng, train=train), both)


def predicted_mask(tb: TokenBatch) -> jax.Array:
    """[B, T] 1.0 where targets[t] is a real token of the same document: every token but a document's first,
    prompt included (TRL's ORPO labels: input_ids where attention_mask is 1, shifted)."""
    seg = tb.segment_ids
    following = jnp.pad(seg[:, 1:], ((0, 0), (0, 1)))
    return ((seg > 0) & (following == seg)).astype(jnp.float32)


def sequence_nll(logp, tb: TokenBatch, rows) -> jax.Array:
    """Mean NLL over every predicted token of the rows of `tb` where `rows` [B] is 1: one number."""
    mask = predicted_mask(tb) * rows[:, None]
    return -(logp * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def halves(logps, ref, b: int):
    """[2B] policy and reference log-probs of a `pair_batch` -> (pc, pr, rc, rr), each [B]."""
    return logps[:b], logps[b:], ref[:b], ref[b:]


def loss_fn(lm, variables, batch, rng, cfg, train: bool = True):
    d = cfg.dpo
    b = batch.chosen.input_ids.shape[0]
    policy, ref_vars = reference.split(variables)
    both = pair_batch(batch.chosen, batch.rejected)
    stats, moe_losses = lm.stats_moe(policy, both, rng, train=train)
    logps, counts = trained_logps(stats, both)
    if d.loss_type in REFERENCE_FREE:
        ref = jnp.zeros_like(logps)
    elif isinstance(batch, RefPreferenceBatch):
        ref = jnp.concatenate([batch.ref_logps[:, 0], batch.ref_logps[:, 1]])
    else:
        ref, _ = sequence_logps_of(lm, ref_vars, both)
        ref = jax.lax.stop_gradient(ref)
    per_token = lambda x: x / jnp.maximum(counts, 1.0)
    sums_of, means_of = halves(logps, ref, b), halves(per_token(logps), per_token(ref), b)
    pc, pr, rc, rr = means_of if d.loss_type in MEAN_LOGPS else sums_of  # what the loss sees
    shown = means_of if reports_means(d) else sums_of  # what the metrics report
    valid = pair_mask(batch)
    nll = None
    if d.loss_type == "orpo":
        seq_nll = lambda: jnp.broadcast_to(sequence_nll(stats.logp[:b], batch.chosen, valid), (b,))
        nll = seq_nll() if d.orpo_nll == "sequence" else -pc
    losses = pair_losses(pc, pr, rc, rr, d, nll)
    chosen_r, rejected_r = pair_rewards(*shown, d)
    total = lambda x: (x * valid).sum()
    sg = jax.lax.stop_gradient
    sums = {
        "loss": total(losses),
        "rewards/chosen": total(chosen_r),
        "rewards/rejected": total(rejected_r),
        "margins": total(chosen_r - rejected_r),
        "accuracy": total((chosen_r > rejected_r).astype(jnp.float32)),
        "logps/chosen": total(sg(shown[0])),
        "logps/rejected": total(sg(shown[1])),
        "tokens": (both.segment_ids > 0).sum().astype(jnp.float32),
    }
    if d.loss_type == "orpo":
        delta = sg(log_odds_ratio(pc, pr))
        sums["nll"] = total(sg(nll))
        sums["log_odds_ratio"] = total(jax.nn.log_sigmoid(delta))
        sums["log_odds_chosen"] = total(delta)
    return with_moe(lm.arch, moe_losses, total(losses), sums, valid.sum())


def prepare(p: Prepare) -> Prepared:
    """Before the step is built: the reference for this run (see `methods/reference.py`)."""
    d, frozen = p.cfg.dpo, p.frozen
    train_it, eval_it = p.train_it, p.eval_it
    if d.loss_type in REFERENCE_FREE:
        log.info("dpo: loss_type=%s needs no reference model", d.loss_type)
        return Prepared(p.trainable, frozen, p.multipliers, train_it, eval_it)
    mode = reference.reference_mode(p.cfg, p.trainable)
    log.info("dpo: loss_type=%s, reference=%s", d.loss_type, mode)
    if p.abstract:  # a restore: the reference is no part of the trained state
        return Prepared(p.trainable, frozen, p.multipliers)
    if mode == "frozen_copy":
        frozen = reference.add_frozen_copy(frozen, p.trainable)
    elif mode == "precomputed":
        from jaxtune.peft import merge_variables

        variables = merge_variables(p.frozen, p.trainable)
        t = p.cfg.training
        items = reference.all_rows(train_it, eval_it)
        lm = p.lm
        table = reference.precompute(
            lambda v, batch: _reference_pair_logps(lm, v, batch), variables, train_it, items,
            t.eval_batch_size or t.batch_size, _parts,
        )  # fmt: skip
        train_it = reference.WithReference(train_it, table, _parts, _attach)
        if eval_it is not None:
            eval_it = reference.WithReference(eval_it, table, _parts, _attach)
    return Prepared(p.trainable, frozen, p.multipliers, train_it, eval_it)


def _reference_pair_logps(lm, variables, batch):
    _, ref_vars = reference.split(variables)
    logps, _ = sequence_logps_of(lm, ref_vars, pair_batch(batch.chosen, batch.rejected))
    b = batch.chosen.input_ids.shape[0]
    return jnp.stack([logps[:b], logps[b:]], axis=-1)  # [B, 2]


def _parts(batch):
    return batch.chosen, batch.rejected


def _attach(batch, values):
    return RefPreferenceBatch(batch.chosen, batch.rejected, values)


DPO = Method("dpo", "pair", loss_fn, denominator, prepare=prepare)
