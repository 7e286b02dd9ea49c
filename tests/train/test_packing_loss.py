"""Packing is loss-neutral: the per-token losses of documents packed into one row (segment ids, per-segment
positions) equal those of each document run alone, through the real model and the SFT loss."""

import chex
import jax
import numpy as np

import jaxtune
from jaxtune import demo
from jaxtune.data import batching, loading
from jaxtune.data.tokenize import encode_example
from jaxtune.methods.forward import LM


def test_packed_row_gives_the_same_token_losses_as_each_sample_alone(tmp_path):
    tok = demo.char_tokenizer()
    path = tmp_path / "demo.json"
    path.write_text(__import__("json").dumps(demo.samples(12, seed=3, min_len=3, max_len=9)))
    examples = [encode_example(r, tok) for r in loading.load(str(path))]
    model = jaxtune.from_hf_config(dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), rng=1)
    lm = LM(model.arch)
    variables = {"params": model.params}
    seq_len = 128
    rows = [[examples[i] for i in row] for row in batching.pack([len(e) for e in examples], seq_len)]
    assert any(len(r) >= 3 for r in rows), "the test needs rows holding several documents"
    packed = batching.token_batch(rows, seq_len)
    stats_fn = jax.jit(lm.stats)
    stats = stats_fn(variables, packed)
    nll = -np.asarray(stats.logp) * packed.loss_mask  # [B, T] per-token loss where trained

    # every document alone in its own row, right-padded (one compiled shape)
    order = [e for row in rows for e in row]
    alone = batching.token_batch([[e] for e in order], max(len(e) for e in order))
    alone_nll = -np.asarray(stats_fn(variables, alone).logp) * alone.loss_mask
    i = 0
    for r, row in enumerate(rows):
        t = 0
        for e in row:
            chex.assert_trees_all_close(nll[r, t:t + len(e)], alone_nll[i, :len(e)], atol=2e-5, rtol=1e-5)
            t, i = t + len(e), i + 1
    # hence the SFT objective (mean over trained tokens) equals the unpacked one
    np.testing.assert_allclose(nll.sum() / packed.loss_mask.sum(), alone_nll.sum() / alone.loss_mask.sum(), rtol=1e-5)
