"""Cleaning before tokenisation: normalise, drop empty records and duplicates, split off validation/test.

Normalisation is conservative so code and formatting survive: Unicode NFC, CRLF/CR -> LF, BOM and zero-width
no-break spaces removed, outer whitespace of each text stripped; inner whitespace is kept. Every dropped record
is counted by reason in a `Report`, which `inspect` prints and the pipeline logs.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import unicodedata

import numpy as np

from jaxtune.data import dedup as dd
from jaxtune.data.records import TRAINED_ROLES, Conversation, Message, Preference, Record, Text, record_text
from jaxtune.errors import RunError

log = logging.getLogger("jaxtune.data")


@dataclasses.dataclass
class Report:
    """What happened to the data, for logs and `inspect`."""

    loaded: int = 0
    kept: int = 0
    filtered: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    truncated: int = 0
    chunked: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # bad records
    # Tokens trained by turn kind and untrained, and the turns a chat template rewrites (see data/jinja.py).
    tokens: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    # Per data file: [records loaded, records kept (reaching tokenisation), examples made, last row counted];
    # each record counts once (streaming data is read again every epoch: later passes are not counted).
    by_file: dict = dataclasses.field(default_factory=dict)

    def merge(self, other: Report) -> Report:
        by_file = {f: list(v) for f, v in self.by_file.items()}
        add_file_counts(by_file, other.by_file.items())
        return Report(
            self.loaded + other.loaded,
            self.kept + other.kept,
            self.filtered + other.filtered,
            self.truncated + other.truncated,
            self.chunked + other.chunked,
            self.skipped + other.skipped,
            self.tokens + other.tokens,
            by_file,
        )

    def count_loaded(self, record: Record) -> None:
        self.by_file.setdefault(record.file, [0, 0, 0, -1])[0] += 1

    def count_encoded(self, record: Record, items: int) -> None:
        """A record reached tokenisation and made `items` examples (counted on its first pass only)."""
        entry = self.by_file.setdefault(record.file, [0, 0, 0, -1])
        row = -1 if record.row is None else record.row
        if row > entry[3] or record.row is None:
            entry[1] += 1
            entry[2] += items
            entry[3] = max(entry[3], row)

    def per_file(self) -> str:
        """Where the examples come from, for errors about too little data: each file's counts, and why
        records were dropped."""
        parts = []
        for file, (loaded, kept, items, _) in self.by_file.items():
            read = f"{loaded} records read, " if loaded else ""
            parts.append(f"{file}: {read}{kept} kept -> {items} examples")
        drops = [f"{n} x {reason}" for reason, n in (self.filtered + self.skipped).most_common()]
        out = "; ".join(parts) or "no records reached tokenisation"
        return out + (f" (dropped: {', '.join(drops)})" if drops else "")

    def lines(self) -> list[str]:
        out = [f"records loaded: {self.loaded}, kept: {self.kept}"]
        out += [f"  filtered ({reason}): {n}" for reason, n in self.filtered.most_common()]
        out += [f"  skipped as bad input ({reason}): {n}" for reason, n in self.skipped.most_common()]
        if self.truncated:
            out.append(f"  truncated to cutoff_len (prompt cut first): {self.truncated}")
        if self.chunked:
            out.append(f"  long documents split into several rows: {self.chunked}")
        tokens = {k: n for k, n in self.tokens.items() if k.startswith(("trained", "not trained"))}
        if tokens:
            trained = sum(n for k, n in tokens.items() if k.startswith("trained"))
            parts = ", ".join(f"{k}: {n}" for k, n in sorted(tokens.items()))
            out.append(f"tokens trained: {trained} of {sum(tokens.values())} ({parts})")
        out += [f"  {k}: {n}" for k, n in sorted(self.tokens.items()) if "turns" in k and n]
        return out


def add_file_counts(by_file: dict, items) -> None:
    """Add (file, [loaded, kept, examples, last row]) pairs into a `Report.by_file` mapping."""
    for f, v in items:
        mine = by_file.setdefault(f, [0, 0, 0, -1])
        by_file[f] = [a + b for a, b in zip(mine[:3], v[:3])] + [max(mine[3], v[3])]


def clean_text(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "").strip()


def _clean_msgs(msgs) -> tuple[Message, ...]:
    return tuple(
        dataclasses.replace(
            m,
            content=clean_text(m.content),
            reasoning=clean_text(m.reasoning) if m.reasoning else m.reasoning,
        )
        for m in msgs
    )


def _said(m: Message) -> bool:
    return bool(m.content.strip() or m.tool_calls)


def normalize(record: Record) -> Record:
    if isinstance(record, Text):
        return dataclasses.replace(record, text=clean_text(record.text))
    system = clean_text(record.system) if record.system else record.system
    if isinstance(record, Preference):
        return dataclasses.replace(
            record,
            prompt=_clean_msgs(record.prompt),
            chosen=_clean_msgs(record.chosen),
            rejected=_clean_msgs(record.rejected),
            system=system,
        )
    return dataclasses.replace(record, messages=_clean_msgs(record.messages), system=system)


def is_empty(record: Record) -> bool:
    """No text to learn from: an empty document, or only empty responses."""
    if isinstance(record, Text):
        return not record.text.strip()
    if isinstance(record, Preference):
        return not any(map(_said, record.chosen)) or not any(map(_said, record.rejected))
    responses = [m for m in record.messages if m.role in TRAINED_ROLES]
    if not responses:  # prompt-only records (PPO/GRPO) are judged by their prompt
        return not any(m.content.strip() for m in record.messages)
    return not any(map(_said, responses))


def clean(records: list[Record], dedup: str = "none", normalise: bool = True, report: Report | None = None):
    """Normalise, drop empty records and duplicates (`dedup`: none | exact | near)."""
    if dedup not in ("none", "exact", "near", None, False):
        raise RunError(f"dedup must be 'none', 'exact' or 'near', got {dedup!r}")
    report = report if report is not None else Report()
    report.loaded += len(records)
    out = []
    for r in records:
        report.count_loaded(r)
        r = normalize(r) if normalise else r
        if is_empty(r):
            report.filtered["empty"] += 1
        else:
            out.append(r)
    if dedup in ("exact", "near"):
        texts = [record_text(r) for r in out]
        drop = set(dd.exact_duplicates(texts))
        report.filtered["exact duplicate"] += len(drop)
        if dedup == "near":
            rest = [i for i in range(len(out)) if i not in drop]
            near = dd.near_duplicates([texts[i] for i in rest])
            report.filtered["near duplicate"] += len(near)
            drop |= {rest[j] for j in near}
        out = [r for i, r in enumerate(out) if i not in drop]
    report.kept += len(out)
    return out, report


def split(records: list, val_size: float = 0.0, test_size: float = 0.0, seed: int = 0):
    """(train, val, test) by ratio (0 < size < 1) or count (size >= 1), from one seeded permutation."""
    n = len(records)

    def count(size) -> int:
        if size is None or size <= 0:
            return 0
        k = int(round(size * n)) if size < 1 else int(size)
        if k >= n:
            raise RunError(f"split size {size} leaves no training data out of {n} records")
        return k

    n_val, n_test = count(val_size), count(test_size)
    if n_val + n_test >= n and n_val + n_test > 0:
        raise RunError(f"val_size={val_size} and test_size={test_size} leave no training data out of {n}")
    perm = np.random.default_rng([seed, 7]).permutation(n)
    pick = lambda idx: [records[i] for i in sorted(idx)]  # keep file order inside each split
    return pick(perm[n_val + n_test :]), pick(perm[:n_val]), pick(perm[n_val : n_val + n_test])


def as_prompt(record: Conversation) -> Conversation:
    """PPO/GRPO: drop the final assistant turn, keeping it as the reference answer unless one was given."""
    msgs = record.messages
    if msgs and msgs[-1].role == "assistant":
        answer = record.answer if record.answer is not None else msgs[-1].content
        return dataclasses.replace(record, messages=msgs[:-1], answer=answer)
    return record
