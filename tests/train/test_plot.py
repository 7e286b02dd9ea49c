"""`jaxtune plot RUN_DIR` draws what a run has: reward and KL panels for RL runs, eval beside train."""

from __future__ import annotations

import math

import pytest

from jaxtune import cli
from jaxtune.config import LoggingConfig
from jaxtune.train import plot
from jaxtune.train.metrics import MetricsWriter

QUIET = LoggingConfig(progress=False, tensorboard=False)
# what the RL loop writes per iteration: the update's metrics (GRPO's loss terms, the step's lr / grad_norm)
# and the rollout's stats (jaxtune/methods/grpo.py, ppo.py)
GRPO = ("loss", "policy_loss", "kl", "clip_fraction", "tokens", "grad_norm", "lr", "reward", "reward_std",
        "completion_length", "stopped")  # fmt: skip
PPO = ("loss", "policy_loss", "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl", "values",
       "returns", "tokens", "grad_norm", "lr", "reward", "kl", "entropy", "completion_length", "sequences",
       "kl_coef")  # fmt: skip


def write_run(run_dir, names, steps=5, evals=()):
    """A metrics.jsonl written the way the loops write it."""
    writer = MetricsWriter(run_dir, QUIET, total_steps=steps, start_step=0)
    for step in range(1, steps + 1):
        writer.write(step, {n: math.sin(step + i) for i, n in enumerate(names)})
        if evals and step % 2 == 0:
            writer.write(step, {n: 0.5 / step for n in evals}, split="eval")
    writer.close()
    return run_dir


@pytest.mark.parametrize("names", [GRPO, PPO], ids=["grpo", "ppo"])
def test_rl_run_plots_reward_and_kl(tmp_path, names, capsys):
    run_dir = write_run(tmp_path, names)
    chosen = dict(plot.panels(plot.load_metrics(run_dir)))
    assert chosen["loss"] == ["loss"]
    assert chosen["reward"] == ["reward"]
    assert chosen["KL to the reference"] == ["kl"]
    assert chosen["policy / value loss"][0] == "policy_loss"
    assert cli.main(["plot", str(run_dir)]) == 0
    png = run_dir / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out == f"wrote {png}\n"


def test_eval_metrics_join_their_train_panel_or_get_their_own(tmp_path):
    run_dir = write_run(
        tmp_path, ("loss", "accuracy", "lr", "grad_norm"), evals=("loss", "accuracy", "exact_match")
    )
    chosen = plot.panels(plot.load_metrics(run_dir))
    assert chosen == [
        ("loss", ["loss", "eval_loss"]),
        ("accuracy", ["accuracy", "eval_accuracy"]),
        ("learning rate", ["lr"]),
        ("gradient norm", ["grad_norm"]),
        ("eval_exact_match", ["eval_exact_match"]),
    ]
    assert plot.main(run_dir, out=tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_nothing_to_plot_is_a_user_error(tmp_path, capsys):
    write_run(tmp_path, ("tokens",))
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "has none of the plotted metrics" in capsys.readouterr().err
