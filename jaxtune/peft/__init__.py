"""Parameter-efficient fine-tuning: every method as a separate trainable pytree beside the frozen base.

    plan = jaxtune.peft.prepare(model, {"method": "lora", "rank": 8}, rng)   # the trainer's entry point
    adapters = jaxtune.peft.init(model, {"method": "lora", "rank": 8}, rng)   # -> Adapters for model.logits
    jaxtune.peft.save_adapter(model, adapters, "out")                          # PEFT's adapter layout
    adapters = jaxtune.peft.load_adapter(model, "peft_dir")
    jaxtune.peft.merge_and_export(model, adapters, "merged")                   # a plain HF model directory

Methods (`METHODS`, the names `method.name` / `method.combine` take):
  full        all base params train                               select.py
  lora        LoRA / rsLoRA / DoRA / PiSSA / LoRA+ on chosen projections   lora.py
              (and on MoE experts / routers, PEFT target_parameters)       experts.py
  dora        LoRA with DoRA on                                   lora.py
  qlora       LoRA over an NF4 / int8 quantised base               lora.py + quant.py
  adapter     Houlsby (attention + MLP) or Pfeiffer (MLP) bottlenecks       adapters.py
  ia3         (IA)^3 rescaling of k, v and the down-projection input        adapters.py
  prompt      prompt tuning: learned virtual tokens at the input            prompts.py
  ptuning     P-tuning: virtual tokens from an MLP / LSTM encoder           prompts.py
  prefix      prefix tuning: learned per-layer keys / values (opt. MLP)     prompts.py
  ptuning_v2  P-tuning v2 (= deep prefix tuning, same implementation)       prompts.py
  bitfit      biases only (zero biases added where the model has none)      select.py
  freeze      the last (or first) N layers, optionally some modules only    select.py
"""

from __future__ import annotations

import jax

from jaxtune.models.model import Adapters, Model
from jaxtune.peft import quant  # noqa: F401  (registers the NF4 / int8 dequantisers with the model)
from jaxtune.peft.adapter_load import load_adapter
from jaxtune.peft.interop import merge_and_export, save_adapter
from jaxtune.peft.names import PeftConfigError
from jaxtune.peft.plan import BUILDERS as METHODS
from jaxtune.peft.plan import Plan, merge_variables, prepare
from jaxtune.peft.quant import load_quantized

__all__ = [
    "METHODS",
    "PeftConfigError",
    "Plan",
    "init",
    "load_adapter",
    "load_quantized",
    "merge_and_export",
    "merge_variables",
    "prepare",
    "save_adapter",
]


def init(model: Model, method_cfg, rng: jax.Array | int = 0, **quantization) -> Adapters:
    """Fresh adapters for `model.logits(..., adapters=)`: the adapter part of `prepare`'s plan.

    Methods that train base params (full, BitFit's existing biases, freeze) have no adapter-only form: use
    `prepare`, which returns the frozen and trainable pytrees. PiSSA's adapters come relative to the original
    weights (a rank-2r LoRA whose second half cancels the principal part at init).
    """
    plan = prepare(model, method_cfg, rng, **quantization)
    if "params" in plan.trainable:
        raise PeftConfigError(
            f"method {'+'.join(plan.methods)} trains base parameters, which Adapters cannot carry: "
            "use jaxtune.peft.prepare(model, method_cfg, rng) and its Plan"
        )
    return plan.adapters(plan.trainable)
