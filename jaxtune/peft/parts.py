"""What one method contributes to a training plan (`Part`), and what it is built from (`Context`).

Each method module (lora, adapters, prompts, select) exposes `build(ctx) -> Part`; `plan.prepare` runs the
configured methods in order and combines their parts, so "LoRA + prefix" is two parts, not a third method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax

from jaxtune.config import MethodConfig
from jaxtune.models.model import Model
from jaxtune.peft import names
from jaxtune.peft import quant as quant_lib


@dataclass
class Context:
    model: Model  # its arch carries the quantisation format
    cfg: MethodConfig
    params: dict  # the base params as the previous parts left them (PiSSA replaces kernels by residuals)
    rng: jax.Array
    quant: dict | None = None  # QLoRA: the quantised kernels, which `params` then lacks

    def kernel(self, m: names.Module):
        """Module `m`'s base kernel in full precision: from `params`, or dequantised from `quant` one module at
        a time (never the whole model: that full-precision copy is what QLoRA avoids)."""
        if self.quant is not None and m in quant_lib.quantized_modules(self.model.arch):
            return quant_lib.dequantize_kernel(self.quant, m, self.model.arch)
        return names.get_path(self.params, (*m.path, "kernel"))


@dataclass
class Part:
    trainable: dict = field(default_factory=dict)  # adapter collections, e.g. {"lora": {...}}
    frozen: dict = field(default_factory=dict)  # extra frozen collections (none today but "quant")
    spec: dict = field(default_factory=dict)  # PeftSpec fields this method sets
    lr: dict = field(default_factory=dict)  # {collection: pytree of floats} where not 1.0 (LoRA+)
    params: dict | None = None  # replacement base params (PiSSA)
    # full / BitFit / freeze: '/'-joined base param path -> trainable
    select: Callable[[str], bool] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # for describe()
