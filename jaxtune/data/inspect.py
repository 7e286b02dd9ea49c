"""`jaxtune data inspect`: what the pipeline will feed the model, before spending accelerator time on it.

`run(data_cfg, tokenizer, kind)` prints counts (loaded, kept, filtered and skipped by reason, truncated), a
histogram of token lengths, packing efficiency, and a few rendered samples with the trained tokens
highlighted (green; prompt tokens dim) so a wrong template or label mask is visible at a glance. It returns
the same facts as a dict, for tests and scripts. `kind` is a data kind (`items.DATA_KINDS`): the one the
stage's method consumes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from jaxtune.config import TrainingConfig
from jaxtune.data import pipeline
from jaxtune.data.batching import item_len
from jaxtune.data.order import MemoryOrder
from jaxtune.errors import MissingError, RunError

_GREEN, _DIM, _RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"


def examples(kind: str, item) -> list[tuple[str, object]]:
    """(label, Example) pairs to show for one item."""
    if kind == "lm":
        return [("", item)]
    if kind == "pair":
        return [("chosen", item[0]), ("rejected", item[1])]
    if kind == "kto":
        return [(f"label={item[1]}", item[0])]
    return [(f"answer={item[1]!r}", None)]


def spans(ids, weights, tokenizer) -> list[tuple[str, bool]]:
    """The decoded text of `ids` as runs of (text, trained): what `highlight` colours (and the board shows)."""
    trained = np.asarray(weights) > 0
    bounds = [0] + [j for j in range(1, len(ids)) if trained[j] != trained[j - 1]] + [len(ids)]
    return [(text, bool(trained[i])) for i, text in zip(bounds[:-1], _span_texts(ids, bounds, tokenizer))]


def highlight(ids, weights, tokenizer, color: bool = True) -> str:
    """Decode `ids`, trained runs in green (or [[...]] without colour), the rest dim."""
    out = []
    for text, trained in spans(ids, weights, tokenizer):
        if color:
            out.append((_GREEN if trained else _DIM) + text + _RESET)
        else:
            out.append(f"[[{text}]]" if trained else text)
    return "".join(out)


def _span_texts(ids, bounds, tokenizer) -> list[str]:
    """The text of each run ids[bounds[k]:bounds[k + 1]] as it reads inside the whole sequence.

    A run decoded alone can read differently: SentencePiece-style (Metaspace) decoders drop the space that
    starts a piece at the start of a text, and byte-level BPE may split a character's bytes. So each run is
    the difference of two decoded prefixes; where that difference is not a clean suffix, the run alone."""
    ids = [int(t) for t in ids]
    texts, before = [], ""
    for i, j in zip(bounds[:-1], bounds[1:]):
        upto = tokenizer.decode(ids[:j])
        texts.append(upto[len(before) :] if upto.startswith(before) else tokenizer.decode(ids[i:j]))
        before = upto
    return texts


def histogram(lengths, cutoff_len: int, width: int = 40) -> list[str]:
    edges = [0] + [2**k for k in range(5, 20) if 2**k < cutoff_len] + [cutoff_len, np.inf]
    counts, _ = np.histogram(lengths, bins=edges)
    top = max(1, counts.max(initial=0))
    lines = []
    for lo, hi, n in zip(edges[:-1], edges[1:], counts):
        label = f"{int(lo):>6}-{'' if hi == np.inf else int(hi):<6}"
        lines.append(f"  {label} {n:>7} {'#' * int(round(width * n / top))}")
    return lines


def run(
    data_cfg,
    tokenizer,
    kind: str,
    *,
    num_samples: int = 3,
    batch_size: int = TrainingConfig.batch_size,
    out=None,
    color=None,
    seed: int | None = None,
):
    """Print a report on the data `data_cfg` (a DataConfig-like object) describes; return it as a dict."""
    out = out or sys.stdout
    color = out.isatty() if color is None and hasattr(out, "isatty") else bool(color)
    kw = {} if seed is None else {"seed": seed}
    train_it, eval_it = pipeline.build(data_cfg, tokenizer, batch_size, kind, **kw)
    order, collate = train_it.order, train_it.kind
    if isinstance(order, MemoryOrder):
        items = [it for ds in order.datasets for it in ds]
    else:  # streaming: the first window is the sample
        items = order.window(0, 0)[0]
    lengths = [item_len(collate, it) for it in items]
    report = train_it.report
    print(f"== '{kind}' data ==", file=out)
    for line in report.lines():
        print(line, file=out)
    if eval_it is not None:
        print(f"eval examples: {sum(len(d) for d in eval_it.order.datasets)}", file=out)
    print(f"examples: {len(items)}; tokens: {sum(lengths)}", file=out)
    if lengths:
        print(f"token lengths: min {min(lengths)}, mean {np.mean(lengths):.1f}, max {max(lengths)}", file=out)
        for line in histogram(lengths, train_it.seq_len):
            print(line, file=out)
    steps = train_it.steps_per_epoch() if items else 0
    eff = None
    if train_it.packing and items:
        rows = train_it.rows_per_epoch()
        eff = sum(lengths) / (rows * train_it.seq_len)
        print(f"packing: {rows} rows of {train_it.seq_len} tokens, efficiency {eff:.1%}", file=out)
    print(f"steps per epoch at batch size {batch_size}: {steps}", file=out)
    for n, item in enumerate(items[:num_samples]):
        print(f"\n-- sample {n} --", file=out)
        for label, ex in examples(collate, item):
            if label:
                print(f"[{label}]", file=out)
            if ex is None:  # prompts: nothing trained
                print(tokenizer.decode([int(t) for t in item[0]]), file=out)
            else:
                print(highlight(ex.ids, ex.weights, tokenizer, color), file=out)
    return {
        "examples": len(items),
        "tokens": int(sum(lengths)),
        "lengths": lengths,
        "filtered": dict(report.filtered),
        "skipped": dict(report.skipped),
        "truncated": report.truncated,
        "trained_tokens": dict(report.tokens),  # by turn kind, untrained, and turns a template rewrites
        "packing_efficiency": eff,
        "steps_per_epoch": steps,
    }


def tokenizer_of(model_cfg, command: str = "data inspect"):
    """The tokenizer training uses: `model.tokenizer`, else the one in the `model.path` directory."""
    field = "model.tokenizer" if model_cfg.tokenizer else "model.path"
    name = model_cfg.tokenizer or model_cfg.path
    if name == "builtin:chars":
        from jaxtune import demo

        return demo.char_tokenizer()
    if not name:
        raise RunError(
            f"{command} needs a tokenizer: set model.tokenizer, or model.path to a model directory"
        )
    if field == "model.path" and not Path(name).is_dir():
        raise MissingError(
            f"model.path {name!r} is not a directory; {command} reads the tokenizer from it: set "
            "model.path to a local Hugging Face model directory (or model.tokenizer to a tokenizer directory)"
        )
    if Path(name).is_dir():  # a local directory: files that do not load are an error naming them
        from jaxtune.models import hf

        tokenizer = hf.load_tokenizer(name)
        if tokenizer is not None:
            return tokenizer
    from transformers import AutoTokenizer  # lazily: heavy

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MissingError(
            f"{field} {name!r}: no tokenizer loads from it ({reason}); set {field} to a directory holding "
            "tokenizer.json or tokenizer_config.json"
        ) from None


def data_of(cfg):
    """`cfg.data`, with the demo config's generated data (`builtin:demo`) written as `train` writes it."""
    data_cfg = cfg.data
    if "builtin:demo" in tuple(data_cfg.train):
        import dataclasses
        import tempfile

        from jaxtune import demo

        train_file, eval_file = demo.write_dataset(
            Path(tempfile.mkdtemp(prefix="jaxtune-inspect-")), seed=cfg.seed
        )
        train = tuple(str(train_file) if s == "builtin:demo" else s for s in data_cfg.train)
        data_cfg = dataclasses.replace(data_cfg, train=train, eval=tuple(data_cfg.eval) or (str(eval_file),))
    return data_cfg


def main(cfg, kind: str) -> dict:
    """`jaxtune data inspect CONFIG`: `cfg` is a RunConfig (its model gives the tokenizer); `kind` the data
    kind of its stage's method record (the CLI looks it up: `methods.METHODS[cfg.stage].data_kind`)."""
    tokenizer = tokenizer_of(cfg.model)  # first: a wrong model path is reported before any data is read
    return run(data_of(cfg), tokenizer, kind, batch_size=cfg.training.batch_size, seed=cfg.seed)
