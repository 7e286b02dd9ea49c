"""Conversation cases for chat-template tests, as plain data.

Every case is ``(case_id, messages, tools)``: ``messages`` is a list of
OpenAI-style message dicts, ``tools`` a list of JSON function specs or
``None``. Tool-call ids are 9 alphanumeric characters, as Mistral's
template requires; tool-call ``arguments`` are dicts, as transformers
documents. Every conversation has at least two assistant turns.

``cases_for(supports)`` picks the cases a template family can render, from
the ``supports`` block of ``tests/data/templates/families.json``.
"""

from __future__ import annotations

import copy

SYSTEM_EN = "You are a concise assistant. Answer in one or two sentences."
SYSTEM_ZH = "你是一个简洁的助手，请用一两句话回答。"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}

CALC_TOOL = {
    "type": "function",
    "function": {
        "name": "calculate",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 12*7"}},
            "required": ["expression"],
        },
    },
}

TOOLS = [WEATHER_TOOL, CALC_TOOL]


def _with_system(system: str, messages: list) -> list:
    return [{"role": "system", "content": system}] + messages


# --- plain multi-turn ---------------------------------------------------------

EN_CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And roughly how many people live there?"},
    {"role": "assistant", "content": "About 2.1 million people live in the city of Paris itself."},
]

ZH_CHAT = [
    {"role": "user", "content": "中国的首都是哪里？"},
    {"role": "assistant", "content": "中国的首都是北京。"},
    {"role": "user", "content": "北京大约有多少人口？"},
    {"role": "assistant", "content": "北京常住人口大约两千一百万。"},
]

# --- reasoning ----------------------------------------------------------------

# Reasoning in the separate `reasoning_content` field (Qwen3 / vLLM style).
EN_REASONING_FIELD = [
    {"role": "user", "content": "What is 17 * 3?"},
    {
        "role": "assistant",
        "reasoning_content": "17 * 3 = 10 * 3 + 7 * 3 = 30 + 21 = 51.",
        "content": "17 * 3 = 51.",
    },
    {"role": "user", "content": "Now add 9 to that."},
    {
        "role": "assistant",
        "reasoning_content": "51 + 9 = 60.",
        "content": "51 + 9 = 60.",
    },
]

ZH_REASONING_FIELD = [
    {"role": "user", "content": "一个三角形的内角和是多少度？"},
    {
        "role": "assistant",
        "reasoning_content": "平面三角形的三个内角之和恒为180度。",
        "content": "三角形的内角和是180度。",
    },
    {"role": "user", "content": "那四边形呢？"},
    {
        "role": "assistant",
        "reasoning_content": "四边形可以分成两个三角形，所以是2乘以180度，等于360度。",
        "content": "四边形的内角和是360度。",
    },
]

# Reasoning inline in `content` as <think>...</think> (DeepSeek-R1 / QwQ style).
EN_REASONING_INLINE = [
    {"role": "user", "content": "Is 91 a prime number?"},
    {
        "role": "assistant",
        "content": "<think>\n91 = 7 * 13, so it has divisors other than 1 and itself.\n</think>\n\nNo, 91 = 7 × 13.",
    },
    {"role": "user", "content": "What about 97?"},
    {
        "role": "assistant",
        "content": "<think>\nsqrt(97) < 10; 97 is not divisible by 2, 3, 5 or 7.\n</think>\n\nYes, 97 is prime.",
    },
]

ZH_REASONING_INLINE = [
    {"role": "user", "content": "一周有几天？"},
    {"role": "assistant", "content": "<think>\n一周是七天。\n</think>\n\n一周有7天。"},
    {"role": "user", "content": "那两周呢？"},
    {"role": "assistant", "content": "<think>\n7乘以2等于14。\n</think>\n\n两周有14天。"},
]

# --- tools --------------------------------------------------------------------

EN_TOOLS = [
    {"role": "user", "content": "What's the weather in Paris right now?"},
    {
        "role": "assistant",
        # "" rather than None: QwQ's template calls content.split() on it.
        "content": "",
        "tool_calls": [
            {
                "id": "abc123XYZ",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "abc123XYZ", "name": "get_weather", "content": '{"temperature": 18, "condition": "cloudy"}'},
    {"role": "assistant", "content": "It is 18 °C and cloudy in Paris."},
]

# Text content alongside the tool call.
EN_TOOLS_WITH_TEXT = [
    {"role": "user", "content": "What is 12 times 7?"},
    {
        "role": "assistant",
        "content": "Let me calculate that.",
        "tool_calls": [
            {
                "id": "Calc00001",
                "type": "function",
                "function": {"name": "calculate", "arguments": {"expression": "12*7"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "Calc00001", "name": "calculate", "content": "84"},
    {"role": "assistant", "content": "12 times 7 is 84."},
]

ZH_TOOLS = [
    {"role": "user", "content": "北京今天天气怎么样？"},
    {
        "role": "assistant",
        "content": "我来查一下北京的天气。",
        "tool_calls": [
            {
                "id": "bj9Weathr",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "北京", "unit": "celsius"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "bj9Weathr", "name": "get_weather", "content": '{"temperature": 25, "condition": "晴"}'},
    {"role": "assistant", "content": "北京今天晴，气温25摄氏度。"},
]

# Tool call made after some reasoning, then a reasoned final answer.
EN_TOOLS_REASONING = [
    {"role": "user", "content": "Is it warmer in Paris than 15 °C?"},
    {
        "role": "assistant",
        "reasoning_content": "I need the current temperature in Paris; call get_weather.",
        "content": "",
        "tool_calls": [
            {
                "id": "Rsn0Paris",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "Rsn0Paris", "name": "get_weather", "content": '{"temperature": 18}'},
    {
        "role": "assistant",
        "reasoning_content": "18 > 15, so yes.",
        "content": "Yes: it is 18 °C in Paris, warmer than 15 °C.",
    },
]


def _cases() -> list[tuple[str, list, list | None, set]]:
    """All cases with the features each needs ("system", "tools", "reasoning")."""
    return [
        ("en_chat", EN_CHAT, None, set()),
        ("zh_chat", ZH_CHAT, None, set()),
        ("en_chat_system", _with_system(SYSTEM_EN, EN_CHAT), None, {"system"}),
        ("zh_chat_system", _with_system(SYSTEM_ZH, ZH_CHAT), None, {"system"}),
        ("en_reasoning_field", EN_REASONING_FIELD, None, {"reasoning"}),
        ("zh_reasoning_field_system", _with_system(SYSTEM_ZH, ZH_REASONING_FIELD), None, {"reasoning", "system"}),
        ("en_reasoning_inline_system", _with_system(SYSTEM_EN, EN_REASONING_INLINE), None, {"reasoning", "system"}),
        ("zh_reasoning_inline", ZH_REASONING_INLINE, None, {"reasoning"}),
        ("en_tools", EN_TOOLS, TOOLS, {"tools"}),
        ("en_tools_system", _with_system(SYSTEM_EN, EN_TOOLS), TOOLS, {"tools", "system"}),
        ("en_tools_with_text", EN_TOOLS_WITH_TEXT, TOOLS, {"tools"}),
        ("zh_tools_system", _with_system(SYSTEM_ZH, ZH_TOOLS), TOOLS, {"tools", "system"}),
        ("en_tools_reasoning", EN_TOOLS_REASONING, TOOLS, {"tools", "reasoning"}),
    ]


CASE_IDS = [c[0] for c in _cases()]


def cases_for(supports: dict) -> list[tuple[str, list, list | None]]:
    """The (case_id, messages, tools) a family with `supports` can render.

    `supports` is {"system": bool, "tools": bool, "reasoning": bool}; a case is
    returned when every feature it needs is supported. Deep copies, so a test
    may mutate them freely.
    """
    out = []
    for case_id, messages, tools, needs in _cases():
        if all(supports.get(feature, False) for feature in needs):
            out.append((case_id, copy.deepcopy(messages), copy.deepcopy(tools)))
    return out
