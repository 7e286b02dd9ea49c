"""Adapters in the PEFT library's on-disk format: `adapter_config.json` + `adapter_model.safetensors`.

Written so that `peft.PeftModel.from_pretrained(transformers_model, dir)` gives the same logits, and read from
directories PEFT wrote. Per method (key names as `get_peft_model_state_dict` writes them, `{m}` = the HF module,
e.g. `model.layers.0.self_attn.q_proj`, prefixed by `base_model.model.`):

  LORA            {m}.lora_A.weight [r, in] = our lora_aᵀ, {m}.lora_B.weight [out, r] = our lora_bᵀ,
                  {m}.lora_magnitude_vector [out] (DoRA); embeddings {m}.lora_embedding_A [r, V] / _B [D, r]
  IA3             {m}.ia3_l: [out, 1] (scaled output) or [1, in] (feed-forward input)
  PROMPT_TUNING   prompt_embeddings [P, D] (P-tuning exports its folded tokens here too: PEFT's P_TUNING
                  saves exactly this and uses it unchanged at inference)
  PREFIX_TUNING   prompt_embeddings [P, L*2*K*H], i.e. [P, L, (key, value), K, H] (PEFT `get_prompt`)

GPT-2's `c_attn` fuses q|k|v: PEFT puts one LoRA on it. Loading splits B by rows (A is shared); saving writes
A = [A_q; A_k; A_v] and a block-diagonal B of rank r_q + r_k + r_v, which is the same ΔW exactly, with alpha
chosen to keep the scale. Anything PEFT cannot express (bottleneck adapters, BitFit, several methods at once)
is written in jaxtune's own layout instead (`peft_type: JAXTUNE`, collection paths as tensor names), which
`load_adapter` reads back.

A tied model's `lm_head` takes a LoRA of its own (`lm_head.lora_A/B`), as PEFT wraps the tied head. Loading
resolves `r` / `lora_alpha` per layer with `rank_pattern` / `alpha_pattern` exactly as PEFT does (a key may
name one layer): ranks are zero-padded to the stack's largest and per-layer scales folded into B, both exact
(`_lora_factors`). Every tensor of the file must be placed — the base embedding / head copies PEFT's
`save_embedding_layers` adds only when they equal this model's — and every invalid setting, shape or stray
tensor is a `PeftConfigError` naming the key or tensor and the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from jaxtune.models.arch import PeftSpec
from jaxtune.models.hf import save_model
from jaxtune.models.model import Adapters, Model
from jaxtune.models.safetensors_io import Lazy, SafetensorsReader, write_file
from jaxtune.peft import adapters as adapters_lib
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


def _np(x) -> np.ndarray:
    return np.asarray(jax.device_get(x), np.float32)


def _groups(arch) -> dict[str, list[names.Module]]:
    """HF module -> our modules in it (one, or GPT-2 c_attn's three parts in order)."""
    out: dict[str, list[names.Module]] = {}
    for m in names.modules(arch):
        out.setdefault(m.hf, []).append(m)
    return out


def _layers(m: names.Module, arch):
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
    tensors, ranks, alphas, targets = [], {}, {}, []
    for hf, group in _groups(arch).items():
        leaves = [(m, _leaf(lora, m.path)) for m in group]
        if all(leaf is None for _, leaf in leaves):
            continue
        scales = {spec.scale_for(m.name) for m, leaf in leaves if leaf is not None}
        if len(scales) > 1:
            raise PeftConfigError(f"{hf}: its fused parts have different LoRA scales {sorted(scales)}")
        scale = scales.pop()
        rank = sum(leaf["lora_a"].shape[-1] for _, leaf in leaves if leaf is not None)
        m0 = group[0]
        short = short_name(m0)
        targets.append(short)
        ranks[short] = rank
        alphas[short] = scale * (math.sqrt(rank) if spec.lora_rslora else rank)
        for i in _layers(m0, arch):
            base = f"{PREFIX}{hf.format(i=i)}"
            if m0.kind == "embedding":
                leaf = leaves[0][1]
                a, b = _np(_take(leaf["lora_a"], i)), _np(_take(leaf["lora_b"], i))
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
                        kernel = _np(_take(names.get_path(model.params, (*m.path, "kernel")), i))
                        mags.append(np.linalg.norm(kernel, axis=0))
                    continue
                a_parts.append(_np(_take(leaf["lora_a"], i)))
                b_parts.append(_np(_take(leaf["lora_b"], i)))
                if "magnitude" in leaf:
                    mags.append(_np(_take(leaf["magnitude"], i)))
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
    r = next(iter(ranks.values()))
    alpha = alphas[next(iter(alphas))]
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": targets,
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
    for hf, group in _groups(arch).items():
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
        for i in _layers(group[0], arch):
            if is_ff:
                v = _np(_take(leaves[0][1]["scale_in"], i))[None, :]  # [1, in]
            else:
                parts = [
                    _np(_take(leaf["scale_out"], i))
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
    emb = _np(prompt["embeddings"])
    config = {
        "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": "RANDOM",
        **_prompt_config(model, emb.shape[0]),
    }
    return [Lazy("prompt_embeddings", emb.shape, np.float32, lambda: emb)], config


def _prefix_tensors(model: Model, prefix: dict) -> tuple[list[Lazy], dict]:
    a = model.arch
    kv = prefix["layers"]["self_attn"]
    stacked = np.stack([_np(kv["key"]), _np(kv["value"])], axis=1)  # [L, 2, P, K, H]
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


# ----------------------------------------------------------------------------------------------- load

LORA_DEFAULTS = {"r": 8, "lora_alpha": 8}  # peft.LoraConfig's own, for configs that leave them out
# LoraConfig fields that change what the adapter computes and that jaxtune does not implement
LORA_UNSUPPORTED = (
    "bias",
    "layers_to_transform",
    "lora_bias",
    "modules_to_save",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_qalora",
    "layer_replication",
    "target_parameters",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
    "megatron_config",
)


class _Tensors:
    """The tensors of an adapter file. Each one must be placed (`take`n) or the load fails naming it: jaxtune
    never drops part of an adapter silently."""

    def __init__(self, d: Path):
        reader = SafetensorsReader(d)
        self.file = d / WEIGHTS
        self.arrays = {n: np.asarray(reader.get(n)) for n in reader.names()}
        self.placed: set[str] = set()

    def take(self, name: str) -> np.ndarray | None:
        if name in self.arrays:
            self.placed.add(name)
        return self.arrays.get(name)

    def require(self, name: str, kind: str) -> np.ndarray:
        x = self.take(name)
        if x is None:
            raise PeftConfigError(f"{self.file}: no tensor {name!r}, which a {kind} adapter must have")
        return x

    def check_all_placed(self, model_type: str) -> None:
        left = sorted(set(self.arrays) - self.placed)
        if left:
            more = f" (and {len(left) - 1} more: {', '.join(left[1:4])}{', ...' if len(left) > 4 else ''})"
            raise PeftConfigError(
                f"{self.file}: tensor {left[0]!r}{more if len(left) > 1 else ''} has no place in jaxtune's "
                f"adapters for this {model_type} model, and jaxtune never drops part of an adapter: is the "
                "adapter for another model, or does it use a PEFT feature jaxtune lacks?"
            )


def _spec_from_json(d: dict, file: Path) -> PeftSpec:
    d = dict(d)
    try:
        d["lora_scale"] = tuple((str(k), float(v)) for k, v in d.get("lora_scale", ()))
        return PeftSpec(**d)
    except (TypeError, ValueError) as e:
        raise PeftConfigError(f"{file}: spec is not a jaxtune PeftSpec ({e})") from None


def _read_config(d: Path) -> dict:
    if not (d / CONFIG).exists():
        raise PeftConfigError(f"{d}: no {CONFIG} — is this a PEFT adapter directory?")
    try:
        config = json.loads((d / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise PeftConfigError(f"{d / CONFIG}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise PeftConfigError(f"{d / CONFIG}: must hold a JSON object, got {type(config).__name__}")
    return config


def load_adapter(model: Model, directory) -> Adapters:
    """`jaxtune.peft.load_adapter`: a directory PEFT (or jaxtune) wrote -> `Adapters` for `model`.

    Every invalid setting of `adapter_config.json`, and every tensor that does not fit this model or that jaxtune
    cannot place, is a `PeftConfigError` naming the key or tensor and the file.
    """
    d = Path(directory)
    config = _read_config(d)
    kind = config.get("peft_type")
    tensors = _Tensors(d)
    if kind == "JAXTUNE":
        variables = traverse_util.unflatten_dict(
            {tuple(k.split("/")): np.array(tensors.take(k)) for k in list(tensors.arrays)}
        )
        return Adapters(
            variables=jax.tree.map(jax.numpy.asarray, variables),
            spec=_spec_from_json(config.get("spec", {}), d / CONFIG),
        )
    loaders = {
        "LORA": _load_lora,
        "IA3": _load_ia3,
        "PROMPT_TUNING": _load_prompt,
        "P_TUNING": _load_prompt,
        "PREFIX_TUNING": _load_prefix,
    }
    if kind not in loaders:
        raise PeftConfigError(
            f"{d / CONFIG}: peft_type {kind!r} is not supported (supported: LORA incl. rsLoRA/DoRA, IA3, "
            "PROMPT_TUNING, P_TUNING, PREFIX_TUNING, and jaxtune's own JAXTUNE)"
        )
    adapters = loaders[kind](model, config, tensors, d)
    _take_base_copies(model, tensors)
    tensors.check_all_placed(model.arch.model_type)
    return adapters


def _load_prompt(model: Model, config: dict, tensors: _Tensors, d: Path) -> Adapters:
    emb = tensors.require("prompt_embeddings", config["peft_type"])
    n = config.get("num_virtual_tokens", emb.shape[0])
    if emb.ndim != 2 or emb.shape != (n, model.arch.hidden_size):
        raise PeftConfigError(
            f"{tensors.file}: prompt_embeddings is {list(emb.shape)}, but num_virtual_tokens={n!r} and this "
            f"model's hidden size make it [{n}, {model.arch.hidden_size}]"
        )
    emb = jax.numpy.asarray(emb, model.arch.weight_dtype)
    return Adapters(variables={"prompt": {"embeddings": emb}}, spec=PeftSpec(prompt_tokens=emb.shape[0]))


def _load_prefix(model: Model, config: dict, tensors: _Tensors, d: Path) -> Adapters:
    a = model.arch
    emb = np.asarray(tensors.require("prompt_embeddings", "PREFIX_TUNING"), np.float32)
    n = config.get("num_virtual_tokens", emb.shape[0])
    want = a.num_layers * 2 * a.num_kv_heads * a.head_dim
    if emb.shape != (n, want):
        raise PeftConfigError(
            f"{tensors.file}: prompt_embeddings is {list(emb.shape)}, but num_virtual_tokens={n!r} and this "
            f"model's layers and key/value heads make it [{n}, {want}]"
        )
    kv = emb.reshape(n, a.num_layers, 2, a.num_kv_heads, a.head_dim).transpose(1, 2, 0, 3, 4)
    tree = {"key": kv[:, 0], "value": kv[:, 1]}  # [L, P, K, H]
    tree = jax.tree.map(lambda x: jax.numpy.asarray(x, a.weight_dtype), tree)
    return Adapters(variables={"prefix": {"layers": {"self_attn": tree}}}, spec=PeftSpec(prefix_tokens=n))


def _take_base_copies(model: Model, tensors: _Tensors) -> None:
    """PEFT's `save_embedding_layers` writes the base embedding and head weights beside an adapter that targets
    them (`{m}.base_layer.weight`; `{m}.weight` for a resized vocabulary). They are placed when they are this
    model's own weights; otherwise PEFT would load them over the base, which an adapter cannot, so it is an error."""
    arch = model.arch
    embedding = _np(model.params["embed_tokens"]["embedding"])  # [V, D]
    for m in names.modules(arch):
        if m.per_layer:
            continue
        for suffix in ("base_layer.weight", "weight"):
            name = f"{PREFIX}{m.hf}.{suffix}"
            saved = tensors.arrays.get(name)
            if saved is None:
                continue
            if m.kind == "linear":  # an untied lm_head: kernel [D, V]
                base = _np(names.get_path(model.params, (*m.path, "kernel"))).T
            else:
                base = embedding
            exact = (
                saved.dtype == np.float32 and np.dtype(model.arch.weight_dtype) == np.float32
            )  # else 16-bit
            tol = (1e-6 if exact else 1e-2) * max(float(np.abs(base).max()), 1e-30)
            if saved.shape != base.shape or np.abs(np.asarray(saved, np.float32) - base).max() > tol:
                raise PeftConfigError(
                    f"{tensors.file}: {name} {list(saved.shape)} is a copy of {m.hf}'s weight that is not this "
                    f"model's {list(base.shape)}; PEFT would load it over the base weight (a resized or trained "
                    "embedding), which jaxtune's adapters cannot: load the adapter over the model it was saved from"
                )
            tensors.take(name)


UNSUPPORTED_HINTS = {
    "modules_to_save": (
        ": PEFT saves a whole trained copy of each such module (e.g. base_model.model.lm_head.weight, untied from "
        "embed_tokens on a tied model), which replaces a base weight, and jaxtune's adapters never do. Merge the "
        "adapter in PEFT (merge_and_unload) and load the merged model instead"
    ),
}


def _unsupported(config: dict, d: Path, keys: tuple[str, ...]) -> None:
    for k in keys:
        if config.get(k) not in (None, False, [], {}, "none"):
            raise PeftConfigError(
                f"{d / CONFIG}: {k}={config[k]!r} is not supported by jaxtune's PEFT loader"
                + UNSUPPORTED_HINTS.get(k, "")
            )


def _per_layer(m: names.Module, arch, tensors: _Tensors, suffix: str) -> list[np.ndarray] | None:
    """Tensor `base_model.model.<hf module>.<suffix>` of every layer (one for a root module); None when no layer
    has it."""
    vals = [tensors.take(f"{PREFIX}{m.hf.format(i=i)}.{suffix}") for i in _layers(m, arch)]
    present = [v is not None for v in vals]
    if any(present) and not all(present):
        raise PeftConfigError(
            f"{tensors.file}: adapter covers {m.hf.format(i='N')} in some layers only; jaxtune needs all layers"
        )
    return vals if all(present) else None


def _stacked(m: names.Module, vals: list[np.ndarray]) -> np.ndarray:
    return np.stack(vals) if m.per_layer else vals[0]


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_rank(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _lora_settings(config: dict, file: Path) -> dict:
    """r, lora_alpha, rank_pattern and alpha_pattern of a LoRA config, checked (errors name the key)."""
    st = {k: config.get(k, v) for k, v in LORA_DEFAULTS.items()}
    if not _is_rank(st["r"]):
        raise PeftConfigError(f"{file}: r={st['r']!r} must be a positive integer (the LoRA rank)")
    if not _is_real(st["lora_alpha"]):
        raise PeftConfigError(f"{file}: lora_alpha={st['lora_alpha']!r} must be a finite number")
    dropout = config.get("lora_dropout") or 0.0
    if not (_is_real(dropout) and 0 <= dropout < 1):
        raise PeftConfigError(f"{file}: lora_dropout={dropout!r} must be a number in [0, 1)")
    for key, valid, what in (
        ("rank_pattern", _is_rank, "a positive integer rank"),
        ("alpha_pattern", _is_real, "a finite number"),
    ):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise PeftConfigError(f"{file}: {key} must map module-name patterns to values, got {patterns!r}")
        for k, v in patterns.items():
            try:
                re.compile(rf"(.*\.)?({k})$")
            except re.error as e:
                raise PeftConfigError(
                    f"{file}: {key} key {k!r} is not a valid regular expression ({e})"
                ) from None
            if not valid(v):
                raise PeftConfigError(f"{file}: {key}[{k!r}] = {v!r} must be {what}")
        st[key] = patterns
    return st


def _setting(st: dict, pattern: str, default: str, hf_name: str) -> tuple[object, str]:
    """PEFT `LoraModel._create_and_replace`: the value of the first `pattern` key that `get_pattern_key` matches
    to the module's HF name, else the default; with the key it came from (for messages)."""
    key = names.pattern_key(st[pattern], hf_name)
    if key is None:
        return st[default], f"{default}={st[default]!r}"
    return st[pattern][key], f"{pattern}[{key!r}]={st[pattern][key]!r}"


def _check_targets(config: dict, arch, file: Path) -> None:
    """`target_modules` must select a module of this model, as PEFT requires (None: PEFT's family defaults)."""
    target = config.get("target_modules")
    if target is None:
        return
    if isinstance(target, str):
        if target == names.ALL_LINEAR:
            return
        try:
            re.compile(target)
        except re.error as e:
            raise PeftConfigError(
                f"{file}: target_modules={target!r} is not a valid regular expression ({e})"
            ) from None
    elif not (isinstance(target, list) and all(isinstance(t, str) for t in target)):
        raise PeftConfigError(f"{file}: target_modules={target!r} must be a list of module names or a regex")
    elif names.ALL_LINEAR in target:
        return
    known = [n for m in names.modules(arch) for i in _layers(m, arch) for n in m.names(i)]
    if not any(names.matches(target, n) for n in known):
        shorts = sorted({m.hf.split(".")[-1] for m in names.modules(arch)})
        raise PeftConfigError(
            f"{file}: target_modules={target!r} matches no module of this {arch.model_type} model "
            f"(modules: {', '.join(shorts)})"
        )


def _lora_factors(
    m: names.Module, out_features: int, arch, tensors: _Tensors, st: dict, rslora: bool, dora: bool
):
    """One HF module's LoRA from its per-layer tensors -> (A [..., in, R], B [..., R, out], magnitude [..., out] or
    None, scale), or None when the file has no LoRA for it.

    PEFT resolves rank and alpha per layer (`rank_pattern` / `alpha_pattern` keys may name one layer), while our
    layers are stacked: a layer of rank r < R is padded with zero columns of A and zero rows of B (the same
    product, and padded entries get zero gradients, so they stay zero in training), and a layer's own scale s_l is
    folded into its B as s_l / s, s being the module's one scale. Both are exact."""
    emb = m.kind == "embedding"
    a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
    a = _per_layer(m, arch, tensors, a_name)
    if a is None:
        return None  # a B alone stays unplaced, and the load fails naming it
    b = _per_layer(m, arch, tensors, b_name)
    if b is None:
        raise PeftConfigError(f"{tensors.file}: {m.hf.format(i='N')} has {a_name} but no {b_name}")
    mag = _per_layer(m, arch, tensors, "lora_magnitude_vector") if dora else None
    if dora and m.kind != "linear":
        raise PeftConfigError(f"{tensors.file}: DoRA on {m.hf} is not supported (only on linear layers)")
    if dora and mag is None:
        raise PeftConfigError(
            f"{tensors.file}: use_dora is set but {m.hf.format(i='N')} has no lora_magnitude_vector"
        )
    a_t, b_t, scales = [], [], []
    for j, i in enumerate(_layers(m, arch)):
        hf = m.hf.format(i=i)
        r, r_from = _setting(st, "rank_pattern", "r", hf)
        alpha, _ = _setting(st, "alpha_pattern", "lora_alpha", hf)
        want = {
            a_name: (r, m.in_features),
            b_name: (out_features, r),
            "lora_magnitude_vector": (out_features,),
        }
        for name, x in (
            (a_name, a[j]),
            (b_name, b[j]),
            ("lora_magnitude_vector", None if mag is None else mag[j]),
        ):
            if x is not None and x.shape != want[name]:
                raise PeftConfigError(
                    f"{tensors.file}: {PREFIX}{hf}.{name} is {list(x.shape)}, but {r_from} and this model's {hf} "
                    f"({m.in_features} -> {out_features}) make it {list(want[name])}"
                )
        a_t.append(np.asarray(a[j], np.float32).T)  # [in, r] (embedding: [V, r])
        b_t.append(np.asarray(b[j], np.float32).T)  # [r, out]
        scales.append(float(alpha) / (math.sqrt(r) if rslora else r))
    scale = max(scales, key=abs)
    rank = max(x.shape[1] for x in a_t)
    a_t = [np.pad(x, ((0, 0), (0, rank - x.shape[1]))) for x in a_t]
    b_t = [
        np.pad(x * (s / scale if s != scale else 1.0), ((0, rank - x.shape[0]), (0, 0)))
        for x, s in zip(b_t, scales)
    ]
    magnitude = None if mag is None else np.asarray(_stacked(m, mag), np.float32)
    return _stacked(m, a_t), _stacked(m, b_t), magnitude, scale


def _load_lora(model: Model, config: dict, tensors: _Tensors, d: Path) -> Adapters:
    arch, file = model.arch, d / CONFIG
    _unsupported(config, d, LORA_UNSUPPORTED)
    st = _lora_settings(config, file)
    _check_targets(config, arch, file)
    rslora, dora = bool(config.get("use_rslora")), bool(config.get("use_dora"))
    lora, scales = {}, {}
    for group in _groups(arch).values():
        out_features = sum(m.out_features for m in group)
        factors = _lora_factors(group[0], out_features, arch, tensors, st, rslora, dora)
        if factors is None:
            continue
        a_t, b_t, mag, scale = factors
        col = 0
        for m in group:  # fused GPT-2 c_attn: shared A, B split by output rows
            leaf = {"lora_a": a_t, "lora_b": b_t[..., col : col + m.out_features]}
            if mag is not None:
                leaf["magnitude"] = mag[..., col : col + m.out_features]
            col += m.out_features
            lora = names.set_path(
                lora, m.path, jax.tree.map(lambda x: jax.numpy.asarray(x, arch.weight_dtype), leaf)
            )
            scales[m.name] = scale
    if not lora:
        raise PeftConfigError(
            f"{tensors.file}: no LoRA tensor matches a module of this {arch.model_type} model"
        )
    spec = PeftSpec(
        lora_scale=tuple(sorted(scales.items())),
        lora_dropout=float(config.get("lora_dropout") or 0.0),
        dora=dora,
        lora_rslora=rslora,
    )
    return Adapters(variables={"lora": lora}, spec=spec)


def _load_ia3(model: Model, config: dict, tensors: _Tensors, d: Path) -> Adapters:
    arch = model.arch
    ia3 = {}
    for hf, group in _groups(arch).items():
        vals = _per_layer(group[0], arch, tensors, "ia3_l")
        if vals is None:
            continue
        name = f"{PREFIX}{hf.format(i='N')}.ia3_l"
        if group[0].kind != "linear":
            raise PeftConfigError(
                f"{tensors.file}: {name}: (IA)^3 on {hf} is not supported (linear layers only)"
            )
        n_in, n_out = group[0].in_features, sum(m.out_features for m in group)
        shapes = {tuple(v.shape) for v in vals}
        if shapes not in ({(1, n_in)}, {(n_out, 1)}):
            raise PeftConfigError(
                f"{tensors.file}: {name} is {sorted(shapes)}, but this model's {hf} ({n_in} -> {n_out}) needs "
                f"[{n_out}, 1] (scaled output) or [1, {n_in}] (feed-forward input)"
            )
        v = np.asarray(_stacked(group[0], vals), np.float32)
        if shapes == {(1, n_in)} and n_out != 1:  # [1, in]: a feed-forward module's input scaling
            if len(group) > 1:
                raise PeftConfigError(f"{tensors.file}: (IA)^3 input scaling on fused {hf} is not supported")
            ia3 = names.set_path(
                ia3, group[0].path, {"scale_in": jax.numpy.asarray(v[..., 0, :], arch.weight_dtype)}
            )
            continue
        col = 0
        for m in group:
            part = v[..., col : col + m.out_features, 0]
            col += m.out_features
            ia3 = names.set_path(ia3, m.path, {"scale_out": jax.numpy.asarray(part, arch.weight_dtype)})
    if not ia3:
        raise PeftConfigError(
            f"{tensors.file}: no (IA)^3 tensor matches a module of this {arch.model_type} model"
        )
    return Adapters(variables={"ia3": ia3}, spec=PeftSpec())


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
