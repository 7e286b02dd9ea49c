"""Scan vs unrolled, remat vs plain, core layers under chex variants, logical axes, and user-facing errors."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import padded_batch, save_hf

import jaxtune
from jaxtune.models import CheckpointError, UnsupportedModelError
from jaxtune.models.arch import ArchConfig
from jaxtune.models.attention import attention_mask
from jaxtune.models.decoder import segment_positions
from jaxtune.models.layers import apply_rope, rope_tables
from jaxtune.models.model import forward, param_logical_axes, prepare_inputs


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mistral")
    save_hf("mistral", d)
    return d


def test_scanned_and_unrolled_layers_agree(mistral_dir):
    scanned = jaxtune.load_model(mistral_dir)
    unrolled = jaxtune.load_model(mistral_dir, scan_layers=False)
    assert "layers_1" in unrolled.params and "layers" not in unrolled.params
    ids, mask = padded_batch()
    chex.assert_trees_all_close(scanned.logits(ids, mask), unrolled.logits(ids, mask), atol=1e-6)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_forward_and_gradients_equal_plain(mistral_dir, policy):
    plain = jaxtune.load_model(mistral_dir)
    remat = jaxtune.load_model(mistral_dir, remat=policy)
    ids, seg, pos = prepare_inputs(*padded_batch())

    def loss(params, arch):
        return forward(arch, params, {}, ids, seg, pos).astype(jnp.float32).std()

    value_p, grad_p = jax.jit(jax.value_and_grad(loss), static_argnums=1)(plain.params, plain.arch)
    value_r, grad_r = jax.jit(jax.value_and_grad(loss), static_argnums=1)(remat.params, remat.arch)
    chex.assert_trees_all_close(value_p, value_r, atol=1e-6)
    chex.assert_trees_all_close(grad_p, grad_r, atol=1e-6)


def test_sliding_window_changes_attention(mistral_dir):
    """Guards the parity test: with window 4 < length 12, dropping the window must change the logits."""
    model = jaxtune.load_model(mistral_dir)
    assert model.arch.layer_windows == (4, 4)
    ids, mask = padded_batch()
    full = model.arch.replace(layer_windows=())
    a = model.logits(ids, mask)
    b = forward(full, model.params, {}, *prepare_inputs(ids, mask))
    assert float(jnp.abs(a - b).max()) > 1e-3


class TestCoreLayers(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_attention_mask_blocks_other_documents_and_future(self):
        seg = jnp.array([[1, 1, 2, 2, 0]])
        mask = self.variant(attention_mask)(seg)
        chex.assert_shape(mask, (1, 1, 5, 5))
        expected = np.array(
            [
                [1, 0, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [0, 0, 1, 0, 0],
                [0, 0, 1, 1, 0],
                [0, 0, 0, 0, 1],
            ],
            dtype=bool,
        )
        np.testing.assert_array_equal(mask[0, 0], expected)

    @chex.variants(with_jit=True, without_jit=True)
    def test_segment_positions_restart_per_document(self):
        seg = jnp.array([[0, 0, 1, 1, 1], [1, 1, 2, 2, 0]])
        np.testing.assert_array_equal(self.variant(segment_positions)(seg), [[0, 1, 0, 1, 2], [0, 1, 0, 1, 0]])

    @chex.variants(with_jit=True, without_jit=True)
    def test_rope_is_a_rotation_and_relative(self):
        """RoPE preserves norms, and <q_m, k_n> depends only on m - n."""
        arch = ArchConfig("llama", 16, 8, 8, 1, 1, 1, head_dim=8)
        q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
        k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))

        def rotated(x, p):
            cos, sin = rope_tables(arch, jnp.array([[p]]), jnp.float32)
            return apply_rope(x, cos, sin)

        f = self.variant(rotated)
        chex.assert_trees_all_close(jnp.linalg.norm(f(q, 5)), jnp.linalg.norm(q), atol=1e-5)
        dot = lambda m, n: jnp.sum(f(q, m) * f(k, n))
        chex.assert_trees_all_close(dot(7, 3), dot(14, 10), atol=1e-5)


def test_every_parameter_has_logical_axes():
    arch = jaxtune.from_hf_config(dict(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).arch
    specs = jax.tree.leaves(param_logical_axes(arch), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert specs and all(len(s) >= 1 and all(a is not None for a in s) for s in specs)
    axes = param_logical_axes(arch)
    assert tuple(axes["layers"]["self_attn"]["q_proj"]["kernel"]) == ("layers", "embed", "heads")
    assert tuple(axes["layers"]["self_attn"]["k_proj"]["kernel"]) == ("layers", "embed", "kv_heads")
    assert tuple(axes["layers"]["mlp"]["down_proj"]["kernel"]) == ("layers", "mlp", "embed")
    assert tuple(axes["embed_tokens"]["embedding"]) == ("vocab", "embed")
    assert tuple(axes["lm_head"]["kernel"]) == ("embed", "vocab")


def test_unsupported_model_type_is_one_clear_paragraph(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(UnsupportedModelError, match=r"model_type 'bert' is not supported; jaxtune supports: .*llama"):
        jaxtune.load_model(tmp_path)


def test_malformed_config_json_names_file_and_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": ,\n}')
    with pytest.raises(CheckpointError, match=r"config.json: invalid JSON at line 3"):
        jaxtune.load_model(tmp_path)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        jaxtune.load_model(tmp_path)


def test_missing_tensor_and_shape_mismatch_name_the_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    save_hf("llama", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    tensors["model.norm.weight"] = np.ones(63, np.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        jaxtune.load_model(tmp_path)
    msg = str(err.value)
    assert "missing tensor model.layers.1.self_attn.k_proj.weight" in msg
    assert "tensor model.norm.weight has shape (63,), config.json implies (64,)" in msg


def test_no_safetensors_points_at_the_fix(tmp_path):
    save_hf("gpt2", tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no \*.safetensors weights \(found pytorch_model.bin"):
        jaxtune.load_model(tmp_path)
