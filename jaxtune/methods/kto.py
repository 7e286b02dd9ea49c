"""KTO (stage `kto`): alignment from unpaired completions labelled desirable or undesirable.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Sec. 4 (the KTO loss), as
TRL's `KTOTrainer.kto_loss` (TRL 1.16: inside `KTOTrainer._compute_loss`). With r = log π(y|x) - log π_ref(y|x)
(summed over the completion's trained tokens) and z0 the reference point,

    desirable:    L = λ_D (1 - σ(β (r - z0)))        ∂L/∂log π = -λ_D β s (1 - s),  s = σ(β (r - z0))
    undesirable:  L = λ_U (1 - σ(β (z0 - r)))        ∂L/∂log π =  λ_U β u (1 - u),  u = σ(β (z0 - r))

    z0 = max(0, mean_i [log π(y_j|x_i) - log π_ref(y_j|x_i)])   over mismatched pairs, no gradient

λ_D, λ_U = dpo.desirable_weight, dpo.undesirable_weight; β = dpo.beta. As in the paper and TRL, z0 is a biased
estimate of KL(π || π_ref) from the same micro-batch: row i's prompt followed by row (i-1)'s completion
(`mismatched`; TRL rotates the completions the same way in its dataset), so micro-batches need at least 2 rows.
The prompt of a row is everything before its first trained token, the completion everything after. The KL
rows are never cut by the batch width: `data.batching.kto_batch` pads every KTO batch to a width that holds
any prompt of the batch followed by any completion of it, up to `data.cutoff_len` (where TRL's KL rows are cut
at max_length too), so z0 and the loss do not depend on `data.bucket_multiple`.

Reference as in `methods/reference.py` (adapters off, or a frozen copy under full fine-tuning);
`dpo.precompute_ref_log_probs` is refused, because z0 pairs rows differently in every batch.

Metrics, as TRL's `KTOTrainer` logs them: loss, kl (z0, after the clamp), rewards/chosen and rewards/rejected
(β r averaged over the desirable / undesirable rows), logps/chosen and logps/rejected (the summed policy
log-probs averaged likewise), margins (rewards/chosen - rewards/rejected). The class means are taken per
micro-batch and averaged over micro-batches by their sizes (TRL's, for one micro-batch per step; a micro-batch
without a class counts 0 for it, where TRL logs nothing). jaxtune adds accuracy (desirable rows with r > z0,
undesirable with r < z0; TRL's KTOTrainer logs none).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from jaxtune.config import config_error
from jaxtune.data.batch import KTOBatch, TokenBatch
from jaxtune.errors import RunError
from jaxtune.methods import reference
from jaxtune.methods.dpo import sequence_logps_of, trained_logps
from jaxtune.methods.forward import with_moe
from jaxtune.methods.record import Method, Prepare, Prepared

log = logging.getLogger("jaxtune.train")


def kto_losses(
    policy, ref, kl, label, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
):
    """Per-example KTO loss [B] from summed log-probs, the reference point `kl` and boolean labels."""
    r = policy - ref
    desirable = desirable_weight * (1 - jax.nn.sigmoid(beta * (r - kl)))
    undesirable = undesirable_weight * (1 - jax.nn.sigmoid(beta * (kl - r)))
    return jnp.where(label, desirable, undesirable)


def _valid(tb: TokenBatch):
    return tb.loss_mask.sum(-1) > 0


def mismatched(tb: TokenBatch) -> tuple[TokenBatch, jax.Array]:
    """Row i := prompt of row i + completion of row i-1 (cyclic), cut to T tokens; and which rows are real.

    Rows are right-padded single documents (KTO batches are never packed). Loss weights come with the
    completion from its own row. Batches from `kto_batch` are wide enough that nothing is cut below
    `data.cutoff_len` (see the module docstring)."""
    b, t = tb.input_ids.shape
    trained = tb.loss_mask > 0
    p = jnp.argmax(trained, axis=-1) + 1  # [B] prompt length: target t is token t + 1
    n = (tb.segment_ids > 0).sum(-1)  # [B] real tokens
    j = jnp.roll(jnp.arange(b), 1)  # donor of row i's completion: row i - 1
    pj = p[j]
    length = jnp.minimum(p + n[j] - pj, t)  # [B]
    pos = jnp.arange(t)[None, :]  # [1, T]
    src = jnp.clip(pos - p[:, None] + pj[:, None], 0, t - 1)  # [B, T] where token t comes from in the donor
    ids = jnp.where(pos < p[:, None], tb.input_ids, jnp.take_along_axis(tb.input_ids[j], src, axis=1))
    real = pos < length[:, None]
    ids = jnp.where(real, ids, 0)
    has_next = pos + 1 < length[:, None]
    targets = jnp.where(has_next, jnp.roll(ids, -1, axis=1), 0)
    # weight of target t (token t + 1): the donor's weight for its token src(t + 1), i.e. loss_mask[src(t)]
    weights = jnp.take_along_axis(tb.loss_mask[j], src, axis=1)
    ok = _valid(tb) & _valid(tb)[j]  # [B]
    loss_mask = jnp.where(has_next & (pos >= p[:, None] - 1) & ok[:, None], weights, 0.0)
    out = TokenBatch(
        input_ids=ids.astype(tb.input_ids.dtype),
        targets=targets.astype(tb.targets.dtype),
        loss_mask=loss_mask.astype(tb.loss_mask.dtype),
        segment_ids=real.astype(tb.segment_ids.dtype),
        positions=jnp.where(real, pos, 0).astype(tb.positions.dtype),
    )
    return out, ok


def denominator(batch: KTOBatch):
    """Labelled completions in the batch: the loss is a mean over them."""
    return _valid(batch.batch).sum()


def loss_fn(lm, variables, batch: KTOBatch, rng, cfg, train: bool = True):
    d = cfg.dpo
    tb = batch.batch
    b = tb.input_ids.shape[0]
    if b < 2:
        raise RunError(
            "stage kto estimates its KL reference point from mismatched rows of one micro-batch: use "
            "training.batch_size (or training.micro_batch_size) >= 2"
        )  # fmt: skip
    policy_vars, ref_vars = reference.split(variables)
    kl_batch, kl_ok = mismatched(tb)
    both = jax.tree.map(
        lambda a, c: jnp.concatenate([a, c]), tb, kl_batch
    )  # [2B, T]: one pass for each model
    if lm.arch.num_experts:  # TRL: the router loss of the completions' forward only, the KL rows apart
        stats, moe_losses = lm.stats_moe(policy_vars, tb, rng, train=train)
        kl_logps, _ = sequence_logps_of(lm, policy_vars, kl_batch, rng, train)
        logps = jnp.concatenate([trained_logps(stats, tb)[0], kl_logps])
    else:  # one pass over both
        logps, _ = sequence_logps_of(lm, policy_vars, both, rng, train)
        moe_losses = None
    ref, _ = sequence_logps_of(lm, ref_vars, both)
    ref = jax.lax.stop_gradient(ref)
    policy, policy_kl, ref, ref_kl = logps[:b], logps[b:], ref[:b], ref[b:]
    w = kl_ok.astype(jnp.float32)
    kl = jax.lax.stop_gradient(jnp.maximum(((policy_kl - ref_kl) * w).sum() / jnp.maximum(w.sum(), 1.0), 0.0))
    label = batch.label.astype(bool)
    losses = kto_losses(policy, ref, kl, label, d.beta, d.desirable_weight, d.undesirable_weight)
    valid = _valid(tb).astype(jnp.float32)
    total = lambda x: (x * valid).sum()
    sg = jax.lax.stop_gradient
    reward = sg(d.beta * (policy - ref))
    n_valid = valid.sum()

    def class_mean(x, mask):  # the micro-batch's class mean, weighted by its size (see module docstring)
        m = mask.astype(jnp.float32) * valid
        return (x * m).sum() / jnp.maximum(m.sum(), 1.0) * n_valid

    chosen_r, rejected_r = class_mean(reward, label), class_mean(reward, ~label)
    sums = {
        "loss": total(losses),
        "kl": kl * n_valid,
        "rewards/chosen": chosen_r,
        "rewards/rejected": rejected_r,
        "margins": chosen_r - rejected_r,
        "logps/chosen": class_mean(sg(policy), label),
        "logps/rejected": class_mean(sg(policy), ~label),
        "accuracy": total(jnp.where(label, policy - ref > kl, policy - ref < kl).astype(jnp.float32)),
        "tokens": (tb.segment_ids > 0).sum().astype(jnp.float32),
    }
    return with_moe(lm.arch, moe_losses, total(losses), sums, n_valid)


def prepare(p: Prepare) -> Prepared:
    """The reference for this run: adapters off under PEFT, else a frozen copy of the trained leaves."""
    mode = reference.reference_mode(p.cfg, p.trainable)
    if mode == "precomputed":
        raise config_error(
            p.cfg, "dpo.precompute_ref_log_probs",
            "stage kto cannot use dpo.precompute_ref_log_probs: its KL reference point pairs each prompt with "
            "another row's completion, different in every batch; set it to false", RunError,
        )  # fmt: skip
    log.info("kto: reference=%s", mode)
    frozen = p.frozen
    if mode == "frozen_copy" and not p.abstract:
        frozen = reference.add_frozen_copy(frozen, p.trainable)
    return Prepared(p.trainable, frozen, p.multipliers, p.train_it, p.eval_it)


KTO = Method("kto", "kto", loss_fn, denominator, prepare=prepare)
