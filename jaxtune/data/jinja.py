"""Render a record with the tokenizer's own Jinja `chat_template`, and find the trained character spans.

Spans come from rendering prefixes (the approach of TRL's and torchtune's prefix checks): the assistant turn
`i` occupies `render(messages[:i+1])` minus `render(messages[:i], add_generation_prompt=True)`, so the
generation prompt is excluded and the end-of-turn marker included, whatever the template's syntax. Trailing
whitespace after the end-of-turn marker is excluded (the model never generates it). This needs templates
whose renders of prefixes are prefixes of the full render; templates that rewrite history (e.g. strip
earlier `<think>` blocks) break that, and then sentinel characters placed around each assistant content
locate the spans instead, extended over the end-of-turn marker found from a probe render. A history turn
the template drops is then simply not trained.

Record roles map to the OpenAI convention templates expect: function_call -> assistant `tool_calls`,
observation -> `tool`.
"""

from __future__ import annotations

import functools
import json
import re

from jaxtune.data.errors import DataError
from jaxtune.data.templates import Rendered

_START, _END = "\ue000", "\ue001"  # private-use characters, absent from real data
_SENTINELS = re.compile(f"{_START}(\\d+){_START}|{_END}")


def hf_messages(system, messages, loc: dict) -> list[dict]:
    out = [{"role": "system", "content": system}] if system else []
    for i, m in enumerate(messages):
        if m.role == "function_call":
            try:
                calls = json.loads(m.content)
            except json.JSONDecodeError:
                raise DataError(
                    "function_call content must be JSON {'name', 'arguments'}",
                    field=f"messages[{i}]",
                    reason="bad tool call",
                    **loc,
                ) from None
            calls = calls if isinstance(calls, list) else [calls]
            tool_calls = [{"type": "function", "function": c} for c in calls]
            out.append({"role": "assistant", "content": "", "tool_calls": tool_calls})
        elif m.role == "observation":
            out.append({"role": "tool", "content": m.content})
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


def _render(tok, msgs, tools, gen: bool) -> str:
    """`tok` is (tokenizer, chat_template): None renders with the tokenizer's own template."""
    tokenizer, template = tok
    return tokenizer.apply_chat_template(
        msgs, tools=tools, tokenize=False, add_generation_prompt=gen, chat_template=template
    )


@functools.lru_cache(maxsize=64)
def _turn_end(tok) -> str:
    """The end-of-turn text a template writes after assistant content (e.g. `<|im_end|>`), from a probe."""
    probe = "\ue002"
    text = _render(
        tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}], None, False
    )
    return text[text.index(probe) + 1 :].rstrip() if probe in text else ""


def render_jinja(
    tokenizer, chat_template, system, tools, messages, weights, loc: dict, generation_prompt: bool = False
) -> Rendered:
    """`chat_template`: Jinja source, or None for the tokenizer's own."""
    tokenizer = (tokenizer, chat_template)
    msgs = hf_messages(system, messages, loc)
    off = 1 if system else 0
    tools = hf_tools(tools, loc)
    try:
        full = _render(tokenizer, msgs, tools, generation_prompt)
        if generation_prompt or not any(m.role in ("assistant", "function_call") for m in messages):
            return Rendered(full, (), len(full))
        return _by_prefixes(tokenizer, msgs, tools, messages, weights, off, full) or _by_sentinels(
            tokenizer, msgs, tools, messages, weights, off
        )
    except DataError as e:
        raise e.at(**loc) from None
    except Exception as e:  # template errors (raise_exception, bad roles) are about this record
        raise DataError(f"chat template failed: {e}", reason="template error", **loc) from None


def _by_prefixes(tokenizer, msgs, tools, messages, weights, off, full) -> Rendered | None:
    spans, response_start = [], len(full)
    for i, (m, w) in enumerate(zip(messages, weights)):
        if m.role not in ("assistant", "function_call"):
            continue
        j = i + off
        pre = _render(tokenizer, msgs[:j], tools, True) if j else ""
        upto = _render(tokenizer, msgs[: j + 1], tools, False)
        if not (upto.startswith(pre) and full.startswith(upto)):
            return None
        end = len(upto.rstrip())
        response_start = len(pre)
        if w > 0 and end > len(pre):
            spans.append((len(pre), end, w))
    return Rendered(full, tuple(spans), response_start)


def _by_sentinels(tokenizer, msgs, tools, messages, weights, off) -> Rendered:
    marked = [dict(m) for m in msgs]
    for i, m in enumerate(messages):
        if m.role == "assistant":
            marked[i + off]["content"] = f"{_START}{i}{_START}{m.content}{_END}"
        elif m.role == "function_call":
            raise DataError(
                "this chat template rewrites history; tool calls cannot be located in it",
                reason="template error",
            )
    text = _render(tokenizer, marked, tools, False)
    turn_end = _turn_end(tokenizer)
    out, spans, response_start, open_ = [], [], None, None
    pos = 0
    for match in _SENTINELS.finditer(text):
        out.append(text[pos : match.start()])
        here = sum(map(len, out))
        if match.group(1) is not None:
            open_ = (int(match.group(1)), here)
        elif open_ is not None:
            i, start = open_
            end = here + (len(turn_end) if text.startswith(turn_end, match.end()) and turn_end else 0)
            response_start = start
            if weights[i] > 0:
                spans.append((start, end, weights[i]))
            open_ = None
        pos = match.end()
    out.append(text[pos:])
    clean = "".join(out)
    return Rendered(clean, tuple(spans), len(clean) if response_start is None else response_start)
