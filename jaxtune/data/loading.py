"""`load(source)`: a path, a registry name or a source dict -> normalised records.

A source is a path (file or directory), a dataset name in `dataset_dir/dataset_info.json`, or a dict with
keys `path` or `name`, and optionally `format`, `columns`, `tags`, `ranking`, `split`, `max_samples`
(keep the first N rows, as LLaMA-Factory does) and `ratio` (used by mixtures, ignored here). A registry
entry's `num_samples` draws a seeded subset (or oversamples) like LLaMA-Factory.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from jaxtune.data import registry
from jaxtune.data.errors import DataError, ErrorPolicy
from jaxtune.data.files import read_rows
from jaxtune.data.formats import FormatSpec, converter, did_you_mean
from jaxtune.data.records import Record
from jaxtune.errors import RunError

SOURCE_KEYS = ("path", "name", "format", "columns", "tags", "ranking", "split", "max_samples", "ratio")


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved source: where to read and how to interpret it."""

    label: str  # what the user wrote, for logs and `inspect`
    path: Path
    spec: FormatSpec
    split: str = "train"
    max_samples: int | None = None
    num_samples: int | None = None
    ratio: float | None = None


def resolve(source, dataset_dir=None, format: str | None = None) -> Source:
    if isinstance(source, Source):
        return source
    if isinstance(source, str | Path):
        source = {"path": str(source)}
    elif dataclasses.is_dataclass(source):  # a typed source section of a config
        source = {k: v for k, v in dataclasses.asdict(source).items() if v is not None}
    if not isinstance(source, Mapping):
        raise TypeError(f"a data source is a path, a dataset name or a dict, got {type(source).__name__}")
    for key in source:
        if key not in SOURCE_KEYS:
            raise RunError(
                f"unknown key '{key}' in data source {dict(source)}{did_you_mean(key, SOURCE_KEYS)}"
            )
    given = source.get("name") or source.get("path")
    if not given:
        raise RunError(f"data source {dict(source)} needs 'path' or 'name'")
    fmt = source.get("format", format)
    overrides = dict(max_samples=source.get("max_samples"), ratio=source.get("ratio"))
    name = source.get("name") or given
    if dataset_dir and name in registry.read_registry(dataset_dir):
        e = registry.entry(dataset_dir, name)
        if e.path is None:
            raise DataError(
                f"dataset '{name}' is only on a hub ({e.hub}); jaxtune reads local files: download it and set "
                "file_name in dataset_info.json",
                file=str(Path(dataset_dir) / registry.REGISTRY_FILE),
                field=name,
                reason="not local",
            )
        spec = e.spec
        if fmt or source.get("columns") or source.get("tags") or source.get("ranking") is not None:
            spec = FormatSpec(
                fmt or spec.formatting, source.get("ranking", spec.ranking), source.get("columns") or spec.columns,
                source.get("tags") or spec.tags,
            )  # fmt: skip
        _text_only(spec, str(Path(dataset_dir) / registry.REGISTRY_FILE), name)
        return Source(
            name, e.path, spec, source.get("split", e.split), num_samples=e.num_samples, **overrides
        )
    if source.get("name"):
        raise DataError(
            f"no dataset named '{name}' (dataset_dir={dataset_dir})",
            file=str(dataset_dir),
            reason="unknown dataset",
        )
    path = Path(given)
    if not path.exists() and dataset_dir and (Path(dataset_dir) / path).exists():
        path = Path(dataset_dir) / path
    if not path.exists() and dataset_dir:  # meant as a registry name or a file there: say what was looked at
        info = Path(dataset_dir) / registry.REGISTRY_FILE
        names = list(registry.read_registry(dataset_dir))
        where = (
            f"not a dataset named in {info}{did_you_mean(name, names)}"
            if names
            else f"data.dataset_dir has no {registry.REGISTRY_FILE} to look it up in ({info} does not exist)"
        )
        raise DataError(f"not a file ({path.resolve()}), and {where}", file=str(given),
                        reason="missing file")  # fmt: skip
    if not path.exists():  # here, before anything (the cache's fingerprint) reads it
        hint = ("; a path is not expanded as a glob: give the directory that holds the files (every data file "
                "under it is read), or list each file" if any(c in given for c in "*?[") else "")  # fmt: skip
        raise DataError(f"no such file or directory{hint}", file=str(given), reason="missing file")
    spec = FormatSpec(
        fmt, bool(source.get("ranking", False)), source.get("columns") or {}, source.get("tags") or {}
    )
    _text_only(spec, str(given), None)
    return Source(given, path, spec, source.get("split", "train"), **overrides)


MEDIA_COLUMNS = ("images", "videos", "audios")


def _text_only(spec: FormatSpec, file: str, name: str | None) -> None:
    """A source that maps image / video / audio columns is multimodal data: training its text alone, around
    the media placeholders, is not what it means. One error saying so, instead of dropping the media."""
    media = [k for k in MEDIA_COLUMNS if k in spec.columns]
    if media:
        where = f"dataset '{name}'" if name else "this source"
        raise DataError(
            f"{where} maps the {', '.join(media)} column(s) ({', '.join(repr(spec.columns[k]) for k in media)}): "
            "jaxtune trains text-only language models and would drop the media, training the text around its "
            "placeholders as if it were complete; remove the mapping to train on the text alone, or use a text "
            "dataset", file=file, field=media[0], reason="multimodal data",
        )  # fmt: skip


def iter_records(src: Source, policy: ErrorPolicy | None = None) -> Iterator[Record]:
    """Records of one source, lazily (streaming reads through this); bad rows go through `policy`."""
    policy = policy or ErrorPolicy("raise")
    current_file, convert = None, None
    rows = read_rows(src.path, policy, src.split)
    if src.max_samples is not None:
        rows = itertools.islice(rows, src.max_samples)
    for raw in rows:
        try:
            if raw.file != current_file:  # a directory may hold files of different formats
                _, convert = converter(raw, src.spec)
                current_file = raw.file
            record = _convert(convert, raw)
        except DataError as err:
            policy.handle(err)
            continue
        yield record


def _convert(convert, raw):
    try:
        return convert(raw)
    except DataError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        # Shapes that no check anticipated still get a location.
        raise DataError(
            f"unreadable record ({e!r})", file=raw.file, row=raw.row, line=raw.line, reason="bad record"
        ) from None


def load(
    source, dataset_dir=None, format: str | None = None, *, on_error: str = "raise", policy=None
) -> list[Record]:
    """Normalised records of a source (a path, a name in `dataset_dir/dataset_info.json`, or a source dict)."""
    own = policy is None  # a caller's policy spans several sources: the caller logs its summary once
    policy = policy or ErrorPolicy(on_error)
    src = resolve(source, dataset_dir, format)
    records = list(iter_records(src, policy))
    if own and policy.on_error == "skip":
        policy.log_summary()
    if src.num_samples is not None and records:
        # LLaMA-Factory's num_samples: a seeded random subset, or the data repeated and topped up at random.
        rng = np.random.default_rng(0)
        n, k = len(records), src.num_samples
        idx = (
            rng.permutation(n)[:k]
            if k <= n
            else np.concatenate([np.arange(n)] * (k // n) + [rng.permutation(n)[: k % n]])
        )
        records = [records[i] for i in idx]
    return records
