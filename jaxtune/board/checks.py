"""What the configure form asks of jaxtune before a run: is this a model directory, which datasets does a
`dataset_info.json` name, what does one templated, masked sample look like, how much memory will it take.

Each answer comes from the code a run uses (`models.hf`, `data.inspect`, `data.registry`, `jaxtune estimate`),
so an error here is the error training would give. No gradio here.
"""

from __future__ import annotations

import dataclasses
import html
import subprocess
import sys
from pathlib import Path

from jaxtune.errors import JaxtuneError


def model_info(path: str, tokenizer: str | None = None) -> str:
    """A Markdown summary of a Hugging Face model directory (config.json, model_type, parameter count,
    tokenizer, chat template); raises the jaxtune error a run would for a directory that is not one."""
    from jaxtune.config import ModelConfig
    from jaxtune.data.inspect import tokenizer_of
    from jaxtune.models import hf

    config = hf.read_hf_config(path)
    arch = hf.arch_of(path, config)
    tok = tokenizer_of(ModelConfig(path=path, tokenizer=tokenizer or None), command="the board")
    template = getattr(tok, "chat_template", None)
    lines = [
        f"**{html.escape(str(path))}**: `{arch.model_type}`, {count_text(arch.num_params())} parameters, "
        f"{arch.num_layers} layers, hidden {arch.hidden_size}, vocabulary {arch.vocab_size:,}",
        f"tokenizer: {type(tok).__name__} ({len(tok):,} tokens)",
        "chat template: " + ("found (the tokenizer's own)" if template else
                             "**none**: set data.template to a template name or Jinja text for chat data"),
    ]  # fmt: skip
    return "  \n".join(lines)


def count_text(n: int) -> str:
    """1234567 -> "1.2 M" (B, M, k)."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return str(n)


def dataset_names(dataset_dir: str) -> list[str]:
    """The names `dataset_dir/dataset_info.json` defines whose files are here (a malformed registry raises
    its DataError)."""
    from jaxtune.data.errors import DataError
    from jaxtune.data.registry import REGISTRY_FILE, read_registry

    if not Path(dataset_dir).is_dir():
        raise DataError(f"data.dataset_dir {dataset_dir!r} is not a directory", file=str(dataset_dir),
                        reason="missing file")  # fmt: skip
    if not (Path(dataset_dir) / REGISTRY_FILE).is_file():
        raise DataError(f"no {REGISTRY_FILE} in {dataset_dir}", file=str(dataset_dir), reason="missing file")
    info = read_registry(dataset_dir)
    local = [n for n, e in info.items() if isinstance(e, dict) and e.get("file_name")
             and (Path(dataset_dir) / str(e["file_name"])).exists()]  # fmt: skip
    return sorted(local)  # hub-only entries cannot be read offline (a run says so), so they are not offered


def preview_html(cfg, max_samples: int = 16) -> str:
    """One templated, tokenised and masked example of `cfg`'s training data (what `jaxtune data inspect`
    shows): trained tokens highlighted, the prompt dim; with the example counts of the few rows read."""
    from jaxtune.data import pipeline
    from jaxtune.data.inspect import data_of, examples, spans, tokenizer_of
    from jaxtune.data.order import MemoryOrder
    from jaxtune.methods import METHODS

    kind = METHODS[cfg.stage].data_kind
    tokenizer = tokenizer_of(cfg.model, command="the board's preview")
    data = dataclasses.replace(data_of(cfg), max_samples=max_samples, cache=False, val_size=0.0, eval=(),
                               streaming=False)  # fmt: skip
    train_it, _ = pipeline.build(data, tokenizer, 1, kind, seed=cfg.seed)
    order = train_it.order
    items = [it for ds in order.datasets for it in ds] if isinstance(order, MemoryOrder) else []
    if not items:
        return "<p>no example: " + html.escape("; ".join(train_it.report.lines())) + "</p>"
    parts = [f"<div class='jt-preview'><p>{len(items)} examples from the first {max_samples} rows of each "
             "source; <span class='jt-trained'>trained tokens</span>, <span class='jt-prompt'>prompt "
             "(no loss)</span></p>"]  # fmt: skip
    for label, ex in examples(train_it.kind, items[0]):
        if label:
            parts.append(f"<p><b>{html.escape(label)}</b></p>")
        if ex is None:
            body = f"<span class='jt-prompt'>{html.escape(tokenizer.decode([int(t) for t in items[0][0]]))}</span>"
        else:
            body = "".join(
                f"<span class='{'jt-trained' if trained else 'jt-prompt'}'>{html.escape(text)}</span>"
                for text, trained in spans(ex.ids, ex.weights, tokenizer)
            )
        parts.append(f"<pre class='jt-sample'>{body}</pre>")
    return "".join(parts) + "</div>"


def estimate_text(config_path: str, cwd: str | None = None, timeout: float = 600) -> tuple[bool, str]:
    """`jaxtune estimate CONFIG` run as the CLI runs it (its own process: no JAX state in the board's); returns
    (succeeded, what it printed)."""
    from jaxtune.board.runs import child_env  # this checkout first on PYTHONPATH, as for training runs

    try:
        done = subprocess.run([sys.executable, "-m", "jaxtune", "estimate", config_path], capture_output=True,
                              text=True, cwd=cwd, env=child_env(), timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return False, f"jaxtune estimate {config_path} took more than {timeout:.0f} s"
    text = done.stdout if done.returncode == 0 else (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    return done.returncode == 0, text.strip()


def error_text(e: BaseException) -> str:
    """A jaxtune error's message (what the CLI prints after 'jaxtune: error:'); others with their type."""
    return str(e) if isinstance(e, JaxtuneError) else f"{type(e).__name__}: {e}"
