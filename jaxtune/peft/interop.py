"""The PEFT library's adapter format (`adapter_config.json` + `adapter_model.safetensors`), and export.

This module holds the format (file names; `hf_groups` / `short_name`: our modules grouped and named as PEFT's
HF modules) and the write side: `save_adapter` writes a directory that `peft.PeftModel.from_pretrained(
transformers_model, dir)` loads to the same logits, and `merge_and_export` folds adapters into a plain HF
checkpoint. Reading a directory PEFT (or jaxtune) wrote is `adapter_load.load_adapter`, which checks the config
with `adapter_config`. Per method (key names as `get_peft_model_state_dict` writes them, `{m}` = the HF module,
e.g. `model.layers.0.self_attn.q_proj`, prefixed by `base_model.model.`):

  LORA            {m}.lora_A.weight [r, in] = our lora_aᵀ, {m}.lora_B.weight [out, r] = our lora_bᵀ,
                  {m}.lora_magnitude_vector [out] (DoRA); embeddings {m}.lora_embedding_A [r, V] / _B [D, r];
                  MoE (`target_parameters`, peft/experts.py): the router {m}.lora_A/B as a linear layer's, the
                  experts model.layers.{i}.mlp.experts[.base_layer].lora_A.weight [r*E, in] / lora_B [out, r*E]
  IA3             {m}.ia3_l: [out, 1] (scaled output) or [1, in] (feed-forward input)
  PROMPT_TUNING   prompt_embeddings [P, D] (P-tuning exports its folded tokens here too: PEFT's P_TUNING
                  saves exactly this and uses it unchanged at inference)
  PREFIX_TUNING   prompt_embeddings [P, L*2*K*H], i.e. [P, L, (key, value), K, H] (PEFT `get_prompt`)

GPT-2's `c_attn` fuses q|k|v: PEFT puts one LoRA on it. Loading splits B by rows (A is shared); saving writes
A = [A_q; A_k; A_v] and a block-diagonal B of rank r_q + r_k + r_v, which is the same ΔW exactly, with alpha
chosen to keep the scale. Anything PEFT cannot express (bottleneck adapters, BitFit, several methods at once)
is written in jaxtune's own layout instead (`peft_type: JAXTUNE`, collection paths as tensor names), which
`load_adapter` reads back. A tied model's `lm_head` takes a LoRA of its own (`lm_head.lora_A/B`), as PEFT wraps
the tied head.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from jaxtune.models.arch import PeftSpec
from jaxtune.models.hf import save_model
from jaxtune.models.model import Adapters, Model
from jaxtune.models.safetensors_io import Lazy, write_file
from jaxtune.peft import adapters as adapters_lib
from jaxtune.peft import experts as experts_lib
from jaxtune.peft import lora as lora_lib
from jaxtune.peft import names, quant
from jaxtune.peft.names import PeftConfigError

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PEFT_KINDS = {"lora": "LORA", "ia3": "IA3", "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}


def short_name(m: names.Module) -> str:
    """The name PEFT's suffix match needs: `self_attn.q_proj`, `attn.c_attn`, `lm_head`, `embed_tokens`."""
    return m.hf.split("{i}.", 1)[1] if m.per_layer else m.hf.split(".")[-1]


def as_f32(x) -> np.ndarray:
    """A (device) array as float32 numpy."""
    return np.asarray(jax.device_get(x), np.float32)


def hf_groups(arch) -> dict[str, list[names.Module]]:
    """HF module -> our modules in it (one, or GPT-2 c_attn's three parts in order)."""
    out: dict[str, list[names.Module]] = {}
    for m in names.modules(arch):
        out.setdefault(m.hf, []).append(m)
    return out


def layer_indices(m: names.Module, arch):
    """The layers of a module: 0..L-1, or [None] for a root module (embedding, head)."""
    return range(arch.num_layers) if m.per_layer else [None]


def _take(x, i: int | None):
    """Layer i of a stacked [L, ...] array, or a root module's array itself (i is None)."""
    return x if i is None else x[i]


def _leaf(tree: dict, path) -> dict | None:
    try:
        return names.get_path(tree, path)
    except (KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------------------------- LoRA out


def _lora_tensors(model: Model, lora: dict, spec: PeftSpec) -> tuple[list[Lazy], dict]:
    arch = model.arch
    tensors, ranks, alphas, targets, params = [], {}, {}, [], []
    for hf, group in hf_groups(arch).items():
        leaves = [(m, _leaf(lora, m.path)) for m in group]
        if all(leaf is None for _, leaf in leaves):
            continue
        scales = {spec.scale_for(m.scale_key) for m, leaf in leaves if leaf is not None}
        if len(scales) > 1:
            raise PeftConfigError(f"{hf}: its fused parts have different LoRA scales {sorted(scales)}")
        scale = scales.pop()
        rank = sum(leaf["lora_a"].shape[-1] for _, leaf in leaves if leaf is not None)
        m0 = group[0]
        short = short_name(m0)
        key = f"{short}.weight" if m0.kind == "router" else short  # what PEFT matches rank_pattern keys to
        ranks[key] = rank
        alphas[key] = scale * (math.sqrt(rank) if spec.lora_rslora else rank)
        if m0.kind in names.ROUTED:  # PEFT reaches these only as parameters (lora.ParamWrapper)
            params.append(m0.param_names[0].split("{i}.", 1)[1])
            if m0.kind == "experts":
                continue  # written below, all expert parameters together (their keys depend on each other)
        else:
            targets.append(short)
        for i in layer_indices(m0, arch):
            base = f"{PREFIX}{hf.format(i=i)}"
            if m0.kind == "embedding":
                leaf = leaves[0][1]
                a, b = as_f32(_take(leaf["lora_a"], i)), as_f32(_take(leaf["lora_b"], i))
                tensors += [
                    Lazy(f"{base}.lora_embedding_A", a.T.shape, np.float32, lambda a=a: a.T),
                    Lazy(f"{base}.lora_embedding_B", b.T.shape, np.float32, lambda b=b: b.T),
                ]
                continue
            a_parts, b_parts, mags = [], [], []
            for m, leaf in leaves:
                if leaf is None:
                    a_parts.append(np.zeros((m.in_features, 0), np.float32))
                    b_parts.append(np.zeros((0, m.out_features), np.float32))
                    if spec.dora:  # an untargeted part of a fused module: magnitude = ||W||_c, factor 1
                        kernel = as_f32(_take(names.get_path(model.params, (*m.path, "kernel")), i))
                        mags.append(np.linalg.norm(kernel, axis=0))
                    continue
                a_parts.append(as_f32(_take(leaf["lora_a"], i)))
                b_parts.append(as_f32(_take(leaf["lora_b"], i)))
                if "magnitude" in leaf:
                    mags.append(as_f32(_take(leaf["magnitude"], i)))
            big_a = np.concatenate(a_parts, axis=1)  # [in, R]
            big_b = np.zeros((big_a.shape[1], sum(b.shape[1] for b in b_parts)), np.float32)  # [R, out]
            r0 = c0 = 0
            for b in b_parts:  # block diagonal: part k's rank rows feed only part k's output columns
                big_b[r0 : r0 + b.shape[0], c0 : c0 + b.shape[1]] = b
                r0, c0 = r0 + b.shape[0], c0 + b.shape[1]
            tensors += [
                Lazy(f"{base}.lora_A.weight", big_a.T.shape, np.float32, lambda x=big_a: x.T),
                Lazy(f"{base}.lora_B.weight", big_b.T.shape, np.float32, lambda x=big_b: x.T),
            ]
            if mags:
                mag = np.concatenate(mags)
                tensors.append(Lazy(f"{base}.lora_magnitude_vector", mag.shape, np.float32, lambda x=mag: x))
    for name, x in experts_lib.export(lora, arch, PREFIX)[0]:
        tensors.append(Lazy(name, x.shape, np.float32, lambda x=x: x))
    if params and spec.lora_dropout:
        raise PeftConfigError(
            f"LoRA on {', '.join(params)} (PEFT target_parameters) cannot be saved with lora_dropout="
            f"{spec.lora_dropout}: PEFT's ParamWrapper refuses dropout"
        )
    r = next(iter(ranks.values()))
    alpha = alphas[next(iter(alphas))]
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": targets or None,
        "target_parameters": params or None,
        "rank_pattern": {k: v for k, v in ranks.items() if v != r},
        "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha},
        "use_rslora": spec.lora_rslora,
        "use_dora": spec.dora,
        "lora_dropout": spec.lora_dropout,
        "bias": "none",
        "fan_in_fan_out": arch.model_type == "gpt2",
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    return tensors, config


def _ia3_tensors(model: Model, ia3: dict) -> tuple[list[Lazy], dict]:
    arch = model.arch
    tensors, targets, feedforward = [], [], []
    for hf, group in hf_groups(arch).items():
        leaves = [(m, _leaf(ia3, m.path)) for m in group]
        if all(leaf is None for _, leaf in leaves):
            continue
        is_ff = any(leaf is not None and "scale_in" in leaf for _, leaf in leaves)
        if is_ff and len(group) > 1:
            raise PeftConfigError(f"{hf}: (IA)^3 input scaling on a fused module is not expressible")
        short = short_name(group[0])
        targets.append(short)
        if is_ff:
            feedforward.append(short)
        for i in layer_indices(group[0], arch):
            if is_ff:
                v = as_f32(_take(leaves[0][1]["scale_in"], i))[None, :]  # [1, in]
            else:
                parts = [
                    as_f32(_take(leaf["scale_out"], i))
                    if leaf is not None
                    else np.ones(m.out_features, np.float32)
                    for m, leaf in leaves
                ]
                v = np.concatenate(parts)[:, None]  # [out, 1]
            tensors.append(Lazy(f"{PREFIX}{hf.format(i=i)}.ia3_l", v.shape, np.float32, lambda v=v: v))
    config = {
        "peft_type": "IA3",
        "target_modules": targets,
        "feedforward_modules": feedforward,
        "fan_in_fan_out": arch.model_type == "gpt2",
        "init_ia3_weights": True,
        "modules_to_save": None,
    }
    return tensors, config


def _prompt_config(model: Model, n: int) -> dict:
    a = model.arch
    return {
        "num_virtual_tokens": n,
        "num_layers": a.num_layers,
        "num_transformer_submodules": 1,
        "num_attention_heads": a.num_heads,
        "token_dim": a.hidden_size,
    }


def _prompt_tensors(model: Model, prompt: dict) -> tuple[list[Lazy], dict]:
    emb = as_f32(prompt["embeddings"])
    config = {
        "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": "RANDOM",
        **_prompt_config(model, emb.shape[0]),
    }
    return [Lazy("prompt_embeddings", emb.shape, np.float32, lambda: emb)], config


def _prefix_tensors(model: Model, prefix: dict) -> tuple[list[Lazy], dict]:
    a = model.arch
    kv = prefix["layers"]["self_attn"]
    stacked = np.stack([as_f32(kv["key"]), as_f32(kv["value"])], axis=1)  # [L, 2, P, K, H]
    n = stacked.shape[2]
    emb = stacked.transpose(2, 0, 1, 3, 4).reshape(n, -1)  # [P, L*2*K*H]
    config = {
        "peft_type": "PREFIX_TUNING",
        **_prompt_config(model, n),
        "num_attention_heads": a.num_kv_heads,
        "token_dim": a.num_kv_heads * a.head_dim,
        "encoder_hidden_size": a.hidden_size,
        "prefix_projection": False,  # folded: the saved tokens are the projection's output
    }
    return [Lazy("prompt_embeddings", emb.shape, np.float32, lambda: emb)], config


# ----------------------------------------------------------------------------------------------- save


def save_adapter(model: Model, adapters: Adapters, out_dir) -> Path:
    """`jaxtune.peft.save_adapter`: PEFT's layout when PEFT can express the adapter, else jaxtune's own."""
    if not isinstance(adapters, Adapters):
        raise PeftConfigError(
            "save_adapter needs jaxtune.models.Adapters (from jaxtune.peft.init or Plan.adapters)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    collections = {k: v for k, v in adapters.variables.items() if k != "quant" and jax.tree.leaves(v)}
    if "encoder" in collections.get("prompt", {}) or "encoder" in collections.get("prefix", {}):
        raise PeftConfigError(
            "fold the encoders first: save Plan.adapters(trainable), not the raw trainable tree"
        )
    if len(collections) == 1 and next(iter(collections)) in PEFT_KINDS:
        kind, tree = next(iter(collections.items()))
        fn = {
            "lora": _lora_tensors,
            "ia3": _ia3_tensors,
            "prompt": _prompt_tensors,
            "prefix": _prefix_tensors,
        }
        tensors, config = fn[kind](model, tree, adapters.spec) if kind == "lora" else fn[kind](model, tree)
    else:
        tensors, config = _native_tensors(collections, adapters.spec)
    config.update(
        task_type="CAUSAL_LM",
        base_model_name_or_path=model.path,
        inference_mode=True,
        revision=None,
    )
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    write_file(out / WEIGHTS, tensors, metadata={"format": "pt"})
    return out


def _native_tensors(collections: dict, spec: PeftSpec) -> tuple[list[Lazy], dict]:
    flat = traverse_util.flatten_dict(collections, sep="/")
    tensors = []
    for name, x in flat.items():
        arr = np.asarray(jax.device_get(x))
        tensors.append(Lazy(name, arr.shape, arr.dtype, lambda arr=arr: arr))
    return tensors, {"peft_type": "JAXTUNE", "spec": dataclasses.asdict(spec)}


def merge_and_export(model: Model, adapters: Adapters | None, out_dir, dtype: str | None = None) -> Path:
    """A full HF model directory with LoRA / DoRA / (IA)^3 / BitFit folded into the weights (jaxtune.save_model)."""
    variables = dict(adapters.variables) if adapters is not None else {}
    spec = adapters.spec if adapters is not None else PeftSpec()
    for kind in ("prompt", "prefix", "adapter"):
        if kind in variables:
            raise PeftConfigError(
                f"{kind} adapters add tokens or layers, which a plain HF checkpoint cannot hold: use save_adapter"
            )
    arch, params, hf_config = model.arch, model.params, dict(model.hf_config)
    if "quant" in variables:
        params = quant.dequantize_params(params, variables.pop("quant"), arch.replace(peft=spec))
    if "lora" in variables:
        params = lora_lib.merge(params, variables.pop("lora"), spec, arch)
    if "bitfit" in variables:
        params, arch, hf_config = _merge_bitfit(params, variables.pop("bitfit"), arch, hf_config)
    if "ia3" in variables:
        params = adapters_lib.merge_ia3(params, variables.pop("ia3"), arch)
    merged = dataclasses.replace(
        model, arch=arch.replace(peft=PeftSpec()), params=params, hf_config=hf_config
    )
    return save_model(merged, out_dir, dtype=dtype)


def _merge_bitfit(params: dict, bitfit: dict, arch, hf_config: dict):
    """BitFit biases added to bias-less projections: only Llama's config can switch all of them on."""
    if arch.model_type != "llama":
        raise PeftConfigError(
            f"BitFit added biases that {arch.model_type} checkpoints cannot hold; export with save_adapter instead"
        )
    arch = arch.replace(qkv_bias=True, o_bias=True, mlp_bias=True)
    hf_config.update(attention_bias=True, mlp_bias=True)
    for m in names.modules(arch):
        if m.kind != "linear" or not m.per_layer:
            continue
        p = dict(names.get_path(params, m.path))
        extra = _leaf(bitfit, m.path)
        bias = p.get("bias", np.zeros((arch.num_layers, m.out_features), np.float32))
        if extra is not None:
            bias = bias + extra["bias"]
        p["bias"] = jax.numpy.asarray(bias, arch.weight_dtype)
        params = names.set_path(params, m.path, p)
    return params, arch, hf_config
