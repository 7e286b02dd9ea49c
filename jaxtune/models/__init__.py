"""Decoder-only model families (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3/4, GPT-2; Mixtral, Qwen2/3-MoE) as one
Flax decoder."""

from jaxtune.models import family_moe  # noqa: F401  (registers mixtral, qwen2_moe, qwen3_moe with families)
from jaxtune.models.arch import ArchConfig, PeftSpec
from jaxtune.models.families import SUPPORTED, UnsupportedModelError, arch_from_hf
from jaxtune.models.hf import from_hf_config, load_model, save_model
from jaxtune.models.model import Adapters, Model, init_params, param_logical_axes
from jaxtune.models.safetensors_io import CheckpointError

__all__ = [
    "SUPPORTED",
    "Adapters",
    "ArchConfig",
    "CheckpointError",
    "Model",
    "PeftSpec",
    "UnsupportedModelError",
    "arch_from_hf",
    "from_hf_config",
    "init_params",
    "load_model",
    "param_logical_axes",
    "save_model",
]
