"""Records -> token ids and per-token label weights (the label mask), exact at token level.

A record is rendered to one string with trained character spans (`templates.py` for named templates,
`jinja.py` for the tokenizer's own `chat_template`), tokenised once with offsets, and a token is trained
when its first character lies in a trained span. Defaults follow LLaMA-Factory/TRL: assistant and
function_call turns are trained, system/user/observation turns are not; `train_on_prompt` trains every token,
`mask_history` only the last assistant turn, and a message's `loss_weight` scales (or, at 0, masks) its turn.

`encode` returns `(ids, labels)` with the Hugging Face convention: labels[i] is ids[i] where token i is a
target, else -100 (unshifted; the model or `batching.py` shifts).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from jaxtune.data.errors import DataError
from jaxtune.data.jinja import render_jinja
from jaxtune.data.records import TRAINED_ROLES, Conversation, Preference, Text, where
from jaxtune.data.templates import Rendered, Template, get_template, render
from jaxtune.errors import RunError

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class Example:
    ids: np.ndarray  # [L] int32
    weights: np.ndarray  # [L] float32: label weight of token i (0 = not a target)
    prompt_len: int  # tokens before the final trained turn; truncation cuts this part first

    def __len__(self) -> int:
        return len(self.ids)


def _special(tokenizer, name: str) -> str:
    return getattr(tokenizer, name, None) or ""


@dataclasses.dataclass(frozen=True)
class Jinja:
    source: str | None = None  # None: the tokenizer's own chat_template


def resolve_template(tokenizer, template) -> Template | Jinja:
    """A named `Template`, or `Jinja` for the tokenizer's own chat_template or raw Jinja text."""
    if isinstance(template, Template | Jinja):
        return template
    if template in (None, "jinja", "tokenizer"):
        if getattr(tokenizer, "chat_template", None):
            return Jinja()
        raise RunError(
            "the tokenizer has no chat_template; set data.template to one of "
            "chatml, qwen, llama3, llama2, mistral, gemma, alpaca, vicuna (the model's own format)"
        )
    if "{%" in template or "{{" in template:  # raw Jinja text given in the config
        return Jinja(template)
    return get_template(template)


def message_weights(messages, mask_history: bool) -> list[float]:
    weights = [
        (m.loss_weight if m.loss_weight is not None else (1.0 if m.role in TRAINED_ROLES else 0.0))
        for m in messages
    ]
    if mask_history:
        last = max((i for i, m in enumerate(messages) if m.role in TRAINED_ROLES), default=None)
        weights = [w if i == last else 0.0 for i, w in enumerate(weights)]
    return weights


def render_record(
    record,
    tokenizer,
    template,
    messages,
    mask_history=False,
    generation_prompt=False,
    template_kwargs=None,
    rewritten_history="split",
) -> list[Rendered]:
    """The record's renders: the whole conversation, then any turns a Jinja template rewrites in history
    (`rewritten_history="split"`, see `jinja.py`)."""
    tmpl = resolve_template(tokenizer, template)
    weights = message_weights(messages, mask_history)
    if isinstance(tmpl, Jinja):
        loc = where(record)
        return render_jinja(
            tokenizer, tmpl.source, record.system, record.tools, messages, weights, loc, generation_prompt,
            template_kwargs, rewritten_history,
        )  # fmt: skip
    bos, eos = _special(tokenizer, "bos_token"), _special(tokenizer, "eos_token")
    return [render(tmpl, record.system, record.tools, messages, weights, bos, eos, generation_prompt)]


def _token_spans(rendered: Rendered, tokenizer) -> tuple[list[int], np.ndarray]:
    """Token ids of the whole text and each token's character range [start, end)."""
    try:
        enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    except (NotImplementedError, ValueError, TypeError, KeyError):
        pass
    # Tokenizers without offsets (slow, sentencepiece-only): tokenise the pieces between span boundaries
    # separately, as LLaMA-Factory does; each token then covers its whole piece.
    cuts = sorted(
        {0, len(rendered.text), rendered.response_start} | {c for s in rendered.spans for c in s[:2]}
    )
    ids, ranges = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        piece = tokenizer(rendered.text[a:b], add_special_tokens=False)["input_ids"]
        ids += piece
        ranges += [(a, b)] * len(piece)
    return ids, np.asarray(ranges, np.int64).reshape(-1, 2)


_KIND_CODES = {"assistant": 1, "function_call": 2}  # the turn kinds whose trained tokens are counted


def tokens_of(rendered: Rendered, tokenizer, train_on_prompt: bool = False, counts=None) -> Example:
    """Tokenise the whole text once; a token is trained when it overlaps a trained span (the rule of
    transformers' `return_assistant_tokens_mask`). `counts` (a Counter), if given, gets trained tokens by
    turn kind and the untrained ones."""
    ids, ranges = _token_spans(rendered, tokenizer)
    ids = np.asarray(ids, np.int32)
    starts, ends = ranges[:, 0], ranges[:, 1]
    weights = np.full(len(ids), 1.0 if train_on_prompt else 0.0, np.float32)
    # Each token's turn kind as a small code (an object array of strings costs more than the tokenisation).
    kinds = np.zeros(len(ids), np.int8) if counts is not None else None
    for start, end, w, kind in rendered.spans:
        hit = (ends > start) & (starts < end)
        weights[hit] = w
        if kinds is not None:
            kinds[hit] = _KIND_CODES.get(kind, len(_KIND_CODES) + 1)
    if counts is not None:
        trained = weights > 0
        for kind, code in _KIND_CODES.items():
            counts[f"trained ({kind})"] += int(np.count_nonzero((kinds == code) & trained))
        counts["not trained"] += int(np.count_nonzero(weights == 0))
    prompt_len = int((ends <= rendered.response_start).sum())
    return Example(ids, weights, prompt_len)


def encode_text(record: Text, tokenizer) -> Example:
    """Pre-training text: the tokenizer's own BOS convention, an EOS after each document, all trained."""
    ids = list(tokenizer(record.text, add_special_tokens=True)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    ids = np.asarray(ids, np.int32)
    return Example(ids, np.ones(len(ids), np.float32), 0)


def encode_examples(
    record,
    tokenizer,
    template=None,
    *,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    require_response: bool = True,
    template_kwargs: dict | None = None,
    rewritten_history: str = "split",
    counts=None,
) -> list[Example]:
    """One Conversation (or Text) -> its `Example`s: the whole conversation, then (for chat templates that
    rewrite history, with rewritten_history="split") one per rewritten turn. `counts`: see `tokens_of`; it
    also gets the turns the template rewrites, leaves untrained or drops the reasoning of."""
    if isinstance(record, Text):
        return [encode_text(record, tokenizer)]
    if not isinstance(record, Conversation):
        raise TypeError(f"encode_example takes a Conversation or Text, got {type(record).__name__}")
    if not record.messages:
        raise DataError("empty conversation", field="messages", reason="empty conversation", **where(record))
    if require_response and not any(m.role in TRAINED_ROLES for m in record.messages):
        raise DataError(
            "no assistant turn to train on", field="messages", reason="no response", **where(record)
        )
    renders = render_record(
        record, tokenizer, template, record.messages, mask_history,
        template_kwargs=template_kwargs, rewritten_history=rewritten_history,
    )  # fmt: skip
    mine = collections.Counter()  # added to `counts` once the row is known to train something
    examples = [tokens_of(r, tokenizer, train_on_prompt, mine) for r in renders]
    if require_response and not any((ex.weights > 0).any() for ex in examples):
        raise DataError(
            "no token of this row is trained (its assistant turns are masked, weighted 0 or not written by "
            "the chat template)",
            field="messages",
            reason="nothing trained",
            **where(record),
        )
    if counts is not None:
        counts.update(mine)
        head = renders[0]
        counts["turns rewritten by the template"] += head.rewritten
        counts["turns left untrained (rewritten_history=final)"] += head.untrained
        counts["turns whose reasoning the template drops"] += head.reasoning_dropped
        counts["tool-calling turns whose text the template drops"] += head.text_dropped
    return examples


def encode_example(record, tokenizer, template=None, **kw) -> Example:
    """One Conversation (or Text) -> the `Example` of the whole conversation (keywords: `encode_examples`'s).

    Turns a template rewrites in history are then trained as `rewritten_history` says, except that "split"
    examples are not made: this is one example.
    """
    if kw.get("rewritten_history", "split") == "split":
        kw = {**kw, "rewritten_history": "final"}
    return encode_examples(record, tokenizer, template, **kw)[0]


def encode_pair(record: Preference, tokenizer, template=None, **kw) -> tuple[Example, Example]:
    """Chosen and rejected, each rendered after the same prompt."""
    if not record.prompt:
        raise DataError("empty prompt", field="prompt", reason="empty conversation", **where(record))
    out = []
    for side in ("chosen", "rejected"):
        turns = getattr(record, side)
        if not turns:
            raise DataError(
                f"empty {side} response", field=side, reason="empty conversation", **where(record)
            )
        conv = Conversation(
            record.prompt + turns, record.system, record.tools, file=record.file, row=record.row
        )
        out.append(encode_example(conv, tokenizer, template, **kw))
    return out[0], out[1]


def encode_prompt(record: Conversation, tokenizer, template=None, template_kwargs=None) -> np.ndarray:
    """PPO/GRPO prompt: the conversation up to its last user turn, with the generation prompt appended."""
    messages = record.messages
    while messages and messages[-1].role in TRAINED_ROLES:
        messages = messages[:-1]
    if not messages:
        raise DataError("no prompt turn", field="messages", reason="empty conversation", **where(record))
    (rendered,) = render_record(
        record, tokenizer, template, messages, generation_prompt=True, template_kwargs=template_kwargs
    )
    return np.asarray(tokenizer(rendered.text, add_special_tokens=False)["input_ids"], np.int32)


def labels_of(ex: Example) -> list[int]:
    return [int(i) if w > 0 else IGNORE for i, w in zip(ex.ids, ex.weights)]


def encode(record, tokenizer, template=None, **kw):
    """`(ids, labels)` lists of ints; labels are -100 where not trained (HF convention, unshifted).

    For a `Preference` record: `((chosen_ids, chosen_labels), (rejected_ids, rejected_labels))`.
    Keyword options: train_on_prompt, mask_history.
    """
    if isinstance(record, Preference):
        chosen, rejected = encode_pair(record, tokenizer, template, **kw)
        return (chosen.ids.tolist(), labels_of(chosen)), (rejected.ids.tolist(), labels_of(rejected))
    ex = encode_example(record, tokenizer, template, **kw)
    return ex.ids.tolist(), labels_of(ex)
