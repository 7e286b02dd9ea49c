"""Render a record with a Jinja `chat_template` (the tokenizer's own, or one given in the config) and find the
character spans to train.

The text is exactly `tokenizer.apply_chat_template(messages, tools=tools, **template_kwargs)`. What is trained
of it is what the model generates: each assistant turn as the template writes it after the generation prompt
(so Qwen3's `<think>` block and Mistral's space after `[/INST]` are trained) up to and including the turn's own
end marker (`<|im_end|>`, `<|eot_id|>`, `<|end|>`, `</s>`, `<end_of_turn>`, `<｜end▁of▁sentence｜>`...), never
the next role header, the newline after the marker or an end-of-text the template appends after the last turn.

How a turn is found, for any template:
1. **As the last turn.** Turn `i` as the model produces it at inference is `render(messages[:i+1])` after
   `render(messages[:i], add_generation_prompt=True)`, cut after the end marker. The end marker is learnt once
   per template from two probe renders (the tokens a probe answer is followed by both when it ends the
   conversation and when a user turn follows it).
2. **In the whole conversation.** Where that text sits at the same place in the whole render, it is trained
   there. Otherwise sentinel characters placed around each answer locate it, and it is trained there if the
   template writes it there exactly as it would as the last turn (Mistral v0.3, which moves the system prompt
   into the last user turn, is found this way).
3. **Templates that rewrite history** write some earlier turns differently (Qwen3 and QwQ drop the reasoning of
   turns before the last user message; Qwen3 writes the empty `<think>` block only in the final turn). What is
   trained then is `data.rewritten_history`:
   - `split` (default): each such turn becomes an example of its own, the conversation up to and including
     it, with that turn trained as the template renders it last: every turn is trained as the model will
     produce it at inference, at the cost of repeating the history;
   - `final`: only the whole conversation, and the rewritten turns are not trained (counted in the log);
   - `as_rendered`: only the whole conversation, every turn trained as it is written there (what a
     `{% generation %}` mask over that template gives; earlier turns then train without their reasoning).
A template with `{% generation %}` blocks defines its own assistant mask, which is used as it is.

Record roles map to the OpenAI convention templates expect: function_call -> assistant with `tool_calls`
(`{id, type: function, function: {name, arguments}}`, arguments as an object when they are JSON) and its
content, observation -> `tool` with its `tool_call_id`. Templates that read tool-call ids (Mistral's) get ids
generated (9 alphanumerics, stable per turn) where the data has none, and each tool result then answers the
calls before it in order. Reasoning goes in `reasoning_content` for templates that read a reasoning field;
for the others it is written into the content as `<think>...</think>` (DeepSeek-R1's convention), and a
template that then drops it (DeepSeek-R1-Distill keeps only the text after `</think>`) is counted and logged.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re

from jaxtune.data.errors import DataError
from jaxtune.data.records import TRAINED_ROLES as TRAINED
from jaxtune.data.templates import THINK, Rendered
from jaxtune.data.turns import Turn, as_rendered, locate, shape, turn

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
_READS_REASONING = re.compile(r"""\.(reasoning_content|reasoning|thinking)\b|\[\s*['"](reasoning_content|reasoning|thinking)['"]\s*\]""")  # fmt: skip
_READS_IDS = re.compile(r"""tool_call_id|tool_call\.id\b|\[\s*['"]id['"]\s*\]""")
_ALNUM = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
HISTORY_POLICIES = ("split", "final", "as_rendered")
# apply_chat_template's own parameters: a template variable of these names cannot be passed through.
RESERVED_KWARGS = frozenset(
    ("conversation", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
     "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
     "return_assistant_tokens_mask", "tokenizer_kwargs")
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Chat:
    """What renders: a tokenizer, a template (None: the tokenizer's own) and extra template variables."""

    tokenizer: object
    source: str | None = None
    kwargs_json: str = "{}"  # template variables (e.g. enable_thinking), as JSON so the Chat is hashable

    @functools.cached_property
    def kwargs(self) -> dict:
        return json.loads(self.kwargs_json)

    @functools.cached_property
    def text(self) -> str:
        """The template's Jinja source."""
        try:
            return self.tokenizer.get_chat_template(self.source)
        except Exception:  # duck-typed tokenizers: the source given, or the tokenizer's attribute
            return self.source or getattr(self.tokenizer, "chat_template", "") or ""

    @functools.cached_property
    def reads_reasoning(self) -> bool:
        return bool(_READS_REASONING.search(self.text))

    @functools.cached_property
    def reads_ids(self) -> bool:
        return bool(_READS_IDS.search(self.text))

    def render(self, msgs: list[dict], tools, gen: bool = False) -> str:
        if not msgs:
            return ""
        return self.tokenizer.apply_chat_template(
            msgs, tools=tools, tokenize=False, add_generation_prompt=gen, chat_template=self.source,
            **self.kwargs,
        )  # fmt: skip


def chat_for(tokenizer, source: str | None, kwargs: dict | None) -> Chat:
    kwargs = dict(kwargs or {})
    clash = sorted(RESERVED_KWARGS & set(kwargs))
    if clash:
        raise DataError(
            f"template_kwargs may not set {', '.join(clash)} (apply_chat_template's own parameters)",
            field="template_kwargs",
            reason="bad template kwargs",
        )
    return _chat(tokenizer, source, json.dumps(kwargs, sort_keys=True, default=str))


@functools.lru_cache(maxsize=64)
def _chat(tokenizer, source: str | None, kwargs_json: str) -> Chat:
    """One `Chat` per template, so its source lookup and regex probes run once, not once per record."""
    return Chat(tokenizer, source, kwargs_json)


def _call_id(i: int, k: int, call) -> str:
    """A stable 9-character id for call `k` of message `i` (Mistral's templates require exactly that shape)."""
    n = int.from_bytes(hashlib.sha1(f"{i}:{k}:{call.name}:{call.arguments}".encode()).digest()[:8], "big")
    return "".join(_ALNUM[(n // 62**d) % 62] for d in range(9))


def _arguments(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def hf_messages(chat: Chat, system, messages) -> list[dict]:
    """Record messages -> the OpenAI-style dicts chat templates read."""
    out = [{"role": "system", "content": system}] if system else []
    pending: list[str] = []  # ids of the calls still waiting for a result
    for i, m in enumerate(messages):
        if m.role in TRAINED:
            content = m.content
            d = {"role": "assistant"}
            if m.reasoning and chat.reads_reasoning:
                d["reasoning_content"] = m.reasoning
            elif m.reasoning:
                content = THINK.replace("{reasoning}", m.reasoning) + content
            d["content"] = content
            if m.tool_calls:
                calls = []
                for k, c in enumerate(m.tool_calls):
                    call = {
                        "type": "function",
                        "function": {"name": c.name, "arguments": _arguments(c.arguments)},
                    }
                    call_id = c.id or (_call_id(i, k, c) if chat.reads_ids else None)
                    if call_id is not None:
                        call["id"] = call_id
                    calls.append(call)
                pending = [c["id"] for c in calls if "id" in c]
                d["tool_calls"] = calls
            out.append(d)
        elif m.role == "observation":
            d = {"role": "tool", "content": m.content}
            call_id = m.tool_call_id or (pending[0] if pending else None)
            if m.tool_call_id in pending:
                pending.remove(m.tool_call_id)
            elif pending and call_id == pending[0]:
                pending.pop(0)
            if call_id is not None:
                d["tool_call_id"] = call_id
            out.append(d)
        else:
            out.append({"role": m.role, "content": m.content})
    return out


def hf_tools(tools: str | None, loc: dict):
    if not tools:
        return None
    try:
        specs = json.loads(tools)
    except json.JSONDecodeError as e:
        raise DataError(
            f"tools must be JSON function specs ({e.msg})", field="tools", reason="bad tools", **loc
        ) from None
    specs = specs if isinstance(specs, list) else [specs]
    return [
        s if "function" in s and s.get("type") == "function" else {"type": "function", "function": s}
        for s in specs
    ]


def _check_calls(m, t: Turn, full: str, span) -> None:
    """A template without tool support writes a tool-calling turn as an empty answer: refuse to train that."""
    if not m.tool_calls:
        return
    text = full[span[0] : span[1]] if span is not None else (t.text if t.text is not None else t.upto)
    missing = sorted({c.name for c in m.tool_calls if c.name not in text})
    if missing:
        raise DataError(
            f"the chat template does not write this turn's tool calls ({', '.join(missing)}): use a "
            "template with tool support (data.template), or drop the tool turns",
            field=f"messages[{t.i}]",
            reason="template drops tool calls",
        )


# ---- the record -------------------------------------------------------------------------------------------


def render_jinja(
    tokenizer,
    chat_template,
    system,
    tools,
    messages,
    weights,
    loc: dict,
    generation_prompt: bool = False,
    template_kwargs: dict | None = None,
    history: str = "split",
) -> list[Rendered]:
    """The record's renders: the whole conversation first, then (history="split") one per rewritten turn.

    `chat_template`: Jinja source, or None for the tokenizer's own.
    """
    if history not in HISTORY_POLICIES:
        raise DataError(
            f"rewritten_history must be one of {', '.join(HISTORY_POLICIES)}, got {history!r}",
            field="rewritten_history",
            reason="bad option",
        )
    chat = chat_for(tokenizer, chat_template, template_kwargs)
    msgs = hf_messages(chat, system, messages)
    tools = hf_tools(tools, loc)
    try:
        full = chat.render(msgs, tools, generation_prompt)
        if generation_prompt or not any(m.role in TRAINED for m in messages):
            return [Rendered(full, (), len(full))]
        if _GENERATION.search(chat.text):
            return [_by_generation(chat, msgs, tools, messages, weights, full)]
        return _by_turns(chat, msgs, tools, messages, weights, 1 if system else 0, full, history)
    except DataError as e:
        raise e.at(**loc) from None
    except Exception as e:  # template errors (raise_exception, bad roles) are about this record
        raise DataError(f"chat template failed: {e}", reason="template error", **loc) from None


def _by_turns(chat, msgs, tools, messages, weights, off, full, history) -> list[Rendered]:
    sh = shape(chat)
    turns = [turn(chat, msgs, tools, i, i + off, sh) for i, m in enumerate(messages) if m.role in TRAINED]
    found, cores = locate(chat, msgs, tools, turns, full, sh)
    for t in turns:
        _check_calls(messages[t.i], t, full, found[t.i])
    spans, extra, rewritten, untrained = {}, [], 0, 0
    for t in turns:
        w, kind = weights[t.i], messages[t.i].role
        if found[t.i] is not None:
            spans[t.i] = (*found[t.i], w, kind)
            continue
        rewritten += 1
        lo = max((s[1] for i, s in found.items() if s is not None and i < t.i), default=0)
        hi = min((s[0] for i, s in found.items() if s is not None and i > t.i), default=len(full))
        if history == "as_rendered" and (span := as_rendered(t, full, cores.get(t.i), sh, lo, hi)):
            spans[t.i] = (*span, w, kind)
        elif history == "split" and w > 0:
            span = locate(chat, msgs[: t.j + 1], tools, [t], t.upto, sh)[0][t.i]
            if span is None:
                raise DataError(
                    "the chat template does not write this assistant turn in a form that can be located",
                    field=f"messages[{t.i}]",
                    reason="template error",
                )
            extra.append(Rendered(t.upto, ((*span, w, kind),), span[0]))
        elif w > 0:
            untrained += 1
    trained = tuple(s for s in sorted(spans.values()) if s[2] > 0)
    response_start = max((s[0] for s in spans.values()), default=len(full))
    texts = [full] + [r.text for r in extra]
    unwritten = lambda part: part and not any(part.strip() in text for text in texts)  # noqa: E731
    dropped = sum(1 for m in messages if m.role in TRAINED and unwritten(m.reasoning))
    said = sum(1 for m in messages if m.role == "function_call" and unwritten(m.content))
    main = Rendered(full, trained, response_start, rewritten, untrained, dropped, said)
    return ([main] if trained or not extra else []) + extra


def _by_generation(chat, msgs, tools, messages, weights, full) -> Rendered:
    """The template's own `{% generation %}` blocks are the assistant mask."""
    from transformers.utils.chat_template_utils import render_jinja_template

    special = dict(getattr(chat.tokenizer, "special_tokens_map", {}) or {})
    texts, blocks = render_jinja_template(
        conversations=[msgs], tools=tools, chat_template=chat.text, return_assistant_tokens_mask=True,
        **{**special, **chat.kwargs},
    )  # fmt: skip
    if texts[0] != full:
        raise DataError(
            "the {% generation %} render differs from the chat template's", reason="template error"
        )
    turns = [i for i, m in enumerate(messages) if m.role in TRAINED]
    blocks = [tuple(b) for b in blocks[0]]
    if len(blocks) == len(turns):
        spans = [(a, b, weights[i], messages[i].role) for (a, b), i in zip(blocks, turns)]
    elif len({weights[i] for i in turns}) <= 1:
        w = weights[turns[0]] if turns else 1.0
        spans = [(a, b, w, "assistant") for a, b in blocks]
    else:
        raise DataError(
            f"per-turn loss weights need one {{% generation %}} block per assistant turn "
            f"({len(turns)} turns, {len(blocks)} blocks)",
            field="messages",
            reason="template error",
        )
    start = spans[-1][0] if spans else len(full)
    return Rendered(full, tuple(s for s in spans if s[2] > 0), start)
