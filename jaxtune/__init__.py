"""jaxtune: fine-tune open LLMs in JAX/Flax.

Public API (see README):
    model = jaxtune.load_model("hf_dir", dtype="bfloat16", param_dtype="float32")
    logits = model.logits(input_ids, attention_mask=None, segment_ids=None, adapters=None)
    jaxtune.save_model(model, "out_dir")
    adapters = jaxtune.peft.init(model, {"method": "lora", "rank": 8}, rng)
    records = jaxtune.data.load("data.json"); ids, labels = jaxtune.data.encode(records[0], tokenizer)
    jaxtune.train("configs/demo.yaml", **overrides)

Attributes are imported lazily so `jaxtune --help` starts without importing JAX.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("jaxtune.models.hf", "load_model"),
    "save_model": ("jaxtune.models.hf", "save_model"),
    "from_hf_config": ("jaxtune.models.hf", "from_hf_config"),
    "Model": ("jaxtune.models.model", "Model"),
    "ArchConfig": ("jaxtune.models.arch", "ArchConfig"),
    "train": ("jaxtune.train.api", "train"),
    "load_config": ("jaxtune.config", "load_config"),
}
_SUBMODULES = ("peft", "data", "models", "methods", "parallel", "config")

__all__ = [*_LAZY, *_SUBMODULES]


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxtune.{name}")
    raise AttributeError(f"module 'jaxtune' has no attribute {name!r}")
