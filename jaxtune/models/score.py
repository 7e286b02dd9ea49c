"""The scalar head of reward and value models: Hugging Face `*ForSequenceClassification`'s `score` Linear.

    params["score"]["kernel"]   [D, num_labels]   = HF `score.weight` [num_labels, D] transposed, no bias

It sits beside the decoder's own parameters in the same `params` tree (the path mirrors HF's module name, as
every other parameter does), so one `Decoder.apply` gives the hidden states and `token_scores` /
`sequence_scores` read the head from the same variables:

    hidden = Decoder(arch).apply(variables, ids, segment_ids, positions)      # [B, T, D]
    rewards = sequence_scores(arch, variables["params"], hidden, segment_ids)  # [B]: reward model (stage rm)
    values = token_scores(arch, variables["params"], hidden)                   # [B, T]: PPO value head

Users: `methods/rm.py` trains it with a Bradley-Terry loss; PPO reads a reward model exported by stage rm (or
any HF `*ForSequenceClassification` directory: `jaxtune.load_model` loads `score.weight` in place of the LM
head) and can start a value head with `init_score`. Like TRL (whose reward and value models are
`AutoModelForSequenceClassification`), the sequence score is the head applied to the final hidden state of the
last real token. HF pools the rightmost token whose id is not `config.pad_token_id`; jaxtune pools the last
token of segment 1 (segment ids, not token ids, mark padding), which is the same token whenever the pad id
does not end sequences — see `seq_cls_config` for the one case where they differ.
"""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.errors import RunError
from jaxtune.models.arch import ArchConfig
from jaxtune.models.families import TensorMap
from jaxtune.models.layers import INIT_STD, param_with_axes

log = logging.getLogger(__name__)

NUM_LABELS = 1  # a reward / value is one scalar; HF's num_labels
SCORE_MAP = TensorMap(("score", "kernel"), "score.weight", transpose=True)  # torch Linear [out, in]


class ScoreHead(nn.Module):
    """`score = nn.Linear(hidden_size, num_labels, bias=False)`, applied to every position."""

    arch: ArchConfig
    num_labels: int = NUM_LABELS

    @nn.compact
    def __call__(self, hidden):  # [B, T, D] -> [B, T, num_labels], fp32
        a = self.arch
        init = nn.initializers.normal(INIT_STD)  # HF's _init_weights: normal(0, initializer_range=0.02)
        kernel = param_with_axes(
            self, "kernel", init, (a.hidden_size, self.num_labels), a.weight_dtype, ("embed", None)
        )
        out = jnp.einsum("btd,dl->btl", hidden, kernel.astype(hidden.dtype))  # [B, T, L]
        return out.astype(jnp.float32)


def init_score(arch: ArchConfig, rng: jax.Array | int = 0, num_labels: int = NUM_LABELS) -> dict:
    """A fresh head: {"kernel": [D, num_labels]} (unboxed; `score_logical_axes` gives its sharding names)."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    hidden = jnp.zeros((1, 1, arch.hidden_size), arch.compute_dtype)
    return nn.meta.unbox(ScoreHead(arch, num_labels).init(rng, hidden))["params"]


def score_logical_axes(arch: ArchConfig, num_labels: int = NUM_LABELS):
    hidden = jax.ShapeDtypeStruct((1, 1, arch.hidden_size), arch.compute_dtype)
    boxed = jax.eval_shape(lambda: ScoreHead(arch, num_labels).init(jax.random.key(0), hidden))
    return nn.get_partition_spec(boxed)["params"]


def token_scores(arch: ArchConfig, params: dict, hidden: jax.Array) -> jax.Array:
    """Per-position scalar [B, T] (fp32) from `params["score"]` (num_labels must be 1)."""
    if "score" not in params:
        raise RunError("params hold no `score` head: init one with jaxtune.models.score.init_score, or load a "
                       "*ForSequenceClassification directory (a reward model exported by stage rm)")  # fmt: skip
    num_labels = params["score"]["kernel"].shape[-1]
    if num_labels != NUM_LABELS:
        raise RunError(f"score head has {num_labels} labels; a reward or value head has exactly 1")
    return ScoreHead(arch, num_labels).apply({"params": params["score"]}, hidden)[..., 0]


def last_token_index(segment_ids: jax.Array) -> jax.Array:
    """[B, T] segment ids (0 = padding) -> [B] index of the rightmost real token (left or right padding).

    The same reduction as HF's `(arange(T) * non_pad_mask).argmax(-1)`; an all-padding row gives 0."""
    t = segment_ids.shape[-1]
    return jnp.argmax(jnp.arange(t) * (segment_ids != 0), axis=-1)


def sequence_scores(arch: ArchConfig, params: dict, hidden: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """One scalar per row [B]: the head on the last real token's hidden state (HF's `pooled_logits`)."""
    idx = last_token_index(segment_ids)  # [B]
    last = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)  # [B, 1, D]
    return token_scores(arch, params, last)[:, 0]


def is_seq_cls(hf_config: dict) -> bool:
    """A `*ForSequenceClassification` config.json (its checkpoint has `score.weight`, no `lm_head.weight`)."""
    return any(a.endswith("ForSequenceClassification") for a in hf_config.get("architectures") or ())


def seq_cls_config(hf_config: dict, tokenizer=None, num_labels: int = NUM_LABELS) -> dict:
    """config.json of a causal LM -> the `AutoModelForSequenceClassification` one: architectures, num_labels
    (HF derives it from id2label) and pad_token_id (HF needs it to find the last token when batch > 1).

    HF pools the rightmost token that is not `pad_token_id`. When the tokenizer has no pad token of its own, or
    its pad token is its EOS (Llama 3), sequences that end in EOS are scored one token earlier by transformers
    than by jaxtune; that is logged, and a tokenizer with a distinct pad token avoids it."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as NAMES,
    )

    cfg = dict(hf_config)
    model_type = cfg.get("model_type")
    if model_type not in NAMES:
        raise RunError(f"transformers has no sequence-classification model for model_type {model_type!r}")
    cfg["architectures"] = [NAMES[model_type]]
    cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
    cfg["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    cfg["num_labels"] = num_labels
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else cfg.get("pad_token_id")
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else cfg.get("eos_token_id")
    if pad is None:
        pad = eos if not isinstance(eos, list) else eos[0]
    if pad is None:
        raise RunError("the reward model needs a pad token id for its config.json (HF pools the last token that "
                         "is not pad_token_id): give the tokenizer a pad token")  # fmt: skip
    if pad == eos or (isinstance(eos, list) and pad in eos):
        log.warning(
            "reward model export: pad_token_id=%d is also the EOS id, so transformers will score sequences that end "
            "in EOS at the token before it (jaxtune scores the EOS itself); use a tokenizer with a distinct pad token "
            "to make the two agree", pad,
        )  # fmt: skip
    cfg["pad_token_id"] = int(pad)
    return cfg


def swap_head(maps: dict, shapes: dict, score_shape: tuple[int, ...]) -> tuple[dict, dict]:
    """Tensor maps / shapes of a causal LM -> those of its `*ForSequenceClassification` checkpoint: the LM
    head (if untied) is replaced by `score` ([num_labels, D] in the file, `score_shape`)."""
    maps = {p: m for p, m in maps.items() if p[0] != "lm_head"}
    shapes = {p: s for p, s in shapes.items() if p[0] != "lm_head"}
    maps[SCORE_MAP.path] = SCORE_MAP
    shapes[SCORE_MAP.path] = tuple(score_shape[::-1])
    return maps, shapes
