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
| ipo       | (z - 1/(2β))², log-probs as per-token means                        | Azar et al. 2023, Eq. 17, β = τ         |
|           |                                                                    | (dpo_loss, "ipo")                       |
| simpo     | -(1-ε) log σ(β(pc - pr) - γ) - ε log σ(γ - β(pc - pr)), means,     | Meng et al. 2024, Eq. 6                 |
|           | no reference; rewards β pc, β pr                                   | (CPOTrainer.cpo_loss, "simpo")          |
| orpo      | -α pc - λ log σ(log odds(pc) - log odds(pr)), means, no reference; | Hong et al. 2024, Eqs. 6-7              |
|           | log odds(p) = p - log(1 - e^p); rewards λ pc, λ pr                 | (ORPOTrainer.odds_ratio_loss)           |

Gradients (what the tests check against autodiff): with s = σ(βz), ∂L/∂pc = -∂L/∂pr = ∂L/∂z, and
sigmoid ∂L/∂z = -β[(1-ε)(1-s) - ε s]; robust -β[(1-ε)(1-s) + ε s] / (1-2ε); hinge -β·[βz < 1];
ipo 2(z - 1/(2β)) (then ÷ token count for a mean); SimPO as sigmoid with βz -> β(pc - pr) - γ; ORPO
∂L/∂pc = -α - λ σ(-Δ) / (1 - e^pc), ∂L/∂pr = λ σ(-Δ) / (1 - e^pr), Δ = log odds(pc) - log odds(pr).

TRL names: the table's `dpo_loss` is TRL < 1.0's `DPOTrainer.dpo_loss`; in TRL 1.16 these losses live in
`DPOTrainer._compute_loss`, whose "sigmoid" ignores label_smoothing, so cDPO (sigmoid with ε > 0) matches
`CPOTrainer.cpo_loss(loss_type="sigmoid")` there (tests/methods/test_trl_oracle.py calls both). IPO's logged
rewards use the per-token means the loss uses (TRL logs β × sums); the loss itself is the same.

Differences from TRL, both deliberate: the loss is a mean over pairs of the whole optimiser step (accumulation
equals one big batch), and ORPO's NLL term is each chosen response's mean token NLL, averaged over pairs (TRL
averages over all chosen tokens of the batch). `loss_type: kto` is stage `kto` (`methods/kto.py`).

Reference log-probs (sigmoid, robust, hinge, ipo) come from `methods/reference.py`: adapters switched off
under PEFT, a frozen copy of the trained leaves under full fine-tuning, or precomputed before training.
Metrics: loss, rewards/chosen, rewards/rejected, margins (their difference), accuracy (chosen reward >
rejected), logps/chosen, logps/rejected (the log-probs the loss used), and for ORPO nll and log_odds_ratio.
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


def orpo_loss(pc, pr, alpha: float, lam: float):
    """-α pc (the chosen response's mean token NLL) - λ log σ(log odds ratio)."""
    return -alpha * pc - lam * jax.nn.log_sigmoid(log_odds_ratio(pc, pr))


def pair_losses(pc, pr, rc, rr, cfg):
    """(losses, chosen rewards, rejected rewards), each [B], for `cfg` (a DPOConfig). Rewards carry no gradient."""
    kind, beta, eps = cfg.loss_type, cfg.beta, cfg.label_smoothing
    sg = jax.lax.stop_gradient
    if kind == "simpo":
        return simpo_loss(pc, pr, beta, cfg.simpo_gamma, eps), sg(beta * pc), sg(beta * pr)
    if kind == "orpo":
        lam = cfg.orpo_beta
        return orpo_loss(pc, pr, cfg.orpo_alpha, lam), sg(lam * pc), sg(lam * pr)
    z = (pc - rc) - (pr - rr)
    if kind == "sigmoid":
        losses = sigmoid_loss(z, beta, eps)
    elif kind == "robust":
        losses = robust_loss(z, beta, eps)
    elif kind == "hinge":
        losses = hinge_loss(z, beta)
    elif kind == "ipo":
        losses = ipo_loss(z, beta)
    else:
        raise RunError(f"dpo.loss_type={kind!r} is not a pairwise loss (kto is stage: kto)")
    return losses, sg(beta * (pc - rc)), sg(beta * (pr - rr))


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


def sequence_logps_of(lm, variables, both: TokenBatch, rng=None, train: bool = False):
    """Summed trained-token log-probs [2B] and trained-token counts [2B] of a `pair_batch`."""
    stats = lm.stats(variables, both, rng, train=train)
    return sequence_logps(stats, both.loss_mask), both.loss_mask.sum(-1)


def loss_fn(lm, variables, batch, rng, cfg, train: bool = True):
    d = cfg.dpo
    b = batch.chosen.input_ids.shape[0]
    policy, ref_vars = reference.split(variables)
    both = pair_batch(batch.chosen, batch.rejected)
    logps, counts = sequence_logps_of(lm, policy, both, rng, train)
    if d.loss_type in REFERENCE_FREE:
        ref = jnp.zeros_like(logps)
    elif isinstance(batch, RefPreferenceBatch):
        ref = jnp.concatenate([batch.ref_logps[:, 0], batch.ref_logps[:, 1]])
    else:
        ref, _ = sequence_logps_of(lm, ref_vars, both)
        ref = jax.lax.stop_gradient(ref)
    if d.loss_type in MEAN_LOGPS:
        logps, ref = logps / jnp.maximum(counts, 1.0), ref / jnp.maximum(counts, 1.0)
    pc, pr, rc, rr = logps[:b], logps[b:], ref[:b], ref[b:]
    losses, chosen_r, rejected_r = pair_losses(pc, pr, rc, rr, d)
    valid = pair_mask(batch)
    total = lambda x: (x * valid).sum()
    sums = {
        "loss": total(losses),
        "rewards/chosen": total(chosen_r),
        "rewards/rejected": total(rejected_r),
        "margins": total(chosen_r - rejected_r),
        "accuracy": total((chosen_r > rejected_r).astype(jnp.float32)),
        "logps/chosen": total(jax.lax.stop_gradient(pc)),
        "logps/rejected": total(jax.lax.stop_gradient(pr)),
        "tokens": (both.segment_ids > 0).sum().astype(jnp.float32),
    }
    if d.loss_type == "orpo":
        sums["nll"] = total(jax.lax.stop_gradient(-pc))
        sums["log_odds_ratio"] = total(jax.lax.stop_gradient(log_odds_ratio(pc, pr)))
    return total(losses), sums


def prepare(p: Prepare) -> Prepared:
    """Before the step is built: the reference for this run (see `methods/reference.py`)."""
    d, frozen = p.cfg.dpo, p.frozen
    train_it, eval_it = p.train_it, p.eval_it
    if d.loss_type in REFERENCE_FREE:
        log.info("dpo: loss_type=%s needs no reference model", d.loss_type)
        return Prepared(p.trainable, frozen, p.multipliers, train_it, eval_it)
    mode = reference.reference_mode(d, p.trainable)
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
