"""Reading a run directory's files for the board, each tolerantly (a run may be writing them, an older jaxtune
may have): metrics.jsonl (torn lines skipped), config.yaml (the raw mapping when it no longer loads as a
RunConfig), JSON records (board.json), and the best eval metric. Neither gradio nor jax is imported."""

from __future__ import annotations

import json
import math
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir) -> list[dict]:
    """The records of `run_dir/metrics.jsonl`; a torn (half-written) or garbage line is skipped."""
    try:
        text = (Path(run_dir) / METRICS_FILE).read_text(errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append(record)
    return out


def number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def run_config(run_dir) -> tuple[object | None, dict]:
    """(the RunConfig of `run_dir/config.yaml` or None when it no longer loads, its raw mapping or {})."""
    path = Path(run_dir) / "config.yaml"
    raw = {}
    try:
        import yaml

        loaded = yaml.safe_load(path.read_text())
        raw = loaded if isinstance(loaded, dict) else {}
    except Exception:  # missing, unreadable, not YAML: nothing to show
        return None, {}
    try:
        from jaxtune.config import load_config

        return load_config(path), raw
    except Exception:  # a config this jaxtune refuses (renamed key, bad value): show what the raw file says
        return None, raw


def section(raw: dict, name: str) -> dict:
    value = raw.get(name)
    return value if isinstance(value, dict) else {}


def describe(cfg, raw: dict) -> dict:
    """stage, method, model, max_steps, best_metric, best_mode, run_name from a config, or from its raw YAML."""
    if cfg is not None:
        m, t = cfg.model, cfg.training
        model_type = (m.random_init or {}).get("model_type", "?")
        return dict(stage=cfg.stage, method="+".join((cfg.method.name, *cfg.method.combine)),
                    model=m.path or (f"random {model_type}" if m.random_init else ""), max_steps=t.max_steps,
                    best_metric=t.best_metric, best_mode=t.best_mode, run_name=cfg.run_name)  # fmt: skip
    model, method, training = section(raw, "model"), section(raw, "method"), section(raw, "training")
    init = model.get("random_init")
    random_model = f"random {init.get('model_type', '?')}" if isinstance(init, dict) else ""
    names = [method.get("name", "")] + list(method.get("combine") or [])
    return dict(stage=str(raw.get("stage", "")), method="+".join(str(n) for n in names if n),
                model=str(model.get("path") or random_model), max_steps=training.get("max_steps"),
                best_metric=training.get("best_metric", "eval_loss"), best_mode=training.get("best_mode", "min"),
                run_name=raw.get("run_name"))  # fmt: skip


def best_of(records: list[dict], metric: str = "eval_loss", mode: str = "min") -> tuple[float, int] | None:
    """(best value, its step) of `metric` ("eval_loss": key loss of the eval records) by `mode`, or None."""
    split, _, key = metric.partition("_") if metric.startswith("eval_") else ("eval", "", metric)
    best = None
    for r in records:
        value = number(r.get(key)) if r.get("split") == split else None
        if value is not None and (best is None or (value < best[0] if mode == "min" else value > best[0])):
            best = (value, r["step"])
    return best


def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
