"""Named chat templates for base models without a tokenizer `chat_template`, and their renderer.

A template is a handful of strings with `{content}` (and `{bos}`/`{eos}`, filled from the tokenizer) that
mirror the models' own Jinja templates and LLaMA-Factory's `template.py`. Rendering returns the text and the
character spans to train; `tokenize.py` maps spans to tokens through the tokenizer's offsets, so tokenisation
is that of the whole string, exactly what inference sees.

What is trained of an assistant turn: its content and the end-of-turn marker (`<|im_end|>`, `<|eot_id|>`,
`</s>`...), because the model must learn to stop; not the header before it (`<|im_start|>assistant\\n`, the
generation prompt) and not the separator after it, which the model never generates.
"""

from __future__ import annotations

import dataclasses
import json

from jaxtune.data.formats import did_you_mean
from jaxtune.errors import RunError

# Default wording for tool descriptions when a template has no tool format of its own.
_TOOLS = (
    "\n\nYou can call the following functions. To call one, reply with a JSON object "
    '{{"name": <function-name>, "arguments": <args-object>}}.\n{tools}'
)
_QWEN_TOOLS = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    user: str
    assistant: str  # trained: content + end-of-turn
    assistant_prompt: str = ""  # generation prompt before each assistant turn (not trained)
    separator: str = ""  # after each assistant turn (not trained)
    system: str = "{content}"
    prefix: str = ""  # once, at the very start (usually {bos})
    observation: str | None = None  # defaults to `user`
    function_call: str | None = None  # defaults to `assistant`
    tools: str = _TOOLS  # appended to the system prompt, `{tools}` = one JSON spec per line
    default_system: str = ""
    system_in_user: str | None = None  # templates with no system slot fold it into the first user turn

    def fill(self, slot: str, content: str, bos: str, eos: str) -> str:
        # str.replace, not str.format: user content is full of braces.
        return slot.replace("{bos}", bos).replace("{eos}", eos).replace("{content}", content)


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            "chatml",
            user="<|im_start|>user\n{content}<|im_end|>\n",
            assistant_prompt="<|im_start|>assistant\n",
            assistant="{content}<|im_end|>",
            separator="\n",
            system="<|im_start|>system\n{content}<|im_end|>\n",
            observation="<|im_start|>tool\n{content}<|im_end|>\n",
        ),
        Template(
            "qwen",
            user="<|im_start|>user\n{content}<|im_end|>\n",
            assistant_prompt="<|im_start|>assistant\n",
            assistant="{content}<|im_end|>",
            separator="\n",
            system="<|im_start|>system\n{content}<|im_end|>\n",
            observation="<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n",
            function_call="<tool_call>\n{content}\n</tool_call><|im_end|>",
            tools=_QWEN_TOOLS,
            default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        ),
        Template(
            "llama3",
            prefix="{bos}",
            user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
            assistant_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
            assistant="{content}<|eot_id|>",
            system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
            observation="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>",
        ),
        Template(
            "llama2",
            user="{bos}[INST] {content} [/INST]",
            assistant=" {content} {eos}",
            system="",
            system_in_user="<<SYS>>\n{system}\n<</SYS>>\n\n{content}",
        ),
        Template(
            "mistral",
            prefix="{bos}",
            user="[INST] {content} [/INST]",
            assistant="{content}{eos}",
            system="",
            system_in_user="{system}\n\n{content}",
        ),
        Template(
            "gemma",
            prefix="{bos}",
            user="<start_of_turn>user\n{content}<end_of_turn>\n",
            assistant_prompt="<start_of_turn>model\n",
            assistant="{content}<end_of_turn>",
            separator="\n",
            system="",
            observation="<start_of_turn>tool\n{content}<end_of_turn>\n",
            system_in_user="{system}\n\n{content}",
        ),
        Template(
            "alpaca",
            prefix="{bos}",
            user="### Instruction:\n{content}\n\n",
            assistant_prompt="### Response:\n",
            assistant="{content}{eos}",
            separator="\n\n",
            system="{content}\n\n",
            default_system=(
                "Below is an instruction that describes a task. Write a response that appropriately completes "
                "the request."
            ),
        ),
        Template(
            "vicuna",
            prefix="{bos}",
            user="USER: {content} ",
            assistant_prompt="ASSISTANT:",
            assistant=" {content}{eos}",
            system="{content} ",
            default_system=(
                "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the user's questions."
            ),
        ),
    )
}
TEMPLATES["default"] = TEMPLATES["vicuna"]


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise RunError(f"unknown chat template '{name}'{did_you_mean(name, sorted(TEMPLATES))}")
    return TEMPLATES[name]


@dataclasses.dataclass(frozen=True)
class Rendered:
    text: str
    # Trained character spans (start, end, weight, kind); kind is the role of the turn: assistant or
    # function_call (a turn that calls tools), for the token counts the pipeline logs.
    spans: tuple[tuple[int, int, float, str], ...]
    response_start: int  # character where the final trained turn starts: the prompt/response boundary
    rewritten: int = 0  # assistant turns the template writes differently in history than as the last turn
    untrained: int = 0  # of those, turns left untrained by data.rewritten_history=final
    reasoning_dropped: int = 0  # assistant turns whose reasoning the template does not write at all
    text_dropped: int = 0  # tool-calling turns whose text beside the calls the template does not write


THINK = "<think>\n{reasoning}\n</think>\n\n"  # reasoning before the answer, as DeepSeek-R1 and Qwen3 write it


def _assistant_body(t: Template, m, bos: str, eos: str) -> str:
    """A named template's assistant turn: reasoning, then the answer, or any text and then the tool calls."""
    think = THINK.replace("{reasoning}", m.reasoning) if m.reasoning else ""
    if m.role != "function_call":
        return t.fill(t.assistant, think + m.content, bos, eos)
    text = think + (m.content + "\n" if m.content else "")
    if t.function_call:
        return text + t.fill(t.function_call, m.calls_json(), bos, eos)
    return t.fill(t.assistant, text + m.calls_json(), bos, eos)


def tool_lines(tools: str | None) -> str:
    if not tools:
        return ""
    try:
        specs = json.loads(tools)
    except json.JSONDecodeError:
        return tools  # free-text tool descriptions are passed through
    specs = specs if isinstance(specs, list) else [specs]
    return "\n".join(json.dumps(s, ensure_ascii=False) for s in specs)


def render(
    t: Template, system, tools, messages, weights, bos: str, eos: str, generation_prompt: bool = False
) -> Rendered:
    """Render `messages` (already without the system one) with per-message label weights."""
    system = system if system is not None else t.default_system
    if tools:
        # the template's own escaped braces first: the tool specs inserted after are JSON, full of "}}"
        system = (system or "") + t.tools.replace("{{", "{").replace("}}", "}").replace("{tools}", tool_lines(tools))
    parts = [t.fill(t.prefix, "", bos, eos)]
    if system and t.system_in_user is None:
        parts.append(t.fill(t.system, system, bos, eos))
    pos = len(parts[0]) + (len(parts[1]) if len(parts) > 1 else 0)
    spans, response_start, folded = [], None, False
    for m, w in zip(messages, weights):
        if m.role in ("assistant", "function_call"):
            head = t.fill(t.assistant_prompt, "", bos, eos)
            body = _assistant_body(t, m, bos, eos)
            start = pos + len(head)
            if w > 0:
                spans.append((start, start + len(body), w, m.role))
            response_start = start
            piece = head + body + t.separator
        else:
            content = m.content
            if m.role == "user" and system and t.system_in_user is not None and not folded:
                content, folded = (
                    t.system_in_user.replace("{system}", system).replace("{content}", content),
                    True,
                )
            slot = t.observation if m.role == "observation" and t.observation else t.user
            piece = t.fill(slot, content, bos, eos)
        parts.append(piece)
        pos += len(piece)
    if generation_prompt:
        parts.append(t.fill(t.assistant_prompt, "", bos, eos))
    text = "".join(parts)
    return Rendered(text, tuple(spans), len(text) if response_start is None else response_start)
