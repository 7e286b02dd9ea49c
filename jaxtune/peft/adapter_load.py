"""Loading a PEFT (or jaxtune) adapter directory: `load_adapter`, the read side of `interop`'s format.

`adapter_config.json` is checked by `adapter_config`; the tensors of `adapter_model.safetensors` are then placed
into jaxtune's collections. Loading resolves `r` / `lora_alpha` per layer with `rank_pattern` / `alpha_pattern`
exactly as PEFT does (a key may name one layer): ranks are zero-padded to the stack's largest and per-layer
scales folded into B, both exact (`_lora_factors`). GPT-2's fused `c_attn` LoRA is split by B's rows (A is
shared). Every tensor of the file must be placed (`_Tensors.check_all_placed`) — the base embedding / head copies
PEFT's `save_embedding_layers` adds only when they equal this model's (`_take_base_copies`) — and every invalid
setting, shape or stray tensor is a `PeftConfigError` naming the key or tensor and the file.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from jaxtune.models.arch import PeftSpec
from jaxtune.models.model import Adapters, Model
from jaxtune.models.safetensors_io import SafetensorsReader
from jaxtune.peft import experts as experts_lib
from jaxtune.peft import experts_v4, names
from jaxtune.peft.adapter_config import (
    LORA_UNSUPPORTED,
    check_target_parameters,
    check_targets,
    check_unsupported,
    lora_setting,
    lora_settings,
    read_config,
    spec_from_json,
)
from jaxtune.peft.interop import CONFIG, PREFIX, WEIGHTS, as_f32, hf_groups, layer_indices
from jaxtune.peft.names import PeftConfigError


class _Tensors:
    """The tensors of an adapter file. Each one must be placed (`take`n) or the load fails naming it: jaxtune
    never drops part of an adapter silently."""

    def __init__(self, d: Path):
        reader = SafetensorsReader(d, files=[d / WEIGHTS])  # headers checked before any tensor is read
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


def load_adapter(model: Model, directory) -> Adapters:
    """`jaxtune.peft.load_adapter`: a directory PEFT (or jaxtune) wrote -> `Adapters` for `model`.

    Every invalid setting of `adapter_config.json`, and every tensor that does not fit this model or that jaxtune
    cannot place, is a `PeftConfigError` naming the key or tensor and the file.
    """
    d = Path(directory)
    config = read_config(d)
    kind = config.get("peft_type")
    tensors = _Tensors(d)
    if kind == "JAXTUNE":
        variables = traverse_util.unflatten_dict(
            {tuple(k.split("/")): np.array(tensors.take(k)) for k in list(tensors.arrays)}
        )
        return Adapters(
            variables=jax.tree.map(jax.numpy.asarray, variables),
            spec=spec_from_json(config.get("spec", {}), d / CONFIG),
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
    embedding = as_f32(model.params["embed_tokens"]["embedding"])  # [V, D]
    for m in names.modules(arch):
        if m.per_layer:
            continue
        for suffix in ("base_layer.weight", "weight"):
            name = f"{PREFIX}{m.hf}.{suffix}"
            saved = tensors.arrays.get(name)
            if saved is None:
                continue
            if m.kind == "linear":  # an untied lm_head: kernel [D, V]
                base = as_f32(names.get_path(model.params, (*m.path, "kernel"))).T
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


def _per_layer(m: names.Module, arch, tensors: _Tensors, suffix: str) -> list[np.ndarray] | None:
    """Tensor `base_model.model.<hf module>.<suffix>` of every layer (one for a root module); None when no layer
    has it."""
    vals = [tensors.take(f"{PREFIX}{m.hf.format(i=i)}.{suffix}") for i in layer_indices(m, arch)]
    present = [v is not None for v in vals]
    if any(present) and not all(present):
        raise PeftConfigError(
            f"{tensors.file}: adapter covers {m.hf.format(i='N')} in some layers only; jaxtune needs all layers"
        )
    return vals if all(present) else None


def _stacked(m: names.Module, vals: list[np.ndarray]) -> np.ndarray:
    return np.stack(vals) if m.per_layer else vals[0]


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
    for j, i in enumerate(layer_indices(m, arch)):
        hf = m.hf.format(i=i)
        r, r_from = lora_setting(st, "rank_pattern", "r", m.pattern_names(i)[0])
        alpha, _ = lora_setting(st, "alpha_pattern", "lora_alpha", m.pattern_names(i)[0])
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
    check_unsupported(config, d, LORA_UNSUPPORTED)
    st = lora_settings(config, file)
    check_targets(config, arch, file)
    check_target_parameters(config, arch, file)
    rslora, dora = bool(config.get("use_rslora")), bool(config.get("use_dora"))
    lora, scales = {}, {}
    for group in hf_groups(arch).values():
        if group[0].kind == "experts":
            continue  # below: the expert parameters' keys depend on which of them are targeted
        v4 = experts_v4.router_name(arch) if group[0].kind == "router" else None
        if (
            v4 and f"{PREFIX}{v4.format(i=0)}.lora_A.weight" in tensors.arrays
        ):  # Mixtral's transformers-4 router
            group = [dataclasses.replace(group[0], hf=v4)]
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
            scales[m.scale_key] = scale
    setting = lambda pattern, default, hf: lora_setting(st, pattern, default, hf)  # noqa: E731
    leaves, expert_scales = experts_lib.load(arch, config, tensors, PREFIX, setting, rslora)
    for path, leaf in leaves.items():
        lora = names.set_path(lora, path, leaf)
    scales.update(expert_scales)
    for path, (leaf, scale) in experts_v4.load(arch, config, tensors, PREFIX, rslora).items():
        if names.has_path(lora, path):
            raise PeftConfigError(
                f"{tensors.file}: both transformers-4 and -5 LoRA tensors for {'/'.join(path)}"
            )
        lora = names.set_path(lora, path, leaf)
        scales[f"experts.{path[-1]}"] = scale
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
    for hf, group in hf_groups(arch).items():
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
