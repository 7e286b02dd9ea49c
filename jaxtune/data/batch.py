"""Typed batches: the contract between the data pipeline and `methods/`.

All arrays are numpy (the trainer device_puts them), shaped [B, T] unless noted. Targets are already shifted
inside each packed segment (targets[t] = input_ids[t+1] of the same document), so no position ever predicts
across a document boundary and the model needs no label shifting. `loss_mask` is the weight of `targets[t]`:
0 on prompts, padding and segment ends; a message's `loss_weight` where one was given.
"""

from __future__ import annotations

import flax.struct
import numpy as np


@flax.struct.dataclass
class TokenBatch:
    input_ids: np.ndarray  # [B, T] int32, 0 in padded slots
    targets: np.ndarray  # [B, T] int32, next token within the segment, 0 where none
    loss_mask: np.ndarray  # [B, T] float32, weight of targets[t]
    segment_ids: np.ndarray  # [B, T] int32, 1, 2, ... per packed document; 0 = padding
    positions: np.ndarray  # [B, T] int32, position within its own segment

    @property
    def shape(self) -> tuple[int, int]:
        return self.input_ids.shape


@flax.struct.dataclass
class PreferenceBatch:
    """Row b of `chosen` and of `rejected` continue the same prompt; both share [B, T]."""

    chosen: TokenBatch
    rejected: TokenBatch


@flax.struct.dataclass
class KTOBatch:
    batch: TokenBatch
    label: np.ndarray  # [B] bool: desirable completion


@flax.struct.dataclass
class PromptBatch:
    """PPO/GRPO prompts, left-padded so generation appends on the right."""

    prompts: TokenBatch  # loss_mask all 0; targets inside the prompt
    # Reference answers for reward functions (None where the data had none). Static metadata, not arrays:
    # keep it out of jitted functions.
    answers: tuple = flax.struct.field(pytree_node=False, default=())
