"""Token sampling against closed-form distributions: temperature, top-k and nucleus (top-p) filtering."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.generate import cut_at_stop, sample_token

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
DRAWS = 20000


def frequencies(temperature=1.0, top_k=0, top_p=1.0):
    logits = jnp.log(jnp.tile(jnp.asarray(PROBS, jnp.float32), (DRAWS, 1)))  # [DRAWS, 4]
    tokens = sample_token(logits, jax.random.PRNGKey(0), temperature, top_k, top_p)
    return np.bincount(np.asarray(tokens), minlength=4) / DRAWS


def test_greedy_is_argmax():
    logits = jnp.asarray([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sample_token(logits, jax.random.PRNGKey(0), 0.0, 0, 1.0).tolist() == [1, 0]


def test_top_k_one_is_greedy():
    logits = jax.random.normal(jax.random.PRNGKey(1), (64, 50))
    drawn = sample_token(logits, jax.random.PRNGKey(2), 1.0, 1, 1.0)
    assert drawn.tolist() == jnp.argmax(logits, -1).tolist()


def test_temperature_one_samples_the_softmax():
    np.testing.assert_allclose(frequencies(), PROBS, atol=0.015)


def test_temperature_sharpens():
    """T = 0.5 samples p^2 / sum p^2: (.25, .09, .0225, .0025) / .365."""
    expected = PROBS**2 / np.sum(PROBS**2)
    np.testing.assert_allclose(frequencies(temperature=0.5), expected, atol=0.015)


def test_top_k_renormalises_over_the_k_most_likely():
    """k = 2 keeps (.5, .3) -> (.625, .375)."""
    np.testing.assert_allclose(frequencies(top_k=2), [0.625, 0.375, 0, 0], atol=0.015)


def test_top_p_keeps_the_smallest_set_reaching_p():
    """p = 0.7: the mass before token 1 is .5 < .7 (kept), before token 2 it is .8 (cut): {0, 1}.
    p = 0.85: .8 < .85, so token 2 joins: (.5, .3, .15) / .95."""
    np.testing.assert_allclose(frequencies(top_p=0.7), [0.625, 0.375, 0, 0], atol=0.015)
    np.testing.assert_allclose(frequencies(top_p=0.85), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=0.015)
    assert frequencies(top_p=0.01)[0] == 1.0  # the most likely token always stays


def test_cut_at_stop_takes_the_earliest_stop_string():
    assert cut_at_stop("abc</s>def\nUser:", ["\nUser:", "</s>"]) == ("abc", True)
    assert cut_at_stop("abc", ["x", ""]) == ("abc", False)
