"""Raw rows -> records, for every common dataset format; the format is named or detected from the columns.

| format       | columns (defaults; remap with `columns`)                         | record        |
|--------------|------------------------------------------------------------------|---------------|
| `alpaca`     | instruction, input, output, [system], [history: [[user, asst]]]   | Conversation  |
| `sharegpt`   | conversations: [{from, value}], [system], [tools]                | Conversation  |
| `openai`     | messages: [{role, content, [loss_weight]}], [tools]              | Conversation  |
| `preference` | [prompt], chosen, rejected (strings or message lists)            | Preference    |
| `kto`        | messages + label, or prompt + completion + label                 | Conversation  |
| `text`       | text                                                             | Text          |
| `qa`         | any two columns, e.g. question + answer                          | Conversation  |

LLaMA-Factory variants follow its `dataset_info.json`: `ranking: true` turns alpaca/sharegpt rows into
preference records (sharegpt `chosen`/`rejected` hold one message, as in `dpo_en_demo.json`), `kto_tag`
names the KTO label column, and an alpaca entry that maps only `prompt` (e.g. `wiki_demo`) is plain text.
Our extra column key `answer` keeps a reference answer for PPO/GRPO rewards.

Rows are checked as LLaMA-Factory's converters check them, but loudly: turn order (`messages.check_order`:
user first, alternating, tool results only after a tool call), preference pairs whose chosen and rejected
are identical or have an empty side, KTO rows with an empty completion or a label that is not a boolean
(true/false, 1/0, or that text in a CSV cell). Each is a `DataError` naming the row and field, skipped and
counted by reason with `on_error: skip`. Whether a conversation must end with the assistant depends on the
data kind (SFT yes, PPO prompts no): `items.Encoder` checks it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Callable, Mapping

from jaxtune.data import messages as msgs
from jaxtune.data.errors import DataError
from jaxtune.data.files import RawRow
from jaxtune.data.records import Conversation, Message, Preference, Record, Text
from jaxtune.errors import RunError

FORMATS = ("alpaca", "sharegpt", "openai", "preference", "kto", "text", "qa")
_ALIASES = {
    "messages": "openai",
    "trl": "openai",
    "ranking": "preference",
    "pairwise": "preference",
    "pt": "text",
}
COLUMN_KEYS = (
    "prompt", "query", "response", "history", "messages", "system", "tools", "chosen", "rejected",
    "kto_tag", "text", "answer", "images", "videos", "audios",
)  # fmt: skip
# Common column pairs of question/answer tables, tried in order when no format is named.
QA_PAIRS = (
    ("question", "answer"),
    ("prompt", "completion"),
    ("prompt", "response"),
    ("query", "response"),
    ("question", "response"),
    ("input", "output"),
    ("input", "target"),
)
# Text labels, as CSV cells hold them; "yes"/"no" and other words are not read as booleans.
_LABEL_TEXT = {"true": True, "false": False, "1": True, "0": False}


def did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(options)})"


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    formatting: str | None = None  # None: detect from the first row's columns
    ranking: bool = False
    columns: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        name = _ALIASES.get(self.formatting, self.formatting)
        if name is not None and name not in FORMATS:
            raise RunError(
                f"unknown data format '{self.formatting}'{did_you_mean(self.formatting, FORMATS)}"
            )
        object.__setattr__(self, "formatting", name)
        for key in self.columns:
            if key not in COLUMN_KEYS:
                raise RunError(f"unknown key '{key}' in columns{did_you_mean(key, COLUMN_KEYS)}")
        for key in self.tags:
            if key not in msgs.SHAREGPT_TAGS:
                raise RunError(f"unknown key '{key}' in tags{did_you_mean(key, msgs.SHAREGPT_TAGS)}")


class _Row:
    """Column access that reports missing or mistyped fields with file and row."""

    def __init__(self, raw: RawRow, columns: Mapping[str, str]):
        self.data, self.columns = raw.data, columns
        self.loc = {"file": raw.file, "row": raw.row, "line": raw.line}

    def col(self, key: str, default: str | None = None) -> str | None:
        return self.columns.get(key, default)

    def has(self, key: str, default: str | None = None) -> bool:
        name = self.col(key, default)
        return name is not None and self.data.get(name) is not None

    def get(self, key: str, default: str | None = None, required: bool = True):
        name = self.col(key, default)
        value = self.data.get(name) if name is not None else None
        if value is None and required:
            state = "is null" if name in self.data else "is missing"
            raise DataError(
                f"required column {state} (columns present: {sorted(self.data)})",
                field=name,
                reason="missing field",
                **self.loc,
            )
        return value

    def text(self, key: str, default: str | None = None, required: bool = True) -> str | None:
        value = self.get(key, default, required)
        if value is None or isinstance(value, str):
            return value
        raise DataError(
            f"expected a string, got {type(value).__name__}",
            field=self.col(key, default),
            reason="wrong type",
            **self.loc,
        )

    def label(self, key: str, default: str) -> bool:
        value = self.get(key, default)
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _LABEL_TEXT:
            return _LABEL_TEXT[value.strip().lower()]
        raise DataError(
            f"KTO label must be a boolean, got {value!r} (true/false; 1/0 and 'true'/'false' text also read)",
            field=self.col(key, default),
            reason="wrong type",
            **self.loc,
        )

    def error(self, message: str, field: str | None, reason: str) -> DataError:
        return DataError(message, field=field, reason=reason, **self.loc)


def _loc(r: _Row) -> dict:
    return {"file": r.loc["file"], "row": r.loc["row"]}


def _conversation(r: _Row, messages, system=None, tools=None, label=None) -> Conversation:
    answer = r.get("answer", required=False)
    return Conversation(
        tuple(messages),
        system=system or None,
        tools=tools if not isinstance(tools, list | dict) else _json(tools),
        label=label,
        answer=None if answer is None else str(answer),
        **_loc(r),
    )


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _turns(r: _Row, value, key: str, default: str, tags: dict | None = None) -> list[Message]:
    """Assistant side of a preference or completion: a string, one message, or a message list."""
    field = r.col(key, default)
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)  # numeric answers in tables (e.g. math datasets)
    if isinstance(value, str):
        return [Message("assistant", value)]
    if isinstance(value, dict):
        value = [value]
    items = msgs.as_list(value, field, r.loc)
    tags = tags or msgs.guess_tags(items[0] if items else None)
    return msgs.parse_messages(items, tags, field, r.loc)


def _role_tag(value, tags: dict | None) -> str | None:
    """The role key of a message column's messages (for field names); None for a plain string."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list | tuple):
        return None
    return (tags or msgs.guess_tags(value[0] if value else None))["role_tag"]


def _order(r: _Row, messages, key: str, default: str, value, tags=None, offset=0, after=None) -> None:
    msgs.check_order(messages, r.col(key, default), r.loc, _role_tag(value, tags), offset, after)


def _said(messages) -> bool:
    return any(m.content.strip() or m.tool_calls for m in messages)


def _check_pair(r: _Row, chosen, rejected, keys=("chosen", "rejected")) -> None:
    """A preference pair teaches something only when both responses say something, and differently."""
    for side, key in zip((chosen, rejected), keys):
        if not _said(side):
            raise r.error(f"the {key} response is empty", r.col(key, key), "empty completion")
    strip = lambda side: [(m.role, m.content.strip(), m.tool_calls) for m in side]  # noqa: E731
    if strip(chosen) == strip(rejected):
        raise r.error(
            "chosen and rejected are identical (the pair teaches nothing)",
            r.col(keys[0], keys[0]),
            "chosen and rejected identical",
        )


def _check_completion(r: _Row, messages, field: str | None) -> None:
    """A KTO row labels its response: an empty one is a broken row, not a quietly dropped one."""
    if not _said([m for m in messages if m.role in ("assistant", "function_call")]):
        raise r.error("the completion is empty (a KTO row labels its response)", field, "empty completion")


def _prompt(r: _Row, value, key: str, default: str, tags: dict | None = None) -> list[Message]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        return [Message("user", value)]
    return _turns(r, value, key, default, tags)


# ---- one converter per format: (row) -> record ---------------------------------------------------------


def _alpaca(r: _Row, ranking: bool) -> Record:
    prompt = r.text("prompt", "instruction")
    query = r.text("query", "input", required=False)
    content = "\n".join(p for p in (prompt, query) if p)
    history, hist = [], r.get("history", "history", required=False) or []
    if not isinstance(hist, list):
        raise r.error(
            f"history must be a list of [user, assistant] pairs, got {type(hist).__name__}",
            r.col("history", "history"),
            "wrong type",
        )
    for i, pair in enumerate(hist):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise r.error(
                "history items must be [user, assistant] string pairs",
                f"{r.col('history', 'history')}[{i}]",
                "wrong type",
            )
        history += [Message("user", pair[0]), Message("assistant", pair[1])]
    turns = history + [Message("user", content)]
    system = r.text("system", "system", required=False)
    if ranking:
        if r.has("chosen", "chosen"):
            chosen, rejected = r.text("chosen", "chosen"), r.text("rejected", "rejected")
        else:  # older LLaMA-Factory files: response = [chosen, rejected]
            pair = r.get("response", "output")
            if not (isinstance(pair, list) and len(pair) == 2):
                raise r.error(
                    "ranking response must be [chosen, rejected]", r.col("response", "output"), "wrong type"
                )
            chosen, rejected = pair
            for x in pair:
                if not isinstance(x, str):
                    raise r.error(
                        f"ranking response must be [chosen, rejected] strings, got {type(x).__name__}",
                        r.col("response", "output"),
                        "wrong type",
                    )
        chosen_m, rejected_m = (Message("assistant", chosen),), (Message("assistant", rejected),)
        keys = ("chosen", "rejected") if r.has("chosen", "chosen") else ("response", "response")
        _check_pair(r, chosen_m, rejected_m, keys)
        return Preference(tuple(turns), chosen_m, rejected_m, system, **_loc(r))
    response = r.text("response", "output")
    label = r.label("kto_tag", "label") if r.col("kto_tag") else None
    if label is not None:
        _check_completion(r, [Message("assistant", response)], r.col("response", "output"))
    return _conversation(r, turns + [Message("assistant", response)], system=system, label=label)


def _chat(r: _Row, ranking: bool, default_col: str, explicit_tags: Mapping) -> Record:
    """ShareGPT and OpenAI rows: explicit tags complete LLaMA-Factory's defaults; else guessed per row."""
    field = r.col("messages", default_col)
    items = msgs.as_list(r.get("messages", default_col), field, r.loc)
    if not items:
        raise r.error("empty conversation", field, "empty conversation")
    if explicit_tags:
        tags = {**msgs.SHAREGPT_TAGS, **explicit_tags}
    else:
        tags = msgs.guess_tags(items[0])
    parsed = msgs.parse_messages(items, tags, field, r.loc)
    system, messages = msgs.split_system(parsed, field, r.loc)
    msgs.check_order(messages, field, r.loc, tags["role_tag"], len(parsed) - len(messages))
    system = r.text("system", "system", required=False) or system
    tools = r.get("tools", "tools", required=False)
    if ranking:
        sides = []
        for key in ("chosen", "rejected"):
            value = r.get(key, key)
            side = _turns(r, value, key, key, tags)
            _order(r, side, key, key, value, tags, after=messages[-1].role if messages else None)
            sides.append(side)
        _check_pair(r, *sides)
        return Preference(tuple(messages), tuple(sides[0]), tuple(sides[1]), system, _tools(tools), **_loc(r))
    label = r.label("kto_tag", "label") if r.col("kto_tag") else None
    if label is not None:
        _check_completion(r, messages, field)
    return _conversation(r, messages, system=system, tools=tools, label=label)


def _tools(tools):
    return tools if tools is None or isinstance(tools, str) else _json(tools)


def _preference(r: _Row) -> Record:
    chosen_v, rejected_v = r.get("chosen", "chosen"), r.get("rejected", "rejected")
    system = r.text("system", "system", required=False)
    if r.has("prompt", "prompt"):
        prompt_v = r.get("prompt", "prompt")
        prompt = _prompt(r, prompt_v, "prompt", "prompt")
        chosen = _turns(r, chosen_v, "chosen", "chosen")
        rejected = _turns(r, rejected_v, "rejected", "rejected")
        s, rest = msgs.split_system(prompt, r.col("prompt", "prompt"), r.loc)
        _order(r, rest, "prompt", "prompt", prompt_v, offset=len(prompt) - len(rest))
        last = rest[-1].role if rest else None
        _order(r, chosen, "chosen", "chosen", chosen_v, after=last)
        _order(r, rejected, "rejected", "rejected", rejected_v, after=last)
        prompt = rest
    else:
        # TRL "implicit prompt": chosen and rejected are whole conversations sharing the prompt turns.
        full_c = _turns(r, chosen_v, "chosen", "chosen")
        full_r = _turns(r, rejected_v, "rejected", "rejected")
        for full, key, value in ((full_c, "chosen", chosen_v), (full_r, "rejected", rejected_v)):
            _, rest = msgs.split_system(full, r.col(key, key), r.loc)
            if len(rest) < len(full) or len(full) > 1:  # a lone answer string has no order to check
                _order(r, rest, key, key, value, offset=len(full) - len(rest))
        n = 0
        while n < min(len(full_c), len(full_r)) - 1 and full_c[n] == full_r[n]:
            n += 1
        prompt, chosen, rejected = full_c[:n], full_c[n:], full_r[n:]
        s, prompt = msgs.split_system(prompt, r.col("prompt", "prompt"), r.loc)
    _check_pair(r, chosen, rejected)
    tools = _tools(r.get("tools", "tools", required=False))
    return Preference(tuple(prompt), tuple(chosen), tuple(rejected), system or s, tools, **_loc(r))


def _kto(r: _Row) -> Record:
    label = r.label("kto_tag", "label")
    if r.has("messages", "messages") or not r.has("prompt", "prompt"):
        rec = _chat(r, False, "messages", {})
        _check_completion(r, rec.messages, r.col("messages", "messages"))
        return dataclasses.replace(rec, label=label)
    system, rest, completion = _prompt_response(r, "prompt", "completion")
    _check_completion(r, completion, r.col("response", "completion"))
    return _conversation(r, rest + completion, system=system, label=label)


def _prompt_response(r: _Row, prompt_name: str, response_name: str):
    """(system split off the prompt, the prompt's other turns, the response turns), both in checked order."""
    prompt_v, response_v = r.get("prompt", prompt_name), r.get("response", response_name)
    prompt = _prompt(r, prompt_v, "prompt", prompt_name)
    response = _turns(r, response_v, "response", response_name)
    system, rest = msgs.split_system(prompt, r.col("prompt", prompt_name), r.loc)
    _order(r, rest, "prompt", prompt_name, prompt_v, offset=len(prompt) - len(rest))
    _order(r, response, "response", response_name, response_v, after=rest[-1].role if rest else None)
    return system, rest, response


def _qa(r: _Row) -> Record:
    s, prompt_rest, answer = _prompt_response(r, "question", "answer")
    system = r.text("system", "system", required=False) or s
    return _conversation(r, prompt_rest + answer, system=system)


def _text(r: _Row) -> Record:
    return Text(r.text("text", r.col("prompt", "text")), **_loc(r))


# ---- detection -----------------------------------------------------------------------------------------


def detect(data: Mapping, spec: FormatSpec) -> tuple[str, FormatSpec]:
    """The format (and any implied columns) of a dataset, from its spec or its first row."""
    cols = dict(spec.columns)
    if spec.formatting is not None:
        if spec.formatting == "alpaca" and set(cols) == {"prompt"}:
            return "text", spec  # LLaMA-Factory pre-training entries map only `prompt`
        return spec.formatting, spec
    keys = set(data)
    has = lambda *names: all(n in keys for n in names)
    if has("chosen", "rejected"):
        for key in ("conversations", "messages"):
            if key in keys:
                cols.setdefault("messages", key)
                return "sharegpt", dataclasses.replace(spec, ranking=True, columns=cols)
        if has("instruction"):  # LLaMA-Factory's alpaca ranking rows: instruction [+ input] + chosen/rejected
            return "alpaca", dataclasses.replace(spec, ranking=True)
        return "preference", spec
    if has("label") and (has("messages") or has("conversations") or has("prompt", "completion")):
        if has("conversations"):
            cols.setdefault("messages", "conversations")
        return "kto", dataclasses.replace(spec, columns=cols)
    if has("conversations"):
        return "sharegpt", spec
    if has("messages"):
        return "openai", spec
    if has("instruction", "output"):
        return "alpaca", spec
    if keys == {"text"} or (has("text") and not any(has(*p) for p in QA_PAIRS)):
        return "text", spec
    for q, a in QA_PAIRS:
        if has(q, a):
            return "qa", dataclasses.replace(spec, columns={"prompt": q, "response": a, **cols})
    raise RunError(f"cannot tell the data format from the columns {sorted(keys)}")


def converter(first: RawRow, spec: FormatSpec) -> tuple[str, Callable[[RawRow], Record]]:
    """Pick the converter for a dataset once (from its first row), then apply it strictly to every row."""
    try:
        name, spec = detect(first.data, spec)
    except ValueError as e:
        raise DataError(
            f"{e}; name the format ({', '.join(FORMATS)}) or map the columns",
            file=first.file,
            row=first.row,
            line=first.line,
            reason="unknown format",
        ) from None
    cols, ranking = spec.columns, spec.ranking
    table = {
        "alpaca": lambda r: _alpaca(r, ranking),
        "sharegpt": lambda r: _chat(r, ranking, "conversations", spec.tags),
        "openai": lambda r: _chat(r, ranking, "messages", spec.tags),
        "preference": _preference,
        "kto": _kto,
        "qa": _qa,
        "text": _text,
    }
    fn = table[name]
    return name, lambda raw: fn(_Row(raw, cols))
