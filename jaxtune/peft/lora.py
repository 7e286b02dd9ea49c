"""LoRA (Hu et al. 2021) and its variants, as the `lora` collection the model's `Proj` layers read.

  ΔW = s · A B,  A [in, r], B [r, out],  s = alpha / r   (rsLoRA, Kalajdzievski 2023: s = alpha / sqrt(r))
  DoRA (Liu et al. 2024): W' = m · (W + s A B) / ||W + s A B||_c  with m [out] initialised to ||W||_c
  PiSSA (Meng et al. 2024): A, B from the top-r singular triplets of W; the frozen W becomes the residual
  LoRA+ (Hayou et al. 2024): B learns `loraplus_lr_ratio` times faster (an lr multiplier, applied by train/optim)

Initialisation follows PEFT's `LoraLayer.update_layer`: A ~ kaiming-uniform(a=√5) = U(±1/√in), B = 0 (so the
model starts exactly at the base); embeddings the other way round (A = 0, B ~ N(0, 1)); `rank_pattern` /
`alpha_pattern` per module with PEFT's key matching. Our A is PEFT's `lora_A.weight` transposed ([in, r] vs
[r, in]) because our kernels are [in, out]; `interop.py` converts. The head of a tied model (`lm_head`, whose
weight is embed_tokens' matrix) takes a LoRA of its own at the decoder root, as PEFT wraps the tied head: the
embedding stays as it is, so such a LoRA cannot be merged into the tied checkpoint. MoE expert parameters take
one LoRA per expert (lora_a [L, E, in, r], lora_b [L, E, r, out]: peft/experts.py), selected by `target_modules`
(`all-linear`, `experts.gate_up_proj`) or PEFT's `target_parameters`.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from jaxtune.peft import experts as experts_lib
from jaxtune.peft import names
from jaxtune.peft.names import PeftConfigError
from jaxtune.peft.parts import Context, Part

_KIND = {"embedding": "an embedding", "tied_head": "the output head tied to embed_tokens"}


def params_kernel(ctx: Context, params: dict, m: names.Module):
    """The kernel DoRA's magnitude starts from: PiSSA's residual when this part replaced it, else the base's."""
    return names.get_path(params, (*m.path, "kernel")) if params is not ctx.params else ctx.kernel(m)


def ranks_and_scales(ctx: Context, chosen: list[names.Module]) -> dict[str, tuple[int, float]]:
    """{module name: (rank, scale)} with rank_pattern / alpha_pattern applied (same in every layer)."""
    cfg, arch = ctx.cfg, ctx.model.arch
    out = {}
    for m in chosen:

        def lookup(pattern, default, hf, ours, router=m.kind == "router"):
            if router:  # PEFT matches a ParamWrapper's patterns to its parameter's name
                hf, ours = f"{hf}.weight", f"{ours}.weight"
            key = names.pattern_key(pattern, hf) or names.pattern_key(pattern, ours)
            return default if key is None else pattern[key]

        r = names.layer_uniform(
            arch, m, lambda hf, o: lookup(cfg.rank_pattern, cfg.rank, hf, o), "rank_pattern"
        )
        alpha = names.layer_uniform(
            arch, m, lambda hf, o: lookup(cfg.alpha_pattern, cfg.alpha, hf, o), "alpha_pattern"
        )
        if int(r) < 1:
            raise PeftConfigError(f"rank for {m.name} must be >= 1, got {r}")
        out[m.scale_key] = (int(r), float(alpha) / (math.sqrt(r) if cfg.rslora else r))
    return out


def pissa(kernel, r: int, scale: float):
    """PEFT `pissa_init` on one torch-layout weight W [out, in]: A = √S_r V_rᵀ/√s, B = U_r √S_r/√s, W - sBA."""
    w = kernel.T.astype(jnp.float32)  # [out, in], the layout PEFT takes the SVD of
    u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    sr = s[:r] / scale
    lora_a = jnp.sqrt(sr)[:, None] * vh[:r]  # [r, in]
    lora_b = u[:, :r] * jnp.sqrt(sr)[None]  # [out, r]
    residual = w - scale * lora_b @ lora_a
    return lora_a.T, lora_b.T, residual.T.astype(kernel.dtype)  # ours: [in, r], [r, out], [in, out]


def build(ctx: Context) -> Part:
    cfg, arch = ctx.cfg, ctx.model.arch
    dora = cfg.dora or cfg.name == "dora"
    chosen = selected(cfg, arch)
    experts_lib.check_lora(cfg, chosen, dora)
    experts_lib.note_all_linear(cfg, arch, chosen)
    rs = ranks_and_scales(ctx, chosen)
    params, tree, lr = ctx.params, {}, {}
    dtype = arch.weight_dtype
    keys = jax.random.split(ctx.rng, len(chosen))
    for m, key in zip(chosen, keys):
        r, scale = rs[m.scale_key]
        lead = (arch.num_layers,) if m.per_layer else ()
        if m.kind != "linear" and (dora or cfg.pissa):
            raise PeftConfigError(
                f"DoRA / PiSSA on {m.ours} is not supported ({_KIND[m.kind]}); target linear layers"
            )
        if m.kind == "experts":
            leaf = experts_lib.init_leaf(key, m, arch, r, dtype)
        elif m.kind == "embedding":
            # PEFT lora.Embedding: A = 0, B ~ N(0, 1)
            leaf = {
                "lora_a": jnp.zeros((*lead, m.in_features, r), dtype),
                "lora_b": jax.random.normal(key, (*lead, r, m.out_features), dtype),
            }
        elif cfg.pissa:
            kernel = names.get_path(params, (*m.path, "kernel"))
            init = partial(pissa, r=r, scale=scale)
            a, b, residual = (jax.vmap(init) if m.per_layer else init)(kernel)  # vmap over the layer axis
            leaf = {"lora_a": a.astype(dtype), "lora_b": b.astype(dtype)}
            params = names.set_path(params, (*m.path, "kernel"), residual)
        else:
            bound = 1.0 / math.sqrt(m.in_features)  # kaiming_uniform(a=sqrt(5)) on PEFT's [r, in] weight
            leaf = {
                "lora_a": jax.random.uniform(key, (*lead, m.in_features, r), dtype, -bound, bound),
                "lora_b": jnp.zeros((*lead, r, m.out_features), dtype),
            }
        if dora:
            kernel = params_kernel(ctx, params, m)
            leaf["magnitude"] = column_norm(kernel, leaf, scale).astype(dtype)
        tree = names.set_path(tree, m.path, leaf)
        if cfg.loraplus_lr_ratio:
            # LoRA+: B's learning rate is ratio x A's (Hayou et al. 2024, eq. 6; PEFT create_loraplus_optimizer)
            mult = {k: float(cfg.loraplus_lr_ratio) if k == "lora_b" else 1.0 for k in leaf}
            lr = names.set_path(lr, m.path, mult)
    spec = {
        "lora_scale": tuple(sorted((name, s) for name, (_, s) in rs.items())),
        "lora_dropout": float(cfg.dropout),
        "dora": dora,
        "lora_rslora": bool(cfg.rslora),
    }
    info = {"lora": {name: r for name, (r, _) in rs.items()}}
    return Part(trainable={"lora": tree}, spec=spec, lr={"lora": lr} if lr else {}, params=params, info=info)


def selected(cfg, arch) -> list[names.Module]:
    """target_modules' modules and target_parameters' (PEFT: both may be given), in `names.modules` order."""
    chosen = names.select(arch, cfg.target_modules) if len(cfg.target_modules) else []
    chosen += names.select_parameters(arch, cfg.target_parameters) if cfg.target_parameters else []
    if not chosen:
        raise PeftConfigError(
            "LoRA selects nothing: set target_modules (e.g. all-linear) or target_parameters"
        )
    return [m for m in names.modules(arch) if m in chosen]


def has_leaf(lora: dict, path: tuple[str, ...]) -> bool:
    try:
        names.get_path(lora, path)
    except KeyError:
        return False
    return True


def pissa_to_lora(trained: dict, initial: dict) -> dict:
    """PiSSA factors over the residual W - sB0A0 -> a LoRA of rank 2r over the original W (PEFT's conversion,
    `path_initial_model_for_weight_conversion`): W - sB0A0 + sBA = W + s[B; -B0]·[A, A0], exactly."""

    def convert(leaf, leaf0):
        out = dict(leaf)
        out["lora_a"] = jnp.concatenate([leaf["lora_a"], leaf0["lora_a"]], axis=-1)  # [..., in, 2r]
        out["lora_b"] = jnp.concatenate([leaf["lora_b"], -leaf0["lora_b"]], axis=-2)  # [..., 2r, out]
        return out

    is_leaf = lambda x: isinstance(x, dict) and "lora_a" in x
    return jax.tree.map(convert, trained, initial, is_leaf=is_leaf)


def delta(leaf: dict, scale: float):
    """s · A B in our [in, out] layout ([L, in, out] for stacked layers), in float32."""
    a, b = leaf["lora_a"].astype(jnp.float32), leaf["lora_b"].astype(jnp.float32)
    return scale * jnp.einsum("...ir,...ro->...io", a, b)


def column_norm(kernel, leaf: dict, scale: float):
    """||W + s A B|| over the input axis: one norm per output feature (DoRA's ||·||_c)."""
    return jnp.linalg.norm(kernel.astype(jnp.float32) + delta(leaf, scale), axis=-2)


def _adapted(lora: dict, spec, arch):
    """(module, its LoRA leaf, its scale) for every module of `arch` that `lora` adapts; an error for a module
    whose delta no weight of the checkpoint can hold alone (merging into the tied matrix would change both the
    embedding and the head, where the adapter changed one)."""
    for m in names.modules(arch):
        try:
            leaf = names.get_path(lora, m.path)
        except KeyError:
            continue
        if arch.tie_word_embeddings and m.kind != "linear":
            raise PeftConfigError(
                f"cannot merge LoRA on {m.ours} into a model with tied embeddings: the merged matrix would also "
                f"change {'the lm_head' if m.kind == 'embedding' else 'embed_tokens'}, which the adapter never "
                "did. Export the adapter instead (save_adapter)"
            )
        yield m, leaf, spec.scale_for(m.scale_key)


def merge(params: dict, lora: dict, spec, arch, return_norms: bool = False):
    """Base params with every LoRA / DoRA delta folded into its kernel (what `merge_and_unload` gives).

    With `return_norms`, also the DoRA column norms ||W + sAB||_c that `unmerge` needs (as PEFT caches them):
    the merged weight alone does not determine them.
    """
    norms = {}
    for m, leaf, scale in _adapted(lora, spec, arch):
        if m.kind == "embedding":
            path = (*m.path, "embedding")
            base = names.get_path(params, path)
            params = names.set_path(
                params, path, (base.astype(jnp.float32) + delta(leaf, scale)).astype(base.dtype)
            )
            continue
        path = names.param_path(m)  # a kernel, or a stacked expert parameter [L, E, in, out]
        base = names.get_path(params, path)
        merged = base.astype(jnp.float32) + delta(leaf, scale)
        if "magnitude" in leaf:
            norm = jnp.linalg.norm(merged, axis=-2)  # [..., out]
            norms = names.set_path(norms, m.path, norm)
            merged = merged * (leaf["magnitude"].astype(jnp.float32) / norm)[..., None, :]
        params = names.set_path(params, path, merged.astype(base.dtype))
    return (params, norms) if return_norms else params


def unmerge(params: dict, lora: dict, spec, arch, norms: dict | None = None) -> dict:
    """Inverse of `merge` (exact up to rounding); DoRA needs the `norms` that `merge` returned."""
    for m, leaf, scale in _adapted(lora, spec, arch):
        path = names.param_path(m)
        merged = names.get_path(params, path).astype(jnp.float32)
        if "magnitude" in leaf:
            if norms is None:
                raise PeftConfigError(
                    "unmerging DoRA needs the column norms: use merge(..., return_norms=True)"
                )
            norm = names.get_path(norms, m.path)
            merged = merged / (leaf["magnitude"].astype(jnp.float32) / norm)[..., None, :]
        base = merged - delta(leaf, scale)
        params = names.set_path(params, path, base.astype(names.get_path(params, path).dtype))
    return params
