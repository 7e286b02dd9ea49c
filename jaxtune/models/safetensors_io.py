"""Minimal safetensors reader/writer on numpy memory maps.

Reading maps each file once and hands out zero-copy views per tensor, so loading a checkpoint touches one tensor
at a time and never builds a second full copy in host memory (the `safetensors` package's numpy backend cannot
return bfloat16, which most checkpoints are). The format is documented at huggingface/safetensors: an 8-byte
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxtune.errors import JaxtuneError

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class CheckpointError(JaxtuneError, ValueError):
    """A checkpoint directory that cannot be read as the model it claims to be."""


def read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    return header, 8 + n


class SafetensorsReader:
    """All tensors of a HF model directory: `model.safetensors`, or shards listed in `*.safetensors.index.json`."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.dir / f for f in weight_map.values()})
        else:
            files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = f" (found {', '.join(bins)}: re-save it with safe_serialization=True)" if bins else ""
            raise CheckpointError(f"{self.dir}: no *.safetensors weights{hint}")
        self.entries: dict[str, tuple[Path, dict, int]] = {}
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index}: lists shard {f.name}, which is missing from {self.dir}")
            header, start = read_header(f)
            for name, info in header.items():
                if name != "__metadata__":
                    self.entries[name] = (f, info, start)
        self._maps: dict[Path, np.memmap] = {}

    def __contains__(self, name: str) -> bool:
        return self.resolve(name) is not None

    def names(self) -> list[str]:
        return list(self.entries)

    def resolve(self, name: str) -> str | None:
        """HF names, tolerating checkpoints saved from the bare base model (no `model.` / `transformer.` prefix)."""
        if name in self.entries:
            return name
        stripped = name.split(".", 1)[1] if "." in name else name
        return stripped if stripped in self.entries else None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[self.resolve(name)][1]["shape"])

    def get(self, name: str) -> np.ndarray:
        """A read-only zero-copy view of one tensor."""
        key = self.resolve(name)
        path, info, start = self.entries[key]
        if info["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._maps[path][start + begin : start + end]
        return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])


class Lazy:
    """A tensor to be written: its name, shape and dtype up front, its values only when `fn()` is called."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype, fn):
        self.name, self.shape, self.dtype, self.fn = name, tuple(shape), np.dtype(dtype), fn

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def write_file(path: Path, tensors: list[Lazy], metadata: dict | None = None) -> None:
    """Write one safetensors file, materialising one tensor at a time."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            arr = np.ascontiguousarray(t.fn(), dtype=t.dtype)
            if arr.shape != t.shape:
                raise AssertionError(f"{t.name}: produced {arr.shape}, declared {t.shape}")
            f.write(arr.tobytes())


def write_sharded(directory: Path, tensors: list[Lazy], max_shard_bytes: int) -> list[str]:
    """Write `model.safetensors`, or `model-0000k-of-0000n.safetensors` + the index when over the limit."""
    shards: list[list[Lazy]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    if len(shards) == 1:
        write_file(directory / "model.safetensors", shards[0])
        return ["model.safetensors"]
    files, weight_map = [], {}
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_file(directory / fname, shard)
        files.append(fname)
        weight_map.update({t.name: fname for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files
