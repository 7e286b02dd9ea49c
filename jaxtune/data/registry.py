"""`dataset_info.json`: LLaMA-Factory's dataset registry, so a user can point jaxtune at an existing data folder.

Schema (per dataset name): file_name, formatting (alpaca | sharegpt; jaxtune also accepts its own format
names), ranking, columns, tags, split, num_samples, and hub fields (hf_hub_url, ms_hub_url, om_hub_url,
script_url, cloud_file_name, subset, folder). jaxtune reads local files only: an entry with no `file_name`
is reported as needing a download, never fetched.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxtune.data.errors import DataError
from jaxtune.data.formats import FormatSpec, did_you_mean
from jaxtune.data.json_text import hint

# The type each key must have (a string `columns` would otherwise be read character by character).
_TYPES = {
    "file_name": (str,), "formatting": (str,), "ranking": (bool,), "columns": (dict,), "tags": (dict,),
    "split": (str,), "num_samples": (int,),
}  # fmt: skip

REGISTRY_FILE = "dataset_info.json"
KEYS = (
    "file_name", "formatting", "ranking", "columns", "tags", "split", "num_samples",
    "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "subset", "folder", "file_sha1",
)  # fmt: skip
_HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    path: Path | None  # None: hub-only entry
    spec: FormatSpec
    split: str = "train"
    num_samples: int | None = None
    hub: str | None = None


def read_registry(dataset_dir: str | Path) -> dict[str, dict]:
    path = Path(dataset_dir) / REGISTRY_FILE
    if not path.exists():
        return {}
    text = path.read_bytes().decode("utf-8", errors="replace")
    if not text.strip():
        raise DataError(
            f"the registry file is {'empty' if not text else 'only whitespace'}; it maps dataset names to entries",
            file=str(path),
            reason="bad registry",
        )
    try:
        info = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"registry is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}{hint(text, e.pos)})",
            file=str(path),
            line=e.lineno,
            reason="malformed JSON",
        ) from None
    except UnicodeDecodeError as e:
        raise DataError(
            f"registry is not valid JSON ({e})", file=str(path), reason="malformed JSON"
        ) from None
    if not isinstance(info, dict):
        raise DataError("registry must map dataset names to entries", file=str(path), reason="bad registry")
    return info


def entry(dataset_dir: str | Path, name: str) -> Entry:
    """The registry entry `name` of `dataset_dir/dataset_info.json`, validated."""
    info = read_registry(dataset_dir)
    reg = str(Path(dataset_dir) / REGISTRY_FILE)
    if name not in info:
        raise DataError(
            f"no dataset named '{name}'{did_you_mean(name, sorted(info))}", file=reg, reason="unknown dataset"
        )
    raw = info[name]
    if not isinstance(raw, dict):
        raise DataError("entry must be an object", file=reg, field=name, reason="bad registry")
    for key in raw:
        if key not in KEYS:
            raise DataError(
                f"unknown key{did_you_mean(key, KEYS)}",
                file=reg,
                field=f"{name}.{key}",
                reason="bad registry",
            )
    for key, types in _TYPES.items():
        value = raw.get(key)
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise DataError(
                f"must be {'an object' if dict in types else types[0].__name__}, got {type(value).__name__} "
                f"{value!r}",
                file=reg,
                field=f"{name}.{key}",
                reason="bad registry",
            )
    for key in ("columns", "tags"):
        for k, v in (raw.get(key) or {}).items():
            if not isinstance(v, str):
                raise DataError(
                    f"must name a column (a string), got {type(v).__name__}",
                    file=reg,
                    field=f"{name}.{key}.{k}",
                    reason="bad registry",
                )
    formatting = raw.get("formatting", "alpaca")
    try:
        spec = FormatSpec(
            formatting, bool(raw.get("ranking", False)), raw.get("columns") or {}, raw.get("tags") or {}
        )
    except ValueError as e:
        raise DataError(str(e), file=reg, field=name, reason="bad registry") from None
    hub = next((raw[k] for k in _HUB_KEYS if raw.get(k)), None)
    path = Path(dataset_dir) / raw["file_name"] if raw.get("file_name") else None
    return Entry(name, path, spec, raw.get("split", "train"), raw.get("num_samples"), hub)
