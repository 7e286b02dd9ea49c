"""The reward / value head against transformers' `*ForSequenceClassification`: loading, scoring, exporting.

Oracle: a tiny perturbed `LlamaForSequenceClassification` / `GPT2ForSequenceClassification` (num_labels=1)
scoring right- and left-padded rows, padded with `pad_token_id` as HF requires (it pools the rightmost token
that is not the pad id; jaxtune pools the last token of the segment ids).
"""

import json

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import FAMILIES, padded_batch, perturb

import jaxtune
from jaxtune.models.score import init_score, last_token_index, seq_cls_config, sequence_scores, token_scores

PAD = 0


def build_seq_cls(family: str, seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    kwargs = dict(FAMILIES[family])
    config = AutoConfig.for_model(kwargs.pop("model_type"), num_labels=1, pad_token_id=PAD, **kwargs)
    torch.manual_seed(seed)
    return perturb(AutoModelForSequenceClassification.from_config(config, attn_implementation="eager").eval())


def hf_scores(model, ids, mask) -> np.ndarray:
    import torch

    ids = np.where(mask == 1, ids, PAD)  # HF finds the last token by the pad id
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        )
    return out.logits[:, 0].float().numpy()


def jax_scores(model, ids, mask) -> np.ndarray:
    hidden = model.hidden_states(ids, attention_mask=mask)
    return np.asarray(sequence_scores(model.arch, model.params, hidden, jnp.asarray(mask)))


def batch():
    ids, mask = padded_batch(seed=1)
    ids = np.where(ids == PAD, 5, ids)  # no real token may equal the pad id (HF would skip it)
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_loads_hf_sequence_classifier_and_scores_like_it(family, tmp_path):
    hf = build_seq_cls(family)
    hf.save_pretrained(tmp_path)
    model = jaxtune.load_model(tmp_path)
    assert "score" in model.params and "lm_head" not in model.params
    chex.assert_shape(model.params["score"]["kernel"], (model.arch.hidden_size, 1))
    ids, mask = batch()
    np.testing.assert_allclose(jax_scores(model, ids, mask), hf_scores(hf, ids, mask), rtol=1e-4, atol=1e-5)

    # save -> transformers loads the same classifier back
    out = tmp_path / "resaved"
    jaxtune.save_model(model, out)
    from transformers import AutoModelForSequenceClassification

    again = AutoModelForSequenceClassification.from_pretrained(out).eval()
    np.testing.assert_allclose(hf_scores(again, ids, mask), hf_scores(hf, ids, mask), rtol=1e-5, atol=1e-6)


def test_causal_lm_plus_new_head_exports_as_sequence_classifier(tmp_path):
    """A causal LM (untied head) + `init_score` -> config with architectures/num_labels/pad_token_id and
    `score.weight` instead of `lm_head.weight`; transformers' scores equal ours."""
    from tiny_models import save_hf
    from transformers import AutoModelForSequenceClassification

    save_hf("llama", tmp_path / "lm")
    model = jaxtune.load_model(tmp_path / "lm")
    assert "lm_head" in model.params
    head = init_score(model.arch, 3)
    chex.assert_shape(head["kernel"], (model.arch.hidden_size, 1))
    cfg = seq_cls_config({**model.hf_config, "pad_token_id": PAD, "eos_token_id": 2})
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    rm = type(model)(model.arch, {**model.params, "score": head}, None, cfg)
    jaxtune.save_model(rm, tmp_path / "rm")
    index = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert index["pad_token_id"] == PAD and index["architectures"] == ["LlamaForSequenceClassification"]
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    ids, mask = batch()
    np.testing.assert_allclose(jax_scores(rm, ids, mask), hf_scores(hf, ids, mask), rtol=1e-4, atol=1e-5)


def test_token_scores_and_last_token():
    """Per-token scores are the head at every position; the sequence score is the one at the last real token
    (left padding: the final position; right padding: before the pads; all-pad rows: position 0)."""
    seg = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(last_token_index(seg), [4, 2, 0])
    from jaxtune.models.arch import ArchConfig

    arch = ArchConfig("llama", 16, 8, 16, 1, 2, 2, 4)
    params = {"score": init_score(arch, 0)}
    hidden = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 8)), jnp.float32)
    per_token = token_scores(arch, params, hidden)
    chex.assert_shape(per_token, (3, 5))
    chex.assert_trees_all_close(per_token, hidden @ params["score"]["kernel"][:, 0], rtol=1e-6)
    chex.assert_trees_all_close(
        sequence_scores(arch, params, hidden, seg), per_token[jnp.arange(3), jnp.array([4, 2, 0])]
    )
