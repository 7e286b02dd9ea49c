"""Which projections a model has, what Hugging Face / PEFT call them, and PEFT's rules for matching names.

PEFT selects modules by their full HF name (`model.layers.3.self_attn.q_proj`) with `target_modules` (a list:
exact name or `.`-suffix match; a string: regex full match; `"all-linear"`: every linear layer but the output
head) and resolves `rank_pattern` / `alpha_pattern` with `get_pattern_key` (`(.*\\.)?key$`). We apply the same
rules to the same names, so a PEFT config means the same thing here. Names are also matched in jaxtune's own
spelling (`model.layers.3.self_attn.q_proj`), which differs only for GPT-2, whose HF modules are fused
(`attn.c_attn` = q|k|v along the output axis, `attn.c_proj` = o_proj, `mlp.c_fc` = up_proj,
`mlp.c_proj` = down_proj); there `c_attn` selects all three of q/k/v. Phi-3 / Phi-4 (`phi3`) have fused
modules of their own, `self_attn.qkv_proj` and `mlp.gate_up_proj`, and so do we (one kernel each): a LoRA on
them is one LoRA (one A shared by q, k and v), as PEFT's; a config naming `q_proj`, `gate_proj`, ... on such a
model is an error pointing to the fused name, never a silently smaller selection.

Layers are stacked (`nn.scan`), so a selection must be the same in every layer: a per-layer choice is an error
that says so, never a silent approximation. (Loading a PEFT adapter whose `rank_pattern` / `alpha_pattern`
name single layers is exact all the same: adapter_load.py pads the ranks and folds the scales.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from jaxtune.errors import JaxtuneError
from jaxtune.models.arch import ArchConfig

ALL_LINEAR = "all-linear"


class PeftConfigError(JaxtuneError, ValueError):
    """A PEFT setting that cannot be applied to this model (names what and why)."""


@dataclass(frozen=True)
class Module:
    """One adaptable module: a `Proj` (or the embedding) and its Hugging Face counterpart."""

    path: tuple[str, ...]  # our module path; ("layers", ...) are stacked over the layer axis
    hf: str  # HF module name, "{i}" = layer index
    ours: str  # jaxtune's dotted name, "{i}" = layer index
    in_features: int
    out_features: int
    part: tuple[int, int] | None = None  # (index, parts) of a module fused along its output (GPT-2 c_attn)
    fan_in_fan_out: bool = False  # HF stores the weight [in, out] (GPT-2 Conv1D)
    kind: str = "linear"  # or "embedding", or "tied_head": the output head of a tied model (no kernel of
    # its own: embed_tokens' matrix transposed), which only LoRA can adapt

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def per_layer(self) -> bool:
        return self.path[0] == "layers"

    def names(self, i: int | None) -> tuple[str, str]:
        return self.hf.format(i=i), self.ours.format(i=i)


def modules(arch: ArchConfig) -> list[Module]:
    """Every module LoRA / (IA)^3 / BitFit can adapt, in a fixed order."""
    d, f = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    projs = [("self_attn", "q_proj", d, q), ("self_attn", "k_proj", d, kv), ("self_attn", "v_proj", d, kv)]
    if arch.fused_qkv:  # phi3
        projs = [("self_attn", "qkv_proj", d, q + 2 * kv)]
    projs.append(("self_attn", "o_proj", q, d))
    if arch.fused_gate_up:  # phi3
        projs.append(("mlp", "gate_up_proj", d, 2 * f))
    elif arch.gated_mlp:
        projs += [("mlp", "gate_proj", d, f), ("mlp", "up_proj", d, f)]
    else:
        projs.append(("mlp", "up_proj", d, f))
    projs.append(("mlp", "down_proj", f, d))
    ours = {name: f"model.layers.{{i}}.{parent}.{name}" for parent, name, _, _ in projs}
    out = []
    if arch.model_type == "gpt2":
        gpt2 = {
            "q_proj": ("attn.c_attn", (0, 3)),
            "k_proj": ("attn.c_attn", (1, 3)),
            "v_proj": ("attn.c_attn", (2, 3)),
            "o_proj": ("attn.c_proj", None),
            "up_proj": ("mlp.c_fc", None),
            "down_proj": ("mlp.c_proj", None),
        }
        for parent, name, i, o in projs:
            hf, part = gpt2[name]
            out.append(
                Module(("layers", parent, name), f"transformer.h.{{i}}.{hf}", ours[name], i, o, part, True)
            )
        embed = "transformer.wte"
    else:
        for parent, name, i, o in projs:
            out.append(Module(("layers", parent, name), ours[name], ours[name], i, o))
        embed = "model.embed_tokens"
    head = "linear" if not arch.tie_word_embeddings else "tied_head"
    out.append(Module(("lm_head",), "lm_head", "lm_head", d, arch.vocab_size, kind=head))
    out.append(Module(("embed_tokens",), embed, "model.embed_tokens", arch.vocab_size, d, kind="embedding"))
    return out


def matches(target, name: str) -> bool:
    """PEFT `check_target_module_exists`: a str is a regex full match; a list matches exactly or by suffix."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return name in target or any(name.endswith(f".{t}") for t in target)


def pattern_key(patterns, name: str) -> str | None:
    """PEFT `get_pattern_key`: the first pattern key `k` with `(.*\\.)?k$` matching the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def layer_uniform(arch: ArchConfig, module: Module, fn, what: str):
    """fn(hf_name, our_name) evaluated for every layer (or once for root modules); must not vary by layer."""
    values = [fn(*module.names(i)) for i in (range(arch.num_layers) if module.per_layer else [None])]
    if any(v != values[0] for v in values):
        raise PeftConfigError(
            f"{what} differs between layers for {module.ours.format(i='N')} ({values}); jaxtune stacks the "
            "layers, so every layer must get the same setting: use a pattern naming the module, e.g. "
            f"'{module.name}', not one naming a layer"
        )
    return values[0]


# phi3: the modules HF fuses -> the fused module that holds them
FUSED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def check_unfused(arch: ArchConfig, target, what: str) -> None:
    """On a model with fused qkv_proj / gate_up_proj, naming one of their parts (q_proj, ..., up_proj) is an
    error pointing to the fused module: PEFT would silently skip it, and a smaller selection than asked is the
    worst outcome. A regex is checked the same way: it may not match a part's name without the fused one's."""
    if target == ALL_LINEAR or (not isinstance(target, str) and ALL_LINEAR in target):
        return
    present = {"qkv_proj": arch.fused_qkv, "gate_up_proj": arch.fused_gate_up}
    for part, fused in FUSED.items():
        if not present[fused]:
            continue
        parent = "self_attn" if fused == "qkv_proj" else "mlp"
        name, fused_name = f"model.layers.0.{parent}.{part}", f"model.layers.0.{parent}.{fused}"
        named = matches(target, name) if isinstance(target, str) else any(
            t == part or name.endswith(f".{t}") for t in target
        )
        if named and not (isinstance(target, str) and matches(target, fused_name)):
            raise PeftConfigError(
                f"{what}={target!r} names {part!r}, which this {arch.model_type} model does not have: its "
                f"{parent}.{fused} fuses {', '.join(p for p, f in FUSED.items() if f == fused)} into one module "
                f"(as in transformers and PEFT); target {fused!r} instead (or 'all-linear')"
            )


def select(arch: ArchConfig, target, what: str = "target_modules", linear_only: bool = False) -> list[Module]:
    """The modules a PEFT-style `target_modules` selects (the same in every layer, or an error)."""
    if target is None or (not isinstance(target, str) and len(target) == 0):
        raise PeftConfigError(f"{what} is empty: name modules such as ['q_proj', 'v_proj'] or 'all-linear'")
    if isinstance(target, str) and target != ALL_LINEAR:
        re.compile(target)
    elif not isinstance(target, str):
        target = [str(t) for t in target]
    check_unfused(arch, target, what)
    chosen = []
    for m in modules(arch):
        if target == ALL_LINEAR or (not isinstance(target, str) and ALL_LINEAR in target):
            hit = m.kind == "linear" and m.path != ("lm_head",)
        else:
            hit = layer_uniform(arch, m, lambda hf, ours: matches(target, hf) or matches(target, ours), what)
        if hit and linear_only and m.kind == "tied_head":
            raise PeftConfigError(
                f"{what}={target!r} selects the tied lm_head, which only LoRA can adapt (its weight is "
                "embed_tokens'); leave lm_head out"
            )
        if hit and not (linear_only and m.kind != "linear"):
            chosen.append(m)
    if not chosen:
        names = sorted({m.name for m in modules(arch)} | {m.hf.split(".")[-1] for m in modules(arch)})
        raise PeftConfigError(
            f"{what}={target!r} matches no module of this {arch.model_type} model; module names: "
            f"{', '.join(names)} (or 'all-linear')"
        )
    return chosen


def get_path(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> dict:
    """A copy of nested dict `tree` with `value` at `path` (intermediate dicts created as needed)."""
    out = dict(tree)
    if len(path) == 1:
        out[path[0]] = value
    else:
        out[path[0]] = set_path(out.get(path[0], {}), path[1:], value)
    return out
