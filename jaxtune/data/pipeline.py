"""The whole data pipeline: sources -> records -> clean -> split -> items -> resumable batch iterators.

`build(data_cfg, tokenizer, batch_size, kind)` reads the `DataConfig` fields of a config object by attribute
(duck-typed: jaxtune's `DataConfig` or anything with some of its fields) and calls `iterators(...)`, the
config-free function with one keyword per `DataConfig` field; a field not given takes `DataConfig`'s default
(config.py is the only home of defaults). `kind` is the data kind the caller's method consumes
(`items.DATA_KINDS`: text, lm, pair, kto, prompt), never a stage name.

In memory (default), every source is loaded, cleaned and tokenised up front: dedup and exact epoch lengths
need the whole dataset. With `streaming=True` records are read, cleaned and tokenised window by window, so
the data never has to fit in memory (dedup then is not available, and a validation split must be a count).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import logging
from typing import NamedTuple

import numpy as np

from jaxtune.config import DataConfig
from jaxtune.data import cache, prepare
from jaxtune.data.errors import ErrorPolicy
from jaxtune.data.items import Encoder, batch_kind
from jaxtune.data.iterator import BatchIterator
from jaxtune.data.loading import iter_records, load, resolve
from jaxtune.data.order import MemoryOrder, StreamOrder
from jaxtune.errors import RunError

log = logging.getLogger("jaxtune.data")

FIELDS = tuple(f.name for f in dataclasses.fields(DataConfig))  # what `build` reads from a config object


class Iterators(NamedTuple):
    train: BatchIterator
    eval: BatchIterator | None


def build(data_cfg, tokenizer, batch_size: int, kind: str, **kw) -> Iterators:
    """Train and eval iterators of data kind `kind` from a DataConfig-like object.

    Its `DataConfig` fields are read (one that is absent or None keeps `DataConfig`'s default); `kw` adds the
    run-level keywords of `iterators` (seed: the run's, eval_batch_size, epochs, window) or overrides a field.
    """
    fields = {name: getattr(data_cfg, name) for name in FIELDS if getattr(data_cfg, name, None) is not None}
    fields.update(kw)
    train = fields.pop("train", ())
    return iterators(train, tokenizer, batch_size, kind, **fields)


def data_config(train, **fields) -> DataConfig:
    """`DataConfig(train=train, **fields)`; a TypeError naming the closest field for an unknown keyword."""
    for name in fields:
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (DataConfig fields: {', '.join(FIELDS)})"
            raise TypeError(f"iterators() got an unknown keyword '{name}'{hint}")
    return DataConfig(train=train, **fields)


def _sources(spec, dataset_dir, format):
    if spec is None:
        return []
    specs = list(spec) if isinstance(spec, list | tuple) else [spec]
    return [resolve(s, dataset_dir, format) for s in specs]


def _ratios(sources) -> list[float] | None:
    given = [s.ratio is not None for s in sources]
    if any(given) and not all(given):
        raise RunError("give every train source a ratio, or none (then they are concatenated)")
    return [float(s.ratio) for s in sources] if all(given) and len(sources) > 1 else None


def iterators(
    train,
    tokenizer,
    batch_size: int,
    kind: str,
    *,
    seed: int = 0,
    eval_batch_size: int | None = None,
    epochs: int | None = None,
    window: int = 4096,
    **fields,
) -> Iterators:
    """Train and eval iterators of data kind `kind` over the source(s) `train`.

    `fields`: any other `DataConfig` field (eval, dataset_dir, format, template, cutoff_len, packing, ...);
    those not given take `DataConfig`'s defaults. The rest are run-level: `seed` (the run's: shuffling, splits,
    max_samples subsets), `eval_batch_size` (default: batch_size), `epochs` (None: endless), `window` (records
    shuffled together).
    """
    d = data_config(train, **fields)
    collate = batch_kind(kind)
    if d.packing and collate != "lm":
        raise RunError(
            f"data.packing is for 'text' and 'lm' data (pt, sft); '{kind}' data keeps whole examples "
            "(pairs, labels or prompts): set data.packing=false"
        )
    cutoff_len, dedup, max_samples, shuffle = d.cutoff_len, d.dedup, d.max_samples, d.shuffle
    policy = ErrorPolicy(d.on_error)

    # The Encoder's options, also what the cache's workers build their Encoder from (with on_error).
    options = dict(
        template=d.template, template_kwargs=d.template_kwargs, rewritten_history=d.rewritten_history,
        cutoff_len=cutoff_len, train_on_prompt=d.train_on_prompt, mask_history=d.mask_history,
        min_length=d.min_length, overlength=d.overlength,
    )  # fmt: skip

    def encoder(report):
        return Encoder(tokenizer, kind, policy=policy, report=report, **options)

    train_src = _sources(d.train, d.dataset_dir, d.format)
    if not train_src:
        raise RunError("data.train names no source")
    eval_src = _sources(d.eval, d.dataset_dir, d.format)
    ratios = _ratios(train_src)
    common = dict(packing=d.packing, seq_len=cutoff_len, bucket_multiple=d.bucket_multiple, seed=seed)
    report, eval_report = prepare.Report(), prepare.Report()
    enc = encoder(report)
    val_size = 0 if eval_src else d.val_size  # explicit eval sources replace the held-out split
    if d.streaming:
        if dedup not in (None, "none"):
            raise RunError("dedup needs the whole dataset: set streaming=False, or dedup offline")
        if val_size and val_size < 1:
            raise RunError(
                "with streaming, val_size must be a count (the first N records of the first source)"
            )
        order = _stream_order(train_src, enc, ratios, seed, shuffle, window, int(val_size), max_samples)
        eval_sets = _stream_eval(train_src[0], int(val_size), encoder(eval_report)) if val_size else []
        prep = None  # streaming reads lazily: never cached
    else:
        plan = lambda: _memory_plan(d, train_src, eval_src, policy, report, eval_report, val_size, seed)
        prep = None
        if d.cache or d.num_workers > 1:
            prep = cache.prepared(d, tokenizer, kind, seed, train_src, eval_src, plan,
                                  {**options, "on_error": d.on_error}, policy, report,
                                  eval_report, persist=d.cache)  # fmt: skip
        if prep is not None:
            train_sets, eval_sets = prep.train, prep.eval if prep.eval is not None else []
        else:  # in this process, in memory
            train_sets, eval_sets = [], []
            for _, target, records in plan():
                if target == "train":
                    train_sets.append([it for r in records for it in enc(r)])
                else:
                    eval_sets += [it for r in records for it in encoder(eval_report)(r)]
        order = MemoryOrder(train_sets, ratios, seed, shuffle, window)
    train_it = BatchIterator(order, collate, batch_size, shuffle=shuffle, epochs=epochs, **common)
    eval_it = None
    if eval_sets:
        eval_order = MemoryOrder([eval_sets], None, seed, shuffle=False, window=window)
        eval_it = BatchIterator(eval_order, collate, eval_batch_size or batch_size, shuffle=False, epochs=1, drop_last=False, **common)  # fmt: skip
    report.skipped, eval_report.skipped = policy.skipped, policy.skipped
    train_it.report, train_it.policy = report, policy
    train_it.cache = prep.info if prep is not None else None  # where the tokenised items are mapped from
    if eval_it is not None:
        eval_it.report = eval_report
    for line in report.lines():
        log.info("data: %s", line)
    if report.truncated:
        log.warning(
            "data: %d samples were longer than cutoff_len=%d and truncated", report.truncated, cutoff_len
        )
    for what in ("reasoning", "text"):  # what the chat template cannot write is not trained: say so
        n = sum(k for key, k in report.tokens.items() if f"whose {what}" in key)
        if n:
            log.warning("data: the chat template does not write the %s of %d assistant turns", what, n)
    policy.log_summary()
    return Iterators(train_it, eval_it)


def eval_records(data_cfg, seed: int = 0) -> list:
    """The records the eval set is made of, as `build` selects them with the same `seed`: the `data.eval`
    sources (with their format, columns and max_samples), or the `val_size` split held out of train; loaded
    and cleaned, not templated. For evaluation by generation (`training.eval_generate`)."""
    d = data_config(data_cfg.train, **{n: getattr(data_cfg, n) for n in FIELDS if n != "train"})
    train_src, eval_src = _sources(d.train, d.dataset_dir, d.format), _sources(d.eval, d.dataset_dir, d.format)
    val_size = 0 if eval_src else d.val_size
    policy = ErrorPolicy(d.on_error)
    if d.streaming and not eval_src:  # the first val_size records of the first source, as _stream_eval
        picked = itertools.islice(iter_records(train_src[0], policy), int(val_size)) if val_size else ()
        return [r for r in map(prepare.normalize, picked) if not prepare.is_empty(r)]
    report = prepare.Report()
    parts = _memory_plan(d, [] if eval_src else train_src, eval_src, policy, report, report, val_size, seed)
    return [r for _, target, records in parts if target == "eval" for r in records]


def _memory_plan(d, train_src, eval_src, policy, report, eval_report, val_size, seed) -> list:
    """Every source loaded and cleaned, split, in the order they are encoded: [(set name, "train" | "eval",
    records)], one train set per source and every eval part in the set "eval"."""
    loaded = [_load(src, policy, d.dedup, report, d.max_samples, seed) for src in train_src]
    total, parts = sum(map(len, loaded)), []
    for k, records in enumerate(loaded):
        if val_size:
            # A count is shared across sources in proportion to their sizes; a ratio applies to each.
            n_val = val_size if val_size < 1 else round(val_size * len(records) / max(1, total))
            records, val, _ = prepare.split(records, n_val, seed=seed)
            parts.append(("eval", "eval", val))
        parts.append((f"train{k}", "train", records))
    for src in eval_src:  # (explicit eval sources replace the held-out split: val_size is then 0)
        parts.append(("eval", "eval", _load(src, policy, "none", eval_report, d.max_samples, seed)))
    return parts


def _load(src, policy, dedup, report, max_samples, seed) -> list:
    records, _ = prepare.clean(load(src, policy=policy), dedup, report=report)
    if max_samples is not None and len(records) > max_samples:
        # data.max_samples: a seeded random subset of each source (file order kept).
        keep = np.sort(np.random.default_rng([seed, 11]).permutation(len(records))[:max_samples])
        records = [records[i] for i in keep]
    return records


def _stream_items(src, enc, skip: int, stop: int | None):
    for record in itertools.islice(iter_records(src, enc.policy), skip, stop):
        record = prepare.normalize(record)
        if prepare.is_empty(record):
            enc.report.filtered["empty"] += 1
            yield []
        else:
            yield enc(record)


def _stream_order(sources, enc, ratios, seed, shuffle, window, n_val: int, max_samples):
    """Source 0 starts after its first `n_val` records (the validation split); max_samples: first N."""

    def opener(src, base):
        stop = None if max_samples is None else base + max_samples
        return lambda k: _stream_items(src, enc, base + k, stop)

    opens = [opener(s, n_val if d == 0 else 0) for d, s in enumerate(sources)]
    return StreamOrder(opens, ratios, seed, shuffle, window)


def _stream_eval(src, n: int, enc):
    items = []
    for record in itertools.islice(iter_records(src, enc.policy), n):
        record = prepare.normalize(record)
        if not prepare.is_empty(record):
            items += enc(record)
    return items
