"""`jaxtune plot RUN_DIR`: the curves of metrics.jsonl in a PNG (matplotlib, headless), in labelled panels.

A panel draws the series of one quantity that the run has, train and eval together: the loss; the reward
(PPO / GRPO rewards, DPO / KTO / RM implicit rewards and margins); the KL to the reference (PPO / GRPO); the
accuracy; the PPO / GRPO loss terms; the learning rate; the gradient norm. Eval metrics (`split: eval` rows,
named `eval_<name>`) join the panel of their train metric; any other eval metric gets a panel of its own.
Panels with no series in the run are left out.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from jaxtune.errors import MissingError, RunError

# (panel title, the metrics it draws): train names; "eval_" + each is drawn beside it when present
PANELS = (
    ("loss", ("loss",)),
    ("reward", ("reward", "rewards/chosen", "rewards/rejected", "margins")),
    ("KL to the reference", ("kl",)),  # not PPO's approx_kl: that one is old policy -> updated policy
    ("accuracy", ("accuracy",)),
    ("policy / value loss", ("policy_loss", "value_loss")),
    ("learning rate", ("lr",)),
    ("gradient norm", ("grad_norm",)),
)


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


def panels(series: dict) -> list[tuple[str, list[str]]]:
    """(title, series names) of each panel to draw, in PANELS order, then one per remaining eval metric."""
    out, placed = [], set()
    for title, names in PANELS:
        drawn = [n for base in names for n in (base, "eval_" + base) if series.get(n)]
        placed |= {n for base in names for n in (base, "eval_" + base)}
        if drawn:
            out.append((title, drawn))
    out += [(n, [n]) for n in sorted(series) if n.startswith("eval_") and n not in placed and series[n]]
    return out


def main(run_dir, out=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = load_metrics(Path(run_dir))
    chosen = panels(series)
    if not chosen:
        known = sorted({n for _, names in PANELS for n in names})
        raise RunError(f"{run_dir}/metrics.jsonl has none of the plotted metrics ({', '.join(known)})")
    fig, axes = plt.subplots(len(chosen), 1, figsize=(8, 2.6 * len(chosen)), sharex=True, squeeze=False)
    for ax, (title, names) in zip(axes[:, 0], chosen):
        for name in names:
            steps, values = zip(*sorted(series[name]))
            ax.plot(steps, values, label=name, marker="o" if name.startswith("eval_") else None, markersize=3)
        ax.set_title(title, fontsize=10, loc="left")
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return out
