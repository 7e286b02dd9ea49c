"""Splash attention under a mesh (8 fake CPU devices, Pallas interpret mode) against one device and the xla path.

Under a mesh the kernel runs per shard in `shard_map` (batch over data x fsdp, heads over tensor). The loss and
parameter gradients of a tiny Qwen2 (4 query heads, 2 KV heads, a full and a windowed layer, so both kernels
and the `lax.switch` between them) on packed and padded rows, sharded with splash, equal the plain single-device
program with xla attention. The mesh is 1 x 2 x 4: rows split over fsdp, one query head per tensor shard, and 2
KV heads for 4 shards, so each KV head is repeated just enough that every shard holds the one its queries read
(with at least as many KV heads as shards, they split like the query heads and nothing is repeated).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtune.models.arch import ArchConfig
from jaxtune.models.decoder import Decoder, segment_positions
from jaxtune.models.model import init_params, param_shardings
from jaxtune.parallel import make_mesh

ARCH = ArchConfig(model_type="qwen2", vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, layer_windows=(0, 24))  # fmt: skip
TOL = dict(atol=2e-5, rtol=2e-5)
T = 128  # one splash block


def rows() -> np.ndarray:
    """[4, T] segment ids: packed (three documents, then padding), left-, right- and both-sides padded."""
    seg = np.zeros((4, T), np.int32)
    seg[0, :48], seg[0, 48:80], seg[0, 80:112] = 1, 2, 3
    seg[1, 32:] = 1
    seg[2, :80] = 1
    seg[3, 16:80] = 1
    return seg


def params():
    rng = np.random.default_rng(0)  # NumPy draws: no per-op compilation of an eager init

    def draw(path, leaf):
        return jnp.asarray(rng.normal(0.0, 0.1, leaf.shape) + (path[-1].key == "scale"), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(lambda: init_params(ARCH, 0)))


def loss_and_grads(impl: str, mesh=None):
    """value_and_grad of a loss over the real tokens' hidden states; under `mesh` jitted with the parameter
    shardings of the rules, the batch split over (data, fsdp), and traced under the mesh as the train step is."""
    seg = jnp.asarray(rows())
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 64, seg.shape), jnp.int32)
    pos = segment_positions(seg)
    weights = jnp.asarray(np.sin(np.arange(seg.size * 64)).reshape(*seg.shape, 64), jnp.float32)
    arch = ARCH.replace(attention_impl=impl)

    def loss(p, ids, seg, pos):
        hidden = Decoder(arch).apply({"params": p}, ids, seg, pos)  # [B, T, D]
        return (hidden * weights * (seg > 0)[..., None]).sum() / (seg > 0).sum()

    args = (params(), ids, seg, pos)
    if mesh is None:
        return jax.jit(jax.value_and_grad(loss))(*args)

    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return jax.value_and_grad(loss)(*args)

    batch = NamedSharding(mesh, P(("data", "fsdp")))
    lowered = jax.jit(traced, in_shardings=(param_shardings(arch, mesh), batch, batch, batch)).lower(*args)
    assert "manual_computation" in lowered.as_text(), "splash runs under shard_map"
    return lowered.compile()(*args)


def test_sharded_splash_equals_one_device_xla(eight_devices):
    got = loss_and_grads("splash", make_mesh(1, 2, 4))
    chex.assert_trees_all_close(jax.device_get(got), jax.device_get(loss_and_grads("xla")), **TOL)
