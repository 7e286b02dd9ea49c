"""GRPO: group advantages and the eq. 3/4 objective against hand computation, then a short run that must raise
the reward of the SFT'd policy by a clear margin while the KL to the reference stays bounded."""

import json

import jax
import jax.numpy as jnp
import numpy as np
from rl_helpers import metrics, rl_config
from train.test_resume import stop_at

from jaxtune import cli
from jaxtune.config import load_config
from jaxtune.methods.grpo import group_advantages, k3, objective
from jaxtune.train.loop import run
from jaxtune.train.status import read_status


def test_group_advantages_normalise_within_each_group():
    """Group (1, 0, 0, 1): mean .5, unbiased std sqrt(1/3) = .57735 -> ±.5 / (.57735 + 1e-4) = ±.86588.
    Group (2, 2, 2, 2): no spread, all 0 (the 1e-4 keeps it finite)."""
    adv = group_advantages(np.array([1, 0, 0, 1, 2, 2, 2, 2.0]), group=4)
    expected = 0.5 / (np.sqrt(1 / 3) + 1e-4)
    np.testing.assert_allclose(adv, [expected, -expected, -expected, expected, 0, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(
        group_advantages(np.array([1, 0, 0, 1.0]), 4, scale=False), [0.5, -0.5, -0.5, 0.5]
    )


def test_k3_is_the_unbiased_nonnegative_kl_estimator():
    """exp(d) - d - 1 with d = log π_ref - log π: 0 at d = 0; d = log 2 -> 2 - .693147 - 1 = .306853."""
    logp = jnp.array([-1.0, -1.0, -2.0])
    ref = jnp.array([-1.0, -1.0 + np.log(2.0), -2.0 - 1.0])
    np.testing.assert_allclose(k3(logp, ref), [0.0, 1 - np.log(2.0), np.exp(-1.0) + 1.0 - 1.0], rtol=1e-6)


def test_objective_matches_eq3_and_its_gradient():
    """Two completions of 2 and 1 tokens, clip .2, beta .1.

    Row 0 (A = +1): ratios e^.5 = 1.6487 (clipped to 1.2: min(1.6487, 1.2) = 1.2) and 1 -> policy terms -1.2, -1;
      mean over 2 tokens: -1.1.  Row 1 (A = -1): ratio e^-.5 = .60653, clip .8: min(-.60653, -.8) = -.8 -> +.8.
    KL terms (ref = old here): k3(logp, old) = e^(old-logp) - (old-logp) - 1 -> e^-.5 + .5 - 1 = .10653, 0; e^.5 - .5 - 1 = .14872.
    Gradient w.r.t. logp, d/dlogp of beta k3 being beta (1 - e^(ref - logp)): at the clipped token only the KL
    term, .1 (1 - e^-.5) / 2 = .019673; at the token with ratio 1, -A / |o| + 0 = -1/2.
    """
    old = jnp.array([[0.0, 0.0], [0.0, 0.0]]) - 1.0
    logp = old + jnp.array([[0.5, 0.0], [-0.5, 0.0]])
    mask = jnp.array([[1.0, 1.0], [1.0, 0.0]])
    adv = jnp.array([1.0, -1.0])
    loss, pg, kl, clipped = objective(logp, old, old, adv, mask, 0.2, 0.1)
    kl0 = (np.exp(-0.5) + 0.5 - 1) / 2
    kl1 = np.exp(0.5) - 0.5 - 1
    np.testing.assert_allclose(pg, [-1.1, 0.8], rtol=1e-6)
    np.testing.assert_allclose(kl, [kl0, kl1], rtol=1e-5)
    np.testing.assert_allclose(loss, [-1.1 + 0.1 * kl0, 0.8 + 0.1 * kl1], rtol=1e-5)
    np.testing.assert_allclose(clipped, [0.5, 1.0])
    grad = jax.grad(lambda lp: objective(lp, old, old, adv, mask, 0.2, 0.1)[0].sum())(logp)
    np.testing.assert_allclose(grad[0, 0], 0.1 * (1 - np.exp(-0.5)) / 2, rtol=1e-5)
    np.testing.assert_allclose(grad[0, 1], -0.5, rtol=1e-6)
    assert float(grad[1, 1]) == 0.0  # padding


def test_grpo_raises_the_reward_of_the_sft_policy(rl_task, tmp_path):
    """Full fine-tuning (reference: a frozen copy of the initial weights), 8 prompts x 8 completions, 12 updates."""
    cfg = rl_config(rl_task, tmp_path / "grpo", "grpo", {"name": "full"},
                    training={"learning_rate": 1e-3, "batch_size": 8, "max_steps": 12},
                    grpo={"num_generations": 8, "beta": 0.04, "reward_fns": ["exact_match"]})  # fmt: skip
    summary = run(load_config(cfg))
    before, after = summary["eval_reward_before"], summary["eval_reward_after"]
    assert after >= before + 0.3, (before, after)  # greedy exact match on 64 held-out words
    history = summary["reward_history"]
    assert np.mean(history[-3:]) >= np.mean(history[:3]) + 0.2, history  # sampled rollouts
    kls = [m["kl"] for m in metrics(tmp_path / "grpo") if m["split"] == "train"]
    assert 0.0 < max(kls) < 0.5, kls  # k3 per token, averaged per completion
    assert (tmp_path / "grpo" / "hf" / "config.json").exists()


def test_resumed_run_repeats_the_uninterrupted_one(rl_task, tmp_path, monkeypatch):
    """Rollouts are seeded by (seed, iteration) and the prompt iterator is checkpointed: `jaxtune train` stopped by
    SIGTERM in iteration 1 (it checkpoints, exits 143), then rerun to 3, logs exactly what 3 straight iterations
    log."""

    def cfg(out, steps):
        return rl_config(rl_task, out, "grpo", {"name": "lora", "rank": 4},
                         training={"learning_rate": 1e-3, "batch_size": 4, "max_steps": steps, "eval_generate": 0,
                                   "export_hf": False},
                         grpo={"num_generations": 4, "reward_fns": ["exact_match"]})  # fmt: skip

    def logged(out):
        rows = [m for m in metrics(out) if m["split"] == "train"]
        assert len({m["step"] for m in rows}) == len(rows)  # each iteration logged once
        return {m["step"]: {k: v for k, v in m.items() if k != "time"} for m in rows}

    run(load_config(cfg(tmp_path / "straight", 3)))
    (tmp_path / "resumed.json").write_text(json.dumps(cfg(tmp_path / "resumed", 3)))
    stop_at(monkeypatch, 1)  # in the first update of iteration 1: the loop saves after that iteration and stops
    assert cli.main(["train", str(tmp_path / "resumed.json")]) == 143
    assert sorted(logged(tmp_path / "resumed")) == [1]
    stopped = read_status(tmp_path / "resumed")  # status.json of an RL run: the iteration it stopped after
    assert (stopped["state"], stopped["stop_reason"], stopped["step"], stopped["total_steps"]) == (
        "stopped", "signal SIGTERM", 1, 3)  # fmt: skip
    summary = run(load_config(cfg(tmp_path / "resumed", 3)))
    assert summary["stop_reason"] == "completed" and "eval_reward_before" not in summary  # it resumed rather than starting over
    straight, resumed = logged(tmp_path / "straight"), logged(tmp_path / "resumed")
    assert sorted(resumed) == [1, 2, 3]
    done = read_status(tmp_path / "resumed")
    assert (done["state"], done["step"], done["total_steps"]) == ("finished", 3, 3)
    assert resumed == straight
