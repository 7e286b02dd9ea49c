"""`jaxtune data prepare CONFIG`: build the tokenised-dataset cache ahead of time (e.g. on a CPU machine before
an accelerator job), so training, every resume and every host map it instead of tokenising.

It reads the config as `train` does (the tokenizer from `model`, the data kind from the stage's method, the
run seed), builds or finds `<data.cache_dir>/<kind>-<key>/` (`cache.py`) and prints its directory, item and
token counts, size on disk and the time taken. `data.num_workers` sets the tokenisation processes.
"""

from __future__ import annotations

import sys
import time

from jaxtune.config import TrainingConfig
from jaxtune.data import inspect, pipeline
from jaxtune.errors import RunError


def prepare(data_cfg, tokenizer, kind: str, *, seed: int = 0, batch_size: int = TrainingConfig.batch_size,
            out=None) -> dict:  # fmt: skip
    """Build (or find) the cache of `data_cfg` (a DataConfig-like object); print and return what it holds."""
    out = out or sys.stdout
    if getattr(data_cfg, "streaming", False):
        raise RunError(
            "data.streaming reads the data lazily and is never cached: set data.streaming=false to prepare it"
        )
    if not getattr(data_cfg, "cache", True):
        raise RunError("data.cache is false, so a run would not map a prepared cache: set data.cache=true")
    t0 = time.perf_counter()
    train_it, eval_it = pipeline.build(data_cfg, tokenizer, batch_size, kind, seed=seed)
    seconds = time.perf_counter() - t0
    info = train_it.cache
    if info is None:
        raise RunError(
            "this tokenizer cannot be fingerprinted (no serialized state), so its data is not cached"
        )
    items = sum(n for p, n in info.items.items() if p != "eval")
    tokens = sum(n for p, n in info.tokens.items() if p != "eval")
    eval_items, eval_tokens = info.items.get("eval", 0), info.tokens.get("eval", 0)
    sets = len(info.items) - ("eval" in info.items)  # one per train source
    state = "found (already prepared)" if info.hit else f"built with {info.workers} worker(s)"
    print(f"tokenised cache: {info.dir}", file=out)
    print(f"  {state} on {info.built}, in {info.seconds:.1f} s (this command: {seconds:.1f} s)", file=out)
    print(
        f"  train: {items} items, {tokens} tokens ({sets} set{'s' if sets != 1 else ''})", file=out
    )
    if "eval" in info.items:
        print(f"  eval: {eval_items} items, {eval_tokens} tokens", file=out)
    print(f"  size on disk: {info.bytes / 2**20:.1f} MiB", file=out)
    return {
        "dir": str(info.dir), "hit": info.hit, "items": items, "tokens": tokens, "eval_items": eval_items,
        "eval_tokens": eval_tokens, "bytes": info.bytes, "seconds": seconds, "build_seconds": info.seconds,
    }  # fmt: skip


def main(cfg, kind: str) -> dict:
    """`jaxtune data prepare CONFIG`: `cfg` a RunConfig, `kind` its stage's data kind (as `data inspect`)."""
    tokenizer = inspect.tokenizer_of(cfg.model, "data prepare")
    return prepare(inspect.data_of(cfg), tokenizer, kind, seed=cfg.seed, batch_size=cfg.training.batch_size)
