"""The key of a tokenised-dataset cache: a hash of everything the items depend on.

The items `pipeline.iterators` builds in memory are a pure function of the source files' bytes, how each source
is read (format, columns, tags, split, sample counts), the tokenizer (its serialized state, special tokens and
chat template), the template and its kwargs, the data kind, the cleaning, split and tokenisation options, the
run seed (splits and max_samples subsets are seeded), and jaxtune's own item encoding (`FORMAT_VERSION`, bumped
whenever an item or the array layout changes, and a hash of jaxtune/data's source files). Options applied after
the items (packing, bucketing, shuffling, batch size, mixture ratios) are not part of it, so changing them reuses
the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

# Bump whenever the items, the tokenisation path or the array layout of a cache change.
FORMAT_VERSION = 1

# DataConfig fields that change the items (the rest act after them: packing, shuffle, bucket_multiple, ...).
ITEM_FIELDS = (
    "template", "template_kwargs", "rewritten_history", "cutoff_len", "overlength", "train_on_prompt",
    "mask_history", "val_size", "dedup", "on_error", "min_length", "max_samples",
)  # fmt: skip
_CHUNK = 1 << 22


def hash_path(path: Path) -> str:
    """blake2b of a file's bytes, or of every file under a directory (relative names and bytes, sorted)."""
    h = hashlib.blake2b(digest_size=20)
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(f"\0{f.relative_to(path).as_posix()}\0".encode())
        with open(f, "rb") as fh:
            while block := fh.read(_CHUNK):
                h.update(block)
    return h.hexdigest()


def source_fingerprint(src) -> dict:
    """A resolved `loading.Source`: its content and how it is read (its mixture ratio is not part of it)."""
    return {
        "content": hash_path(src.path),
        "spec": dataclasses.asdict(src.spec) if dataclasses.is_dataclass(src.spec) else repr(src.spec),
        "split": src.split,
        "max_samples": src.max_samples,
        "num_samples": src.num_samples,
    }


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A hash of what tokenisation reads from `tokenizer`; None when it cannot be serialized (no caching)."""
    h = hashlib.blake2b(digest_size=20)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    elif hasattr(tokenizer, "get_vocab"):  # slow tokenizers: the vocabulary and how the class was built
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
        h.update(
            repr(sorted((k, repr(v)) for k, v in getattr(tokenizer, "init_kwargs", {}).items())).encode()
        )
    else:
        return None
    specials = {
        "class": type(tokenizer).__qualname__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_tokens_map": repr(getattr(tokenizer, "special_tokens_map", None)),
        "ids": [getattr(tokenizer, f"{n}_token_id", None) for n in ("bos", "eos", "pad", "unk")],
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
    }
    h.update(json.dumps(specials, sort_keys=True, default=repr).encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _code() -> str:
    """A hash of the data package's own source: a jaxtune upgrade or a local edit that changes how items are made
    can never map a cache built by other code (FORMAT_VERSION alone relies on someone remembering to bump it)."""
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _versions() -> dict:
    out = {"jaxtune.data source": _code()}
    for name in ("transformers", "tokenizers", "jinja2"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # not installed: it then plays no part in tokenisation
            out[name] = None
    return out


def cache_key(d, kind: str, seed: int, train_src, eval_src, tokenizer) -> tuple[str, dict] | None:
    """(hex key, the inputs it hashes) for DataConfig `d`, or None when the tokenizer cannot be fingerprinted."""
    tok = tokenizer_fingerprint(tokenizer)
    if tok is None:
        return None
    inputs = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "seed": int(seed),
        "tokenizer": tok,
        "versions": _versions(),
        "fields": {name: getattr(d, name) for name in ITEM_FIELDS},
        "train": [source_fingerprint(s) for s in train_src],
        "eval": [source_fingerprint(s) for s in eval_src],
    }
    blob = json.dumps(inputs, sort_keys=True, default=repr, ensure_ascii=False)
    return hashlib.blake2b(blob.encode(), digest_size=20).hexdigest(), inputs
