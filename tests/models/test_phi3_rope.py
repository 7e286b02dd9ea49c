"""phi3 RoPE settings read as transformers' Phi3Config + Phi3RotaryEmbedding read them (the oracle), for the
config.json spellings real checkpoints use: `su` / `yarn` (renamed longrope), top-level
original_max_position_embeddings overriding the dict's, explicit `factor` / `attention_factor`, partial rotary;
and what HF cannot run is an UnsupportedModelError naming the field. No model is built: sizes only."""

import numpy as np
import pytest

from jaxtune.models import longrope
from jaxtune.models.families import UnsupportedModelError, arch_from_hf

BASE = dict(model_type="phi3", vocab_size=16, hidden_size=64, intermediate_size=8, num_hidden_layers=1,
            num_attention_heads=4, max_position_embeddings=64, pad_token_id=0)  # fmt: skip
SHORT, LONG = [1.0, 1.2, 1.5, 2.0, 3.0, 4.0], [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]  # rotary_dim 12 = 16 * 0.75


def test_phi3_rope_parameters_match_transformers():
    import torch
    from transformers import AutoConfig
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    cases = [
        dict(rope_scaling={"type": "su", "short_factor": SHORT, "long_factor": LONG,
                           "original_max_position_embeddings": 16}, original_max_position_embeddings=8),
        dict(rope_scaling={"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG},
             original_max_position_embeddings=8),
        dict(rope_scaling={"type": "yarn", "short_factor": SHORT, "long_factor": LONG,
                           "original_max_position_embeddings": 16}, original_max_position_embeddings=8),
        dict(rope_scaling={"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "factor": 3.0,
                           "attention_factor": 1.25}, original_max_position_embeddings=4, rope_theta=500.0),
        dict(rope_parameters={"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                              "rope_theta": 300.0, "partial_rotary_factor": 0.75}),  # original: the default 4096
        dict(rope_theta=2000.0),  # default RoPE, partial
    ]  # fmt: skip
    for case in cases:
        cfg = {**BASE, "partial_rotary_factor": 0.75, **case}
        hf = Phi3RotaryEmbedding(AutoConfig.for_model(**cfg))
        arch = arch_from_hf(cfg)
        rope = arch.rope
        assert longrope.rotary_dim(arch) == 2 * hf.inv_freq.shape[0] == 12, case
        if rope["rope_type"] == "default":
            from jaxtune.models.layers import rope_inv_freq

            np.testing.assert_allclose(rope_inv_freq(arch), hf.inv_freq.numpy(), rtol=1e-6)
            continue
        assert rope["attention_factor"] == pytest.approx(hf.attention_scaling, rel=1e-12), case
        original = hf.config.rope_parameters["original_max_position_embeddings"]
        np.testing.assert_allclose(longrope.inv_freq(arch, rope["short_factor"]), hf.inv_freq.numpy(), rtol=1e-6)
        # HF's long set, as its forward computes it for a sequence longer than original_max_position_embeddings
        hf(torch.zeros(1), torch.arange(original + 1)[None])
        np.testing.assert_allclose(longrope.inv_freq(arch, rope["long_factor"]), hf.inv_freq.numpy(), rtol=1e-6)
        assert rope["original_max_position_embeddings"] == original, case

    for bad, field in (
        (dict(rope_scaling={"rope_type": "longrope", "short_factor": SHORT[:4], "long_factor": LONG}), "short_factor"),
        (dict(rope_scaling={"rope_type": "longrope", "short_factor": SHORT}), "long_factor"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_type"),
    ):  # fmt: skip
        with pytest.raises(UnsupportedModelError, match=field):
            arch_from_hf({**BASE, "partial_rotary_factor": 0.75, **bad})


def test_rl_rollouts_refuse_a_generation_that_crosses_longrope_switch():
    """The cached rollout sampler cannot switch longrope's factors mid-generation (transformers recomputes
    there): such a rollout is an error naming the settings, never a silently different sampling policy."""
    import types

    import numpy as np
    import pytest
    from tiny_models import FAMILIES

    from jaxtune.data.batch import TokenBatch
    from jaxtune.errors import RunError
    from jaxtune.methods.rollout import sample_completions
    from jaxtune.models.families import arch_from_hf

    arch = arch_from_hf(dict(FAMILIES["phi3_longrope"]))  # original_max_position_embeddings = 8
    ids = np.ones((1, 6), np.int32)
    prompts = TokenBatch(ids, ids * 0, ids * 0.0, ids, np.arange(6)[None])
    ctx = types.SimpleNamespace(lm=types.SimpleNamespace(arch=arch), stop_ids=(),
                                generation=types.SimpleNamespace(max_new_tokens=4, temperature=1.0, top_k=0, top_p=1.0))  # fmt: skip
    with pytest.raises(RunError, match="original_max_position_embeddings=8"):
        sample_completions(ctx, {}, prompts, None)
