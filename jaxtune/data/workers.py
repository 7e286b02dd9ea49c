"""Parallel tokenisation: contiguous chunks of records -> raw column files, in `data.num_workers` processes.

Each task is one chunk of one set's records; a worker encodes it with the same `Encoder` the in-memory pipeline
uses and writes its columns to the build directory (`columns.write_chunk`), returning only counts: the items
never travel back through a pipe, and no process holds more than one chunk of them. Results come back in task
order, so the assembled arrays are byte-identical for any worker count (one worker runs in this process).

Workers come from a `forkserver` (`spawn` where there is none), never from `fork`: a forked child of a process
that has initialised JAX (or the Rust tokenizer's thread pool) can deadlock. A `JaxtuneError` raised in a worker (a `DataError` naming file and row, a template
that does not apply) comes back as a plain value and is raised again here, the same error with the same
location, never a multiprocessing traceback; skipped records (`on_error: skip`) come back counted.
"""

from __future__ import annotations

import collections
import importlib
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from jaxtune.data import columns, prepare
from jaxtune.data.errors import _LOGGED_PER_REASON, DataError, ErrorPolicy
from jaxtune.data.items import Encoder, batch_kind
from jaxtune.errors import JaxtuneError, RunError

log = logging.getLogger("jaxtune.data")

_STATE: dict = {}  # a worker's tokenizer and encoder options, set once by `_init`
_DATA_ERROR_FIELDS = ("message", "file", "row", "field", "line", "reason")


class Collect(ErrorPolicy):
    """`ErrorPolicy` that keeps the first few skip messages per reason instead of logging them (the parent
    process logs them, in record order)."""

    def __init__(self, on_error: str):
        super().__init__(on_error)
        self.messages: list[tuple[str, str]] = []

    def tell(self, err: DataError) -> None:
        self.messages.append((err.reason, str(err)))


def report_state(report: prepare.Report) -> dict:
    """A `Report` as JSON-able values; Counters as ordered [key, n] pairs (zeros and insertion order kept, so
    a restored report prints and compares exactly like the original)."""
    return {
        "loaded": report.loaded,
        "kept": report.kept,
        "truncated": report.truncated,
        "chunked": report.chunked,
        "filtered": [[k, n] for k, n in report.filtered.items()],
        "tokens": [[k, n] for k, n in report.tokens.items()],
        "by_file": [[f, list(v)] for f, v in report.by_file.items()],
    }


def add_report(report: prepare.Report, state: dict) -> None:
    """Add a `report_state` into `report` (as if its records had been encoded here, in order)."""
    report.loaded += state["loaded"]
    report.kept += state["kept"]
    report.truncated += state["truncated"]
    report.chunked += state["chunked"]
    report.filtered.update(dict(state["filtered"]))
    report.tokens.update(dict(state["tokens"]))
    prepare.add_file_counts(report.by_file, state.get("by_file", ()))


def add_skips(policy: ErrorPolicy, result: dict, logged: collections.Counter) -> None:
    """Count a chunk's skipped records into `policy` and log the first few of each reason, as it would."""
    policy.skipped.update(dict(result["skipped"]))
    for reason, message in result["messages"]:
        policy.examples.setdefault(reason, message)
        logged[reason] += 1
        if logged[reason] <= _LOGGED_PER_REASON:
            log.warning("skipping bad record: %s", message)


def _init(tokenizer, kind: str, options: dict) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _STATE.update(tokenizer=tokenizer, kind=kind, options=options)


def encode_chunk(state: dict, task: tuple) -> dict:
    """Task (part, seq, records, build dir) -> counts; its columns are written as `<dir>/<part>.<seq>.*.bin`."""
    part, seq, records, out = task
    report, policy = prepare.Report(), Collect(state["options"]["on_error"])
    opts = {k: v for k, v in state["options"].items() if k != "on_error"}
    try:
        enc = Encoder(state["tokenizer"], state["kind"], policy=policy, report=report, **opts)
        items = [it for r in records for it in enc(r)]
        counts = columns.write_chunk(batch_kind(state["kind"]), items, Path(out) / f"{part}.{seq:06d}")
    except JaxtuneError as e:
        return {"error": error_state(e)}
    return {
        "error": None, "part": part, "seq": seq, "items": len(items), "counts": counts,
        "report": report_state(report), "skipped": list(policy.skipped.items()), "messages": policy.messages,
    }  # fmt: skip


def _worker(task: tuple) -> dict:
    return encode_chunk(_STATE, task)


def error_state(e: JaxtuneError) -> dict:
    if isinstance(e, DataError):
        return {"class": "DataError", **{k: getattr(e, k) for k in _DATA_ERROR_FIELDS}}
    return {"class": f"{type(e).__module__}:{type(e).__qualname__}", "message": str(e)}


def raise_error(state: dict):
    """Raise the error `error_state` described: a DataError with its location, else the same class."""
    if state["class"] == "DataError":
        raise DataError(state["message"], **{k: state[k] for k in _DATA_ERROR_FIELDS[1:]})
    module, _, name = state["class"].partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
        err = cls(state["message"])
    except Exception:  # a class that takes other arguments: its message, as a RunError
        err = RunError(state["message"])
    raise err


def _context(tokenizer):
    """forkserver where the platform has it: its server imports this module and the tokenizer's (JAX
    imported, never initialised) once, and forks each worker from that, so workers start at once; spawn
    elsewhere. Never fork this process: it may have initialised JAX."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__, type(tokenizer).__module__])
        return ctx
    return multiprocessing.get_context("spawn")


_BROKEN = (
    "a data.num_workers tokenisation worker died before finishing its records (killed, out of memory, or it "
    "could not start: a Python script that calls jaxtune must guard its top-level code with "
    "`if __name__ == \"__main__\":`, since each worker re-imports the main module); set data.num_workers=1 to "
    "tokenise in this process"
)


def _ready() -> None:
    """A no-op task: submitting one per worker starts them all."""


class Pool:
    """`num_workers` worker processes (none for one: tasks then run here). Created before the records are loaded,
    so the workers start and unpickle the tokenizer meanwhile."""

    def __init__(self, tokenizer, kind: str, options: dict, num_workers: int):
        self.state = {"tokenizer": tokenizer, "kind": kind, "options": options}
        self.pool = None
        if num_workers > 1:
            self.pool = ProcessPoolExecutor(
                num_workers,
                mp_context=_context(tokenizer),
                initializer=_init,
                initargs=(tokenizer, kind, options),
            )
            for _ in range(num_workers):
                self.pool.submit(_ready)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def run(self, tasks: list):
        """Yield each task's result in task order; raise a worker's JaxtuneError as itself."""
        if self.pool is None or len(tasks) <= 1:
            for task in tasks:
                result = encode_chunk(self.state, task)
                if result["error"]:
                    raise_error(result["error"])
                yield result
            return
        try:
            futures = [self.pool.submit(_worker, t) for t in tasks]
        except BrokenProcessPool:
            raise RunError(_BROKEN) from None
        try:
            for f in futures:
                try:
                    result = f.result()
                except BrokenProcessPool:
                    raise RunError(_BROKEN) from None
                if result["error"]:
                    raise_error(result["error"])
                yield result
        finally:
            for f in futures:
                f.cancel()
