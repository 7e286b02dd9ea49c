"""The experts run as a grouped matmul on the accelerators, not every expert on every token.

On CPU XLA lowers `lax.ragged_dot` to a masked dense product (exact, but each token pays for every expert);
lowered for TPU and GPU the same model keeps `chlo.ragged_dot`, which those backends compile to a grouped GEMM.
The MoE forward is exported for both platforms here (lowering needs no accelerator, and compiles nothing) and
the expert matmuls found in it: two in the scanned layer body (gate_up, down).
"""

import jax
import jax.numpy as jnp
from jax import export

from jaxtune.models.decoder import Decoder
from jaxtune.models.families import arch_from_hf

TINY_MOE = dict(model_type="mixtral", vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)  # fmt: skip


def test_moe_forward_lowers_to_grouped_matmuls_on_tpu_and_gpu():
    decoder = Decoder(arch_from_hf(TINY_MOE))
    ids = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    params = jax.eval_shape(lambda: decoder.init(jax.random.key(0), jnp.ones((2, 8), jnp.int32),
                                                 jnp.ones((2, 8), jnp.int32), jnp.zeros((2, 8), jnp.int32)))  # fmt: skip

    def forward(params, ids):
        return decoder.apply({"params": params["params"]}, ids, jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(8), ids.shape))

    for platform in ("tpu", "cuda"):
        text = export.export(jax.jit(forward), platforms=[platform])(params, ids).mlir_module()
        assert text.count('"chlo.ragged_dot"') >= 2, platform
