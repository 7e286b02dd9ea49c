"""Where each assistant turn lies in a chat template's render: the machinery behind `jinja.py`.

A turn is first taken as the model produces it last (`turn`: its render after the generation prompt, cut after
the template's end marker, learnt once per template by `shape` from probe renders), then found in a render of
the whole conversation (`locate`): at the same place (`fast`), by sentinel characters around its answer
(`answer_spans`, `find`), or, for a turn with no answer to mark (tool calls only), by its text right after the
template's role header between its located neighbours (`search`). `as_rendered` finds a turn the template
writes differently in history, as it is written there.

`chat` arguments are `jinja.Chat`s (anything with `render(msgs, tools, gen)` and `tokenizer`); this module
imports nothing of jinja's, so the two stay one-way.
"""

from __future__ import annotations

import dataclasses
import functools
import re

_START, _END, _PROBE = "\ue000", "\ue001", "\ue002"  # private-use characters, absent from real data
_SENTINELS = re.compile(f"{_START}(\\d+){_START}|{_END}")

# ---- the template's turn shape, from probe renders ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    lead: str  # what the template writes between the generation prompt and a last turn's plain answer
    marker: str  # the end-of-turn marker after an answer ("" for templates with none, e.g. GLM-4)
    header: str = ""  # what it writes before an answer in history (the role header), without the lead


def common_tokens(tokenizer, a: str, b: str) -> str:
    """The longest common prefix of `a` and `b` in whole tokens (so `<|endoftext|>` vs `<|user|>` share none)."""
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids_a, ids_b = ids(a), ids(b)
    n = 0
    while n < min(len(ids_a), len(ids_b)) and ids_a[n] == ids_b[n]:
        n += 1
    if n == 0:
        return ""
    try:
        return a[
            : tokenizer(a, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"][n - 1][1]
        ]
    except (NotImplementedError, ValueError, TypeError, KeyError):  # no offsets: the longest common
        c = 0  # character prefix, cut back until it is exactly the common tokens
        while c < min(len(a), len(b)) and a[c] == b[c]:
            c += 1
        for p in range(c, 0, -1):
            if ids(a[:p]) == ids_a[:n]:
                return a[:p]
        return ""


@functools.lru_cache(maxsize=64)
def shape(chat) -> Shape:
    user, answer = {"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE}
    for head in ([], [{"role": "system", "content": "s"}]):  # some templates require a system message
        try:
            last = chat.render([*head, user, answer], None)
            mid = chat.render([*head, user, answer, {"role": "user", "content": "y"}], None)
            pre = chat.render([*head, user], None, True)
        except Exception:
            continue
        if _PROBE not in last or _PROBE not in mid:
            continue
        tail_last, tail_mid = last[last.index(_PROBE) + 1 :], mid[mid.index(_PROBE) + 1 :]
        marker = common_tokens(chat.tokenizer, tail_last, tail_mid).rstrip()
        lead = last[len(pre) : last.index(_PROBE)] if last.startswith(pre) else ""
        before = mid[: mid.index(_PROBE)]
        header = before[len(common_tokens(chat.tokenizer, chat.render([*head, user], None), before)) :]
        return Shape(
            lead, marker, header[: len(header) - len(lead)] if lead and header.endswith(lead) else header
        )
    return Shape("", "")


def cut(text: str, marker: str) -> str:
    """A turn's text up to and including its end marker (or without trailing whitespace, if it has none)."""
    if marker:
        k = text.find(marker)
        if k >= 0:
            return text[: k + len(marker)]
    return text.rstrip()


# ---- sentinels: where each answer lands in a render -----------------------------------------------------


def mark(content: str, i: int) -> str | None:
    """`content` with sentinels around its answer: after any `</think>` and inside outer whitespace, which
    templates split off or trim. None when there is no answer text to mark (a tool-call-only turn)."""
    head, sep, body = content.rpartition("</think>")
    core = body.strip()
    if not core:
        return None
    k = body.index(core)
    return head + sep + body[:k] + f"{_START}{i}{_START}" + core + _END + body[k + len(core) :]


def answer_spans(chat, msgs, tools, turns: dict[int, int], text: str) -> dict[int, tuple[int, int]]:
    """Answer positions in `text` (the render of `msgs`) of the turns {message index: dict index}."""
    marked = [dict(m) for m in msgs]
    for i, j in turns.items():
        new = mark(msgs[j].get("content") or "", i)
        if new is not None:
            marked[j]["content"] = new
    try:
        rendered = chat.render(marked, tools)
    except Exception:
        return {}
    out, pos, clean, open_ = {}, 0, [], None
    for match in _SENTINELS.finditer(rendered):
        clean.append(rendered[pos : match.start()])
        here = sum(map(len, clean))
        if match.group(1) is not None:
            open_ = (int(match.group(1)), here)
        elif open_ is not None:
            out[open_[0]] = (open_[1], here)
            open_ = None
        pos = match.end()
    clean.append(rendered[pos:])
    return out if "".join(clean) == text else {}  # sentinels that changed the render locate nothing


def after(text: str, b: int, marker: str) -> int | None:
    """End of the turn whose answer ends at `b`: over whitespace the template kept, then the marker."""
    if not marker:
        return b
    k = b
    while k < len(text) and text[k].isspace() and not text.startswith(marker, k):
        k += 1
    return k + len(marker) if text.startswith(marker, k) else None


# ---- locating one turn ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Turn:
    i: int  # message index (without the system message)
    j: int  # index in the rendered message list
    upto: str  # render of the conversation ending with this turn
    start: int | None  # where the turn's own text starts in `upto` (None: not known there)
    text: str | None  # the turn as the model produces it last, up to its end marker; None: not known


def turn(chat, msgs, tools, i: int, j: int, sh: Shape) -> Turn:
    upto = chat.render(msgs[: j + 1], tools)
    start, text = own_text(chat, msgs, tools, j, upto, sh)
    if text is None and msgs and msgs[0].get("role") == "system" and j > 0:
        # Templates that move the system prompt into the last user turn (Mistral v0.3) render no prompt
        # consistent with the conversation: the turn's own text is then read from the system-free one.
        rest = msgs[1:]
        _, text = own_text(chat, rest, tools, j - 1, chat.render(rest[:j], tools), sh)
    return Turn(i, j, upto, start, text)


def own_text(chat, msgs, tools, j: int, upto: str, sh: Shape) -> tuple[int | None, str | None]:
    """(start in `upto`, text) of turn `j` when it ends the conversation `msgs[:j+1]` rendered as `upto`."""
    pre = chat.render(msgs[:j], tools, True)
    if upto.startswith(pre):
        return len(pre), cut(upto[len(pre) :], sh.marker)
    # A generation prompt that opens more than the turn writes (QwQ's and DeepSeek-R1's `<think>\n`, which
    # their tool-call and history turns lack): the turn starts after the part of the header both share.
    base = chat.render(msgs[:j], tools)
    if upto.startswith(base) and pre.startswith(base):
        tail = upto[len(base) :]
        head = common_tokens(chat.tokenizer, tail, pre[len(base) :])
        return len(base) + len(head), cut(tail[len(head) :], sh.marker)
    return None, None


def fast(t: Turn, text: str) -> tuple[int, int] | None:
    """The turn at the same place in `text` as in its own render."""
    if t.start is not None and t.text is not None and text.startswith(t.upto[: t.start]):
        if text.startswith(t.text, t.start):
            return t.start, t.start + len(t.text)
    return None


def find(chat, msgs, tools, t: Turn, text: str, core, sh: Shape) -> tuple[int, int] | None:
    """Where turn `t` is written in `text` exactly as the model produces it last, located by its answer."""
    if core is None:
        return None
    a, b = core
    if t.text is not None and t.start is not None:  # the answer's place inside the turn's own text
        own = answer_spans(chat, msgs[: t.j + 1], tools, {t.i: t.j}, t.upto).get(t.i)
        if own is None:
            return None
        start = a - (own[0] - t.start)
        return (start, start + len(t.text)) if start >= 0 and text.startswith(t.text, start) else None
    # No render of the turn as the last one agrees with its prompt (e.g. Mistral v0.3 writes the system
    # prompt into the last user turn only): take the template's plain turn shape from the probe.
    start, end = a - len(sh.lead), after(text, b, sh.marker)
    return (start, end) if start >= 0 and end is not None and text[start:a] == sh.lead else None


def search(t: Turn, text: str, lo: int, hi: int, header: str, part: str | None = None):
    """`part` (default: the turn's own text) right after `header`, between the turn's located neighbours:
    how turns with no answer to mark (tool calls only) are found."""
    part = t.text if part is None else part
    if not part or not part.strip():
        return None
    k = text.find(part, lo, hi)
    while k >= 0 and not text[:k].endswith(header):
        k = text.find(part, k + 1, hi)
    return (k, k + len(part)) if k >= 0 else None


def locate(chat, msgs, tools, turns: list[Turn], text: str, sh: Shape) -> dict[int, tuple[int, int] | None]:
    """Each turn's span in `text` (a render of `msgs`), or None where the template writes it differently."""
    found = {t.i: fast(t, text) for t in turns}
    missing = [t for t in turns if found[t.i] is None]
    cores = answer_spans(chat, msgs, tools, {t.i: t.j for t in missing}, text) if missing else {}
    for t in missing:
        found[t.i] = find(chat, msgs, tools, t, text, cores.get(t.i), sh)
    for t in missing:
        if found[t.i] is None:
            lo = max((s[1] for i, s in found.items() if s is not None and i < t.i), default=0)
            hi = min((s[0] for i, s in found.items() if s is not None and i > t.i), default=len(text))
            found[t.i] = search(t, text, lo, hi, sh.header)
    return found, cores


def as_rendered(t: Turn, text: str, core, sh: Shape, lo: int, hi: int) -> tuple[int, int] | None:
    """A rewritten turn trained as the whole render writes it: from its answer (with the template's lead
    before it) to its end marker; a turn with no answer to mark (tool calls only) is found as the longest
    part of its own text after the reasoning that history turns lose."""
    if core is not None:
        a, b = core
        start = a - len(sh.lead) if sh.lead and text[:a].endswith(sh.lead) else a
        end = after(text, b, sh.marker)
        if end is None and sh.marker:  # tool calls between the answer and the marker
            k = text.find(sh.marker, b, hi)
            end = k + len(sh.marker) if k >= 0 else None
        return start, b if end is None else end
    if t.text is None:
        return None
    rest = t.text.rpartition("</think>")[2]
    for k in range(len(rest) - len(rest.lstrip()) + 1):
        if span := search(t, text, lo, hi, sh.header, rest[k:]):
            return span
    return None
