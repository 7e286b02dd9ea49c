"""Gemma 2 / Gemma 3 beyond the per-family parity tests (test_hf_parity.py runs both tiny models): every switch the
tiny configs set really changes the logits (so the 1e-4 parity means each is implemented, not merely harmless);
config.json forms the tiny models do not write (older Gemma 3 rope keys, a hub-style sparse text_config, absent
Gemma 2 soft-caps); and a multimodal Gemma 3 checkpoint, whose language model loads with the logits of
transformers' Gemma3ForConditionalGeneration and exports as a text-only gemma3_text."""

import json
import logging

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny_models import build_hf_gemma3_multimodal, hf_logits, padded_batch, save_hf

import jaxtune
from jaxtune.models import UnsupportedModelError, arch_from_hf
from jaxtune.models.families import language_model_config
from jaxtune.models.model import forward, prepare_inputs

# switch -> the value that turns it off; each must move the logits of its tiny model by more than 1e-3
SWITCHES = {
    "gemma2": {"attn_softcap": 0.0, "final_softcap": 0.0, "query_pre_attn_scalar": 0.0, "layer_windows": ()},
    "gemma3": {"rope_local_theta": 0.0, "rope_scaling": (), "final_softcap": 0.0, "query_pre_attn_scalar": 0.0,
               "layer_windows": ()},
}  # fmt: skip


def masked_max_diff(a, b, mask):
    return float(np.max(np.abs((np.asarray(a) - np.asarray(b)) * np.asarray(mask)[..., None])))


@pytest.mark.parametrize("family", sorted(SWITCHES))
def test_every_switch_of_the_tiny_model_changes_its_logits(family, tmp_path):
    save_hf(family, tmp_path)
    model = jaxtune.load_model(tmp_path)
    inputs = prepare_inputs(*padded_batch())
    mask = padded_batch()[1]
    logits = forward(model.arch, model.params, {}, *inputs)
    for name, off in SWITCHES[family].items():
        assert getattr(model.arch, name) != off, name
        changed = forward(model.arch.replace(**{name: off}), model.params, {}, *inputs)
        assert masked_max_diff(logits, changed, mask) > 1e-3, f"{family}: {name} does not matter"


def test_gemma2_defaults_of_keys_a_config_leaves_out():
    """transformers' Gemma2Config defaults: soft-caps 50 / 30, query_pre_attn_scalar 256, layer 0 sliding and
    then alternating; a key present as null stays off."""
    cfg = dict(model_type="gemma2", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
               num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8)  # fmt: skip
    arch = arch_from_hf(cfg)
    assert (arch.attn_softcap, arch.final_softcap, arch.query_pre_attn_scalar) == (50.0, 30.0, 256.0)
    assert arch.layer_windows == (8, 0, 8, 0) and arch.sandwich_norms and arch.tie_word_embeddings
    assert arch.attn_scale == 256**-0.5 and arch.rope_local_theta == 0.0
    off = arch_from_hf({**cfg, "attn_logit_softcapping": None, "final_logit_softcapping": None})
    assert (off.attn_softcap, off.final_softcap) == (0.0, 0.0)
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention"):
        arch_from_hf({**cfg, "use_bidirectional_attention": True})


def test_gemma3_older_rope_keys_and_a_sparse_multimodal_text_config():
    """A hub-style gemma-3-4b config.json: a text_config naming little more than its sizes (transformers' defaults
    fill the rest), rope_scaling for the global layers only, the 5:1 pattern from sliding_window_pattern."""
    hub = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 12, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"model_type": "siglip_vision_model"},
    }  # fmt: skip
    arch = arch_from_hf(hub)
    assert arch.model_type == "gemma3_text" and (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (8, 4, 256)
    assert arch.layer_windows == (1024,) * 5 + (0,) + (1024,) * 5 + (0,)
    assert (arch.rope_theta, dict(arch.rope_scaling)) == (1e6, {"factor": 8.0, "rope_type": "linear"})
    assert (arch.rope_local_theta, arch.rope_local_scaling) == (1e4, ())
    assert arch.qk_norm and arch.query_pre_attn_scalar == 256.0 and arch.vocab_size == 262208
    assert (arch.attn_softcap, arch.final_softcap) == (0.0, 0.0)
    text = language_model_config(hub)
    assert text["model_type"] == "gemma3_text" and text["architectures"] == ["Gemma3ForCausalLM"]
    assert text["eos_token_id"] == [1, 106]  # the outer config's special ids win
    older = dict(model_type="gemma3_text", num_hidden_layers=2, sliding_window=4, sliding_window_pattern=2,
                 rope_theta=5e5, rope_local_base_freq=50.0, rope_scaling=None, attn_logit_softcapping=7.0)  # fmt: skip
    arch = arch_from_hf(older)
    assert arch.layer_windows == (4, 0) and (arch.rope_theta, arch.rope_local_theta) == (5e5, 50.0)
    assert arch.attn_softcap == 0.0  # transformers' Gemma 3 attention ignores attn_logit_softcapping


def test_gemma3_multimodal_checkpoint_loads_its_language_model(tmp_path, caplog):
    """Gemma3ForConditionalGeneration saved by transformers (language_model.model.* names, a vision tower and
    projector beside them): jaxtune loads the language model alone, with transformers' text logits (which carry no
    final-logit soft-cap, whatever text_config says), says so in one line and warns of no unused tensor; the
    export is a gemma3_text that Gemma3ForCausalLM loads with the same logits. The model.language_model.* layout
    loads the same weights."""
    from transformers import AutoModelForCausalLM

    hf = build_hf_gemma3_multimodal()
    assert hf.config.text_config.final_logit_softcapping  # set, and ignored by the multimodal model
    hf.save_pretrained(tmp_path / "mm")
    with caplog.at_level(logging.INFO, logger="jaxtune.models"):
        model = jaxtune.load_model(tmp_path / "mm")
    notes = [r.getMessage() for r in caplog.records if "language model" in r.getMessage()]
    assert any("gemma3_text" in n for n in notes) and any("vision tensors not loaded" in n for n in notes), notes
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert model.arch.model_type == "gemma3_text" and model.arch.final_softcap == 0.0
    ids, mask = padded_batch()
    ours = model.logits(ids, attention_mask=mask)
    assert masked_max_diff(ours, hf_logits(hf, ids, mask), mask) <= 1e-4

    jaxtune.save_model(model, tmp_path / "text")
    config = json.loads((tmp_path / "text" / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    assert "vision_config" not in config and config["final_logit_softcapping"] is None
    text = AutoModelForCausalLM.from_pretrained(tmp_path / "text", attn_implementation="eager").eval()
    assert type(text).__name__ == "Gemma3ForCausalLM"
    assert masked_max_diff(ours, hf_logits(text, ids, mask), mask) <= 1e-4

    # the names transformers >= 4.52 uses in memory (model.language_model.*, model.vision_tower.*, lm_head)
    (tmp_path / "mm2").mkdir()
    (tmp_path / "mm2" / "config.json").write_text((tmp_path / "mm" / "config.json").read_text())
    tensors = load_file(tmp_path / "mm" / "model.safetensors")
    lm = "language_model.model."
    renamed = {"model.language_model." + n[len(lm) :] if n.startswith(lm) else "model." + n: t
               for n, t in tensors.items()}  # fmt: skip
    assert "model.language_model.embed_tokens.weight" in renamed and "model.vision_tower" in " ".join(renamed)
    save_file(renamed, tmp_path / "mm2" / "model.safetensors", metadata={"format": "pt"})
    again = jaxtune.load_model(tmp_path / "mm2")
    np.testing.assert_array_equal(np.asarray(again.logits(ids, attention_mask=mask)), np.asarray(ours))
