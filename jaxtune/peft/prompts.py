"""Virtual-token methods: prompt tuning, P-tuning, prefix tuning / P-tuning v2 (`prompt` and `prefix` collections).

- Prompt tuning (Lester et al. 2021): P trainable embeddings prepended to the input. Initialised from the
  embeddings of `prompt_init_text` (tokenised, repeated / cut to P, as PEFT's `PromptTuningInit.TEXT`) or of P
  tokens sampled from the vocabulary (the paper's "sampled vocab", sec. 3.2, which beats random uniform;
  PEFT's RANDOM draws N(0, 1), far off the scale of real embeddings).
- P-tuning (Liu et al. 2021, "GPT Understands, Too"): the virtual tokens are the output of an encoder over P
  trainable embeddings — PEFT's `PromptEncoder`: MLP (D -> E -> E -> D, ReLU) or a 2-layer bidirectional LSTM
  (hidden E) followed by an MLP head (2E -> 2E -> D). The encoder trains; for inference and export it is
  folded into fixed virtual tokens (PEFT also saves only the encoder's output).
- Prefix tuning (Li & Liang 2021) / P-tuning v2 (Liu et al. 2022): learned keys and values [P, K, H] in every
  layer, initialised N(0, 1) like PEFT's `PrefixEncoder`; with `prefix_projection` they are produced at train
  time by PEFT's MLP (D -> E, tanh, E -> L*2*K*H) over P embeddings, and folded away for inference.

The model sees only plain collections ({"prompt": {"embeddings"}}, {"prefix": ... {"key", "value"}}):
`materialize` turns encoder parameters into them inside the differentiated step (`plan.merge_variables`), so
gradients reach the encoder, and `fold` does the same once for inference. How virtual tokens enter the
decoder (masks, positions, packing) is `models/adapters_hook.virtual_tokens` / `prefix_kv`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxtune.peft.names import PeftConfigError
from jaxtune.peft.parts import Context, Part


def _dense(key, n_in: int, n_out, dtype) -> dict:
    """torch.nn.Linear's default init: W, b ~ U(±1/sqrt(in)); `n_out` may be a shape tuple."""
    shape = n_out if isinstance(n_out, tuple) else (n_out,)
    bound = 1.0 / math.sqrt(n_in)
    kw, kb = jax.random.split(key)
    return {
        "kernel": jax.random.uniform(kw, (n_in, *shape), dtype, -bound, bound),
        "bias": jax.random.uniform(kb, shape, dtype, -bound, bound),
    }


def _apply_dense(p: dict, x):
    return jnp.tensordot(x, p["kernel"], axes=1) + p["bias"]


def init_embeddings(ctx: Context, n: int, key):
    """[P, D]: embeddings of `prompt_init_text` (repeated to P tokens) or of P sampled vocabulary tokens."""
    table = ctx.params["embed_tokens"]["embedding"]  # [V, D]
    text = ctx.cfg.prompt_init_text
    if text:
        tok = ctx.model.tokenizer
        if tok is None:
            raise PeftConfigError("prompt_init_text needs the model's tokenizer, and this model has none")
        ids = list(tok(text, add_special_tokens=False)["input_ids"]) or [0]
        ids = (ids * math.ceil(n / len(ids)))[:n]  # PEFT PromptTuningInit.TEXT: repeat, then cut
    else:
        ids = jax.random.randint(key, (n,), 0, table.shape[0])
    return jnp.take(table, jnp.asarray(ids), axis=0).astype(ctx.model.arch.weight_dtype)


def _lstm_params(key, n_in: int, hidden: int, dtype) -> dict:
    bound = 1.0 / math.sqrt(hidden)  # torch.nn.LSTM init
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w_ih": jax.random.uniform(k1, (n_in, 4 * hidden), dtype, -bound, bound),
        "w_hh": jax.random.uniform(k2, (hidden, 4 * hidden), dtype, -bound, bound),
        "b": jax.random.uniform(k3, (4 * hidden,), dtype, -2 * bound, 2 * bound),  # b_ih + b_hh
    }


def _lstm(p: dict, x, reverse: bool):
    """One LSTM direction over x [P, in] -> [P, H] (torch gate order i, f, g, o)."""
    hidden = p["w_hh"].shape[0]

    def step(carry, xt):
        h, c = carry
        i, f, g, o = jnp.split(xt @ p["w_ih"] + h @ p["w_hh"] + p["b"], 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((hidden,), x.dtype)
    _, hs = jax.lax.scan(step, (zeros, zeros), x, reverse=reverse)
    return hs


def build_prompt(ctx: Context) -> Part:
    n = ctx.cfg.num_virtual_tokens
    emb = init_embeddings(ctx, n, ctx.rng)
    return Part(trainable={"prompt": {"embeddings": emb}}, spec={"prompt_tokens": n})


def build_ptuning(ctx: Context) -> Part:
    cfg, arch = ctx.cfg, ctx.model.arch
    n, d = cfg.num_virtual_tokens, arch.hidden_size
    e = cfg.encoder_hidden_size or d
    dtype = arch.weight_dtype
    keys = jax.random.split(ctx.rng, 8)
    enc = {"embedding": init_embeddings(ctx, n, keys[0])}
    if cfg.ptuning_encoder == "mlp":
        enc["mlp"] = {
            "dense_0": _dense(keys[1], d, e, dtype),
            "dense_1": _dense(keys[2], e, e, dtype),
            "dense_2": _dense(keys[3], e, d, dtype),
        }
    else:
        enc["lstm"] = {
            "l0_fwd": _lstm_params(keys[1], d, e, dtype),
            "l0_bwd": _lstm_params(keys[2], d, e, dtype),
            "l1_fwd": _lstm_params(keys[3], 2 * e, e, dtype),
            "l1_bwd": _lstm_params(keys[4], 2 * e, e, dtype),
        }
        enc["head"] = {
            "dense_0": _dense(keys[5], 2 * e, 2 * e, dtype),
            "dense_1": _dense(keys[6], 2 * e, d, dtype),
        }
    return Part(trainable={"prompt": {"encoder": enc}}, spec={"prompt_tokens": n})


def build_prefix(ctx: Context) -> Part:
    cfg, arch = ctx.cfg, ctx.model.arch
    n, d, layers = cfg.num_virtual_tokens, arch.hidden_size, arch.num_layers
    kv = (arch.num_kv_heads, arch.head_dim)
    dtype = arch.weight_dtype
    k1, k2, k3, k4 = jax.random.split(ctx.rng, 4)
    if cfg.prefix_projection:
        e = cfg.encoder_hidden_size or d
        enc = {
            "embedding": jax.random.normal(k1, (n, d), dtype),
            "dense_in": _dense(k2, d, e, dtype),
            "dense_out": _dense(k3, e, (layers, 2, *kv), dtype),
        }
        tree = {"encoder": enc}
    else:
        key = jax.random.normal(k1, (layers, n, *kv), dtype)
        tree = {
            "layers": {"self_attn": {"key": key, "value": jax.random.normal(k4, (layers, n, *kv), dtype)}}
        }
    return Part(trainable={"prefix": tree}, spec={"prefix_tokens": n})


def _encode_prompt(enc: dict):
    x = enc["embedding"]  # [P, D]
    if "mlp" in enc:
        m = enc["mlp"]
        h = jax.nn.relu(_apply_dense(m["dense_0"], x))
        h = jax.nn.relu(_apply_dense(m["dense_1"], h))
        return _apply_dense(m["dense_2"], h)  # [P, D]
    lstm = enc["lstm"]
    h = x
    for layer in ("l0", "l1"):
        h = jnp.concatenate([_lstm(lstm[f"{layer}_fwd"], h, False), _lstm(lstm[f"{layer}_bwd"], h, True)], -1)
    head = enc["head"]
    return _apply_dense(head["dense_1"], jax.nn.relu(_apply_dense(head["dense_0"], h)))  # [P, D]


def _encode_prefix(enc: dict) -> dict:
    h = jnp.tanh(_apply_dense(enc["dense_in"], enc["embedding"]))  # [P, E]
    out = _apply_dense(enc["dense_out"], h)  # [P, L, 2, K, H]
    kv = jnp.moveaxis(out, 0, 2)  # [L, 2, P, K, H]
    return {"layers": {"self_attn": {"key": kv[:, 0], "value": kv[:, 1]}}}


def materialize(collections: dict) -> dict:
    """Replace encoder parameters by the virtual tokens / prefixes they produce (differentiable)."""
    out = dict(collections)
    if "encoder" in out.get("prompt", {}):
        out["prompt"] = {"embeddings": _encode_prompt(out["prompt"]["encoder"])}
    if "encoder" in out.get("prefix", {}):
        out["prefix"] = _encode_prefix(out["prefix"]["encoder"])
    return out
