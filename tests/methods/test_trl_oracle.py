"""jaxtune's preference and GRPO losses against TRL's own code, called on the same numbers.

Every oracle below is a function of the installed `trl` (>= 1.16), not a re-typed formula. TRL's losses are
methods of its trainers; each test builds a bare trainer with `object.__new__(Trainer)`, sets only the
attributes that method reads (the defaults of TRL's own config for everything we do not vary), and calls it:

| jaxtune                                   | TRL 1.16                                                        |
|-------------------------------------------|-----------------------------------------------------------------|
| dpo.pair_losses sigmoid / robust /        | DPOTrainer._compute_loss, precompute_ref_logps=True, with a     |
|   hinge / ipo                             | stand-in model whose fused-LM-head output holds fixed per-token |
|                                           | log-probs (so TRL does its own summing and IPO's per-token      |
|                                           | normalisation from the completion mask)                         |
| dpo.pair_losses sigmoid, ε > 0 (cDPO)     | CPOTrainer.cpo_loss, loss_type="sigmoid", on the log-ratios     |
|                                           | π - π_ref (TRL 1.16's DPOTrainer dropped label smoothing from   |
|                                           | "sigmoid": it now only enters robust/exo_pair/aot)              |
| dpo.pair_losses simpo                     | CPOTrainer.cpo_loss, loss_type="simpo"                          |
| dpo.pair_losses orpo (odds-ratio part)    | ORPOTrainer.odds_ratio_loss (its losses and log_odds outputs)   |
| kto.kto_losses                            | KTOTrainer._compute_loss (TRL computes z0 from the KL rows)     |
| dpo.loss_fn metrics (loss, rewards/*,     | DPOTrainer._compute_loss's logged metrics (sigmoid, robust,     |
|   margins, accuracy, logps/*), through    | hinge, ipo), ORPOTrainer.get_batch_loss_metrics (the whole ORPO |
|   dpo.DPO's finalize                      | loss: nll over prompt + response, log_odds_*), CPOTrainer.get_  |
|                                           | batch_loss_metrics (simpo, cpo_alpha=0); one token-level stand- |
|                                           | in model on both sides, jaxtune's own batching                  |
| kto.loss_fn metrics (loss, kl, rewards/*, | KTOTrainer._compute_loss's logged metrics, given TRL's rotated  |
|   logps/*, margins)                       | KL rows; jaxtune builds its own (`kto.mismatched`)              |
| grpo.objective                            | GRPOTrainer._compute_loss, loss_type="grpo", with               |
|                                           | `_get_per_token_logps_and_entropies` replaced by the fixed      |
|                                           | per-token log-probs                                             |
| grpo.group_advantages                     | TRL normalises rewards inline in `_generate_and_score_completions|
|                                           | (generation, reward functions, vLLM ...): not callable alone;   |
|                                           | compared with its expression built on TRL's `nanstd`            |

Batched calls give TRL's mean loss and, by torch autograd through TRL's code, its gradient with respect to
the policy log-probs, compared with jax.grad of the mean of ours; one-pair calls give per-pair losses and
rewards. Float64 on both sides (jax inside `jax.enable_x64`), except ORPO, which TRL casts to float32. The
metric tests compare what each side reports for one batch, every metric by name.
"""

from __future__ import annotations

import collections
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl import DPOTrainer, GRPOTrainer, KTOTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

from jaxtune.config import DPOConfig, load_config  # noqa: E402
from jaxtune.methods import dpo, grpo, kto  # noqa: E402

RTOL, ATOL = 1e-6, 1e-8  # float64; both sides do the same few operations in the same precision


def close(ours, theirs, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------- bare TRL trainers


class Accelerator:
    """The part of accelerate.Accelerator the loss methods touch, for one process on CPU."""

    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def unwrap_model(self, model):
        return model


class FusedLM:
    """Stands in for the policy: TRL calls model(..., labels=, fused_lm_head=True) and reads `.log_probs`
    [B, T-1] (and, for its metrics only, entropy / mean_logits / is_top1). `outputs` maps the first input id
    of a batch to the per-token log-probs that batch gets (KTO calls it for the KL rows as well)."""

    training = True

    def __init__(self, outputs: dict[int, torch.Tensor]):
        self.outputs = outputs

    def __call__(self, input_ids, labels=None, fused_lm_head=False, **kwargs):
        assert fused_lm_head, "TRL 1.16 asks for the fused LM head"
        log_probs = self.outputs[int(input_ids[0, 0])]
        assert log_probs.shape == (input_ids.shape[0], input_ids.shape[1] - 1)
        zeros = torch.zeros_like(log_probs.detach())
        return types.SimpleNamespace(
            log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None
        )


def bare(cls, **attrs):
    trainer = object.__new__(cls)
    trainer.accelerator = Accelerator()
    trainer._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    trainer.aux_loss_enabled = False
    for k, v in attrs.items():
        setattr(trainer, k, v)
    return trainer


def dpo_trainer(loss_type, beta, label_smoothing=0.0):
    return bare(
        DPOTrainer, model=FusedLM({}), beta=beta, label_smoothing=label_smoothing, loss_types=[loss_type],
        loss_weights=[1.0], precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl",
        use_weighting=False,
    )  # fmt: skip


def cpo_trainer(loss_type, beta, label_smoothing=0.0, simpo_gamma=0.5):
    return bare(CPOTrainer, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                simpo_gamma=simpo_gamma, alpha=0.0)  # fmt: skip


# ------------------------------------------------------------------------------------------ random numbers


def completions(rng, rows, t):
    """Per-token log-probs [rows, T-1] on completion tokens only, and the completion mask [rows, T] (the
    prompt is 2-5 tokens, the completion 1..T-prompt tokens): TRL sums `log_probs` itself, and IPO divides by
    the completion mask's row sums."""
    mask = np.zeros((rows, t), np.int64)
    for i in range(rows):
        p = rng.integers(2, 6)
        mask[i, p : p + rng.integers(1, t - p + 1)] = 1
    token_logps = rng.uniform(-6.0, -0.01, (rows, t - 1)) * mask[:, 1:]
    return token_logps, mask


def dpo_inputs(token_logps, mask, ref_sums, first_id=1):
    n = len(ref_sums) // 2
    ids = torch.full(mask.shape, first_id, dtype=torch.long)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "completion_mask": torch.tensor(mask),
        "ref_chosen_logps": torch.tensor(ref_sums[:n]),
        "ref_rejected_logps": torch.tensor(ref_sums[n:]),
    }


def trl_dpo(trainer, token_logps, mask, ref_sums):
    """TRL's loss (mean over pairs), its gradient w.r.t. each row's summed log-prob, and its logged metrics."""
    t_logps = torch.tensor(token_logps, requires_grad=True)
    trainer.model = FusedLM({1: t_logps})
    trainer._metrics["train"].clear()
    loss = trainer._compute_loss(trainer.model, dpo_inputs(token_logps, mask, ref_sums), return_outputs=False)
    loss.backward()
    # every completion token of a row has the same gradient (the row's sum enters linearly)
    grads = (t_logps.grad.numpy() * mask[:, 1:]).sum(1) / mask[:, 1:].sum(1)
    return float(loss.detach()), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def ours_dpo(cfg, sums, ref_sums, counts):
    """(mean loss, its gradient w.r.t. the summed log-probs [2B], per-pair losses, chosen and rejected rewards)
    — the summed log-probs turned into per-token means for the loss types jaxtune length-normalises; rewards
    from the sums (what TRL's DPOTrainer logs for all of these loss types, IPO included)."""
    n = len(sums) // 2

    def per_pair(sums):
        logps, ref = sums, jnp.asarray(ref_sums)
        if cfg.loss_type in dpo.MEAN_LOGPS:
            logps, ref = logps / counts, ref / counts
        return dpo.pair_losses(logps[:n], logps[n:], ref[:n], ref[n:], cfg)

    with jax.enable_x64(True):
        sums = jnp.asarray(sums)
        losses = per_pair(sums)
        rc, rr = dpo.pair_rewards(sums[:n], sums[n:], ref_sums[:n], ref_sums[n:], cfg)
        grad = jax.grad(lambda s: per_pair(s).mean())(sums)
        return float(losses.mean()), np.asarray(grad), np.asarray(losses), np.asarray(rc), np.asarray(rr)


# ------------------------------------------------------------------------------------------------ DPO


@pytest.mark.parametrize(
    "seed,loss_type,beta,eps",
    [(0, "sigmoid", 0.1, 0.0), (1, "sigmoid", 0.5, 0.0), (2, "robust", 0.1, 0.1), (3, "robust", 0.3, 0.25),
     (4, "hinge", 0.1, 0.0), (5, "hinge", 1.0, 0.0), (6, "ipo", 0.1, 0.0), (7, "ipo", 0.5, 0.0)],
)  # fmt: skip
def test_dpo_family_matches_trl_dpo_trainer(seed, loss_type, beta, eps):
    """hinge with β = 1 puts pairs on both sides of the kink (|βz| spans ~0..20 with summed log-probs)."""
    rng = np.random.default_rng(seed)
    pairs, t = 12, 10
    token_logps, mask = completions(rng, 2 * pairs, t)
    sums = token_logps.sum(1)
    ref_sums = sums + rng.normal(0.0, 3.0, 2 * pairs)
    counts = mask.sum(1).astype(np.float64)  # IPO: TRL divides by completion_mask's row sums
    cfg = DPOConfig(beta=beta, loss_type=loss_type, label_smoothing=eps)
    trainer = dpo_trainer(loss_type, beta, eps)

    loss, grads, metrics = trl_dpo(trainer, token_logps, mask, ref_sums)
    our_loss, our_grads, our_losses, our_rc, our_rr = ours_dpo(cfg, sums, ref_sums, counts)
    close(our_loss, loss)
    close(our_grads, grads)
    if loss_type == "hinge" and beta == 1.0:
        assert 0 < (our_losses == 0).sum() < pairs, "both sides of the hinge"

    for i in range(pairs):  # per pair: one-pair batches
        rows = [i, pairs + i]
        loss_i, _, m = trl_dpo(trainer, token_logps[rows], mask[rows], ref_sums[rows])
        close(our_losses[i], loss_i)
        close(our_rc[i], m["rewards/chosen"])
        close(our_rr[i], m["rewards/rejected"])
    close(our_rc.mean(), metrics["rewards/chosen"])
    close(our_rr.mean(), metrics["rewards/rejected"])


def cpo(trainer, chosen, rejected):
    """TRL's cpo_loss on float64 tensors: (losses, chosen rewards, rejected rewards, ∂Σloss/∂chosen, ∂/∂rejected)."""
    c = torch.tensor(chosen, requires_grad=True)
    r = torch.tensor(rejected, requires_grad=True)
    losses, cr, rr = trainer.cpo_loss(c, r)
    losses.sum().backward()
    return [x.detach().numpy() for x in (losses, cr, rr, c.grad, r.grad)]


def ours_pairs(cfg, pc, pr, rc, rr):
    with jax.enable_x64(True):
        args = [jnp.asarray(x) for x in (pc, pr, rc, rr)]
        losses, (cr, rrw) = dpo.pair_losses(*args, cfg), dpo.pair_rewards(*args, cfg)
        gc, gr = jax.grad(lambda pc, pr: dpo.pair_losses(pc, pr, *args[2:], cfg).sum(), argnums=(0, 1))(
            *args[:2]
        )
        return [np.asarray(x) for x in (losses, cr, rrw, gc, gr)]


@pytest.mark.parametrize("beta,eps", [(0.1, 0.1), (0.5, 0.3), (0.1, 0.0)])
def test_cdpo_matches_trl_conservative_sigmoid(beta, eps):
    """cDPO's loss is the conservative sigmoid of β z, z = (pc - rc) - (pr - rr): TRL's CPOTrainer applies it
    to logits = chosen - rejected, so it gets the log-ratios pc - rc and pr - rr. Rewards are TRL's β·input,
    i.e. β (pc - rc) and β (pr - rr) as ours."""
    rng = np.random.default_rng(int(eps * 100))
    pc, pr, rc, rr = rng.normal(-50.0, 15.0, (4, 16))
    theirs = cpo(cpo_trainer("sigmoid", beta, eps), pc - rc, pr - rr)
    ours = ours_pairs(DPOConfig(beta=beta, label_smoothing=eps), pc, pr, rc, rr)
    for o, t in zip(ours, theirs):
        close(o, t)


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (2.0, 0.5, 0.1), (10.0, 3.0, 0.2)])
def test_simpo_matches_trl_cpo_loss(beta, gamma, eps):
    """SimPO on per-token mean log-probs, no reference: the reference arguments must play no part."""
    rng = np.random.default_rng(int(beta + gamma * 10 + eps * 100))
    pc, pr = rng.uniform(-3.0, -0.05, (2, 16))
    theirs = cpo(cpo_trainer("simpo", beta, eps, simpo_gamma=gamma), pc, pr)
    junk = rng.normal(0.0, 100.0, (2, 16))
    ours = ours_pairs(
        DPOConfig(beta=beta, loss_type="simpo", simpo_gamma=gamma, label_smoothing=eps), pc, pr, *junk
    )
    for o, t in zip(ours, theirs):
        close(o, t)


@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_orpo_odds_ratio_matches_trl(lam):
    """TRL's odds_ratio_loss returns +λ log σ(Δ) per pair (the trainer subtracts it from the NLL) and the mean Δ;
    ours is -α pc - λ log σ(Δ), so the odds-ratio part is loss + α pc. Float32: TRL casts to float32. Means
    from -3 to -1e-5 cover both branches of log(1 - e^p)."""
    rng = np.random.default_rng(int(lam * 10))
    pc = np.concatenate([rng.uniform(-3.0, -0.05, 14), [-1e-5, -0.69]]).astype(np.float32)
    pr = np.concatenate([rng.uniform(-3.0, -0.05, 14), [-2.0, -1e-4]]).astype(np.float32)
    trainer = bare(ORPOTrainer, beta=lam)
    c, r = torch.tensor(pc, requires_grad=True), torch.tensor(pr, requires_grad=True)
    losses, cr, rr, _, log_odds_mean = trainer.odds_ratio_loss(c, r)
    (-losses).sum().backward()

    alpha = 1.0
    cfg = DPOConfig(loss_type="orpo", orpo_alpha=alpha, orpo_beta=lam)
    zero = jnp.zeros(16)
    part = lambda pc, pr: dpo.pair_losses(pc, pr, zero, zero, cfg) + alpha * pc  # nll = -pc: the response's
    ours = dpo.pair_losses(jnp.asarray(pc), jnp.asarray(pr), zero, zero, cfg)
    our_cr, our_rr = dpo.pair_rewards(jnp.asarray(pc), jnp.asarray(pr), zero, zero, cfg)
    close(ours + alpha * pc, -losses.detach().numpy(), rtol=1e-5, atol=1e-7)
    close(our_cr, cr.numpy(), rtol=1e-6)
    close(our_rr, rr.numpy(), rtol=1e-6)
    close(
        dpo.log_odds_ratio(jnp.asarray(pc), jnp.asarray(pr)).mean(), float(log_odds_mean.detach()), rtol=1e-5
    )
    for i in range(16):  # TRL returns only the mean Δ: one pair at a time for each Δ
        *_, lo_i = trainer.odds_ratio_loss(c[i : i + 1].detach(), r[i : i + 1].detach())
        close(dpo.log_odds_ratio(jnp.float32(pc[i]), jnp.float32(pr[i])), float(lo_i), rtol=1e-5, atol=1e-6)
    gc, gr = jax.grad(lambda a, b: part(a, b).sum(), argnums=(0, 1))(jnp.asarray(pc), jnp.asarray(pr))
    close(gc, c.grad.numpy(), rtol=1e-4, atol=1e-6)
    close(gr, r.grad.numpy(), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ KTO


def kto_inputs(mask, kl_mask, labels, ref, ref_kl):
    ids = torch.full(mask.shape, 1, dtype=torch.long)
    kl_ids = torch.full(kl_mask.shape, 2, dtype=torch.long)  # the stand-in model tells the KL rows by this
    return {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.tensor(mask),
        "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids),
        "KL_completion_mask": torch.tensor(kl_mask), "label": torch.tensor(labels),
        "ref_logps": torch.tensor(ref), "ref_KL_logps": torch.tensor(ref_kl),
    }  # fmt: skip


def trl_kto(trainer, token_logps, mask, labels, ref, kl_token_logps, kl_mask, ref_kl):
    t_logps = torch.tensor(token_logps, requires_grad=True)
    trainer.model = FusedLM({1: t_logps, 2: torch.tensor(kl_token_logps)})
    trainer._metrics["train"].clear()
    inputs = kto_inputs(mask, kl_mask, labels, ref, ref_kl)
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    loss.backward()
    grads = (t_logps.grad.numpy() * mask[:, 1:]).sum(1) / mask[:, 1:].sum(1)
    return float(loss.detach()), grads, trainer._metrics["train"]["kl"][-1]


@pytest.mark.parametrize(
    "beta,wd,wu,kl_shift", [(0.1, 1.0, 1.0, 2.0), (0.5, 1.0, 1.5, 1.0), (0.1, 1.33, 1.0, -3.0)]
)
def test_kto_matches_trl_kto_trainer(beta, wd, wu, kl_shift):
    """TRL computes z0 = max(0, mean(KL policy - KL reference)) from the KL rows; kl_shift < 0 makes that
    mean negative, so the clamp is tested too. Ours gets TRL's z0 (what jaxtune's loss_fn computes from its
    mismatched rows) and must give TRL's per-example losses for desirable and undesirable rows."""
    rng = np.random.default_rng(int(beta * 10 + wu * 100 + kl_shift))
    rows, t = 12, 9
    token_logps, mask = completions(rng, rows, t)
    kl_token_logps, kl_mask = completions(rng, rows, t)
    labels = np.array([True, False] * (rows // 2))
    rng.shuffle(labels)
    sums = token_logps.sum(1)
    ref = sums + rng.normal(0.0, 4.0, rows)
    ref_kl = kl_token_logps.sum(1) + rng.normal(-kl_shift, 1.0, rows)
    trainer = bare(KTOTrainer, calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=beta,
                   desirable_weight=wd, undesirable_weight=wu)  # fmt: skip

    loss, grads, z0 = trl_kto(trainer, token_logps, mask, labels, ref, kl_token_logps, kl_mask, ref_kl)
    assert z0 == pytest.approx(max(0.0, float((kl_token_logps.sum(1) - ref_kl).mean())), rel=1e-12)
    assert (z0 == 0.0) == (kl_shift < 0)
    with jax.enable_x64(True):
        f = lambda s: kto.kto_losses(s, jnp.asarray(ref), z0, jnp.asarray(labels), beta, wd, wu)
        losses = np.asarray(f(jnp.asarray(sums)))
        our_grads = np.asarray(jax.grad(lambda s: f(s).mean())(jnp.asarray(sums)))
    close(losses.mean(), loss)
    close(our_grads, grads)
    for i in range(rows):  # each row alone, against the same KL rows (so the same z0)
        loss_i, _, _ = trl_kto(trainer, token_logps[i : i + 1], mask[i : i + 1], labels[i : i + 1], ref[i : i + 1],
                               kl_token_logps, kl_mask, ref_kl)  # fmt: skip
        close(losses[i], loss_i)


# ------------------------------------------------- metrics: jaxtune's loss_fn and TRL's trainers on the same tokens
#
# Both sides get one tiny "model" whose logits at position t are table[input_ids[t]] + pos[t] (float64): TRL
# calls it as its model (fused LM head or plain logits), jaxtune's loss_fn as its `LM` (`stats`), so each side
# does its own masking, summing, normalising, reference pairing and metric bookkeeping from the same token rows.
# The rows go through jaxtune's own batching (bucketed, so wider than TRL's), TRL gets them unpadded-to-bucket
# as its collators make them.

V = 16


def tables(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 1.5, (V, V)), rng.normal(0.0, 1.5, (V, V)), rng.normal(0.0, 0.5, (64, V))


class TorchTokenLM:
    """TRL's model: fused-LM-head log-probs (0 where the label is -100), or plain logits."""

    training = True

    def __init__(self, table, pos):
        self.table, self.pos = torch.tensor(table), torch.tensor(pos)

    def __call__(self, input_ids, attention_mask=None, labels=None, fused_lm_head=False, **kwargs):
        logits = self.table[input_ids] + self.pos[: input_ids.shape[1]]
        if not fused_lm_head:
            return types.SimpleNamespace(logits=logits, aux_loss=None)
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None])[..., 0]
        log_probs = logp * (labels[:, 1:] != -100)
        zeros = torch.zeros_like(log_probs)
        return types.SimpleNamespace(
            log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None
        )


class JaxTokenLM:
    """jaxtune's `LM` for the same model: `variables["params"]["table"]` picks policy or reference."""

    # a table, not a decoder: no experts (the stages read lm.arch only for the MoE router losses)
    arch = types.SimpleNamespace(num_experts=0)

    def __init__(self, pos):
        self.pos = pos  # numpy float64: made a jax array inside `ours`, under enable_x64

    def stats(self, variables, batch, rng=None, train=False):
        from jaxtune.methods.logps import TokenStats

        ids = jnp.asarray(batch.input_ids)
        logits = variables["params"]["table"][ids] + self.pos[: ids.shape[1]]
        lp = jax.nn.log_softmax(logits, -1)
        logp = jnp.take_along_axis(lp, jnp.asarray(batch.targets)[..., None], -1)[..., 0]
        return TokenStats(logp, jax.nn.logsumexp(logits, -1), logits.mean(-1), jnp.zeros(ids.shape, bool))

    def stats_moe(self, variables, batch, rng=None, train=False):
        """The policy forward the stages call (`LM.stats_moe`): no experts, so no router losses."""
        return self.stats(variables, batch, rng, train), None


def jax_variables(policy, ref):
    """A frozen-copy reference (`reference.split` overlays it on the policy's params)."""
    from jaxtune.methods.reference import REFERENCE

    return {"params": {"table": policy}, REFERENCE: {"table": ref}}  # float64 numpy, as `pos`


def example(prompt, completion):
    from jaxtune.data.tokenize import Example

    ids = np.asarray(list(prompt) + list(completion), np.int32)
    return Example(ids, np.asarray([0.0] * len(prompt) + [1.0] * len(completion), np.float32), len(prompt))


def random_tokens(rng, lo, hi):
    return rng.integers(0, V, rng.integers(lo, hi + 1)).tolist()


def right_pad(rows, masks=None, value=0):
    """TRL's collators: right padding to the longest row; (ids, attention mask, completion mask)."""
    t = max(len(r) for r in rows)
    ids = torch.tensor([r + [value] * (t - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in rows])
    if masks is None:
        return ids, attention
    return ids, attention, torch.tensor([m + [0] * (t - len(m)) for m in masks])


def ours(method, lm, variables, batch, cfg):
    """jaxtune's reported metrics for one batch (one micro-batch per step): loss_fn, then finalize."""
    from jaxtune.methods.record import finalize

    with jax.enable_x64(True):
        _, sums = jax.jit(lambda v, b: method.loss_fn(lm, v, b, None, cfg, False))(variables, batch)
        out = finalize(sums, method.denominator(batch))
    return {k: float(v) for k, v in out.items()}


def close_metrics(ours_m, theirs_m, names, rtol=1e-9, atol=1e-10):
    """names: {jaxtune metric: TRL metric}; every one must be logged by both."""
    for mine, theirs in names.items():
        assert theirs in theirs_m, f"TRL logged no {theirs}"
        np.testing.assert_allclose(ours_m[mine], theirs_m[theirs], rtol=rtol, atol=atol, err_msg=mine)


PAIR_METRICS = {
    "loss": "loss", "rewards/chosen": "rewards/chosen", "rewards/rejected": "rewards/rejected",
    "margins": "rewards/margins", "accuracy": "rewards/accuracies", "logps/chosen": "logps/chosen",
    "logps/rejected": "logps/rejected",
}  # fmt: skip


def preference_rows(seed, pairs=6):
    rng = np.random.default_rng(seed)
    return [(p, random_tokens(rng, 1, 6), random_tokens(rng, 1, 6)) for p in
            (random_tokens(rng, 2, 5) for _ in range(pairs))]  # fmt: skip


def jax_pairs(rows, bucket_multiple=8):
    from jaxtune.data.batching import preference_batch

    return preference_batch([(example(p, c), example(p, r)) for p, c, r in rows], bucket_multiple)


@pytest.mark.parametrize(
    "seed,loss_type,beta,eps",
    [(0, "sigmoid", 0.1, 0.0), (1, "robust", 0.3, 0.2), (2, "hinge", 0.5, 0.0), (3, "ipo", 0.1, 0.0),
     (4, "ipo", 0.5, 0.0)],
)  # fmt: skip
def test_dpo_metrics_match_trl_dpo_trainer(seed, loss_type, beta, eps):
    """dpo.loss_fn's reported metrics against DPOTrainer._compute_loss's logged ones: rewards β × summed
    log-ratios and summed logps for every loss type, IPO included (its loss alone uses per-token means)."""
    policy, ref, pos = tables(seed)
    rows = preference_rows(seed)
    seqs = [p + c for p, c, _ in rows] + [p + r for p, _, r in rows]
    masks = [
        [0] * len(p) + [1] * len(x) for p, x in [(p, c) for p, c, _ in rows] + [(p, r) for p, _, r in rows]
    ]
    ids, attention, completion = right_pad(seqs, masks)
    labels = ids.masked_fill(completion == 0, -100)
    ref_sums = TorchTokenLM(ref, pos)(ids, labels=labels, fused_lm_head=True).log_probs.sum(1)
    n = len(rows)
    trainer = dpo_trainer(loss_type, beta, eps)
    trainer.model = TorchTokenLM(policy, pos)
    inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion,
              "ref_chosen_logps": ref_sums[:n], "ref_rejected_logps": ref_sums[n:]}  # fmt: skip
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    theirs = {k: v[-1] for k, v in trainer._metrics["train"].items()} | {"loss": float(loss)}

    cfg = load_config({"stage": "dpo", "dpo": {"loss_type": loss_type, "beta": beta, "label_smoothing": eps}})
    mine = ours(dpo.DPO, JaxTokenLM(pos), jax_variables(policy, ref), jax_pairs(rows), cfg)
    close_metrics(mine, theirs, PAIR_METRICS)
    assert 0.0 < theirs["rewards/accuracies"] < 1.0, "both outcomes among the pairs"
    if loss_type == "ipo":  # the switch: IPO's rewards from the means its loss uses (jaxtune's old metrics)
        cfg = load_config({"stage": "dpo", "dpo": {"loss_type": "ipo", "beta": beta, "ipo_rewards": "mean"}})
        means = ours(dpo.DPO, JaxTokenLM(pos), jax_variables(policy, ref), jax_pairs(rows), cfg)
        counts = completion.sum(1).double()
        lp = trainer.model(ids, labels=labels, fused_lm_head=True).log_probs.sum(1).detach()
        ratio = (lp - ref_sums) / counts
        close(means["rewards/chosen"], beta * ratio[:n].mean())
        close(means["logps/rejected"], (lp / counts)[n:].mean())
        close(means["loss"], mine["loss"])


def trl_pair_batch(rows):
    """ORPO / CPO inputs as their tokenize_row makes them: labels are the response (prompt -100)."""
    batch = {}
    for side, k in (("chosen", 1), ("rejected", 2)):
        ids, attention = right_pad([r[0] + r[k] for r in rows])
        labels = ids.clone()
        for i, r in enumerate(rows):
            labels[i, : len(r[0])] = -100
        labels[attention == 0] = -100
        batch |= {f"{side}_input_ids": ids, f"{side}_attention_mask": attention, f"{side}_labels": labels}
    return batch


def bare_pairwise(cls, **attrs):
    return bare(cls, is_encoder_decoder=False, padding_value=0, pad_token_id=0, **attrs)


@pytest.mark.parametrize("seed,lam", [(0, 0.1), (1, 0.5)])
def test_orpo_loss_and_metrics_match_trl_orpo_trainer(seed, lam):
    """ORPOTrainer.get_batch_loss_metrics (TRL's whole ORPO loss): its NLL is the token mean over the chosen
    rows' prompt and response (orpo_nll: sequence, the default); log probs are response means. TRL computes
    the odds-ratio part in float32, hence the tolerance."""
    policy, _, pos = tables(seed)
    rows = preference_rows(seed)
    trainer = bare_pairwise(ORPOTrainer, beta=lam)
    loss, theirs = trainer.get_batch_loss_metrics(TorchTokenLM(policy, pos), trl_pair_batch(rows))
    theirs["loss"] = float(loss)

    cfg = load_config({"stage": "dpo", "dpo": {"loss_type": "orpo", "orpo_beta": lam, "orpo_alpha": 1.0}})
    mine = ours(dpo.DPO, JaxTokenLM(pos), jax_variables(policy, policy), jax_pairs(rows), cfg)
    names = PAIR_METRICS | {"nll": "nll_loss"} | {k: k for k in ("log_odds_ratio", "log_odds_chosen")}
    close_metrics(mine, theirs, names, rtol=1e-6, atol=1e-7)

    # the paper's variant (orpo_nll: response): the mean over pairs of each chosen response's mean token NLL
    cfg = load_config({"stage": "dpo", "dpo": {"loss_type": "orpo", "orpo_beta": lam, "orpo_nll": "response"}})  # fmt: skip
    paper = ours(dpo.DPO, JaxTokenLM(pos), jax_variables(policy, policy), jax_pairs(rows), cfg)
    close(paper["nll"], -mine["logps/chosen"])
    assert abs(paper["nll"] - mine["nll"]) > 1e-3, "the two NLL variants differ on these rows"
    close(paper["loss"] - paper["nll"], mine["loss"] - mine["nll"])


@pytest.mark.parametrize("seed,beta,gamma,eps", [(0, 2.0, 0.5, 0.0), (1, 2.5, 1.0, 0.1)])
def test_simpo_loss_and_metrics_match_trl_cpo_trainer(seed, beta, gamma, eps):
    """CPOTrainer.get_batch_loss_metrics with loss_type simpo and cpo_alpha 0 (TRL's SimPO: no NLL term)."""
    policy, _, pos = tables(seed)
    rows = preference_rows(seed)
    trainer = bare_pairwise(CPOTrainer, loss_type="simpo", beta=beta, label_smoothing=eps, simpo_gamma=gamma,
                            alpha=0.0, cpo_alpha=0.0)  # fmt: skip
    loss, theirs = trainer.get_batch_loss_metrics(TorchTokenLM(policy, pos), trl_pair_batch(rows))
    theirs["loss"] = float(loss)
    dpo_cfg = {"loss_type": "simpo", "beta": beta, "simpo_gamma": gamma, "label_smoothing": eps}
    mine = ours(dpo.DPO, JaxTokenLM(pos), jax_variables(policy, policy), jax_pairs(rows),
                load_config({"stage": "dpo", "dpo": dpo_cfg}))  # fmt: skip
    close_metrics(mine, theirs, PAIR_METRICS)


@pytest.mark.parametrize(
    "seed,beta,wd,wu,kl_positive",
    [(0, 0.1, 1.0, 1.0, False), (1, 0.5, 1.0, 1.5, True), (2, 0.2, 1.33, 1.0, True)],
)
def test_kto_loss_and_metrics_match_trl_kto_trainer(seed, beta, wd, wu, kl_positive):
    """kto.loss_fn (its own mismatched KL rows from a bucketed batch) against KTOTrainer._compute_loss given
    TRL's KL rows (row i's prompt, row i-1's completion: its add_kl_completion_ids rotation) and the reference
    log-probs of both. The reference is another table: z0 is positive for some seeds and clamped to 0 for
    seed 0."""
    policy, ref, pos = tables(seed)
    rng = np.random.default_rng(seed + 10)
    rows = [(random_tokens(rng, 2, 5), random_tokens(rng, 1, 6)) for _ in range(6)]
    labels = [True, False, True, True, False, False]
    kl_rows = [(rows[i][0], rows[i - 1][1]) for i in range(len(rows))]

    def tokens(rs):
        masks = [[0] * len(p) + [1] * len(c) for p, c in rs]
        ids, attention, completion = right_pad([p + c for p, c in rs], masks)
        return ids, attention, completion, ids.masked_fill(completion == 0, -100)

    ids, attention, completion, lab = tokens(rows)
    kl_ids, kl_attention, kl_completion, kl_lab = tokens(kl_rows)
    ref_lm = TorchTokenLM(ref, pos)
    trainer = bare(KTOTrainer, calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=beta,
                   desirable_weight=wd, undesirable_weight=wu, model=TorchTokenLM(policy, pos))  # fmt: skip
    inputs = {
        "input_ids": ids, "attention_mask": attention, "completion_mask": completion,
        "KL_input_ids": kl_ids, "KL_attention_mask": kl_attention, "KL_completion_mask": kl_completion,
        "label": torch.tensor(labels),
        "ref_logps": ref_lm(ids, labels=lab, fused_lm_head=True).log_probs.sum(1),
        "ref_KL_logps": ref_lm(kl_ids, labels=kl_lab, fused_lm_head=True).log_probs.sum(1),
    }  # fmt: skip
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    theirs = {k: v[-1] for k, v in trainer._metrics["train"].items()} | {"loss": float(loss)}

    from jaxtune.data.batching import kto_batch

    batch = kto_batch([(example(p, c), lab) for (p, c), lab in zip(rows, labels)], bucket_multiple=8)
    dpo_cfg = {"beta": beta, "desirable_weight": wd, "undesirable_weight": wu}
    cfg = load_config({"stage": "kto", "dpo": dpo_cfg})
    mine = ours(kto.KTO, JaxTokenLM(pos), jax_variables(policy, ref), batch, cfg)
    names = {k: k for k in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")}  # fmt: skip
    close_metrics(mine, theirs, names | {"margins": "rewards/margins"})
    assert (theirs["kl"] > 0) == kl_positive


# ------------------------------------------------------------------------------------------------ GRPO


def grpo_trainer(beta, clip):
    return bare(
        GRPOTrainer, model=FusedLM({}), beta=beta, epsilon_low=clip, epsilon_high=clip, loss_type="grpo",
        importance_sampling_level="token", top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        use_vllm=False, vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None),
    )  # fmt: skip


def trl_grpo(trainer, logp, old, ref, adv, mask, prompt_len=3):
    t_logp = torch.tensor(logp, requires_grad=True)
    b, t = mask.shape

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == t and input_ids.shape == (b, prompt_len + t)
        return t_logp, torch.zeros_like(t_logp.detach()), None

    trainer._get_per_token_logps_and_entropies = per_token_logps_and_entropies
    trainer._metrics["train"].clear()
    inputs = {
        "prompt_ids": torch.ones((b, prompt_len), dtype=torch.long),
        "prompt_mask": torch.ones((b, prompt_len), dtype=torch.long),
        "completion_ids": torch.ones((b, t), dtype=torch.long),
        "completion_mask": torch.tensor(mask),
        "advantages": torch.tensor(adv),
        "old_per_token_logps": torch.tensor(old),
        "ref_per_token_logps": torch.tensor(ref),
    }
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return float(loss.detach()), t_logp.grad.numpy()


@pytest.mark.parametrize("seed,beta,clip", [(0, 0.04, 0.2), (1, 0.0, 0.2), (2, 0.1, 0.1), (3, 0.5, 0.3)])
def test_grpo_objective_matches_trl_compute_loss(seed, beta, clip):
    """Completions of 1..T tokens, log π_old = log π + N(0, 0.3): ratios e^±0.3 lie both inside and outside
    [1-ε, 1+ε], with advantages of both signs, so every branch of the min/clip is exercised. TRL's loss is
    the mean over completions of Σ_t loss_t / |o_i|: ours is `objective(...)[0].mean()`."""
    rng = np.random.default_rng(seed)
    b, t = 8, 7
    lengths = rng.integers(1, t + 1, b)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float64)
    logp = rng.uniform(-4.0, -0.05, (b, t))
    old = logp + rng.normal(0.0, 0.3, (b, t))
    ref = logp + rng.normal(0.0, 0.5, (b, t))
    adv = grpo.group_advantages(rng.normal(0.0, 1.0, b), group=4).astype(np.float64)

    loss, grad = trl_grpo(grpo_trainer(beta, clip), logp, old, ref, adv, mask)
    with jax.enable_x64(True):
        f = lambda lp: grpo.objective(lp, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv),
                                      jnp.asarray(mask), clip, beta)[0].mean()  # fmt: skip
        ours, our_grad = jax.value_and_grad(f)(jnp.asarray(logp))
        clipped = np.asarray(grpo.objective(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref),
                                            jnp.asarray(adv), jnp.asarray(mask), clip, beta)[3])  # fmt: skip
    assert clipped.max() > 0, "some ratios must be clipped"
    close(float(ours), loss)
    close(np.asarray(our_grad) * mask, grad * mask)


def test_grpo_ratio_one_is_the_policy_gradient_in_trl_too():
    """old = logp (num_iterations = 1): TRL drops old_per_token_logps then and uses logp.detach(); ours with
    old = logp must give the same loss."""
    rng = np.random.default_rng(5)
    b, t = 6, 5
    mask = np.ones((b, t))
    logp = rng.uniform(-3.0, -0.1, (b, t))
    ref = logp + rng.normal(0.0, 0.2, (b, t))
    adv = rng.normal(0.0, 1.0, b)
    loss, grad = trl_grpo(grpo_trainer(0.04, 0.2), logp, logp, ref, adv, mask)
    with jax.enable_x64(True):
        f = lambda lp: grpo.objective(lp, jnp.asarray(logp), jnp.asarray(ref), jnp.asarray(adv),
                                      jnp.asarray(mask), 0.2, 0.04)[0].mean()  # fmt: skip
        ours, our_grad = jax.value_and_grad(f)(jnp.asarray(logp))
    close(float(ours), loss)
    close(np.asarray(our_grad), grad)


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_trl_normalisation(scale):
    """TRL (GRPOTrainer._generate_and_score_completions, sum_then_normalize): A = r - mean_group(r), divided
    by nanstd_group(r) + 1e-4 unless scale_rewards="none". nanstd is TRL's (unbiased). Groups include a
    constant one (std 0: advantages 0)."""
    g = 4
    rng = np.random.default_rng(int(scale))
    rewards = np.concatenate([rng.normal(0.0, 2.0, 3 * g), np.full(g, 1.5)])
    r = torch.tensor(rewards)
    mean = torch.nanmean(r.view(-1, g), dim=1).repeat_interleave(g)
    std = nanstd(r.view(-1, g), dim=1).repeat_interleave(g)
    theirs = (r - mean) / (std + 1e-4) if scale else r - mean
    ours = grpo.group_advantages(rewards, g, scale=scale)  # float32
    close(ours, theirs.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ours[-g:], 0.0)
