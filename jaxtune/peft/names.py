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

Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE) have no per-expert modules: as in transformers 5, each
layer's `mlp.experts` holds two stacked parameters, `gate_up_proj` and `down_proj` (kind "experts", adapted by
PEFT's `target_parameters` / `ParamWrapper`, see peft/experts.py), and a router `mlp.gate` (kind "router", a
custom module in transformers 5 that PEFT reaches as the parameter `mlp.gate.weight`). `all-linear` selects every
linear layer (attention, Qwen2-MoE's shared expert and its gate) and the expert parameters, but never the router
(`ALL_LINEAR_ROUTER`): routing is left as trained unless `gate` is named. (PEFT's own `all-linear` differs per
family here: on Mixtral / Qwen3-MoE it also adapts the router and gives gate_up_proj rank 2r, on Qwen2-MoE it skips
the experts; saved adapters list their targets explicitly, so interop is exact either way.)

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
    # its own: embed_tokens' matrix transposed), which only LoRA can adapt; "router": an MoE router (a Proj,
    # selected only by name); "experts": a stacked expert parameter [E, in, out] (in/out_features per expert)

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def per_layer(self) -> bool:
        return self.path[0] == "layers"

    def names(self, i: int | None) -> tuple[str, str]:
        return self.hf.format(i=i), self.ours.format(i=i)

    @property
    def scale_key(self) -> str:
        """Its `PeftSpec.lora_scale` key: the module name, `experts.<param>` for expert parameters (which must not
        collide with an ordinary Proj named alike, e.g. Phi-3's `mlp.gate_up_proj`)."""
        return f"experts.{self.name}" if self.kind == "experts" else self.name

    def pattern_names(self, i: int | None) -> tuple[str, str]:
        """The names rank_pattern / alpha_pattern keys match: PEFT's `current_key`, the module name, or for a
        ParamWrapper the parameter's (the router: `model.layers.0.mlp.gate.weight`)."""
        if self.kind == "router":
            return f"{self.hf.format(i=i)}.weight", f"{self.ours.format(i=i)}.weight"
        return self.names(i)

    @property
    def param_names(self) -> tuple[str, str]:
        """The HF parameter PEFT's `target_parameters` matches (`...mlp.experts.gate_up_proj`, `...q_proj.weight`),
        HF's and ours, "{i}" = layer index."""
        if self.kind == "experts":
            return self.hf, self.ours
        return f"{self.hf}.weight", f"{self.ours}.weight"


ROUTED = ("experts", "router")  # kinds PEFT adapts only through target_parameters (ParamWrapper)
ALL_LINEAR_ROUTER = False  # all-linear leaves the MoE router frozen (see the module docstring)
# transformers-4 names of Mixtral / Qwen-MoE expert linears, which transformers 5 fused into `mlp.experts`
V4_EXPERT_NAMES = ("w1", "w2", "w3", "gate_proj", "up_proj")


def param_path(m: Module) -> tuple[str, ...]:
    """Where module m's base weight lives in params: the kernel, embedding, or the expert parameter itself."""
    if m.kind == "experts":
        return m.path
    return (*m.path, "embedding" if m.kind == "embedding" else "kernel")


def _moe_projs(arch: ArchConfig) -> list[tuple[tuple[str, ...], int, int, str]]:
    """(path under layers, in, out, kind) of an MoE block's adaptable weights, in transformers' module order."""
    d, e, f = arch.hidden_size, arch.num_experts, arch.moe_intermediate_size
    out = [
        (("mlp", "gate"), d, e, "router"),
        (("mlp", "experts", "gate_up_proj"), d, 2 * f, "experts"),
        (("mlp", "experts", "down_proj"), f, d, "experts"),
    ]
    if arch.shared_expert_size:
        s = arch.shared_expert_size
        out += [
            (("mlp", "shared_expert", "gate_proj"), d, s, "linear"),
            (("mlp", "shared_expert", "up_proj"), d, s, "linear"),
            (("mlp", "shared_expert", "down_proj"), s, d, "linear"),
            (("mlp", "shared_expert_gate"), d, 1, "linear"),
        ]
    return out


def modules(arch: ArchConfig) -> list[Module]:
    """Every module LoRA / (IA)^3 / BitFit can adapt, in a fixed order."""
    d, f = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    projs = [("self_attn", "q_proj", d, q), ("self_attn", "k_proj", d, kv), ("self_attn", "v_proj", d, kv)]
    if arch.fused_qkv:  # phi3
        projs = [("self_attn", "qkv_proj", d, q + 2 * kv)]
    projs.append(("self_attn", "o_proj", q, d))
    if arch.fused_gate_up:  # phi3
        projs += [("mlp", "gate_up_proj", d, 2 * f), ("mlp", "down_proj", f, d)]
    elif not arch.num_experts:  # an MoE block's weights (`_moe_projs`) follow the attention ones
        projs += [("mlp", "gate_proj", d, f)] if arch.gated_mlp else []
        projs += [("mlp", "up_proj", d, f), ("mlp", "down_proj", f, d)]
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
        for rel, i, o, kind in _moe_projs(arch) if arch.num_experts else []:
            hf = f"model.layers.{{i}}.{'.'.join(rel)}"
            out.append(Module(("layers", *rel), hf, hf, i, o, kind=kind))
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


def _all_linear(m: Module) -> bool:
    """What `all-linear` selects: every linear layer but the output head, the expert parameters, not the router."""
    return (
        (m.kind == "linear" and m.path != ("lm_head",))
        or m.kind == "experts"
        or (m.kind == "router" and ALL_LINEAR_ROUTER)
    )


def _check_v4_names(arch: ArchConfig, target, what: str) -> None:
    """PEFT maps transformers-4 expert names (Mixtral w1/w2/w3, Qwen gate_proj/up_proj) onto the fused experts; here
    a name that matches nothing on an MoE model is an error rather than silently nothing."""
    if not arch.num_experts or isinstance(target, str):
        return
    known = [n for m in modules(arch) for n in m.names(0)]
    for t in target:
        if t in V4_EXPERT_NAMES and not any(matches([t], n) for n in known):
            raise PeftConfigError(
                f"{what} names {t!r}, a transformers-4 expert projection: this {arch.model_type} model's experts are "
                "the fused parameters experts.gate_up_proj and experts.down_proj (name those, or use "
                "target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj])"
            )


def select(arch: ArchConfig, target, what: str = "target_modules", linear_only: bool = False) -> list[Module]:
    """The modules a PEFT-style `target_modules` selects (the same in every layer, or an error).

    `linear_only` ((IA)^3, BitFit): projections only; naming an MoE expert parameter or router is an error."""
    if target is None or (not isinstance(target, str) and len(target) == 0):
        raise PeftConfigError(f"{what} is empty: name modules such as ['q_proj', 'v_proj'] or 'all-linear'")
    if isinstance(target, str) and target != ALL_LINEAR:
        re.compile(target)
    elif not isinstance(target, str):
        target = [str(t) for t in target]
    check_unfused(arch, target, what)
    _check_v4_names(arch, target, what)
    all_linear = target == ALL_LINEAR or (not isinstance(target, str) and ALL_LINEAR in target)
    chosen = []
    for m in modules(arch):
        if all_linear:
            hit = _all_linear(m) and not (linear_only and m.kind in ROUTED)
        else:
            hit = layer_uniform(arch, m, lambda hf, ours: matches(target, hf) or matches(target, ours), what)
        if hit and linear_only and m.kind == "tied_head":
            raise PeftConfigError(
                f"{what}={target!r} selects the tied lm_head, which only LoRA can adapt (its weight is "
                "embed_tokens'); leave lm_head out"
            )
        if hit and linear_only and m.kind in ROUTED:
            raise PeftConfigError(
                f"{what}={target!r} selects {m.ours.format(i='N')}, an MoE {m.kind} weight, which only LoRA can "
                "adapt (PEFT's (IA)^3 and jaxtune's BitFit work on linear layers); name linear layers only"
                + (" (e.g. shared_expert.down_proj)" if arch.shared_expert_size else "")
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


def select_parameters(arch: ArchConfig, target, what: str = "target_parameters") -> list[Module]:
    """The modules whose weight PEFT's `target_parameters` names (`LoraConfig.target_parameters`: each entry the
    full parameter name or a `.`-suffix of it, e.g. `mlp.experts.gate_up_proj`, `mlp.gate.weight`). Every entry
    must name a parameter of this model (PEFT only requires one to)."""
    target = [str(t) for t in target or ()]
    mods = [m for m in modules(arch) if m.kind in ("linear", *ROUTED)]
    chosen = []
    for t in target:
        hits = [
            m
            for m in mods
            if any(matches([t], n) for n in (m.param_names[0].format(i=0), m.param_names[1].format(i=0)))
        ]
        if not hits:
            params = sorted({m.param_names[0].split("{i}.", 1)[-1] for m in mods})
            raise PeftConfigError(
                f"{what} entry {t!r} names no parameter of this {arch.model_type} model; parameters: "
                f"{', '.join(params)}"
            )
        chosen += [m for m in hits if m not in chosen]
    return [m for m in modules(arch) if m in chosen]  # in the fixed order


def has_path(tree: dict, path: tuple[str, ...]) -> bool:
    try:
        get_path(tree, path)
    except (KeyError, TypeError):
        return False
    return True


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
