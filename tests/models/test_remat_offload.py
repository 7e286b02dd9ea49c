"""`model.remat: offload` (saved matmul outputs go to pinned host memory) changes memory, never the numbers."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.models.hf import from_hf_config
from jaxtune.models.model import forward, prepare_inputs

SHAPE = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64)  # fmt: skip


def _loss_and_grads(remat: str, scan: bool):
    model = from_hf_config(
        SHAPE, rng=0, dtype="float32", param_dtype="float32", remat=remat, scan_layers=scan
    )
    ids = np.random.RandomState(0).randint(0, 64, (2, 16)).astype(np.int32)
    ids, seg, pos = prepare_inputs(ids)

    def loss(params):
        logits = forward(model.arch, params, {}, ids[:, :-1], seg[:, :-1], pos[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()

    return jax.jit(jax.value_and_grad(loss))(model.params)


def test_offload_matches_no_remat():
    l0, g0 = _loss_and_grads("none", scan=True)
    l1, g1 = _loss_and_grads("offload", scan=True)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g0)
