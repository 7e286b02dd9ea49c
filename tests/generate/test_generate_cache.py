"""KV-cache decoding against two oracles: step-by-step full recomputation (the training forward over the whole
buffer at every step) and `transformers`' own `generate`, on left-padded batches of different prompt lengths."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny_models import VOCAB, acting_adapters, save_hf

import jaxtune
from jaxtune.generate import generate, left_pad, sample, stop_array
from jaxtune.models import kv_cache
from jaxtune.models.decoder import Decoder, segment_positions

LENGTHS = (3, 8, 13)  # left padding of 13, 8 and 3 slots after rounding the width up to 16
NEW = 10


def prompts(seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(1, VOCAB, size=n).tolist() for n in LENGTHS]


def both(arch, variables, **kw):
    cached = generate(arch, variables, prompts(), max_new_tokens=NEW, **kw)
    recomputed = generate(arch, variables, prompts(), max_new_tokens=NEW, use_cache=False, **kw)
    return cached, recomputed


def test_greedy_gqa_llama_equals_recompute_and_transformers(tiny_llama):
    hf, directory = tiny_llama
    model = jaxtune.load_model(directory)
    assert model.arch.num_kv_heads < model.arch.num_heads  # grouped-query attention
    cached, recomputed = both(model.arch, {"params": model.params})
    assert cached == recomputed
    assert all(len(row) == NEW for row in cached)  # no stop token: every row runs to the end
    ids, mask = left_pad(prompts(), multiple=1)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                          max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
    assert cached == out[:, ids.shape[1] :].tolist()


def test_cache_layout_is_layers_batch_slots_kv_heads_head_dim(tiny_llama):
    _, directory = tiny_llama
    model = jaxtune.load_model(directory)
    a = model.arch
    ids, mask = left_pad(prompts())
    seg = jnp.asarray(mask)
    _, state = Decoder(a).apply({"params": model.params}, ids, seg, segment_positions(seg), mutable=["cache"])
    cache = kv_cache.pad(state["cache"], NEW)
    s = ids.shape[1] + NEW
    entry = cache["layers"]["self_attn"]
    chex.assert_shape(
        [entry["key"], entry["value"]], (a.num_layers, len(LENGTHS), s, a.num_kv_heads, a.head_dim)
    )
    chex.assert_shape(entry["positions"], (a.num_layers, len(LENGTHS), s))
    assert entry["index"].tolist() == [ids.shape[1]] * a.num_layers


@pytest.mark.parametrize(
    "method",
    [
        {"method": "prefix", "num_virtual_tokens": 3},
        {"method": "prompt", "num_virtual_tokens": 4},
        {"method": "lora", "target_modules": "all-linear", "rank": 4},
    ],
    ids=["prefix", "prompt", "lora"],
)
def test_greedy_with_peft_equals_recompute(tiny_llama, method):
    """Prefixes enter the cache as its first slots, virtual tokens through the prefill, LoRA in every step."""
    _, directory = tiny_llama
    model = jaxtune.load_model(directory)
    adapters = acting_adapters(model, method)  # LoRA's B off zero: a step that skipped it would differ
    arch = model.arch.replace(peft=adapters.spec)
    variables = {"params": model.params, **adapters.variables}
    cached, recomputed = both(arch, variables)
    assert cached == recomputed
    base = generate(model.arch, {"params": model.params}, prompts(), max_new_tokens=NEW)
    assert cached != base  # the adapter changed what is generated, so the comparison above means something


def test_sliding_window_equals_recompute(tmp_path):
    """Mistral's window (4 positions) is shorter than the prompts: cached keys that fell out of it must be
    masked by their stored positions."""
    save_hf("mistral", tmp_path)
    model = jaxtune.load_model(tmp_path)
    assert model.arch.layer_windows and max(model.arch.layer_windows) < min(LENGTHS) + NEW
    cached, recomputed = both(model.arch, {"params": model.params})
    assert cached == recomputed


def test_phi3_longrope_greedy_equals_transformers(tmp_path):
    """Phi-3 128k style: fused qkv_proj, partial rotary, longrope. Prompts of 3, 8, 13 tokens: the 13 is longer
    than original_max_position_embeddings=8, so the long factors hold throughout (KV cache); two prompts of 3
    tokens: the generation crosses 8, where HF recomputes with the long factors, and so do we (no cache: on
    this batch the cached short-factor keys would change the greedy tokens)."""
    hf = save_hf("phi3_longrope", tmp_path)
    model = jaxtune.load_model(tmp_path)
    for batch in (prompts(), [p[:3] for p in prompts()[:2]]):
        ours = generate(model.arch, {"params": model.params}, batch, max_new_tokens=NEW)
        ids, mask = left_pad(batch, multiple=1)
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                              max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
        assert ours == out[:, ids.shape[1] :].tolist()


def test_sampling_with_the_same_seed_equals_recompute(tiny_llama):
    """Temperature / top-k / top-p draws use the same random stream in both decoders."""
    _, directory = tiny_llama
    model = jaxtune.load_model(directory)
    cached, recomputed = both(
        model.arch, {"params": model.params}, seed=3, temperature=0.7, top_k=5, top_p=0.9
    )
    assert cached == recomputed
    greedy = generate(model.arch, {"params": model.params}, prompts(), max_new_tokens=NEW)
    assert cached != greedy  # it did sample


def test_stop_token_ends_its_row_only(tiny_llama):
    """Stopping at the token one row produces at step 4 ends that row there (stop token included) while the
    others go on; once every row has stopped, the loop ends early and the rest stays masked."""
    _, directory = tiny_llama
    model = jaxtune.load_model(directory)
    variables = {"params": model.params}
    free = generate(model.arch, variables, prompts(), max_new_tokens=NEW)
    stop = free[1][4]
    stopped = generate(model.arch, variables, prompts(), max_new_tokens=NEW, stop_ids=[stop])
    for row_free, row in zip(free, stopped):
        cut = row_free.index(stop) + 1 if stop in row_free else NEW
        assert row == row_free[:cut]
    ids, mask = left_pad(prompts())
    tokens, keep = sample(model.arch, variables, ids, mask, jax.random.PRNGKey(0),
                          stop_array({row[0] for row in free}), max_new_tokens=NEW)  # fmt: skip
    assert np.asarray(keep).tolist() == [[True] + [False] * (NEW - 1)] * len(LENGTHS)
    assert np.all(np.asarray(tokens)[:, 1:] == 0)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_equals_recompute_and_transformers(family, tmp_path):
    """Gemma 2 (soft-capped attention and output logits, a sliding and a global layer) and Gemma 3 (the sliding
    layers' own RoPE, picked per layer at every decode step): the cached decoder, full
    recomputation and `transformers.generate` pick the same tokens."""
    hf = save_hf(family, tmp_path)
    model = jaxtune.load_model(tmp_path)
    assert model.arch.final_softcap and max(model.arch.layer_windows) < min(LENGTHS) + NEW
    cached, recomputed = both(model.arch, {"params": model.params})
    assert cached == recomputed
    ids, mask = left_pad(prompts(), multiple=1)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                          max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
    assert cached == out[:, ids.shape[1] :].tolist()
