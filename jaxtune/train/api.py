"""`jaxtune.train(config_or_path, **overrides)`: what `jaxtune train` calls, for use from Python."""

from __future__ import annotations

import json

from jaxtune.config import load_config


def _flatten(prefix: str, value) -> list[str]:
    if isinstance(value, dict) and prefix.count(".") == 0 and prefix not in ("",):
        return [item for k, v in value.items() for item in _flatten(f"{prefix}.{k}", v)]
    return [f"{prefix}={json.dumps(value)}"]


def train(config_or_path, **overrides) -> dict:
    """Run training. Overrides: `training={"max_steps": 10}` or `**{"training.max_steps": 10}`."""
    from jaxtune.train.loop import run

    dotted = [item for k, v in overrides.items() for item in _flatten(k, v)]
    return run(load_config(config_or_path, dotted))
