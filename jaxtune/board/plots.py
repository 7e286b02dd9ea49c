"""Tables for the board's curves (gradio's LinePlot takes a DataFrame with step / value / series columns),
and the one-paragraph status of a run, from the run directory (jaxtune/board/runs.py reads it)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from jaxtune.board import runs

COLUMNS = ["step", "value", "series"]


def empty() -> None:
    """No points yet. Not an empty DataFrame: gradio's LinePlot would type its empty `series` column as a
    number, and then draw no line for the names that come later."""
    return None


def frame(series: dict[str, list[tuple[int, float]]]) -> pd.DataFrame | None:
    rows = [(float(s), float(v), name) for name, points in series.items() for s, v in points]
    return pd.DataFrame(rows, columns=COLUMNS) if rows else empty()


def _points(run_dir: str, key: str, split: str) -> list:
    """The (step, value) points of one run's `key` in its `split` records."""
    return next(iter(runs.curves([run_dir], key, split).values()), [])


def watch(launcher, run_dir: str) -> tuple[str, pd.DataFrame | None, pd.DataFrame | None]:
    """(status Markdown, train curves, eval curves) of one run, re-read from its directory."""
    train = {"train loss": _points(run_dir, "loss", "train")}
    evals = {}
    for split, key in runs.metric_names([run_dir]):
        if split != "train" and key in ("loss", "reward", "accuracy") or (split == "train" and "reward" in key):
            evals[f"{split} {key}"] = _points(run_dir, key, split)
    return status_text(launcher, run_dir), frame(train), frame(evals)


def status_text(launcher, run_dir: str) -> str:
    row = runs.run_row(Path(run_dir))
    last = runs.latest(run_dir)
    state = row.status
    if state != "running" and launcher.live_pid(run_dir) is not None:
        state = f"{state.split(':')[0]}, exiting"  # the final status is written; the process is closing
    parts = [f"**{state}**", f"step {row.steps}"]
    train = last.get("train") or {}
    if "loss" in train:
        parts.append(f"loss {train['loss']:.4f}")
    rate = last.get("tokens_per_s")
    if rate is not None:
        parts.append(f"{rate:,.0f} tokens/s")
    ev = last.get("eval") or {}
    if "loss" in ev:
        parts.append(f"eval loss {ev['loss']:.4f} (step {ev.get('step', '?')})")
    if row.best:
        parts.append(f"best {row.best}")
    code = launcher.poll(run_dir)
    if code is not None and row.status not in ("running",):
        parts.append(f"exit status {code}")
    return " · ".join(parts)


def overlay(run_dirs: list[str], metric: str) -> pd.DataFrame | None:
    """`metric` ("split/key", e.g. "train/loss") of several runs on one plot, one series per run."""
    split, _, key = metric.partition("/")
    return frame(runs.curves(run_dirs, key, split))
