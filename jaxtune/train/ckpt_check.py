"""Is a checkpoint on disk whole? A cheap check of every file a restore reads, and quiet restore attempts.

    problem(step_dir) -> None, or one short line: "state: array file of trainable.params.x is truncated ..."
    with quiet(): ...          # orbax / tensorstore / asyncio chatter of a failing restore goes nowhere
    describe(exc) -> the most specific first line of an exception chain

`problem` reads the JSON items (data, meta), the state's tree metadata and the OCDBT index of its arrays, then
the last byte of every stored value: a deleted or truncated array file (a full disk, a bucket sync that stopped)
fails that read, while the arrays themselves are never read whole. It is what a resume runs before handing a
checkpoint to Orbax (whose failing reads leave background futures printing tracebacks), and what a save runs on
its own result before older checkpoints are deleted.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import re
import sys
from pathlib import Path

ARRAY_TYPES = ("jax.Array", "np.ndarray", "scalar")  # orbax value types stored through tensorstore
NOISY_LOGGERS = ("absl", "orbax", "asyncio", "tensorstore", "jax._src.checkpoint")


def problem(step_dir: Path, items: tuple[str, ...] = ("data", "meta")) -> str | None:
    """What is wrong with the checkpoint `step_dir` (missing, truncated or unparsable files), or None."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        return "the directory is gone"
    if not any(step_dir.iterdir()):
        return "the directory is empty"
    for item in items:
        path = step_dir / item / "metadata"
        try:
            value = json.loads(path.read_text())
        except FileNotFoundError:
            return f"{item}/metadata is missing"
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return f"{item}/metadata is not valid JSON ({describe(e)})"
        if not isinstance(value, dict):
            return f"{item}/metadata holds a JSON {type(value).__name__}, not an object"
    return _state_problem(step_dir / "state")


def _state_problem(state: Path) -> str | None:
    try:
        meta = json.loads((state / "_METADATA").read_text())
        tree = meta["tree_metadata"]
        leaves = [
            ".".join(str(k["key"]) for k in v["key_metadata"])
            for v in tree.values()
            if v["value_metadata"]["value_type"] in ARRAY_TYPES and not v["value_metadata"].get("skip_deserialize")
        ]
    except FileNotFoundError:
        return "state/_METADATA (the tree of arrays) is missing"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"state/_METADATA is damaged ({describe(e)})"
    if not meta.get("use_ocdbt", True):
        return None  # not the layout jaxtune writes: Orbax's restore is the only check
    if not (state / "manifest.ocdbt").is_file():
        return "state/manifest.ocdbt (the index of the array files) is missing"
    import tensorstore as ts

    try:
        kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state.absolute()}/"}).result()
        keys = [k.decode() for k in kv.list().result()]
    except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError / RuntimeError for damaged indexes
        return f"state: the index of the array files cannot be read ({describe(e)})"
    stored = {k.split("/", 1)[0] for k in keys}
    for leaf in leaves:
        if leaf not in stored:
            return f"state: array {leaf} has no stored data"
    # the last byte of every value: the index says which file and range holds it, so a missing or short file fails
    reads = [(k, kv.read(k, byte_range=slice(-1, None))) for k in keys]
    first = None
    for key, future in reads:  # wait for every read, so none completes later in the background
        try:
            result = future.result()  # a missing data file reads as an empty value: no stored value is empty
            bad = None if result.state == "value" and len(result.value) == 1 else "is missing"
        except Exception as e:  # noqa: BLE001
            short = re.search(r"\[(\d+), \d+\) is not valid for value of size (\d+)", str(e))
            bad = (f"is truncated (the index needs byte {short[1]}, the file holds {short[2]} bytes)" if short
                   else f"is unreadable ({describe(e)})")  # fmt: skip
        if bad and first is None:
            first = f"state: the array file of {key.split('/', 1)[0]} {bad}"
    return first


def describe(e: BaseException, limit: int = 240) -> str:
    """The deepest cause's first line (orbax wraps tensorstore's precise error in generic ones)."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for exc in reversed(chain):
        text = str(exc).strip()
        if text:
            line = text.splitlines()[0]
            return (line[: limit - 3] + "...") if len(line) > limit else line
    return type(chain[0]).__name__


@contextlib.contextmanager
def quiet():
    """Silence what a failing Orbax restore prints besides its exception: absl / orbax / asyncio log records and
    tracebacks that tensorstore callbacks write to stderr. Levels and stderr are restored afterwards."""
    loggers = [logging.getLogger(n) for n in NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    stderr, sys.stderr = sys.stderr, io.StringIO()
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        if failed:  # "Task exception was never retrieved" is logged when a failed task is collected: now (a full
            gc.collect()  # collection costs ~0.5 s in a process holding JAX and torch: not after every save)
        sys.stderr = stderr
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
