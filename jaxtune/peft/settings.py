"""`method_cfg` in any of the forms users pass it -> `jaxtune.config.MethodConfig` (where the defaults live).

Accepted: a `MethodConfig`; a mapping such as {"method": "lora", "rank": 8} (`method` or `name` names the
method; missing fields take MethodConfig's defaults; unknown keys fail with a "did you mean"); or any object
with MethodConfig's field names as attributes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from jaxtune import typed_yaml
from jaxtune.config import MethodConfig

SELECTION = ("full", "bitfit", "freeze")  # methods that train a subset of the base params themselves


def method_config(cfg) -> MethodConfig:
    if isinstance(cfg, MethodConfig):
        return cfg
    if cfg is None:
        return MethodConfig()
    if isinstance(cfg, Mapping):
        d = dict(cfg)
        if "method" in d:
            if "name" in d and d["name"] != d["method"]:
                raise typed_yaml.ConfigError(
                    f"method_cfg gives method={d['method']!r} and name={d['name']!r}"
                )
            d["name"] = d.pop("method")
    else:
        d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(MethodConfig) if hasattr(cfg, f.name)}
        if "name" not in d and hasattr(cfg, "method"):
            d["name"] = cfg.method
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    return typed_yaml.load(MethodConfig, d)


def methods_of(cfg: MethodConfig) -> tuple[str, ...]:
    """The method names a config trains together, `name` first (e.g. ("lora", "prefix"))."""
    return (cfg.name, *cfg.combine)
