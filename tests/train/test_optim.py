"""The optax chain: schedules in closed form, weight decay only where the mask says, lr groups, every optimiser."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtune.config import load_config
from jaxtune.train import optim


def tcfg(**kw):
    return load_config({"training": kw}).training


def test_warmup_then_cosine_and_linear_schedules():
    """warm-up: lr(s) = peak * s / W; cosine: min + (peak - min) * (1 + cos(pi * (s - W) / (N - W))) / 2."""
    peak, w, n, floor = 1e-3, 10, 110, 0.1
    lr = optim.schedule(tcfg(learning_rate=peak, warmup_steps=w, lr_scheduler="cosine", min_lr_ratio=floor), n)
    for s in (0, 5, 10, 35, 60, 110):
        want = peak * s / w if s < w else peak * (floor + (1 - floor) * (1 + np.cos(np.pi * (s - w) / (n - w))) / 2)
        np.testing.assert_allclose(float(lr(s)), want, rtol=1e-5, atol=1e-12)
    lin = optim.schedule(tcfg(learning_rate=peak, warmup_ratio=0.1, lr_scheduler="linear"), 100)
    np.testing.assert_allclose([float(lin(s)) for s in (5, 10, 55, 100)], [peak / 2, peak, peak / 2, 0.0], atol=1e-9)
    const = optim.schedule(tcfg(learning_rate=peak, lr_scheduler="constant"), 100)
    assert float(const(0)) == float(const(99)) == pytest.approx(peak)


def test_weight_decay_skips_norms_and_biases():
    """Zero gradients: AdamW's update is only the decoupled decay -lr * wd * p, and only on decayed leaves."""
    params = {"layers": {"mlp": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "input_layernorm": {"scale": jnp.ones(2)}}}
    opt, _ = optim.build(tcfg(learning_rate=0.5, weight_decay=0.1, lr_scheduler="constant", max_grad_norm=0), params, 10)
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    np.testing.assert_allclose(updates["layers"]["mlp"]["kernel"], -0.05 * np.ones((2, 2)), rtol=1e-6)
    assert not np.any(updates["layers"]["mlp"]["bias"]) and not np.any(updates["layers"]["input_layernorm"]["scale"])


def test_lr_multiplier_groups_scale_and_freeze():
    params = {"embed_tokens": {"embedding": jnp.ones(3)}, "lm_head": {"kernel": jnp.ones(3)}, "q_proj": {"kernel": jnp.ones(3)}}
    cfg = tcfg(optimizer="sgd", adam_beta1=0.0, learning_rate=0.1, lr_scheduler="constant", max_grad_norm=0,
               lr_multipliers={"embed_tokens": 0.0, "lm_head": 2.0})
    opt, _ = optim.build(cfg, params, 10)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_allclose(updates["embed_tokens"]["embedding"], 0.0)
    np.testing.assert_allclose(updates["lm_head"]["kernel"], -0.2 * np.ones(3), rtol=1e-6)
    np.testing.assert_allclose(updates["q_proj"]["kernel"], -0.1 * np.ones(3), rtol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "sgd"])
def test_every_optimizer_minimises_a_quadratic(name):
    target = jnp.arange(8.0).reshape(2, 4) / 8
    params = {"w": jnp.zeros((2, 4))}
    lr = {"adamw": 0.05, "adafactor": 0.05, "lion": 0.01, "sgd": 0.5}[name]
    opt, _ = optim.build(tcfg(optimizer=name, learning_rate=lr, lr_scheduler="constant"), params, 200)
    state = opt.init(params)
    loss = lambda p: jnp.sum((p["w"] - target) ** 2)
    start = float(loss(params))
    for _ in range(200):
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert float(loss(params)) < 0.05 * start, name
