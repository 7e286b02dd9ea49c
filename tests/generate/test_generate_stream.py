"""`stream` (one token at a time, for a chat page) against `generate` / `sample` on the same prompt: the same
tokens for greedy decoding, with cache-extending and weight-space PEFT, and for seeded sampling; stop tokens
and max_new_tokens end it; the longrope case falls back to recomputation."""

import logging

import numpy as np
import pytest
from tiny_models import VOCAB, acting_adapters, save_hf

import jaxtune
from jaxtune import generate as gen
from jaxtune.generate import generate, stream

NEW = 10
PROMPT = np.random.RandomState(0).randint(1, VOCAB, size=7).tolist()


def streamed(arch, variables, prompt=PROMPT, **kw):
    return list(stream(arch, variables, prompt, max_new_tokens=kw.pop("max_new_tokens", NEW), **kw))


def batched(arch, variables, prompt=PROMPT, **kw):
    return generate(arch, variables, [prompt], max_new_tokens=kw.pop("max_new_tokens", NEW), pad_multiple=32,
                    **kw)[0]  # fmt: skip


@pytest.fixture(scope="module")
def llama(tiny_llama):
    model = jaxtune.load_model(tiny_llama[1])
    return model.arch, {"params": model.params}


def test_greedy_stream_equals_generate_and_runs_max_new_tokens(llama):
    expected = batched(*llama)
    assert len(expected) == NEW  # no stop token: the whole budget
    assert streamed(*llama) == expected
    assert streamed(*llama, max_new_tokens=1) == expected[:1]  # prefill only, no decode step


def test_no_compile_per_token(llama):
    """A fresh cache size compiles the step once, however many tokens it then decodes."""
    before = gen._stream_step._cache_size()
    tokens = streamed(*llama, max_new_tokens=NEW + 3)
    assert len(tokens) == NEW + 3
    assert gen._stream_step._cache_size() - before <= 1


@pytest.mark.parametrize(
    "method",
    [
        {"method": "prefix", "num_virtual_tokens": 3},
        {"method": "lora", "target_modules": "all-linear", "rank": 4},
    ],
    ids=["prefix", "lora"],
)
def test_greedy_stream_with_peft_equals_generate(tiny_llama, llama, method):
    """Prefix keys/values are the cache's first slots (the step's slot index starts after them); LoRA acts in
    every step."""
    model = jaxtune.load_model(tiny_llama[1])
    adapters = acting_adapters(model, method)  # LoRA's B off zero: a step that skipped it would differ
    arch = model.arch.replace(peft=adapters.spec)
    variables = {"params": model.params, **adapters.variables}
    expected = batched(arch, variables)
    assert streamed(arch, variables) == expected
    assert expected != batched(*llama)  # the adapter changed the tokens: the equality above means something


def test_seeded_sampling_draws_what_sample_draws(llama):
    kw = dict(seed=3, temperature=0.8, top_k=20, top_p=0.95)
    expected = batched(*llama, **kw)  # generate -> sample, with PRNGKey(seed)
    assert streamed(*llama, **kw) == expected
    assert expected != batched(*llama)  # it did sample
    assert streamed(*llama, **{**kw, "seed": 4}) != expected


def test_stop_token_is_yielded_last(llama):
    free = batched(*llama)
    stop = free[3]
    cut = free.index(stop) + 1
    assert streamed(*llama, stop_ids=[stop, VOCAB + 5]) == free[:cut]
    assert streamed(*llama, stop_ids=[free[0]]) == free[:1]  # the first token, from the prefill


def test_longrope_crossing_streams_the_recomputed_tokens(tmp_path, caplog):
    """Phi-3 128k: a 3-token prompt whose generation crosses original_max_position_embeddings=8 decodes
    without the cache, as `generate` does, and says so."""
    save_hf("phi3_longrope", tmp_path)
    model = jaxtune.load_model(tmp_path)
    arch, variables = model.arch, {"params": model.params}
    with caplog.at_level(logging.WARNING, logger="jaxtune.generate"):
        tokens = streamed(arch, variables, PROMPT[:3])
    assert any("longrope" in r.getMessage() for r in caplog.records)
    assert tokens == batched(arch, variables, PROMPT[:3])
