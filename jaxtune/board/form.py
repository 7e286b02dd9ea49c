"""The board's configure form: each field is a `RunConfig` field, and a form is a YAML config validated by the
code that validates every YAML file (`jaxtune.config.load_config`), so the page and the CLI cannot disagree.

A form starts from a base config (a YAML file, or the defaults). `compose(base, values, extra)` is the base
file's own mapping with every field whose text the user changed set to that text read as a YAML value (the
syntax of a command-line override), plus free ``section.field=value`` lines; `validate(text, path)` loads
that YAML as `jaxtune train` would and turns a `ConfigError` into {field key: message}, the message word for
word what the YAML file gives. Nothing here imports gradio or jax.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import shlex
import tempfile
import typing
from pathlib import Path
from typing import Any

from jaxtune import typed_yaml
from jaxtune.config import ConfigError, RunConfig, load_config

# (dotted key, widget): the fields the form shows, the ones users change most; any other key goes through the
# free overrides box. "choice": a Literal's values; "bool": a checkbox; "list": several names; "text": YAML.
FIELDS: tuple[tuple[str, str], ...] = (
    ("model.path", "text"),
    ("model.tokenizer", "text"),
    ("stage", "choice"),
    ("method.name", "choice"),
    ("method.rank", "text"),
    ("method.alpha", "text"),
    ("method.dropout", "text"),
    ("method.target_modules", "text"),
    ("model.quantization", "choice"),
    ("method.adapter_size", "text"),
    ("method.num_virtual_tokens", "text"),
    ("method.freeze_trainable_layers", "text"),
    ("data.dataset_dir", "text"),
    ("data.train", "list"),
    ("data.template", "text"),
    ("data.cutoff_len", "text"),
    ("data.packing", "bool"),
    ("data.val_size", "text"),
    ("training.learning_rate", "text"),
    ("training.num_epochs", "text"),
    ("training.max_steps", "text"),
    ("training.batch_size", "text"),
    ("training.micro_batch_size", "text"),
    ("training.warmup_ratio", "text"),
    ("training.eval_every", "text"),
    ("training.save_every", "text"),
    ("logging.log_every", "text"),
    ("dpo.beta", "text"),
    ("dpo.loss_type", "choice"),
    ("ppo.reward_model", "text"),
    ("grpo.num_generations", "text"),
    ("grpo.reward_fns", "text"),
    ("output_dir", "text"),
)
KEYS = tuple(k for k, _ in FIELDS)
LORA = ("lora", "qlora", "dora")
# which fields matter for a method / stage (the others are hidden, never dropped: a changed hidden field still
# goes into the YAML and is validated)
METHOD_FIELDS = {
    "method.rank": LORA, "method.alpha": LORA, "method.dropout": LORA, "method.target_modules": LORA,
    "model.quantization": ("qlora",), "method.adapter_size": ("adapter",),
    "method.num_virtual_tokens": ("prompt", "ptuning", "prefix", "ptuning_v2"),
    "method.freeze_trainable_layers": ("freeze",),
}  # fmt: skip
STAGE_FIELDS = {
    "dpo.beta": ("dpo", "kto"), "dpo.loss_type": ("dpo",), "ppo.reward_model": ("ppo",),
    "grpo.num_generations": ("grpo",), "grpo.reward_fns": ("grpo",),
}  # fmt: skip


def annotation(key: str) -> Any:
    """The type annotation of dotted `key` of RunConfig."""
    cls: Any = RunConfig
    *sections, name = key.split(".")
    for s in sections:
        cls = typed_yaml.hints(cls)[s]
    return typed_yaml.hints(cls)[name]


def choices(key: str) -> list[str]:
    """The values a Literal field (or a tuple of them) takes."""
    tp = annotation(key)
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple:
        tp, args = args[0], typing.get_args(args[0])
    return [str(a) for a in args]


def get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def render(value: Any, widget: str) -> Any:
    """A config value as its widget shows it: text in YAML flow syntax (what an override takes)."""
    if widget == "bool":
        return bool(value)
    if widget == "list":
        return [s if isinstance(s, str) else text_of(typed_yaml.to_dict(s)) for s in value]
    if widget == "choice":
        return str(value)
    return "" if value is None else text_of(value)


def text_of(value: Any) -> str:
    """YAML flow syntax on one line (a string as it is)."""
    if isinstance(value, str):
        return value
    import yaml

    value = typed_yaml.to_dict(value) if dataclasses.is_dataclass(value) else value
    value = list(value) if isinstance(value, tuple) else value
    text = yaml.dump(value, Dumper=typed_yaml.Dumper, default_flow_style=True, width=2**31, sort_keys=False,
                     allow_unicode=True)  # fmt: skip
    return text.strip().removesuffix("...").strip()


def values_of(cfg: RunConfig) -> dict[str, Any]:
    """What each field shows for `cfg`."""
    return {key: render(get(cfg, key), widget) for key, widget in FIELDS}


def base_mapping(base: str | None) -> tuple[dict, RunConfig]:
    """The base YAML file's own mapping (differences from the defaults) and the config it loads to."""
    if not base:
        return {}, load_config(None)
    data, _ = typed_yaml.read_yaml(Path(base))
    cfg = load_config(base)
    return (dict(data) if isinstance(data, dict) else {}), cfg


def parse(text: Any, widget: str, key: str | None = None) -> Any:
    """A widget's value as the config value it stands for: YAML for text ("" is null), as an override reads.
    For a string field (`key`'s annotation), a text YAML would read as a number or a boolean stays the text
    typed: output_dir 007 is "007", not "7"."""
    if widget in ("bool", "choice"):
        return text
    if widget == "list":
        return [typed_yaml.yaml_value(t) if isinstance(t, str) and t.lstrip().startswith("{") else t
                for t in (text or [])]  # fmt: skip
    text = str(text).strip()
    if not text:
        return None
    [(_, value, _)] = typed_yaml.parse_overrides([f"x={text}"])
    if key is not None and isinstance(value, (bool, int, float)) and _is_text(annotation(key)):
        return text
    return value


def _is_text(tp: Any) -> bool:
    """str, or str | None: no number or boolean would fit."""
    args = set(typing.get_args(tp)) - {type(None)} if typing.get_args(tp) else {tp}
    return args == {str}


def _set(mapping: dict, key: str, value: Any) -> None:
    *sections, name = key.split(".")
    node = mapping
    for s in sections:
        child = node.get(s)
        if not isinstance(child, dict):
            child = node[s] = {}
        node = child
    node[name] = value


def compose(base: str | None, values: dict[str, Any], extra: str = "") -> dict:
    """The YAML mapping of a form: the base file's mapping, every changed field, then the `extra` lines."""
    mapping, cfg = base_mapping(base)
    mapping = copy.deepcopy(mapping)
    shown = values_of(cfg)
    widgets = dict(FIELDS)
    for key, value in values.items():
        if key in widgets and value != shown[key]:
            _set(mapping, key, parse(value, widgets[key], key))
    for path, value, _ in typed_yaml.parse_overrides(overrides_of(extra)):
        _set(mapping, ".".join(path), value)
    return mapping


def overrides_of(extra: str) -> list[str]:
    """The free box: one ``section.field=value`` per line; blank lines and ``#`` comments ignored."""
    return [line.strip() for line in (extra or "").splitlines() if line.strip() and not line.lstrip().startswith("#")]


def yaml_text(mapping: dict) -> str:
    return typed_yaml.dump(mapping) if mapping else "{}\n"


@dataclasses.dataclass
class Checked:
    cfg: RunConfig | None
    errors: dict[str, str]  # field key ("" for a key no field shows) -> the ConfigError's text


def field_of(message: str) -> str:
    """The form field a config error is about: the dotted key it starts with (or names first)."""
    keys = re.findall(r"(?<![\w.])((?:[a-z_]+\.)*[a-z_]+)(?:\[\d+\])?", message)
    for k in keys[:1] + keys:
        for field in sorted(KEYS, key=len, reverse=True):
            if k == field or k.startswith(field + "."):
                return field
    return ""


def validate(text: str, path: str | Path) -> Checked:
    """Load YAML `text` as if it were the file `path` (errors name that file and its lines)."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="jaxtune-board-") as tmp:
        probe = Path(tmp) / path.name
        probe.write_text(text, encoding="utf-8")
        try:
            cfg = load_config(probe)
        except ConfigError as e:
            message = str(e).replace(str(probe), str(path))
            return Checked(None, {field_of(message): message})
    return Checked(cfg, {})


def train_command(base: str | None, mapping: dict, saved: str | Path | None = None) -> str:
    """`jaxtune train SAVED`, and the same run as the base config plus overrides (no file to save)."""
    lines = []
    if saved:
        lines.append(f"jaxtune train {shlex.quote(str(saved))}")
    base_map = base_mapping(base)[0]
    overrides = [f"{k}={text_of(v)}" for k, v in _flat(mapping).items() if _flat(base_map).get(k, _NONE) != v]
    gone = [k for k in _flat(base_map) if k not in _flat(mapping)]
    if base and not gone:  # an override adds or replaces; it cannot delete a base key
        cmd = ["jaxtune", "train", base] + overrides
        lines.append(" ".join(shlex.quote(c) for c in cmd))
    return "\n".join(lines)


_NONE = object()


def _flat(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of the sections' fields (a field's value may be a mapping itself: kept whole)."""
    out = {}
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not prefix and dataclasses.is_dataclass(typed_yaml.hints(RunConfig).get(k)):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def visible(key: str, stage: str, method: str) -> bool:
    if key in METHOD_FIELDS:
        return method in METHOD_FIELDS[key]
    if key in STAGE_FIELDS:
        return stage in STAGE_FIELDS[key]
    return True
