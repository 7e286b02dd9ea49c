"""Message lists -> `Message`s: ShareGPT (`from`/`value`) and OpenAI/TRL (`role`/`content`) conventions.

Tag names are remappable exactly as LLaMA-Factory's `dataset_info.json` `tags` does (role_tag, content_tag,
user_tag, assistant_tag, observation_tag, function_tag, system_tag). The OpenAI convention adds `tool` (and the
older `function`, Llama's `ipython`) for tool results (with their `tool_call_id`), `developer` for system, and
assistant `tool_calls` (ids kept), which make a `function_call` message whose `content` is any text said beside
the calls; a ShareGPT `function_call` turn holds the JSON LLaMA-Factory stores ({"name", "arguments"}, or a
list). Assistant `reasoning_content` / `reasoning` / `thinking` become the message's `reasoning`.
"""

from __future__ import annotations

import json

from jaxtune.data.errors import DataError
from jaxtune.data.records import Message, ToolCall

SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "function_call",
    "system_tag": "system",
}
# Extra role names accepted under the OpenAI convention (they have no LLaMA-Factory tag).
_OPENAI_ALIASES = {"developer": "system", "function": "observation", "ipython": "observation"}
_TAG_TO_ROLE = {
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}


def role_map(tags: dict) -> dict[str, str]:
    mapping = {tags[key]: role for key, role in _TAG_TO_ROLE.items() if tags.get(key)}
    if tags.get("role_tag") == "role":
        for name, role in _OPENAI_ALIASES.items():
            mapping.setdefault(name, role)
    return mapping


def guess_tags(first_message) -> dict:
    """ShareGPT tags when the message has `from`, OpenAI tags when it has `role` (the common variants)."""
    if isinstance(first_message, dict) and "role" in first_message and "from" not in first_message:
        return dict(OPENAI_TAGS)
    return dict(SHAREGPT_TAGS)


def as_list(value, field: str, loc: dict) -> list:
    """A list, or a JSON string holding one (CSV and Parquet cells often store lists as JSON text)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(
                f"cell holds malformed JSON ({e.msg})", field=field, reason="malformed JSON", **loc
            ) from None
    if not isinstance(value, list | tuple):
        raise DataError(
            f"expected a list of messages, got {type(value).__name__}",
            field=field,
            reason="wrong type",
            **loc,
        )
    return list(value)


def text_content(value, field: str, loc: dict) -> str:
    """Message content as text: a string, or OpenAI content parts of type text (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        parts = []
        for i, part in enumerate(value):
            if part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                raise DataError(
                    f"content part of type '{part.get('type')}' is not supported (text only)",
                    field=f"{field}[{i}]",
                    reason="unsupported content",
                    **loc,
                )
            parts.append(part["text"])
        return "".join(parts)
    raise DataError(f"expected a string, got {type(value).__name__}", field=field, reason="wrong type", **loc)


def tool_calls(calls, field: str, loc: dict) -> tuple[ToolCall, ...]:
    """OpenAI `tool_calls` ([{id, type, function: {name, arguments}}]) or LLaMA-Factory's {name, arguments}."""
    out = []
    for i, call in enumerate(calls if isinstance(calls, list) else [calls]):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(
                "tool call needs a function name", field=f"{field}[{i}]", reason="bad tool call", **loc
            )
        args = fn.get("arguments", fn.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.dumps(json.loads(args), ensure_ascii=False)
            except json.JSONDecodeError:
                pass  # keep the model's raw argument text
        else:
            args = json.dumps(args, ensure_ascii=False)
        call_id = call.get("id") if isinstance(call, dict) else None
        if call_id is not None and not isinstance(call_id, str | int):
            raise DataError(
                f"tool call id must be a string, got {type(call_id).__name__}",
                field=f"{field}[{i}].id",
                reason="bad tool call",
                **loc,
            )
        out.append(ToolCall(fn["name"], args, None if call_id is None else str(call_id)))
    return tuple(out)


def _function_call(content: str, field: str, loc: dict) -> tuple[ToolCall, ...]:
    """A ShareGPT `function_call` turn: its value is the JSON of one call or a list of calls."""
    try:
        calls = json.loads(content)
    except json.JSONDecodeError:
        raise DataError(
            "function_call content must be JSON {'name', 'arguments'} (or a list of them)",
            field=field,
            reason="bad tool call",
            **loc,
        ) from None
    return tool_calls(calls, field, loc)


_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


def _reasoning(msg: dict, field: str, loc: dict) -> str | None:
    for key in _REASONING_KEYS:
        value = msg.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise DataError(
                    f"reasoning must be a string, got {type(value).__name__}",
                    field=f"{field}.{key}",
                    reason="wrong type",
                    **loc,
                )
            return value or None
    return None


def _loss_weight(msg: dict, field: str, loc: dict) -> float | None:
    for key in ("loss_weight", "weight"):
        if msg.get(key) is not None:
            w = msg[key]
            if isinstance(w, bool) or not isinstance(w, int | float) or w < 0:
                raise DataError(
                    f"loss weight must be a number >= 0, got {w!r}",
                    field=f"{field}.{key}",
                    reason="wrong type",
                    **loc,
                )
            return float(w)
    return None


def parse_messages(value, tags: dict, field: str, loc: dict) -> list[Message]:
    """Messages of one record; `field` is the column name, used in error messages."""
    items = as_list(value, field, loc)
    roles = role_map(tags)
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    out = []
    for i, msg in enumerate(items):
        here = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise DataError(
                f"expected a message object, got {type(msg).__name__}", field=here, reason="wrong type", **loc
            )
        if role_tag not in msg:
            raise DataError(
                f"message has no '{role_tag}' (keys: {sorted(msg)}); set tags.role_tag",
                field=here,
                reason="missing field",
                **loc,
            )
        name = msg[role_tag]
        role = roles.get(name)
        if role is None:
            raise DataError(
                f"unknown role {name!r} (expected one of {sorted(roles)}); map it with tags "
                f"(user_tag, assistant_tag, system_tag, function_tag, observation_tag)",
                field=f"{here}.{role_tag}",
                reason="unknown role",
                **loc,
            )
        weight = _loss_weight(msg, here, loc)
        if role == "assistant" and msg.get("tool_calls"):
            calls = tool_calls(msg["tool_calls"], f"{here}.tool_calls", loc)
            text = msg.get(content_tag)
            text = "" if text is None else text_content(text, f"{here}.{content_tag}", loc)
            out.append(Message("function_call", text, weight, calls, _reasoning(msg, here, loc)))
            continue
        if content_tag not in msg:
            raise DataError(
                f"message has no '{content_tag}' (keys: {sorted(msg)}); set tags.content_tag",
                field=here,
                reason="missing field",
                **loc,
            )
        content = text_content(msg[content_tag], f"{here}.{content_tag}", loc)
        if role == "function_call":
            calls = _function_call(content, f"{here}.{content_tag}", loc)
            out.append(Message(role, "", weight, calls, _reasoning(msg, here, loc)))
        elif role == "assistant":
            out.append(Message(role, content, weight, reasoning=_reasoning(msg, here, loc)))
        elif role == "observation":
            call_id = msg.get("tool_call_id")
            out.append(Message(role, content, weight, tool_call_id=None if call_id is None else str(call_id)))
        else:
            out.append(Message(role, content, weight))
    return out


def split_system(messages: list[Message], field: str, loc: dict) -> tuple[str | None, list[Message]]:
    """A leading system message becomes the record's system prompt; a later one is an error."""
    system, offset = None, 0
    if messages and messages[0].role == "system":
        system, messages, offset = messages[0].content, messages[1:], 1
    for i, m in enumerate(messages):
        if m.role == "system":
            raise DataError(
                "a system message may only come first",
                field=f"{field}[{i + offset}]",
                reason="misplaced system",
                **loc,
            )
    return system, messages


_PROMPT_SIDE, _MODEL_SIDE = ("user", "observation"), ("assistant", "function_call")


def _order_problem(role: str, prev: str | None, results: int, calls: int) -> tuple[str, str] | None:
    """(reason, explanation) when `role` may not follow `prev`; None when it may."""
    if prev is None:
        if role in _MODEL_SIDE:
            return "starts with an assistant turn", "the conversation starts with an assistant turn"
        if role == "observation":
            return "tool result without a tool call", "the conversation starts with a tool result"
        return None
    if role == "user" and prev == "user":
        return "two user turns in a row", "two user turns in a row"
    if role == "user" and prev == "observation":
        return "user turn after a tool result", "a user turn right after a tool result (the assistant answers it)"
    if role in _MODEL_SIDE and prev in _MODEL_SIDE:
        return "two assistant turns in a row", "two assistant turns in a row"
    if role == "observation" and prev not in ("function_call", "observation"):
        return "tool result without a tool call", f"a tool result right after a {prev} turn, not a tool call"
    if role == "observation" and prev == "observation" and results >= calls:
        return "more tool results than tool calls", f"more tool results than the {calls} tool call(s) before them"
    return None


def check_order(messages, field: str, loc: dict, role_tag: str | None, offset: int = 0, after: str | None = None):
    """Turn order as LLaMA-Factory requires it, after an optional system message (already split off): a user
    turn first, then user and assistant alternate; an assistant turn may call tools (function_call), whose
    results (observation: one per call, several for parallel calls) come right after it and are answered by
    the assistant. `after`: the role before `messages[0]` (a chosen response after its prompt); `offset`: the
    index of `messages[0]` in the column (1 when a system message was split off), for the field name (`role_tag`
    None: the column holds a plain string, the field is the column). Whether
    the conversation must end with the assistant depends on what it trains (SFT or a PPO prompt): see
    `items.Encoder`."""
    prev, results, calls = after, 0, 0
    for i, m in enumerate(messages):
        problem = _order_problem(m.role, prev, results, calls)
        if problem is not None:
            reason, what = problem
            raise DataError(
                f"{what}: after an optional system message, turns alternate user / assistant, starting with "
                "the user; tool results follow the assistant's tool call",
                field=f"{field}[{i + offset}].{role_tag}" if role_tag else field,
                reason=reason,
                **loc,
            )
        if m.role == "function_call":
            results, calls = 0, max(1, len(m.tool_calls))
        elif m.role == "observation":
            results += 1
        prev = m.role
