"""Preference losses on fixed log-probs: values and gradients against closed forms.

The fixed pair used throughout (summed log-probs of one chosen / rejected response under policy and reference):

    pc = -10.0, pr = -12.0, rc = -11.0, rr = -11.5, beta = 0.1
    z  = (pc - rc) - (pr - rr) = 1.0 - (-0.5) = 1.5,    beta * z = 0.15

The comparison with TRL's own loss code (the installed `trl`, called on the same numbers) is
`test_trl_oracle.py`.
"""

import math

import chex
import jax
import jax.numpy as jnp
import pytest

from jaxtune.config import DPOConfig
from jaxtune.methods import dpo, kto, rm

PC, PR, RC, RR, BETA = -10.0, -12.0, -11.0, -11.5, 0.1
Z = 1.5


def sig(x):
    return 1 / (1 + math.exp(-x))


def loss_and_grads(cfg, pc=PC, pr=PR, rc=RC, rr=RR):
    def f(pc, pr):
        return dpo.pair_losses(pc, pr, rc, rr, cfg)

    value = float(f(jnp.float32(pc), jnp.float32(pr)))
    gc, gr = jax.grad(f, argnums=(0, 1))(jnp.float32(pc), jnp.float32(pr))
    return value, float(gc), float(gr)


def test_sigmoid_dpo():
    """-log σ(0.15) = log(1 + e^-0.15) = 0.62096; ∂/∂pc = -β σ(-0.15) = -0.1 * 0.46257 = -0.046257."""
    value, gc, gr = loss_and_grads(DPOConfig(beta=BETA))
    assert value == pytest.approx(math.log1p(math.exp(-0.15)), rel=1e-6)
    assert value == pytest.approx(0.620957, abs=1e-6)
    assert gc == pytest.approx(-BETA * sig(-0.15), rel=1e-5)
    assert gc == pytest.approx(-0.0462570, abs=1e-6)
    assert gr == pytest.approx(-gc, rel=1e-6)


def test_cdpo_label_smoothing():
    """ε = 0.2: 0.8 * log(1 + e^-0.15) + 0.2 * log(1 + e^0.15); ∂/∂pc = -β [0.8 σ(-0.15) - 0.2 σ(0.15)]."""
    eps = 0.2
    value, gc, gr = loss_and_grads(DPOConfig(beta=BETA, label_smoothing=eps))
    assert value == pytest.approx(
        0.8 * math.log1p(math.exp(-0.15)) + 0.2 * math.log1p(math.exp(0.15)), rel=1e-6
    )
    assert gc == pytest.approx(-BETA * (0.8 * sig(-0.15) - 0.2 * sig(0.15)), rel=1e-5)
    assert gr == pytest.approx(-gc, rel=1e-6)


def test_robust_dpo():
    """ε = 0.2: [0.8 log(1 + e^-0.15) - 0.2 log(1 + e^0.15)] / 0.6; ∂/∂pc = -β [0.8 σ(-0.15) + 0.2 σ(0.15)] / 0.6."""
    eps = 0.2
    value, gc, gr = loss_and_grads(DPOConfig(beta=BETA, label_smoothing=eps, loss_type="robust"))
    expected = (0.8 * math.log1p(math.exp(-0.15)) - 0.2 * math.log1p(math.exp(0.15))) / 0.6
    assert value == pytest.approx(expected, rel=1e-6)
    assert gc == pytest.approx(-BETA * (0.8 * sig(-0.15) + 0.2 * sig(0.15)) / 0.6, rel=1e-5)
    assert gr == pytest.approx(-gc, rel=1e-6)


def test_hinge_both_sides_of_the_kink():
    """βz = 0.15 < 1: loss 0.85, ∂/∂pc = -β. With β = 1, z = 1.5: βz > 1, loss 0 and no gradient."""
    value, gc, gr = loss_and_grads(DPOConfig(beta=BETA, loss_type="hinge"))
    assert value == pytest.approx(0.85, rel=1e-6)
    assert (gc, gr) == pytest.approx((-BETA, BETA), rel=1e-6)
    value, gc, gr = loss_and_grads(DPOConfig(beta=1.0, loss_type="hinge"))
    assert (value, gc, gr) == (0.0, 0.0, 0.0)


def test_ipo():
    """(z - 1/(2β))² = (1.5 - 5)² = 12.25; ∂/∂pc = 2 (1.5 - 5) = -7 (the log-probs here are already means)."""
    value, gc, gr = loss_and_grads(DPOConfig(beta=BETA, loss_type="ipo"))
    assert value == pytest.approx(12.25, rel=1e-6)
    assert (gc, gr) == pytest.approx((-7.0, 7.0), rel=1e-6)


def test_simpo():
    """Means pc = -1.0, pr = -1.5, β = 2, γ = 0.5: x = 2 * 0.5 - 0.5 = 0.5, loss log(1 + e^-0.5) = 0.474077,
    ∂/∂pc = -β σ(-x) = -2 * 0.377541; the reference plays no part."""
    cfg = DPOConfig(beta=2.0, loss_type="simpo", simpo_gamma=0.5)
    value, gc, gr = loss_and_grads(cfg, pc=-1.0, pr=-1.5, rc=123.0, rr=-77.0)
    assert value == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-6)
    assert value == pytest.approx(0.474077, abs=1e-6)
    assert gc == pytest.approx(-2.0 * sig(-0.5), rel=1e-5)
    assert gr == pytest.approx(-gc, rel=1e-6)


def test_orpo():
    """Means pc = -0.5, pr = -1.5, α = 1, λ = 0.1:
    log odds(p) = p - log(1 - e^p): -0.5 - log(0.393469) = 0.432752;  -1.5 - log(0.776870) = -1.247518
    Δ = 1.680270, loss = 0.5 + 0.1 log(1 + e^-Δ) = 0.5 + 0.1 * 0.170859 = 0.517086
    ∂/∂pc = -α - λ σ(-Δ) / (1 - e^pc),  ∂/∂pr = λ σ(-Δ) / (1 - e^pr)."""
    cfg = DPOConfig(loss_type="orpo", orpo_alpha=1.0, orpo_beta=0.1)
    pc, pr = -0.5, -1.5
    value, gc, gr = loss_and_grads(cfg, pc=pc, pr=pr, rc=0.0, rr=0.0)
    lo = lambda p: p - math.log(1 - math.exp(p))
    delta = lo(pc) - lo(pr)
    assert delta == pytest.approx(1.680270, abs=1e-6)
    assert value == pytest.approx(0.5 + 0.1 * math.log1p(math.exp(-delta)), rel=1e-6)
    assert value == pytest.approx(0.517086, abs=1e-6)
    assert gc == pytest.approx(-1.0 - 0.1 * sig(-delta) / (1 - math.exp(pc)), rel=1e-5)
    assert gr == pytest.approx(0.1 * sig(-delta) / (1 - math.exp(pr)), rel=1e-5)


def test_orpo_log_odds_stable_near_zero_and_far_below():
    """log(1 - e^p) for p -> 0- and p << 0 stays finite and matches log1p(-exp(p)) where that is exact."""
    for p in (-1e-4, -0.3, -0.9, -30.0):
        assert float(dpo.log1mexp(jnp.float32(p))) == pytest.approx(math.log(-math.expm1(p)), rel=1e-4)


def test_kto():
    """r = π - ref; z0 = 0.4 (kl), β = 0.1, λ_D = 1, λ_U = 1.5:
    desirable  r = 2.4: 1 - σ(0.1 * 2.0) = 0.450166, ∂/∂π = -β s (1 - s), s = σ(0.2)
    undesirable r = -1.6: 1.5 (1 - σ(0.1 * 2.0)) = 0.675249, ∂/∂π = 1.5 β u (1 - u), u = σ(0.2)."""
    policy = jnp.array([-8.0, -13.0])
    ref = jnp.array([-10.4, -11.4])
    label = jnp.array([True, False])

    def f(policy):
        return kto.kto_losses(policy, ref, 0.4, label, 0.1, 1.0, 1.5)

    losses = f(policy)
    s = sig(0.2)
    chex.assert_trees_all_close(losses, jnp.array([1 - s, 1.5 * (1 - s)]), rtol=1e-6)
    assert float(losses[0]) == pytest.approx(0.450166, abs=1e-6)
    grads = jax.grad(lambda p: f(p).sum())(policy)
    chex.assert_trees_all_close(grads, jnp.array([-0.1 * s * (1 - s), 1.5 * 0.1 * s * (1 - s)]), rtol=1e-5)


def test_reward_model_bradley_terry():
    """r_c = 1.0, r_r = 0.2, m = 0.3, c = 0.01: -log σ(0.5) + 0.01 * 1.44 = 0.474077 + 0.0144;
    ∂/∂r_c = -σ(-0.5) + 0.024, ∂/∂r_r = σ(-0.5) + 0.024."""
    f = lambda rc, rr: rm.pair_loss(rc, rr, margin=0.3, center_coef=0.01)
    value = float(f(1.0, 0.2))
    assert value == pytest.approx(math.log1p(math.exp(-0.5)) + 0.0144, rel=1e-6)
    gc, gr = jax.grad(f, argnums=(0, 1))(1.0, 0.2)
    assert float(gc) == pytest.approx(-sig(-0.5) + 0.024, rel=1e-5)
    assert float(gr) == pytest.approx(sig(-0.5) + 0.024, rel=1e-5)
