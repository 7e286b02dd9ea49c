"""`jaxtune plot RUN_DIR`: loss / eval curves from metrics.jsonl to a PNG (matplotlib, headless)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from jaxtune.errors import MissingError, RunError

PLOTTED = ("loss", "eval_loss", "eval_accuracy", "lr", "grad_norm")


def load_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise MissingError(f"{run_dir}: no metrics.jsonl (is it a jaxtune run directory?)")
    series = defaultdict(list)
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        prefix = "eval_" if rec.get("split") == "eval" else ""
        for k, v in rec.items():
            if k not in ("step", "split", "time"):
                series[prefix + k].append((rec["step"], v))
    return series


def main(run_dir, out=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = load_metrics(Path(run_dir))
    names = [n for n in PLOTTED if series.get(n)]
    if not names:
        raise RunError(f"{run_dir}/metrics.jsonl has none of {PLOTTED}")
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.6 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        steps, values = zip(*sorted(series[name]))
        ax.plot(steps, values, marker="o" if name.startswith("eval") else None, markersize=3)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return out
