"""Reading and checking a PEFT `adapter_config.json` for loading (`adapter_load`).

Every invalid setting is a `PeftConfigError` naming the key and the file: the file must be a JSON object, LoRA's
`r` / `lora_alpha` / `lora_dropout` / `rank_pattern` / `alpha_pattern` must be valid, `target_modules` must select
a module of this model (as PEFT requires), and settings that change what the adapter computes but that jaxtune
does not implement (`LORA_UNSUPPORTED`) must be off. `lora_setting` resolves `r` / `lora_alpha` for one HF module
exactly as PEFT does (`rank_pattern` / `alpha_pattern` keys may name one layer).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from jaxtune.models.arch import PeftSpec
from jaxtune.peft import experts_v4, names
from jaxtune.peft.interop import CONFIG, layer_indices
from jaxtune.peft.names import PeftConfigError

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
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
    "megatron_config",
)


UNSUPPORTED_HINTS = {
    "modules_to_save": (
        ": PEFT saves a whole trained copy of each such module (e.g. base_model.model.lm_head.weight, untied from "
        "embed_tokens on a tied model), which replaces a base weight, and jaxtune's adapters never do. Merge the "
        "adapter in PEFT (merge_and_unload) and load the merged model instead"
    ),
}


def check_unsupported(config: dict, d: Path, keys: tuple[str, ...]) -> None:
    for k in keys:
        if config.get(k) not in (None, False, [], {}, "none"):
            raise PeftConfigError(
                f"{d / CONFIG}: {k}={config[k]!r} is not supported by jaxtune's PEFT loader"
                + UNSUPPORTED_HINTS.get(k, "")
            )


def read_config(d: Path) -> dict:
    if not (d / CONFIG).exists():
        raise PeftConfigError(f"{d}: no {CONFIG} — is this a PEFT adapter directory?")
    try:
        config = json.loads((d / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise PeftConfigError(f"{d / CONFIG}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise PeftConfigError(f"{d / CONFIG}: must hold a JSON object, got {type(config).__name__}")
    return config


def spec_from_json(d: dict, file: Path) -> PeftSpec:
    d = dict(d)
    try:
        d["lora_scale"] = tuple((str(k), float(v)) for k, v in d.get("lora_scale", ()))
        return PeftSpec(**d)
    except (TypeError, ValueError) as e:
        raise PeftConfigError(f"{file}: spec is not a jaxtune PeftSpec ({e})") from None


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_rank(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def lora_settings(config: dict, file: Path) -> dict:
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


def lora_setting(st: dict, pattern: str, default: str, hf_name: str) -> tuple[object, str]:
    """PEFT `LoraModel._create_and_replace`: the value of the first `pattern` key that `get_pattern_key` matches
    to the module's HF name, else the default; with the key it came from (for messages)."""
    key = names.pattern_key(st[pattern], hf_name)
    if key is None:
        return st[default], f"{default}={st[default]!r}"
    return st[pattern][key], f"{pattern}[{key!r}]={st[pattern][key]!r}"


def check_target_parameters(config: dict, arch, file: Path) -> None:
    """`target_parameters` (PEFT's ParamWrapper: MoE experts, the router): a list of names, no dropout, and (as
    PEFT requires) at least one naming a parameter of this model."""
    target = config.get("target_parameters")
    if not target:
        return
    if not (isinstance(target, list) and all(isinstance(t, str) for t in target)):
        raise PeftConfigError(f"{file}: target_parameters={target!r} must be a list of parameter names")
    if config.get("lora_dropout"):
        raise PeftConfigError(
            f"{file}: lora_dropout={config['lora_dropout']!r} with target_parameters: PEFT's ParamWrapper refuses "
            "dropout, so no PEFT adapter can have both"
        )
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise PeftConfigError(
                f"{file}: {key}=true with target_parameters is refused by PEFT's ParamWrapper"
            )
    mods = [m for m in names.modules(arch) if m.kind in ("linear", *names.ROUTED)]
    known = [m.param_names[0].format(i=0) for m in mods]
    if not any(names.matches([t], n) for t in target for n in known):
        raise PeftConfigError(
            f"{file}: target_parameters={target!r} names no parameter of this {arch.model_type} model "
            f"(parameters: {', '.join(sorted({n.split('layers.0.', 1)[-1] for n in known}))})"
        )


def check_targets(config: dict, arch, file: Path) -> None:
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
    known = [n for m in names.modules(arch) for i in layer_indices(m, arch) for n in m.names(i)]
    known += experts_v4.v4_module_names(arch)  # a transformers-4 MoE adapter's expert / router modules
    if not any(names.matches(target, n) for n in known):
        shorts = sorted({m.hf.split(".")[-1] for m in names.modules(arch)})
        raise PeftConfigError(
            f"{file}: target_modules={target!r} matches no module of this {arch.model_type} model "
            f"(modules: {', '.join(shorts)})"
        )
