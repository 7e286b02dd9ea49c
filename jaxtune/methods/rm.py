"""Reward modelling (stage `rm`): a scalar `score` head on the decoder, trained on chosen/rejected pairs.

The reward of a sequence is the score head (`jaxtune/models/score.py`, HF's `score` Linear) on the final hidden
state of its last real token. The loss per pair is the Bradley-Terry negative log-likelihood with a margin m
(Llama 2, Touvron et al. 2023, Eq. 2) and optional reward centring (Eisenstein et al. 2023, "Helping or
Herding?", Sec. 3), as TRL's `RewardTrainer.compute_loss`:

    L = -log σ(r_c - r_r - m) + c (r_c + r_r)²            m = rm.margin, c = rm.center_rewards_coef
    ∂L/∂r_c = -σ(m - (r_c - r_r)) + 2c (r_c + r_r),   ∂L/∂r_r = σ(m - (r_c - r_r)) + 2c (r_c + r_r)

(TRL takes m per example from a `margin` column and adds c · mean((r_c + r_r)²); here m is one number and both
terms are means over the pairs of the optimiser step.) Metrics: loss, accuracy (pairwise: r_c > r_r),
rewards/chosen, rewards/rejected, margins (r_c - r_r means).

The head trains with whatever the method trains: with LoRA it is `params/score` beside the adapters (PEFT's
`modules_to_save=["score"]`). A base loaded from a `*ForSequenceClassification` directory keeps its head.
Export writes that HF layout (`score.weight`, architectures, num_labels=1, pad_token_id) with adapters merged,
which `transformers.AutoModelForSequenceClassification` loads with the same scores, and which PPO reads as its
reward model.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxtune.config import config_error
from jaxtune.data.batch import PreferenceBatch
from jaxtune.errors import RunError
from jaxtune.methods.dpo import pair_batch, pair_mask
from jaxtune.methods.forward import with_moe
from jaxtune.methods.record import Method, Prepare, Prepared
from jaxtune.models.adapters_hook import UNMERGEABLE
from jaxtune.models.score import SCORE_MAP, init_score, seq_cls_config, sequence_scores

log = logging.getLogger("jaxtune.train")


def denominator(batch):
    """Pairs in the batch: the loss is a mean over pairs."""
    return pair_mask(batch).sum()


def rewards(lm, variables, batch: PreferenceBatch, rng=None, train: bool = False):
    """(chosen rewards [B], rejected rewards [B]) from one forward pass over both."""
    return rewards_moe(lm, variables, batch, rng, train)[:2]


def rewards_moe(lm, variables, batch: PreferenceBatch, rng=None, train: bool = False):
    """`rewards` and the MoE router losses of the pass (None for a dense model)."""
    both = pair_batch(batch.chosen, batch.rejected)  # [2B, T]
    hidden, moe_losses = lm.hidden_moe(variables, both, rng, train)  # [2B, T, D]
    r = sequence_scores(lm.arch, variables["params"], hidden, both.segment_ids)  # [2B]
    b = batch.chosen.input_ids.shape[0]
    return r[:b], r[b:], moe_losses


def pair_loss(r_c, r_r, margin: float = 0.0, center_coef: float = 0.0):
    """Per-pair Bradley-Terry loss with margin and centring (module docstring)."""
    loss = -jax.nn.log_sigmoid(r_c - r_r - margin)
    if center_coef:
        loss = loss + center_coef * jnp.square(r_c + r_r)
    return loss


def loss_fn(lm, variables, batch: PreferenceBatch, rng, cfg, train: bool = True):
    r_c, r_r, moe_losses = rewards_moe(lm, variables, batch, rng, train)
    valid = pair_mask(batch)
    losses = pair_loss(r_c, r_r, cfg.rm.margin, cfg.rm.center_rewards_coef)
    total = lambda x: (x * valid).sum()
    sg = jax.lax.stop_gradient
    sums = {
        "loss": total(losses),
        "accuracy": total((r_c > r_r).astype(jnp.float32)),
        "rewards/chosen": total(sg(r_c)),
        "rewards/rejected": total(sg(r_r)),
        "margins": total(sg(r_c - r_r)),
        "tokens": ((batch.chosen.segment_ids > 0).sum() + (batch.rejected.segment_ids > 0).sum()).astype(
            jnp.float32
        ),
    }
    return with_moe(lm.arch, moe_losses, total(losses), sums, valid.sum())


def prepare(p: Prepare) -> Prepared:
    """Put a trainable score head into the run: the base's own (a *ForSequenceClassification checkpoint) or a
    fresh one (`init_score`, seeded by the run)."""
    cfg, arch = p.cfg, p.lm.arch
    unmergeable = [c for c in UNMERGEABLE if c in p.trainable]
    if unmergeable and cfg.training.export_hf and not p.abstract:
        raise config_error(
            cfg, "method.name",
            f"{cfg.method.name} does not fit stage rm: it exports a *ForSequenceClassification model, which cannot "
            f"hold {'/'.join(unmergeable)} adapters: use method lora, qlora, dora, ia3, bitfit, freeze or full, or "
            "set training.export_hf=false", RunError,
        )  # fmt: skip
    frozen_params = dict(p.frozen["params"])
    trainable = dict(p.trainable)
    params = dict(trainable.get("params", {}))
    head = params.pop("score", None) or frozen_params.pop("score", None)
    if head is None:
        head = init_score(arch, jax.random.fold_in(jax.random.key(cfg.seed), 7))
        log.info("rm: new score head [%d, 1] on %s", arch.hidden_size, arch.model_type)
    params["score"] = head
    trainable["params"] = params
    multipliers = dict(p.multipliers)
    multipliers["params"] = {**multipliers.get("params", {}), "score": jax.tree.map(lambda _: 1.0, head)}
    frozen = {**p.frozen, "params": frozen_params}
    return Prepared(trainable, frozen, multipliers, p.train_it, p.eval_it)


def export(model, plan, trainable, out, mode: str = "auto") -> Path:
    """`auto` / `merge`: an `AutoModelForSequenceClassification` directory, adapters merged into the base.
    `adapter`: a PEFT `SEQ_CLS` adapter (the adapter plus `modules_to_save=["score"]`) over the base model, which
    `PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), out)` loads."""
    from jaxtune import peft
    from jaxtune.models.hf import save_model

    out = Path(out)
    if mode == "adapter":
        return _export_adapter(model, plan, trainable, out)
    # the head trains (prepare moved a loaded one out of the frozen params): take it from `trainable` only
    frozen = {**plan.frozen, "params": {k: v for k, v in plan.frozen["params"].items() if k != "score"}}
    base = dataclasses.replace(plan, frozen=frozen).base_model(trainable)  # trained leaves and head put back
    base = dataclasses.replace(base, hf_config=seq_cls_config(base.hf_config, model.tokenizer))
    adapters = plan.adapters(trainable)
    if {k for k in adapters.variables if k != "quant"}:
        peft.merge_and_export(base, adapters, out)
    else:
        save_model(base, out)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out))
    return out


def _export_adapter(model, plan, trainable, out: Path) -> Path:
    import json

    import numpy as np
    from safetensors.numpy import save_file

    from jaxtune import peft
    from jaxtune.models.safetensors_io import read_tensors
    from jaxtune.peft.interop import CONFIG, PREFIX, WEIGHTS

    base_params = sorted(set(trainable.get("params", {})) - {"score"})
    if base_params:
        raise peft.PeftConfigError(
            f"this reward model trains base parameters ({', '.join(base_params)}), which an adapter cannot hold: "
            "export it without --adapter (a sequence-classification model)"
        )
    adapters = plan.adapters({k: v for k, v in trainable.items() if k != "params"})
    peft.save_adapter(model, adapters, out)
    tensors = read_tensors(out / WEIGHTS)
    kernel = np.asarray(jax.device_get(trainable["params"]["score"]["kernel"]), np.float32)  # [D, 1]
    tensors[PREFIX + SCORE_MAP.hf] = np.ascontiguousarray(kernel.T)  # torch Linear [out, in]
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    config = json.loads((out / CONFIG).read_text())
    config.update(task_type="SEQ_CLS", modules_to_save=["score"])
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out))
    return out


RM = Method("rm", "pair", loss_fn, denominator, prepare=prepare, export=export)
