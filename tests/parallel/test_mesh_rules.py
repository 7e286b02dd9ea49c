"""Mesh construction and the logical -> mesh rules, on 8 fake CPU devices.

The oracle is the rules table read by hand: e.g. on mesh (data=1, fsdp=4, tensor=2) a kernel (embed=16, mlp=32)
is split `embed -> fsdp` (16 / 4 = 4 rows per device) and `mlp -> tensor` (32 / 2 = 16 columns per device).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtune.parallel import (
    LOGICAL_AXES,
    RULES,
    constrain,
    describe_mesh,
    explain_spec,
    host_local_to_global,
    logical_to_mesh_spec,
    make_mesh,
    mesh_from_config,
    process_batch_slice,
    sharding_context,
    sharding_snapshot,
    spec_for,
    tree_shardings,
)

SHAPES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]
AXES = ("data", "fsdp", "tensor")


def abstract_mesh(shape):
    return AbstractMesh(shape, AXES)


# --- mesh ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_mesh_shapes(eight_devices, shape):
    mesh = make_mesh(*shape)
    assert mesh.axis_names == AXES
    assert tuple(mesh.shape.values()) == shape
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in eight_devices)
    data, fsdp, tensor = shape
    assert (
        describe_mesh(mesh)
        == f"mesh data={data} × fsdp={fsdp} × tensor={tensor} over 8 cpu devices (1 process)"
    )


@pytest.mark.parametrize(
    "sizes, expected",
    [
        ({}, (8, 1, 1)),  # data=-1 by default: plain data parallelism
        ({"data": -1, "fsdp": 2, "tensor": 2}, (2, 2, 2)),  # 8 / (2*2) = 2
        ({"data": 1, "fsdp": -1, "tensor": 2}, (1, 4, 2)),  # 8 / (1*2) = 4
        ({"data": 2, "fsdp": 4, "tensor": -1}, (2, 4, 1)),  # 8 / (2*4) = 1
    ],
)
def test_rest_is_inferred(eight_devices, sizes, expected):
    assert tuple(make_mesh(**sizes).shape.values()) == expected


def test_mesh_from_config_object(eight_devices):
    cfg = SimpleNamespace(data=1, fsdp=-1, tensor=2, dcn_data=1, dcn_fsdp=1, dcn_tensor=1, distributed="auto")
    assert tuple(mesh_from_config(cfg).shape.values()) == (1, 4, 2)


def test_mesh_from_the_real_parallel_config(eight_devices):
    from jaxtune.config import ParallelConfig

    assert tuple(mesh_from_config(ParallelConfig(fsdp=2, tensor=2)).shape.values()) == (2, 2, 2)


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"data": 3}, "needs 3 devices, but 8 are available"),
        ({"data": 2, "fsdp": 2, "tensor": 4}, "needs 16 devices, but 8 are available"),
        ({"data": -1, "fsdp": -1}, "Only one of"),
        ({"data": -1, "fsdp": 3}, "Cannot infer parallel.data=-1"),
        ({"fsdp": 0}, "parallel.fsdp must be a positive integer"),
        ({"tensor": True}, "parallel.tensor must be a positive integer"),
        ({"dcn_data": 3}, "dcn_data=3"),
        ({"dcn_fsdp": -1}, "parallel.dcn_fsdp must be a positive integer"),
    ],
)
def test_bad_sizes_say_what_is_wrong(eight_devices, sizes, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(**sizes)


def test_dcn_is_the_outer_factor(eight_devices):
    """data = dcn_data(2) × data(2), fsdp = dcn_fsdp(2) × fsdp(1): 4 granules of 2 devices.

    On one CPU process there is no topology, so devices go in id order: granule g = (Dd, Df) holds ids
    2g, 2g+1 along the inner data factor, i.e. mesh[Dd*2 + d, Df] = id 4*Dd + 2*Df + d.
    """
    mesh = make_mesh(data=2, fsdp=1, tensor=1, dcn_data=2, dcn_fsdp=2)
    assert tuple(mesh.shape.values()) == (4, 2, 1)
    ids = [[d.id for d in row] for row in mesh.devices[:, :, 0]]
    assert ids == [[0, 2], [1, 3], [4, 6], [5, 7]]


# --- rules -----------------------------------------------------------------------------------------------

# The table, read by hand, on a mesh where every axis has size 2 and every dim is divisible.
EXPECTED_222 = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "head_dim": None,
    "layers": None,
    "lora_rank": None,
    "length": None,
    "norm": None,
    "adapter": None,
    "virtual_tokens": None,
}


def test_table_covers_the_design_names():
    assert set(LOGICAL_AXES) == set(EXPECTED_222)
    assert RULES[0][0] == "batch"  # first, so activations put fsdp on batch, not embed


@pytest.mark.parametrize("name", list(EXPECTED_222))
def test_spec_for_every_logical_name(name):
    assert spec_for((8,), (name,), abstract_mesh((2, 2, 2))) == P(EXPECTED_222[name])
    # Without a mesh the table gives Flax's answer exactly.
    assert logical_to_mesh_spec((name,)) == nn.logical_to_mesh_axes((name,), RULES)


@pytest.mark.parametrize(
    "shape, logical, expected",
    [
        ((8, 1, 1), ("batch",), P("data")),  # fsdp has size 1: dropped
        ((1, 8, 1), ("batch",), P("fsdp")),
        ((1, 4, 2), ("embed", "mlp"), P("fsdp", "tensor")),
        ((8, 1, 1), ("embed", "mlp"), P(None, None)),  # pure data parallel: params replicated
        # Activations: batch claims fsdp first, so embed stays whole (FSDP shards params, not activations).
        ((2, 2, 2), ("batch", "length", "embed"), P(("data", "fsdp"), None, None)),
        ((2, 2, 2), ("layers", "embed", "heads", "head_dim"), P(None, "fsdp", "tensor", None)),
        ((2, 2, 2), ("embed", "lora_rank"), P("fsdp", None)),  # LoRA A shards like its kernel's input dim
        ((2, 2, 2), (None, "embed"), P(None, "fsdp")),
    ],
)
def test_logical_to_mesh_spec(shape, logical, expected):
    assert logical_to_mesh_spec(logical, mesh=abstract_mesh(shape)) == expected


def test_non_dividing_dim_falls_back_to_replication_with_a_note():
    mesh = abstract_mesh((2, 4, 1))
    # batch 6: data=2 divides, data×fsdp=8 does not -> keep data, drop fsdp.
    spec, notes = explain_spec(("batch", "length"), mesh, shape=(6, 3))
    assert spec == P("data", None)
    assert len(notes) == 1 and "batch=6" in notes[0] and "'fsdp'" in notes[0]
    # A 65-row vocabulary on tensor=2 stays whole.
    spec, notes = explain_spec(("vocab", "embed"), abstract_mesh((1, 4, 2)), shape=(65, 16))
    assert spec == P(None, "fsdp")
    assert "vocab=65" in notes[0]
    # Without a shape nothing can be checked, so nothing is dropped but size-1 axes.
    assert logical_to_mesh_spec(("vocab", "embed"), mesh=abstract_mesh((1, 4, 2))) == P("tensor", "fsdp")


def test_bad_logical_axes_are_user_errors():
    with pytest.raises(ValueError, match="Did you mean 'embed'"):
        logical_to_mesh_spec(("embd", "mlp"))
    with pytest.raises(ValueError, match="more than once"):
        logical_to_mesh_spec(("embed", "embed"))
    with pytest.raises(ValueError, match="name 2 dims but the shape"):
        spec_for((4,), ("embed", "mlp"), abstract_mesh((2, 2, 2)))


@pytest.mark.parametrize(
    "shape, spec, shard",
    [
        # kernel (embed=16, mlp=32); shard = (16 / fsdp, 32 / tensor)
        ((8, 1, 1), P(None, None), (16, 32)),
        ((1, 8, 1), P("fsdp", None), (2, 32)),
        ((2, 2, 2), P("fsdp", "tensor"), (8, 16)),
        ((1, 4, 2), P("fsdp", "tensor"), (4, 16)),
    ],
)
def test_2d_param_named_sharding(eight_devices, shape, spec, shard):
    mesh = make_mesh(*shape)
    kernel = jnp.arange(16 * 32, dtype=jnp.float32).reshape(16, 32)
    (sharding,) = jax.tree.leaves(tree_shardings([kernel], [P("embed", "mlp")], mesh))
    assert sharding == NamedSharding(mesh, spec)
    placed = jax.device_put(kernel, sharding)
    assert {s.data.shape for s in placed.addressable_shards} == {shard}
    np.testing.assert_array_equal(np.asarray(placed), np.asarray(kernel))


class TinyBlock(nn.Module):
    """A kernel, a LoRA pair, a norm and an embedding whose vocabulary (65) no tensor size divides."""

    @nn.compact
    def __call__(self, x):  # x: [B, T, 16]
        part = nn.with_logical_partitioning
        emb = self.param("embedding", part(nn.initializers.normal(), ("vocab", "embed")), (65, 16))
        kernel = self.param("kernel", part(nn.initializers.lecun_normal(), ("embed", "mlp")), (16, 32))
        lora_a = self.param("lora_a", part(nn.initializers.normal(), ("embed", "lora_rank")), (16, 4))
        lora_b = self.param("lora_b", part(nn.initializers.zeros, ("lora_rank", "mlp")), (4, 32))
        scale = self.param("scale", part(nn.initializers.ones, ("norm",)), (16,))
        h = constrain(x * scale, ("batch", "length", "embed"))
        y = h @ kernel + (h @ lora_a) @ lora_b  # [B, T, 32]
        return constrain(y, ("batch", "length", "mlp")) + emb.sum()


@pytest.mark.parametrize("shape", SHAPES)
def test_params_are_created_straight_into_their_shards(eight_devices, shape, caplog):
    mesh = make_mesh(*shape)
    x = jnp.ones((8, 4, 16))
    abstract = jax.eval_shape(TinyBlock().init, jax.random.key(0), x)
    shardings = tree_shardings(abstract, None, mesh)
    init = jax.jit(lambda key: nn.unbox(TinyBlock().init(key, x)), out_shardings=shardings)
    params = init(jax.random.key(0))
    chex.assert_trees_all_equal_structs(params, shardings)
    tensor = shape[2]
    assert params["params"]["embedding"].sharding.spec == P(None, "fsdp" if shape[1] > 1 else None)
    for leaf, want in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        assert leaf.sharding == want
    if tensor > 1:
        assert "vocab=65" in caplog.text  # the fallback is logged, not silent
    with sharding_context(mesh):
        y = jax.jit(TinyBlock().apply)(params, x)
    batch = tuple(a for a, n in zip(AXES[:2], shape[:2]) if n > 1)
    want = P(batch if len(batch) > 1 else batch[0] if batch else None, None, "tensor" if tensor > 1 else None)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, want), y.ndim)  # trailing Nones may be dropped


def test_sharding_snapshot():
    """Every parameter's shape, logical axes and mesh spec on mesh (1, 4, 2), as a test would store it."""
    f32 = jnp.float32

    def box(shape, names):
        return nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, f32), names)

    tree = {
        "params": {
            "embed_tokens": {"embedding": box((65, 16), ("vocab", "embed"))},
            "layers": {
                "q_proj": {"kernel": box((2, 16, 4, 4), ("layers", "embed", "heads", "head_dim"))},
                "k_proj": {"kernel": box((2, 16, 2, 4), ("layers", "embed", "kv_heads", "head_dim"))},
                "down_proj": {"kernel": box((2, 32, 16), ("layers", "mlp", "embed"))},
                "input_layernorm": {"scale": box((2, 16), ("layers", "norm"))},
            },
        },
        "lora": {"layers": {"q_proj": {"lora_a": box((2, 16, 8), ("layers", "embed", "lora_rank"))}}},
        "prompt": {"embedding": box((10, 16), ("virtual_tokens", "embed"))},
    }
    snapshot = sharding_snapshot(tree, abstract_mesh((1, 4, 2)))
    assert json.loads(json.dumps(snapshot)) == snapshot  # stored as JSON and diffed
    assert snapshot == {
        "params/embed_tokens/embedding": {
            "shape": [65, 16],
            "logical": ["vocab", "embed"],
            "mesh_spec": [None, "fsdp"],
            "notes": ["dim 0 (vocab=65) is not divisible by tensor=2; replicated along 'tensor'"],
        },
        "params/layers/q_proj/kernel": {
            "shape": [2, 16, 4, 4],
            "logical": ["layers", "embed", "heads", "head_dim"],
            "mesh_spec": [None, "fsdp", "tensor", None],
        },
        "params/layers/k_proj/kernel": {
            "shape": [2, 16, 2, 4],
            "logical": ["layers", "embed", "kv_heads", "head_dim"],
            "mesh_spec": [None, "fsdp", "tensor", None],
        },
        "params/layers/down_proj/kernel": {
            "shape": [2, 32, 16],
            "logical": ["layers", "mlp", "embed"],
            "mesh_spec": [None, "tensor", "fsdp"],
        },
        "params/layers/input_layernorm/scale": {
            "shape": [2, 16],
            "logical": ["layers", "norm"],
            "mesh_spec": [None, None],
        },
        "lora/layers/q_proj/lora_a": {
            "shape": [2, 16, 8],
            "logical": ["layers", "embed", "lora_rank"],
            "mesh_spec": [None, "fsdp", None],
        },
        "prompt/embedding": {
            "shape": [10, 16],
            "logical": ["virtual_tokens", "embed"],
            "mesh_spec": [None, "fsdp"],
        },
    }


# --- activations and batches -----------------------------------------------------------------------------


def test_constrain_is_a_no_op_outside_a_mesh():
    x = jnp.ones((8, 4, 16))
    assert constrain(x, ("batch", "length", "embed")) is x


def test_constrain_inside_a_mesh(eight_devices):
    mesh = make_mesh(2, 2, 2)
    f = jax.jit(lambda x: constrain(x * 2, ("batch", "length", "mlp")))
    with sharding_context(mesh):
        assert f(jnp.ones((8, 4, 16))).sharding.spec == P(("data", "fsdp"), None, "tensor")
    g = jax.jit(lambda x: constrain(x * 2, ("batch", "length", "mlp"), mesh=mesh))
    assert g(jnp.ones((8, 4, 16))).sharding.spec == P(("data", "fsdp"), None, "tensor")
    # Flax's own constraint reads the same table inside sharding_context.
    h = jax.jit(lambda x: nn.with_logical_constraint(x * 2, ("batch", "length", "mlp")))
    with sharding_context(mesh):
        assert h(jnp.ones((8, 4, 16))).sharding.spec == P(("data", "fsdp"), None, "tensor")


def test_single_process_batch_is_the_whole_batch(eight_devices):
    mesh = make_mesh(2, 2, 2)
    assert process_batch_slice(16) == (0, 16)
    assert process_batch_slice(16, mesh) == (0, 16)
    with pytest.raises(ValueError, match="divisible by the batch-parallel devices"):
        process_batch_slice(6, mesh)  # data × fsdp = 4
    batch = {"input_ids": np.arange(32).reshape(16, 2), "loss_mask": np.ones((16, 2), np.int32)}
    global_batch = host_local_to_global(batch, mesh)
    assert global_batch["input_ids"].sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in global_batch["input_ids"].addressable_shards} == {(4, 2)}  # 16 rows / 4
    np.testing.assert_array_equal(np.asarray(global_batch["input_ids"]), batch["input_ids"])
