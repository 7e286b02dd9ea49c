"""Records -> items of one data kind, with truncation and length filters counted in the `Report`.

The caller names the kind (a method's `data_kind`); the data layer knows nothing of stages.

| data kind | batch  | item                                                                | used by   |
|-----------|--------|---------------------------------------------------------------------|-----------|
| text      | lm     | Example (every token trained; long documents split into rows)      | pt        |
| lm        | lm     | Example (prompt masked; truncated prompt-first)                     | sft       |
| pair      | pair   | (chosen Example, rejected Example) sharing the prompt budget        | rm, dpo   |
| kto       | kto    | (Example, label)                                                    | kto       |
| prompt    | prompt | (prompt ids, reference answer or None)                              | ppo, grpo |
"""

from __future__ import annotations

import logging

from jaxtune.config import DataConfig
from jaxtune.data import prepare
from jaxtune.data.batching import chunk, truncate
from jaxtune.data.errors import DataError, ErrorPolicy
from jaxtune.data.records import TRAINED_ROLES, Conversation, Preference, Text, where
from jaxtune.data.tokenize import encode_example, encode_examples, encode_pair, encode_prompt
from jaxtune.errors import RunError

log = logging.getLogger("jaxtune.data")

DATA_KINDS = ("text", "lm", "pair", "kto", "prompt")
_DEFAULTS = DataConfig()  # the only home of the defaults below


def check_kind(kind: str) -> str:
    """`kind` if it is one of DATA_KINDS; a ValueError naming them otherwise."""
    if kind not in DATA_KINDS:
        kinds = ", ".join(DATA_KINDS)
        raise RunError(
            f"unknown data kind {kind!r} (one of {kinds}; a stage's kind is its method's data_kind)"
        )
    return kind


def batch_kind(kind: str) -> str:
    """The batch kind a data kind is collated into: pre-training text makes the same TokenBatch as SFT."""
    return "lm" if check_kind(kind) == "text" else kind


class Encoder:
    """Callable record -> list of items (empty when filtered or skipped); counts everything in `report`."""

    def __init__(
        self,
        tokenizer,
        kind: str,
        *,
        template: str | None = _DEFAULTS.template,
        template_kwargs: dict | None = None,
        rewritten_history: str = _DEFAULTS.rewritten_history,
        cutoff_len: int = _DEFAULTS.cutoff_len,
        train_on_prompt: bool = _DEFAULTS.train_on_prompt,
        mask_history: bool = _DEFAULTS.mask_history,
        min_length: int | None = _DEFAULTS.min_length,
        overlength: str = _DEFAULTS.overlength,
        policy: ErrorPolicy | None = None,
        report: prepare.Report | None = None,
    ):
        if overlength not in ("truncate", "drop"):
            raise RunError(f"overlength must be 'truncate' or 'drop', got {overlength!r}")
        self.tokenizer, self.kind = tokenizer, check_kind(kind)
        self.template, self.cutoff_len = template, int(cutoff_len)
        self.report = report if report is not None else prepare.Report()
        self.template_kwargs = dict(template_kwargs or {})
        self.opts = {
            "train_on_prompt": train_on_prompt,
            "mask_history": mask_history,
            "template_kwargs": self.template_kwargs,
            "counts": self.report.tokens,
        }
        self.rewritten_history = rewritten_history
        self.min_length, self.overlength = min_length or 0, overlength
        self.policy = policy or ErrorPolicy("raise")
        self.bos_id = getattr(tokenizer, "bos_token_id", None)

    def __call__(self, record) -> list:
        try:
            items = self._items(record)
        except DataError as err:
            self.policy.handle(err.at(**where(record)))  # raises, or counts and logs the skip
            items = []
        self.report.count_encoded(record, len(items))
        return items

    @property
    def _whole(self) -> dict:
        """Options for items that are one whole conversation (pairs, KTO): rewritten turns are never split
        out of them ("split" acts as "final")."""
        return {**self.opts, "rewritten_history": self.rewritten_history}

    def _fits(self, n: int) -> bool:
        if n < self.min_length:
            self.report.filtered[f"shorter than min_length={self.min_length}"] += 1
            return False
        if n > self.cutoff_len and self.overlength == "drop":
            self.report.filtered[f"longer than cutoff_len={self.cutoff_len}"] += 1
            return False
        if n > self.cutoff_len:
            self.report.truncated += 1
        return True

    def _wrong(self, record, wanted: str) -> DataError:
        return DataError(
            f"a {type(record).__name__} record cannot make a '{self.kind}' item (needs {wanted})",
            reason="wrong record type",
            **where(record),
        )

    def _check_ending(self, record) -> None:
        """SFT and KTO train the conversation's last turn: it is the assistant's (LLaMA-Factory: an even number
        of turns). Prompt-only records are valid for 'prompt' data (PPO/GRPO), which is why the loader does
        not judge the ending."""
        msgs = record.messages if isinstance(record, Conversation) else ()
        if msgs and msgs[-1].role not in TRAINED_ROLES and any(m.role in TRAINED_ROLES for m in msgs):
            role = {"observation": "tool result"}.get(msgs[-1].role, msgs[-1].role)
            raise DataError(
                f"the conversation ends with a {role} turn (message {len(msgs) - 1 + bool(record.system)}); "
                f"'{self.kind}' data trains the last turn, which must be the assistant's (prompts without an "
                "answer are 'prompt' data, for ppo/grpo)",
                field="messages",
                reason="ends without an assistant turn",
                **where(record),
            )

    def _items(self, record) -> list:
        if self.kind in ("lm", "kto"):
            self._check_ending(record)
        if self.kind in ("text", "lm"):
            if isinstance(record, Preference):
                raise self._wrong(record, "text or conversations")
            pt = self.kind == "text"
            opts = {**self.opts, "train_on_prompt": pt or self.opts["train_on_prompt"]}
            out = []
            for ex in encode_examples(
                record, self.tokenizer, self.template, rewritten_history=self.rewritten_history, **opts
            ):
                if not self._fits(len(ex)):
                    continue
                if len(ex) <= self.cutoff_len:
                    out.append(ex)
                elif pt or isinstance(record, Text):
                    self.report.truncated -= 1
                    self.report.chunked += 1
                    out += chunk(ex, self.cutoff_len)
                else:
                    out.append(truncate(ex, self.cutoff_len, self.bos_id))
            return out
        if self.kind == "pair":
            if not isinstance(record, Preference):
                raise self._wrong(record, "chosen and rejected responses")
            c, r = encode_pair(record, self.tokenizer, self.template, **self._whole)
            if not self._fits(max(len(c), len(r))):
                return []
            resp = max(len(c) - c.prompt_len, len(r) - r.prompt_len)
            return [
                (
                    truncate(c, self.cutoff_len, self.bos_id, resp),
                    truncate(r, self.cutoff_len, self.bos_id, resp),
                )
            ]
        if not isinstance(record, Conversation):
            raise self._wrong(record, "conversations")
        if self.kind == "kto":
            if record.label is None:
                raise DataError(
                    "KTO needs a boolean label per record",
                    field="label",
                    reason="missing field",
                    **where(record),
                )
            ex = encode_example(record, self.tokenizer, self.template, **self._whole)
            if not self._fits(len(ex)):
                return []
            return [(truncate(ex, self.cutoff_len, self.bos_id), record.label)]
        prompt = prepare.as_prompt(record)
        ids = encode_prompt(prompt, self.tokenizer, self.template, self.template_kwargs)
        if len(ids) > self.cutoff_len:  # a cut prompt would be a different question: drop it
            self.report.filtered[f"prompt longer than cutoff_len={self.cutoff_len}"] += 1
            return []
        if len(ids) < self.min_length:
            self.report.filtered[f"shorter than min_length={self.min_length}"] += 1
            return []
        return [(ids, prompt.answer)]
