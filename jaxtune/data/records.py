"""Normalised records: what every input format becomes before templating.

Three shapes cover every stage:
- `Conversation` (SFT, KTO with `label`, PPO/GRPO prompts with an optional reference `answer`),
- `Preference` (RM/DPO: a shared prompt and a chosen and a rejected continuation),
- `Text` (continued pre-training).
Roles are LLaMA-Factory's five: system, user, assistant, function_call (an assistant turn that calls a
tool, trained like assistant) and observation (the tool's answer, never trained). Each record knows the file
and row it came from, so later errors (e.g. at tokenisation) still point at the user's data.
"""

from __future__ import annotations

import dataclasses

ROLES = ("system", "user", "assistant", "function_call", "observation")
# Roles whose tokens are trained by default: what the model itself must produce.
TRAINED_ROLES = ("assistant", "function_call")


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    content: str
    # None = default weighting (1 for trained roles, 0 otherwise); 0 masks this turn, 2.0 doubles it.
    loss_weight: float | None = None


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
    return "\n".join(head + [m.content for m in msgs])
