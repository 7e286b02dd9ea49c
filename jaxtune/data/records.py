"""Normalised records: what every input format becomes before templating.

Three shapes cover every stage:
- `Conversation` (SFT, KTO with `label`, PPO/GRPO prompts with an optional reference `answer`),
- `Preference` (RM/DPO: a shared prompt and a chosen and a rejected continuation),
- `Text` (continued pre-training).
Roles are LLaMA-Factory's five: system, user, assistant, function_call (an assistant turn that calls a
tool, trained like assistant) and observation (the tool's answer, never trained). An assistant or
function_call message also carries its `reasoning` (the thinking before the answer, from `reasoning_content`,
`reasoning` or `thinking` fields) and its `tool_calls` (OpenAI's: id, name, JSON arguments), with `content` the
text said beside them; an observation carries the `tool_call_id` it answers. Each record knows the file and
row it came from, so later errors (e.g. at tokenisation) still point at the user's data.
"""

from __future__ import annotations

import dataclasses
import json

ROLES = ("system", "user", "assistant", "function_call", "observation")
# Roles whose tokens are trained by default: what the model itself must produce.
TRAINED_ROLES = ("assistant", "function_call")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object (or the model's raw text when it is not JSON)
    id: str | None = None

    def as_json(self) -> dict:
        """{"name", "arguments"}: LLaMA-Factory's function_call content, arguments parsed when they are JSON."""
        try:
            args = json.loads(self.arguments)
        except json.JSONDecodeError:
            args = self.arguments
        return {"name": self.name, "arguments": args}


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    content: str
    # None = default weighting (1 for trained roles, 0 otherwise); 0 masks this turn, 2.0 doubles it.
    loss_weight: float | None = None
    tool_calls: tuple[ToolCall, ...] = ()  # function_call messages: the calls (content: text beside them)
    reasoning: str | None = None  # assistant thinking, rendered where the chat template puts it
    tool_call_id: str | None = None  # observation messages: the call this result answers

    def calls_json(self) -> str:
        """The tool calls as LLaMA-Factory's JSON text (one object, or a list for several)."""
        calls = [c.as_json() for c in self.tool_calls]
        return json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    system: str | None = None
    tools: str | None = None  # JSON text of a list of function specs, as LLaMA-Factory stores it
    label: bool | None = None  # KTO: desirable (True) or undesirable (False)
    answer: str | None = None  # PPO/GRPO: reference answer for a reward function
    file: str | None = None
    row: int | None = None


@dataclasses.dataclass(frozen=True)
class Preference:
    prompt: tuple[Message, ...]  # ends with a user (or observation) turn
    chosen: tuple[Message, ...]  # one or more assistant/function_call turns
    rejected: tuple[Message, ...]
    system: str | None = None
    tools: str | None = None
    file: str | None = None
    row: int | None = None


@dataclasses.dataclass(frozen=True)
class Text:
    text: str
    file: str | None = None
    row: int | None = None


Record = Conversation | Preference | Text


def where(record: Record) -> dict:
    """Location keywords for `DataError` (file, row)."""
    return {"file": record.file, "row": record.row}


def record_text(record: Record) -> str:
    """All user-visible text of a record, for dedup hashing and length filters."""
    if isinstance(record, Text):
        return record.text
    if isinstance(record, Preference):
        msgs = record.prompt + record.chosen + record.rejected
    else:
        msgs = record.messages
    head = [record.system] if record.system else []
    parts = []
    for m in msgs:
        parts += [m.reasoning] if m.reasoning else []
        parts.append(m.content)
        parts += [m.calls_json()] if m.tool_calls else []
    return "\n".join(head + parts)
