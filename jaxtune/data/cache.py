"""The tokenised-dataset cache: load -> clean -> split -> template -> tokenise once, then memory-map it.

`prepared(...)` returns the train sets (one per source), the eval set and the `Report` counts the in-memory
pipeline would compute, from `<cache_dir>/<kind>-<key>/` where the key hashes everything the items depend on
(`fingerprint.py`). A miss builds the directory: records are loaded and cleaned here, tokenised in
`data.num_workers` processes (`workers.py`) into raw chunk files, concatenated in record order into `.npy`
arrays (`columns.py` says which), and published atomically:

1. everything is written into a temporary sibling directory and fsynced;
2. `manifest.json` is written last: each array's shape, dtype, byte size, full crc32 and the crc32 of its
   first and last 64 KiB, the per-set item and token counts, the reports, and a checksum of itself;
3. the directory is renamed into place. Two processes building the same key race only at the rename: the
   loser discards its copy and maps the winner's.

Opening checks the manifest against the files (sizes, shapes, dtypes, offsets, the edge checksums); a torn,
partial or corrupt directory is logged in one line, removed and rebuilt, never read.

Several hosts (`jax.process_count() > 1`): process 0 opens or builds; the others wait for its signal through
the JAX distributed key-value store and then open the same directory (output_dir and the cache are expected
on a shared file system); a host that finds no valid cache there (a host-local cache_dir) builds its own,
with identical results.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path

import numpy as np

from jaxtune.data import columns, workers
from jaxtune.data.fingerprint import FORMAT_VERSION, cache_key
from jaxtune.data.items import batch_kind

log = logging.getLogger("jaxtune.data")

ENV_DIR = "JAXTUNE_DATA_CACHE"
MANIFEST = "manifest.json"
_EDGE = 1 << 16  # bytes at each end of an array file checked on every open
_COPY = 1 << 22
_SYNCS = itertools.count()  # every process calls `prepared` in the same order: one signal name per call


class Damaged(Exception):
    """A cache directory that must not be read (why: the message)."""


@dataclasses.dataclass(frozen=True)
class Info:
    """What `jaxtune data prepare` prints and the pipeline logs."""

    dir: Path
    hit: bool
    built: str
    seconds: float  # to build it (the build's own time, also on a hit)
    items: dict  # set name -> items
    tokens: dict  # set name -> tokens
    bytes: int  # array bytes on disk
    workers: int


@dataclasses.dataclass(frozen=True)
class Prepared:
    train: list  # columns.Mapped per train source
    eval: columns.Mapped | None
    info: Info


def cache_root(cache_dir: str | None = None) -> Path:
    """data.cache_dir, else $JAXTUNE_DATA_CACHE, else ~/.cache/jaxtune/data."""
    given = cache_dir or os.environ.get(ENV_DIR)
    return Path(given).expanduser() if given else Path.home() / ".cache" / "jaxtune" / "data"


# ---- hosts ---------------------------------------------------------------------------------------------------
def hosts() -> tuple[int, int]:
    """(process index, process count); (0, 1) unless JAX's distributed runtime is initialised (never starts a
    backend: `jaxtune data prepare` must not grab an accelerator)."""
    if "jax" not in sys.modules:
        return 0, 1
    try:
        from jax._src import distributed  # jax's own state: process_count() would initialise a backend

        state = distributed.global_state
        if state.client is None or not state.num_processes:
            return 0, 1
    except (ImportError, AttributeError):  # another jax layout: every host then builds or maps on its own
        return 0, 1
    return int(state.process_id), int(state.num_processes)


def signal(name: str, value: str) -> None:
    """Process 0: tell the others the cache `name` is ready (or failed)."""
    from jax._src import distributed

    distributed.global_state.client.key_value_set(name, value)


def wait(name: str) -> str:
    """Other processes: block until process 0 signals `name` (logging every ten minutes)."""
    from jax._src import distributed

    client = distributed.global_state.client
    while True:
        try:
            return client.blocking_key_value_get(name, 600_000)
        except Exception as e:  # jax raises its runtime error; only a timeout means "still building"
            if "DEADLINE" not in str(e).upper():
                raise
            log.info("data: still waiting for process 0 to prepare the tokenised cache")


# ---- files ---------------------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _edges(path: Path, size: int) -> int:
    with open(path, "rb") as f:
        crc = zlib.crc32(f.read(_EDGE))
        f.seek(max(0, size - _EDGE))
        return zlib.crc32(f.read(_EDGE), crc)


def _write_npy(path: Path, dtype, n: int, blocks) -> dict:
    """`<path>` as a 1-D .npy of `n` values from raw byte blocks (bytes or chunk files); its manifest entry."""
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for block in blocks:
            if isinstance(block, Path):
                with open(block, "rb") as g:
                    shutil.copyfileobj(g, f, _COPY)
                block.unlink()
            else:
                f.write(block)
        f.flush()
        os.fsync(f.fileno())
    size = path.stat().st_size
    crc = 0
    with open(path, "rb") as f:
        while b := f.read(_COPY):
            crc = zlib.crc32(b, crc)
    return {"shape": [n], "dtype": dtype.str, "bytes": size, "crc32": crc, "edges": _edges(path, size)}


def _assemble(tmp: Path, chunks: Path, kind: str, part: str, results: list) -> dict:
    """Concatenate one set's chunk files, in order, into its final arrays."""
    out = {}
    stem = lambda r: chunks / f"{part}.{r['seq']:06d}"
    for name, dtype, ragged in columns.COLUMNS[kind]:
        if ragged:
            lens = []
            for r in results:
                lens.append(np.fromfile(f"{stem(r)}.{name}.len.bin", np.int64))
                os.unlink(f"{stem(r)}.{name}.len.bin")
            offsets = np.zeros(sum(map(len, lens)) + 1, np.int64)
            np.cumsum(np.concatenate(lens) if lens else np.zeros(0, np.int64), out=offsets[1:])
            out[f"{part}.{name}.offsets.npy"] = _write_npy(
                tmp / f"{part}.{name}.offsets.npy", np.int64, len(offsets), [offsets.tobytes()]
            )
        n = sum(r["counts"][name] for r in results)
        files = [Path(f"{stem(r)}.{name}.bin") for r in results]
        out[f"{part}.{name}.npy"] = _write_npy(tmp / f"{part}.{name}.npy", dtype, n, files)
    return out


def _checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=16).hexdigest()


def _discard(path: Path) -> None:
    """Move a directory out of the way first (atomic), then delete it."""
    trash = path.with_name(f"{path.name}.trash-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except OSError:
        return  # already gone (another process discarded it)
    shutil.rmtree(trash, ignore_errors=True)


# ---- open ----------------------------------------------------------------------------------------------------
def open_dir(path: Path, key: str) -> tuple[dict, dict]:
    """(manifest, {file name: memory-mapped array}) of a valid cache directory; `Damaged` otherwise."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise Damaged("no manifest") from None
    except (OSError, ValueError) as e:
        raise Damaged(f"unreadable manifest: {type(e).__name__}") from None
    if not isinstance(manifest, dict) or manifest.get("checksum") != _checksum(manifest):
        raise Damaged("manifest checksum mismatch")
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("key") != key:
        raise Damaged("manifest of another format or key")
    arrays = {}
    for name, entry in manifest["arrays"].items():
        file = path / name
        try:
            size = file.stat().st_size
        except OSError:
            raise Damaged(f"{name} is missing") from None
        if size != entry["bytes"]:
            raise Damaged(f"{name} holds {size} bytes, the manifest says {entry['bytes']}")
        try:
            arr = np.load(file, mmap_mode="r") if entry["shape"][0] else np.load(file)
        except (OSError, ValueError) as e:
            raise Damaged(f"{name} does not load ({e})") from None
        if list(arr.shape) != entry["shape"] or arr.dtype.str != entry["dtype"]:
            raise Damaged(f"{name} is {arr.dtype.str}{list(arr.shape)}, the manifest says otherwise")
        if _edges(file, size) != entry["edges"]:
            raise Damaged(f"{name} checksum mismatch")
        arrays[name] = arr
    for name, arr in arrays.items():
        if name.endswith(".offsets.npy"):
            flat = arrays[name.replace(".offsets.npy", ".npy")]
            if arr[0] != 0 or arr[-1] != len(flat) or (np.diff(arr) < 0).any():
                raise Damaged(f"{name} does not index its array")
    return manifest, arrays


def _sets(manifest: dict, arrays: dict, kind: str):
    def mapped(part):
        prefix = part + "."
        cols = {n[len(prefix) : -len(".npy")]: a for n, a in arrays.items() if n.startswith(prefix)}
        return columns.Mapped(kind, cols)

    train = [mapped(p) for p in manifest["train_parts"]]
    return train, mapped(manifest["eval_part"]) if manifest["eval_part"] else None


def _info(path: Path, manifest: dict, hit: bool) -> Info:
    parts = manifest["parts"]
    return Info(
        path, hit, manifest["built"], manifest["seconds"], {p: v["items"] for p, v in parts.items()},
        {p: v["tokens"] for p, v in parts.items()}, sum(e["bytes"] for e in manifest["arrays"].values()),
        manifest["workers"],
    )  # fmt: skip


def _open_valid(path: Path, key: str) -> tuple[dict, dict] | None:
    """A valid cache at `path`, or None (a damaged one is logged and removed)."""
    if not path.exists():
        return None
    try:
        return open_dir(path, key)
    except Damaged as e:
        log.warning("data: the tokenised cache %s is damaged (%s): removing it and tokenising again", path, e)
        _discard(path)
        return None


# ---- build ---------------------------------------------------------------------------------------------------
def _chunk_size(total: int, num_workers: int) -> int:
    return max(64, min(4096, -(-total // max(1, 4 * num_workers))))


def _sweep(final: Path, max_age_s: float = 86400.0) -> None:
    """Remove this key's build and trash directories left by processes killed more than a day ago."""
    for stale in final.parent.glob(f"{final.name}.*-*"):
        try:
            if time.time() - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _build(final: Path, key: str, inputs: dict, job: dict) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep(final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    try:
        (tmp / "chunks").mkdir()
        pool = workers.Pool(job["tokenizer"], job["kind"], job["options"], job["num_workers"])
        with pool:  # the workers start while the records load
            _build_in(tmp, key, inputs, job, pool, t0)
        return _publish(tmp, final, key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build_in(tmp: Path, key: str, inputs: dict, job: dict, pool, t0: float) -> None:
    """Load, tokenise and write everything into `tmp`, the manifest last."""
    chunks = tmp / "chunks"
    parts = job["plan"]()  # [(set name, "train" | "eval", records)], loaded and cleaned here
    names = list(dict.fromkeys(p for p, _, _ in parts))
    reports = {p: job["report"] if t == "train" else job["eval_report"] for p, t, _ in parts}
    size = _chunk_size(sum(len(r) for _, _, r in parts), job["num_workers"])
    tasks, seqs = [], collections.Counter()
    for part, _, records in parts:
        for a in range(0, len(records), size):
            tasks.append((part, seqs[part], records[a : a + size], str(chunks)))
            seqs[part] += 1
    del parts
    done, logged = {p: [] for p in names}, collections.Counter()
    bkind = batch_kind(job["kind"])
    for result in pool.run(tasks):
        workers.add_report(reports[result["part"]], result["report"])
        workers.add_skips(job["policy"], result, logged)
        done[result["part"]].append(result)
    arrays = {}
    for part in names:
        arrays.update(_assemble(tmp, chunks, bkind, part, done[part]))
    chunks.rmdir()
    tokens = lambda part: sum(arrays[f"{part}.{c}.npy"]["shape"][0] for c in columns.TOKEN_COLUMNS
                              if f"{part}.{c}.npy" in arrays)  # fmt: skip
    manifest = {
        "format_version": FORMAT_VERSION, "key": key, "kind": job["kind"],
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 3), "workers": job["num_workers"],
        "parts": {p: {"items": sum(r["items"] for r in done[p]), "tokens": tokens(p)} for p in names},
        "train_parts": [p for p in names if p.startswith("train")],
        "eval_part": "eval" if "eval" in names else None,
        "report": workers.report_state(job["report"]), "eval_report": workers.report_state(job["eval_report"]),
        "skipped": list(job["policy"].skipped.items()), "examples": dict(job["policy"].examples),
        "arrays": arrays, "inputs": inputs,
    }  # fmt: skip
    manifest["checksum"] = _checksum(manifest)
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1, default=repr)
        f.flush()
        os.fsync(f.fileno())
    _fsync(tmp)


def _publish(tmp: Path, final: Path, key: str) -> tuple[dict, dict]:
    try:
        os.rename(tmp, final)
    except OSError:  # another process published this key first: keep theirs if it is valid
        found = _open_valid(final, key)
        if found is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return found
        os.rename(tmp, final)
    _fsync(final.parent)
    return open_dir(final, key)


# ---- entry point ---------------------------------------------------------------------------------------------
def prepared(d, tokenizer, kind: str, seed: int, train_src, eval_src, plan, options: dict, policy, report,
             eval_report, persist: bool = True) -> Prepared | None:  # fmt: skip
    """The mapped sets of DataConfig `d` (building them on a miss); None when the tokenizer cannot be
    fingerprinted. `plan()` loads and cleans: [(set name, "train" | "eval", records)], counting into the
    reports and `policy`; on a hit it is never called and the saved counts are added to them instead.
    `persist=False` builds in a temporary directory removed once mapped (parallel tokenisation, no cache)."""
    keyed = cache_key(d, kind, seed, train_src, eval_src, tokenizer)
    if keyed is None:
        log.info("data: the tokenizer cannot be fingerprinted; not caching the tokenised data")
        return None
    key, inputs = keyed
    job = dict(plan=plan, tokenizer=tokenizer, kind=kind, options=options, policy=policy, report=report,
               eval_report=eval_report, num_workers=int(d.num_workers))  # fmt: skip
    if not persist:
        root = Path(tempfile.mkdtemp(prefix="jaxtune-data-"))
        try:
            manifest, arrays = _build(root / key, key, inputs, job)
            return _result(root / key, manifest, arrays, kind, False)
        finally:
            shutil.rmtree(root, ignore_errors=True)  # the maps stay readable
    final = cache_root(d.cache_dir) / f"{kind}-{key[:24]}"
    index, count = hosts()
    name = f"jaxtune/data-cache/{next(_SYNCS)}/{key}"
    if count > 1 and index != 0:
        wait(name)  # process 0 has opened or built it (or failed: then this host fails the same way)
    try:
        found = _open_valid(final, key)
        if found is None:
            found = _build(final, key, inputs, job)
            result = _result(final, *found, kind, False)
        else:
            result = _result(final, *found, kind, True)
            for rep, state in ((report, found[0]["report"]), (eval_report, found[0]["eval_report"])):
                workers.add_report(rep, state)
            policy.skipped.update(dict(found[0]["skipped"]))
            for reason, message in found[0]["examples"].items():
                policy.examples.setdefault(reason, message)
    except BaseException:
        if count > 1 and index == 0:
            signal(name, "failed")
        raise
    if count > 1 and index == 0:
        signal(name, "ready")
    return result


def _result(path: Path, manifest: dict, arrays: dict, kind: str, hit: bool) -> Prepared:
    train, ev = _sets(manifest, arrays, batch_kind(kind))
    info = _info(path, manifest, hit)
    n = sum(info.items.values())
    if hit:
        log.info("data: mapped the tokenised cache %s (%d items, built %s)", path, n, info.built)
    else:
        log.info(
            "data: tokenised %d items in %.1f s with %d worker(s) into %s",
            n,
            info.seconds,
            info.workers,
            path,
        )
    return Prepared(train, ev, info)
