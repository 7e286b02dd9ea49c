"""PPO: GAE, KL-penalised rewards, whitening, the clipped objectives and the adaptive KL controller against hand
computation; the reward-model path against transformers; then a short run (LoRA policy, separate LoRA value
model on the same frozen base) that must raise the reward of the SFT'd policy while the KL stays bounded."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from rl_helpers import metrics, rl_config

from jaxtune import cli, demo
from jaxtune.config import load_config
from jaxtune.methods import ppo
from jaxtune.methods import rollout as ro
from jaxtune.train.loop import run

MASK = np.array([[0, 1, 1, 1, 0]], np.float32)
REWARDS = np.array([[0, 0.1, 0.2, 1.0, 0]], np.float32)
VALUES = np.array([[9, 0.5, 0.4, 0.3, 9]], np.float32)  # 9s sit outside the completion and must not leak in


def test_gae_without_discount_is_return_minus_value():
    """gamma = lambda = 1: A_t = sum_{k>=t} r_k - V_t -> (1.3 - .5, 1.2 - .4, 1.0 - .3) = (.8, .8, .7)."""
    adv, ret = ppo.gae(REWARDS, VALUES, MASK, 1.0, 1.0)
    np.testing.assert_allclose(adv, [[0, 0.8, 0.8, 0.7, 0]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0, 1.3, 1.2, 1.0, 0]], atol=1e-6)


def test_gae_with_discount_follows_the_recursion():
    """gamma .9, lambda .5: delta_3 = 1 - .3 = .7; delta_2 = .2 + .9*.3 - .4 = .07; delta_1 = .1 + .9*.4 - .5
    = -.04; A_3 = .7, A_2 = .07 + .45*.7 = .385, A_1 = -.04 + .45*.385 = .13325."""
    adv, ret = ppo.gae(REWARDS, VALUES, MASK, 0.9, 0.5)
    np.testing.assert_allclose(adv, [[0, 0.13325, 0.385, 0.7, 0]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0, 0.63325, 0.785, 1.0, 0]], atol=1e-6)


def test_token_rewards_put_the_score_on_the_last_token():
    """beta .1, log pi - log pi_ref = (.5, -.2, .1): r = (-.05, .02, -.01 + 2)."""
    logp = np.array([[0, -1.0, -2.0, -3.0, 0]])
    ref = logp - np.array([[7, 0.5, -0.2, 0.1, 7]])
    r, kl = ppo.token_rewards(np.array([2.0]), logp, ref, MASK, 0.1)
    np.testing.assert_allclose(r, [[0, -0.05, 0.02, 1.99, 0]], atol=1e-6)
    np.testing.assert_allclose(kl.sum(1), [0.4], atol=1e-6)


def test_whiten_over_masked_tokens():
    x = np.array([[5.0, 1.0, 2.0, 3.0, 5.0]])
    w = ppo.whiten(x, MASK)
    np.testing.assert_allclose(w, [[0, -np.sqrt(1.5), 0, np.sqrt(1.5), 0]], atol=1e-6)  # (x - 2) / sqrt(2/3)


def test_clipped_policy_and_value_objectives():
    """clip .2, value clip .1, c_v .5; three tokens, advantages (+1, -1, +1), returns 1:
    ratios (e^.5, e^-.5, 1): pg = max(-A r, -A clip(r)) = (max(-1.6487, -1.2), max(.6065, .8), -1) = (-1.2, .8, -1)
    values (1.5, .5, 1) vs old (1, 1, 1): clipped to (1.1, .9, 1); vf = .5 max((v-R)^2, (vc-R)^2) = (.125, .125, 0)."""
    old = jnp.zeros((1, 3))
    batch = ppo.Batch(None, old, jnp.ones((1, 3)), jnp.array([[1.0, -1.0, 1.0]]), jnp.ones((1, 3)))
    logp = jnp.array([[0.5, -0.5, 0.0]])
    loss, pg, vf, clipped, v_clipped, _ = ppo.objective(
        logp, jnp.array([[1.5, 0.5, 1.0]]), batch, 0.2, 0.1, 0.5
    )
    np.testing.assert_allclose(pg, [[-1.2, 0.8, -1.0]], rtol=1e-6)
    np.testing.assert_allclose(vf, [[0.125, 0.125, 0.0]], atol=1e-7)
    np.testing.assert_allclose(loss, pg + 0.5 * vf, rtol=1e-6)
    assert np.asarray(clipped).tolist() == [[True, True, False]]
    assert np.asarray(v_clipped).tolist() == [[False, False, False]]  # the unclipped error was the larger


def test_adaptive_kl_controller():
    """Ziegler et al.: KL 12 vs target 6 -> error clip(1, +-.2) = .2 -> beta * (1 + .2 * 32 / 10000)."""
    cfg = load_config({"stage": "ppo", "ppo": {"reward_fn": "exact_match", "adaptive_kl": True}})
    meta = ppo.initial_meta(cfg)
    ppo.update_meta(meta, {"kl": 12.0, "sequences": 32}, cfg)
    assert meta["kl_coef"] == pytest.approx(0.05 * (1 + 0.2 * 32 / 10000))
    fixed = load_config({"stage": "ppo", "ppo": {"reward_fn": "exact_match"}})
    meta = ppo.initial_meta(fixed)
    ppo.update_meta(meta, {"kl": 12.0, "sequences": 32}, fixed)
    assert meta["kl_coef"] == 0.05


def test_reward_model_scores_equal_transformers(tmp_path):
    """A *ForSequenceClassification directory (what stage rm exports) scores joined prompt + completion rows
    like transformers: the score head on the last real token (left padding before, padding after the stop)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)  # fmt: skip
    hf = LlamaForSequenceClassification(config).eval()
    hf.save_pretrained(tmp_path)
    cfg = load_config({"stage": "ppo", "ppo": {"reward_model": str(tmp_path)}})
    score = ppo._reward_model(cfg, demo.char_tokenizer())
    rng = np.random.RandomState(0)
    prompts, mask = np.zeros((3, 8), np.int32), np.zeros((3, 8), np.int32)
    for i, n in enumerate((8, 5, 2)):
        prompts[i, 8 - n :], mask[i, 8 - n :] = rng.randint(1, 128, n), 1
    tokens = rng.randint(1, 128, (3, 4)).astype(np.int32)
    keep = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
    batch = ro.join(prompts, mask, tokens, keep)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(batch.input_ids, dtype=torch.long),
                      attention_mask=torch.tensor(batch.segment_ids > 0, dtype=torch.long),
                      position_ids=torch.tensor(batch.positions, dtype=torch.long)).logits[:, 0].numpy()  # fmt: skip
    np.testing.assert_allclose(score(batch), expected, atol=1e-5)


def test_ppo_raises_the_reward_of_the_sft_policy(rl_task, tmp_path, capsys):
    lora = {"name": "lora", "rank": 8, "target_modules": "all-linear"}
    cfg = rl_config(rl_task, tmp_path / "ppo", "ppo", lora,
                    training={"learning_rate": 3e-3, "batch_size": 32, "max_steps": 15},
                    ppo={"reward_fn": "exact_match", "ppo_epochs": 2, "mini_batch_size": 16, "kl_coef": 0.05})  # fmt: skip
    summary = run(load_config(cfg))
    before, after = summary["eval_reward_before"], summary["eval_reward_after"]
    assert after >= before + 0.3, (before, after)  # greedy exact match on 64 held-out words
    history = summary["reward_history"]
    assert np.mean(history[-3:]) >= np.mean(history[:3]) + 0.15, history  # sampled rollouts
    logged = [m for m in metrics(tmp_path / "ppo") if m["split"] == "train"]
    kls = [m["kl"] for m in logged]
    assert max(kls) < 3.0, kls  # nats per completion of <= 4 tokens
    assert all(np.isfinite([m["entropy"] + m["value_loss"] for m in logged]))
    # the exported adapter answers through `jaxtune generate` with the run directory as --model
    capsys.readouterr()
    args = ["generate", "--model", str(tmp_path / "ppo"), "--temperature", "0", "--max-new-tokens", "4"]
    assert cli.main(args + ["--prompt", "cf", "--prompt", "ha"]) == 0
    assert capsys.readouterr().out == "CF\n---\nHA\n"
