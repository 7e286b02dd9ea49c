"""`LM`: the policy forward every method shares — hidden states once, then chunked target log-probs.

Methods never call the decoder directly: they ask an `LM` for `TokenStats` of a `TokenBatch`, under the
variables they choose (policy = base + adapters; reference = the same call without the adapter collections).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax

from jaxtune.data.batch import TokenBatch
from jaxtune.methods.logps import TokenStats, token_stats
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

    def stats(self, variables, batch: TokenBatch, rng=None, train: bool = False) -> TokenStats:
        hidden = self.hidden(variables, batch, rng, train)  # [B, T, D]
        decoder = Decoder(self.arch)

        def head(h):  # [B, C, D] -> [B, C, V]
            return decoder.apply(variables, h, method=Decoder.logits)

        return token_stats(head, hidden, batch.targets, self.chunk)
