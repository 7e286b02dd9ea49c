"""`LM`: the policy forward every method shares — hidden states once, then chunked target log-probs.

Methods never call the decoder directly: they ask an `LM` for `TokenStats` of a `TokenBatch`, under the
variables they choose (policy = base + adapters; reference = the same call without the adapter collections).

Mixture-of-experts models: the policy forward of every stage goes through `hidden_moe` / `stats_moe`, which
also return the router losses (models/moe.py `moe_losses`: {"aux_loss", "z_loss"}; None for a dense model,
which runs exactly as before), and the stage's loss adds them with `with_moe`. Reference forwards, generation
and the value model use `hidden` / `stats`, which never collect router statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxtune.data.batch import TokenBatch
from jaxtune.methods.logps import TokenStats, token_stats
from jaxtune.models import moe
from jaxtune.models.arch import ArchConfig
from jaxtune.models.decoder import Decoder


@dataclass(frozen=True)
class LM:
    arch: ArchConfig
    chunk: int | None = None  # positions per log-prob chunk; None: sized for ~256 MB of fp32 logits

    def hidden(self, variables, batch: TokenBatch, rng=None, train: bool = False) -> jax.Array:
        decoder = Decoder(self.arch, deterministic=not train)
        rngs = {"dropout": rng} if (train and rng is not None) else {}
        return decoder.apply(variables, batch.input_ids, batch.segment_ids, batch.positions, rngs=rngs)

    def hidden_moe(self, variables, batch: TokenBatch, rng=None, train: bool = False):
        """(hidden [B, T, D], router losses or None): `hidden` plus the MoE router statistics."""
        if not self.arch.num_experts:
            return self.hidden(variables, batch, rng, train), None
        decoder = Decoder(self.arch, deterministic=not train)
        rngs = {"dropout": rng} if (train and rng is not None) else {}
        hidden, state = decoder.apply(
            variables, batch.input_ids, batch.segment_ids, batch.positions, rngs=rngs, mutable=[moe.COLLECTION]
        )
        return hidden, moe.moe_losses(self.arch, state.get(moe.COLLECTION, {}))

    def stats_moe(self, variables, batch: TokenBatch, rng=None, train: bool = False):
        """(TokenStats, router losses or None)."""
        hidden, losses = self.hidden_moe(variables, batch, rng, train)
        return self.stats_from_hidden(variables, hidden, batch), losses

    def stats(self, variables, batch: TokenBatch, rng=None, train: bool = False) -> TokenStats:
        return self.stats_from_hidden(variables, self.hidden(variables, batch, rng, train), batch)

    def stats_from_hidden(self, variables, hidden, batch: TokenBatch) -> TokenStats:
        decoder = Decoder(self.arch)

        def head(h):  # [B, C, D] -> [B, C, V]
            return decoder.apply(variables, h, method=Decoder.logits)

        return token_stats(head, hidden, batch.targets, self.chunk)


def with_moe(arch: ArchConfig, losses, loss, sums: dict, weight):
    """Add the router losses of a policy forward to a stage's summed loss and metric sums.

    `weight` is the micro-batch's share of the step's denominator (the stage's `denominator(batch)`): the step
    divides the summed loss by the global denominator, so the step's loss gets router_aux_loss_coef x aux_loss
    + router_z_loss_coef x z_loss (a denominator-weighted mean over accumulation micro-batches, each one's
    losses over its own tokens as transformers computes them per forward), and `moe/aux_loss`, `moe/z_loss`
    are logged as the same means. Dense models (losses None): unchanged."""
    if losses is None:
        return loss, sums
    w = jnp.asarray(weight, jnp.float32)
    aux, z = losses["aux_loss"], losses["z_loss"]
    extra = arch.router_aux_loss_coef * aux + arch.router_z_loss_coef * z
    sg = jax.lax.stop_gradient
    return loss + w * extra, {**sums, "moe/aux_loss": w * sg(aux), "moe/z_loss": w * sg(z)}
