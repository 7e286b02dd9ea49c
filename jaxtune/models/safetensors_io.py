"""Minimal safetensors reader/writer on numpy memory maps.

Reading maps each file once and hands out zero-copy views per tensor, so loading a checkpoint touches one tensor
at a time and never builds a second full copy in host memory (the `safetensors` package's numpy backend cannot
return bfloat16, which most checkpoints are). The format is documented at huggingface/safetensors: an 8-byte
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes.
"""

from __future__ import annotations

import json
import math
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
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items() if not k.startswith("F8")}
MAX_HEADER = 100_000_000  # bytes; the reference reader refuses larger headers too
REDOWNLOAD = "re-download it (or re-save it)"


class CheckpointError(JaxtuneError, ValueError):
    """A checkpoint directory that cannot be read as the model it claims to be."""


def read_header(path: Path) -> tuple[dict, int]:
    """(the JSON header, the byte where the data section starts) of a safetensors file, after checking that the
    header describes this file: a sane length, valid JSON, known dtypes, offsets ordered and of each tensor's
    size, the tensors packed back to back (no overlap, no gap) in a data section that ends where the file
    ends. Any problem is a `CheckpointError` naming the file (and the tensor), so nothing reads a tensor from a
    damaged file."""
    path = Path(path)
    try:
        return _read_header(path)
    except OSError as e:  # unreadable (permissions, a directory, an I/O error): not a tensor to read
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None


def _read_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(
                f"{path}: truncated: {size} bytes, shorter than the 8-byte header length of a safetensors file; "
                f"{REDOWNLOAD}"
            )
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or n < 2:
            raise CheckpointError(
                f"{path}: not a safetensors file (its first 8 bytes give a header length of {n} bytes)"
            )
        if 8 + n > size:
            raise CheckpointError(
                f"{path}: truncated: {size} bytes, but its header alone needs {8 + n}; {REDOWNLOAD}"
            )
        text = f.read(n)
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header, not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: a JSON {type(header).__name__}, not an object")
    end, last = _check_entries(path, header, size - 8 - n)
    if 8 + n + end != size:
        if 8 + n + end > size:
            raise CheckpointError(
                f"{path}: truncated: {size} bytes, the header describes {8 + n + end} (its last tensor, {last!r}, "
                f"ends there); {REDOWNLOAD}"
            )
        raise CheckpointError(
            f"{path}: {size} bytes, but the header describes {8 + n + end}: {size - 8 - n - end} bytes after "
            f"the last tensor (a damaged or concatenated file); {REDOWNLOAD}"
        )
    return header, 8 + n


def _naturals(xs) -> bool:
    return isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)


def _check_entries(path: Path, header: dict, data_len: int) -> tuple[int, str | None]:
    """Each tensor entry well-formed, sized and packed; (the end of the data the header describes, the tensor
    that ends there)."""
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(f"{where}: header entry is not {{dtype, shape, data_offsets}}: {info!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        if not _naturals(shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not _naturals(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise CheckpointError(f"{where}: data_offsets {offsets!r} are not [begin, end] with begin <= end")
        begin, end = offsets
        want = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        if end - begin != want:
            raise CheckpointError(
                f"{where}: data_offsets {offsets} span {end - begin} bytes, but {dtype} {shape} needs {want}; "
                "the header is corrupt"
            )
        spans.append((begin, end, name))
    spans.sort()
    at, previous = 0, None  # the reference format packs the tensors back to back from byte 0 of the data
    for begin, end, name in spans:
        if begin != at:
            what = "overlaps" if begin < at else "leaves a gap after"
            after = f"tensor {previous!r}, which ends at {at}" if previous else "the start of the data section"
            raise CheckpointError(
                f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] {what} {after}; the header is corrupt "
                f"(data section: {max(data_len, 0)} bytes); {REDOWNLOAD}"
            )
        at, previous = end, name
    return at, previous


def _load_index(index: Path) -> dict[str, str]:
    """The `weight_map` (tensor -> shard file) of a `model.safetensors.index.json`."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{index}: not UTF-8 text ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: needs a \"weight_map\" object (tensor name -> shard file name)")
    return weight_map


class SafetensorsReader:
    """All tensors of a HF model directory: `model.safetensors`, or shards listed in `*.safetensors.index.json`;
    `files`: exactly these files instead (an adapter's `adapter_model.safetensors`). Every file's header is
    checked (`read_header`) before any tensor is read."""

    def __init__(self, directory: str | Path, files: list[Path] | None = None):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        weight_map = None
        if files is not None:
            files = [Path(f) for f in files]
            for f in files:
                if not f.is_file():
                    bins = sorted(p.name for p in self.dir.glob("*.bin")) if self.dir.is_dir() else []
                    hint = f" (found {', '.join(bins)}: re-save it with safe_serialization=True)" if bins else ""
                    raise CheckpointError(f"{self.dir}: no {f.name}{hint}")
        elif index.exists():
            weight_map = _load_index(index)
            files = sorted({self.dir / f for f in weight_map.values()})
            if not files:
                raise CheckpointError(f"{index}: its weight_map names no shard")
        else:
            files = sorted(p for p in self.dir.glob("*.safetensors") if p.is_file())
        if not files:
            bins = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = f" (found {', '.join(bins)}: re-save it with safe_serialization=True)" if bins else ""
            raise CheckpointError(f"{self.dir}: no *.safetensors weights{hint}")
        self.entries: dict[str, tuple[Path, dict, int]] = {}
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: lists shard {f.name}, which is missing from {self.dir}")
            header, start = read_header(f)
            for name, info in header.items():
                if name != "__metadata__":
                    self.entries[name] = (f, info, start)
        for name, shard in (weight_map or {}).items():
            held = self.entries.get(name)
            if held is None or held[0].name != Path(shard).name:
                found = f" (it is in {held[0].name})" if held else ""
                raise CheckpointError(
                    f"{index}: places tensor {name!r} in {shard}, which does not hold it{found}; the index and "
                    f"its shards are from different downloads: {REDOWNLOAD}"
                )
        self._maps: dict[Path, np.memmap] = {}

    def __contains__(self, name: str) -> bool:
        return self.resolve(name) is not None

    def names(self) -> list[str]:
        return list(self.entries)

    def file_of(self, name: str) -> Path:
        return self.entries[self.resolve(name)][0]

    def resolve(self, name: str) -> str | None:
        """HF names, tolerating checkpoints saved from the bare base model (no `model.` / `transformer.` prefix)."""
        if name in self.entries:
            return name
        stripped = name.split(".", 1)[1] if "." in name else name
        return stripped if stripped in self.entries else None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[self.resolve(name)][1]["shape"])

    def get(self, name: str) -> np.ndarray:
        """A read-only zero-copy view of one tensor (its header entry was checked when the file was opened)."""
        key = self.resolve(name)
        path, info, start = self.entries[key]
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._maps[path][start + begin : start + end]
        return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file, as arrays in memory (header checked)."""
    path = Path(path)
    reader = SafetensorsReader(path.parent, files=[path])
    return {n: np.array(reader.get(n)) for n in reader.names()}


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
