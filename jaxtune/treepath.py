"""Tree paths as strings: the one place that turns a pytree key path (or a tuple of dict keys) into names.

    path_keys((DictKey("params"), DictKey("layers"), SequenceKey(0)))  -> ("params", "layers", "0")
    path_str(...)                                                       -> "params/layers/0"

Config regexes (`method.trainable_patterns`, weight-decay masks) and log lines use the "/"-joined form.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def path_keys(path: Iterable[Any]) -> tuple[str, ...]:
    """Each entry of a jax key path (DictKey.key, GetAttrKey.name, SequenceKey.idx) or a plain key, as text."""
    out = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                out.append(str(getattr(key, attr)))
                break
        else:
            out.append(str(key))
    return tuple(out)


def path_str(path: Iterable[Any]) -> str:
    return "/".join(path_keys(path))
