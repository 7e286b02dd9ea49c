"""Rollouts shared by the RL stages (methods/ppo.py, methods/grpo.py): sample, join, decode, score per token.

    tokens, keep = sample_completions(ctx, policy_vars, prompts, rng)   # KV-cache sampling, jitted
    batch = join(prompt_ids, prompt_mask, tokens, keep)                  # TokenBatch [B, P + N]
    texts = decode(ctx, tokens, keep)                                    # for reward functions
    logp = token_logps(lm, variables, batch, temperature)                # [B, P + N], jitted

A joined row is [left padding, prompt, completion, padding after the stop token]; segment ids mark prompt and
completion as one document, so positions run on from the prompt exactly as during sampling. `targets[t]` is
the token at t + 1 and `loss_mask[t]` is 1 where that token was generated (the stop token included): the
per-token quantities of PPO/GRPO (log-probs, KL, values, advantages) all live at those positions.

Log-probs are those of the sampling distribution softmax(logits / T): the LM head is linear without bias
(LoRA, DoRA, IA3 and quantised heads too), so dividing the final hidden state by T divides the logits by T.
Top-k / top-p truncation is not modelled (as in TRL), so use them with care in RL.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.data.batch import PromptBatch, TokenBatch
from jaxtune.errors import RunError
from jaxtune.generate import cut_at_stop, sample, stop_array
from jaxtune.methods.forward import LM
from jaxtune.methods.logps import TokenStats, token_stats
from jaxtune.models import longrope
from jaxtune.models.adapters_hook import without_adapters
from jaxtune.models.decoder import Decoder, segment_positions


@dataclass
class RolloutContext:
    """What every rollout needs besides the variables: built once per run by the method's `setup`."""

    lm: LM  # the policy
    ref_lm: LM  # the reference: the policy's architecture without virtual tokens / prefixes
    tokenizer: Any
    generation: Any  # GenerationConfig: max_new_tokens, temperature, top_k, top_p, stop strings
    stop_ids: tuple[int, ...]
    reward: Any  # (prompts, completions, answers) -> list[float], or None (PPO with a reward model)
    extra: dict = dataclasses.field(default_factory=dict)  # method-specific (e.g. PPO's reward model)
    train_lm: Any = None  # what the update step's loss_fn is applied with; None: `lm`


def reference_arch(arch):
    """The reference model's architecture: adapter collections are dropped, so virtual tokens and prefixes
    (and the position offset they imply) must go too; quantisation and layer split stay (they are the base)."""
    return arch.replace(
        peft=dataclasses.replace(arch.peft, prompt_tokens=0, prefix_tokens=0), neftune_alpha=0.0
    )


def policy_and_reference(variables: dict) -> tuple[dict, dict]:
    """(policy, reference) variables from the step's merged variables: see methods/reference.py (adapters off
    under PEFT; the frozen copy of the trained base leaves under full fine-tuning). Method-private collections
    (PPO's `value`) are dropped from both."""
    from jaxtune.methods.reference import split

    policy, ref = split({k: v for k, v in variables.items() if k != "value"})
    return policy, without_adapters(ref)


def stop_ids_of(tokenizer, hf_config: dict | None = None) -> tuple[int, ...]:
    ids = {getattr(tokenizer, "eos_token_id", None)}
    eos = (hf_config or {}).get("eos_token_id")
    ids |= set(eos) if isinstance(eos, list) else {eos}
    return tuple(sorted(int(i) for i in ids if i is not None))


def sample_completions(ctx: RolloutContext, variables: dict, prompts: TokenBatch, rng, repeat: int = 1,
                       greedy: bool = False):  # fmt: skip
    """Sample `repeat` completions per prompt row (rows i*repeat .. i*repeat + repeat - 1 share prompt i), or
    the greedy one. Returns (prompt ids [B*repeat, P], prompt mask, tokens [B*repeat, N], keep) as numpy."""
    ids = np.repeat(np.asarray(prompts.input_ids), repeat, axis=0)
    mask = np.repeat((np.asarray(prompts.segment_ids) > 0).astype(np.int32), repeat, axis=0)
    g = ctx.generation
    settings = dict(temperature=0.0, top_k=0, top_p=1.0) if greedy else dict(
        temperature=float(g.temperature), top_k=int(g.top_k), top_p=float(g.top_p))  # fmt: skip
    longest = int(mask.sum(1).max()) if mask.size else 0
    crossing = longrope.cache_crossing(ctx.lm.arch, longest, longest + int(g.max_new_tokens))
    if crossing:  # the cached sampler would keep short-factor keys where transformers recomputes with long ones
        raise RunError(
            f"{crossing.split(', where')[0]}: rollouts sample with the KV cache, which cannot switch the RoPE "
            "factors mid-generation; keep prompt + generation.max_new_tokens within "
            "original_max_position_embeddings, or start past it (longer prompts)"
        )
    tokens, keep = sample(ctx.lm.arch, variables, ids, mask, rng, stop_array(ctx.stop_ids),
                          max_new_tokens=g.max_new_tokens, **settings)  # fmt: skip
    return ids, mask, np.asarray(tokens), np.asarray(keep)


def rewards(
    ctx: RolloutContext, prompts: PromptBatch, ids, mask, tokens, keep, repeat: int = 1
) -> np.ndarray:
    """One reward per completion [B*repeat]: the reward model's score of the joined sequence when the run has
    one (`ctx.extra["reward_model"]`), else the reward function(s) over the decoded texts."""
    if "reward_model" in ctx.extra:
        return ctx.extra["reward_model"](join(ids, mask, tokens, keep))
    answers = [a for a in prompts.answers for _ in range(repeat)]
    values = ctx.reward(prompt_texts(ctx, prompts.prompts, repeat), decode(ctx, tokens, keep), answers)
    return np.asarray(values, np.float32)


def join(prompt_ids, prompt_mask, tokens, keep) -> TokenBatch:
    """Left-padded prompts [B, P] + completions [B, N] -> one TokenBatch [B, P + N] (module docstring)."""
    keep = np.asarray(keep, bool)
    ids = np.concatenate([prompt_ids, np.where(keep, tokens, 0)], axis=1).astype(np.int32)
    seg = np.concatenate([np.asarray(prompt_mask) > 0, keep], axis=1).astype(np.int32)
    generated = np.concatenate([np.zeros_like(prompt_mask, bool), keep], axis=1)
    targets = np.zeros_like(ids)
    # the next token of the same document (the pipeline's convention), 0 where there is none
    targets[:, :-1] = np.where((seg[:, 1:] > 0) & (seg[:, :-1] > 0), ids[:, 1:], 0)
    loss_mask = np.zeros(ids.shape, np.float32)
    loss_mask[:, :-1] = generated[:, 1:]
    positions = np.where(seg > 0, np.asarray(segment_positions(jnp.asarray(seg))), 0)  # padding at 0
    return TokenBatch(ids, targets, loss_mask, seg, positions.astype(np.int32))


def decode(ctx: RolloutContext, tokens, keep) -> list[str]:
    """Completion texts for reward functions: special tokens skipped, cut at the first stop string."""
    texts = [ctx.tokenizer.decode(row[k].tolist(), skip_special_tokens=True) for row, k in zip(tokens, keep)]
    return [cut_at_stop(t, ctx.generation.stop)[0] for t in texts]


def prompt_texts(ctx: RolloutContext, prompts: TokenBatch, repeat: int = 1) -> list[str]:
    rows = [
        row[s > 0].tolist() for row, s in zip(np.asarray(prompts.input_ids), np.asarray(prompts.segment_ids))
    ]
    texts = ctx.tokenizer.batch_decode(rows, skip_special_tokens=True)
    return [t for t in texts for _ in range(repeat)]


def stats_from_hidden(lm: LM, variables, hidden, targets, temperature: float = 1.0) -> TokenStats:
    """Token stats of softmax(logits / temperature) from final hidden states [B, T, D]."""
    if temperature not in (0.0, 1.0):
        hidden = hidden / jnp.asarray(temperature, hidden.dtype)  # the head is linear: logits / T
    decoder = Decoder(lm.arch)
    head = lambda h: decoder.apply(variables, h, method=Decoder.logits)
    return token_stats(head, hidden, targets, lm.chunk)


def stats(
    lm: LM, variables, batch: TokenBatch, temperature: float = 1.0, rng=None, train=False
) -> TokenStats:
    """`LM.stats` of softmax(logits / temperature) (the distribution sampling draws from)."""
    hidden = lm.hidden(variables, batch, rng, train)  # [B, T, D]
    return stats_from_hidden(lm, variables, hidden, batch.targets, temperature)


def stats_moe(lm: LM, variables, batch: TokenBatch, temperature: float = 1.0, rng=None, train=False):
    """`stats` and the MoE router losses of the pass (None for a dense model): the policy update's forward."""
    hidden, losses = lm.hidden_moe(variables, batch, rng, train)  # [B, T, D]
    return stats_from_hidden(lm, variables, hidden, batch.targets, temperature), losses


@partial(jax.jit, static_argnames=("lm", "temperature"))
def token_logps(lm: LM, variables, batch: TokenBatch, temperature: float = 1.0):
    """log p(target) [B, T] in eval mode (no dropout), no gradient."""
    return jax.lax.stop_gradient(stats(lm, variables, batch, temperature).logp)


def masked_mean(x, mask) -> float:
    return float((np.asarray(x) * mask).sum() / max(float(np.sum(mask)), 1.0))
