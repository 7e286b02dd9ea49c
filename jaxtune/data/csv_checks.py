"""Checks of CSV/TSV text: its header (`check_header`), and its quotes (`check_quotes`), so that an unclosed
quote is reported where it opens, not where reading stops.

Python's `csv` module (like most readers) accepts an unclosed quote silently: the field runs on to the next
quote character or to the end of the file, swallowing the records in between (rows merge into one answer),
or a later "missing field" error points lines away from the cause. `check_quotes` walks the text quote by
quote (it jumps between quote characters) with the same rules as `csv` and finds a quoted field that
- reaches the end of the file,
- closes right before more text (`"a1 ... q3,,"a3"` closes at the quote that opened `"a3"`), or
- spans following lines that each look like a record of the file (every one has exactly the header's number
  of cells, with at least 3 columns: two-column prose with one comma per line is too common to judge),
and returns a `DataError` located at the opening quote (file, line, row, column name). A quoted field whose
lines merely contain some record-like line is legitimate often enough (code, lists) that it only warrants a
warning, which `check_quotes` returns as text. Closed multi-line quoted fields pass. The walk is Python,
so it runs only when `suspicious` (the `csv` module in strict mode, at C speed) finds something.
"""

from __future__ import annotations

import csv
import io
import re

from jaxtune.data.errors import DataError

_NEWLINE = re.compile(r"\r\n|\r|\n")
# A newline that ends an empty line (csv yields no record for it): after \n, or after a lone \r.
_BLANK = re.compile(r"(?<=\n)(?:\r\n|\r|\n)|(?<=\r)(?:\r\n|\r)")


def _newlines(text: str, a: int, b: int) -> int:
    return text.count("\n", a, b) + text.count("\r", a, b) - text.count("\r\n", a, b)


def _cells(line: str, delimiter: str) -> int:
    return len(next(csv.reader([line], delimiter=delimiter), []))


def _record_like(lines, delimiter: str, ncols: int) -> list[int]:
    """Indices of the (index, line) pairs that read as a record of `ncols` cells."""
    return [i for i, ln in lines if ln.count(delimiter) >= ncols - 1 and _cells(ln, delimiter) == ncols]


def suspicious(text: str, delimiter: str, ncols: int) -> bool:
    """A fast pass (the csv module, strict): True when `check_quotes` has something to locate or warn about."""
    if '"' not in text:
        return False
    try:
        for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True):
            for v in row:
                if ("\n" in v or "\r" in v) and ncols >= 2:
                    if _record_like(enumerate(_NEWLINE.split(v)[1:], 1), delimiter, ncols):
                        return True
    except csv.Error:  # a quote left open to the end of the file, or text right after a closing quote
        return True
    return False


class _Walk:
    """Position of the walk: line (1-based), record (0 = header), column of the current field."""

    def __init__(self, text: str, delimiter: str):
        self.text, self.delimiter = text, delimiter
        self.line, self.record, self.col, self.line_start = 1, 0, 0, 0

    def advance(self, a: int, b: int) -> None:
        """Move over unquoted text [a, b): count its newlines, records and delimiters."""
        text = self.text
        nl = _newlines(text, a, b)
        if nl:
            last = max(text.rfind("\n", a, b), text.rfind("\r", a, b))
            self.line += nl
            self.record += nl - len(_BLANK.findall(text, a, b))
            self.col, self.line_start = text.count(self.delimiter, last + 1, b), last + 1
        else:
            self.col += text.count(self.delimiter, a, b)


def check_quotes(
    text: str, file: str, header: list[str], delimiter: str = ",", quote: str = '"'
) -> tuple[DataError | None, list[str]]:
    """(the first quoting error or None, warnings) for CSV `text` whose first record is `header`."""
    warnings: list[str] = []
    if quote not in text:
        return None, warnings
    walk, pos, n, ncols = _Walk(text, delimiter), 0, len(text), len(header)

    def name(col: int, record: int) -> str:
        if record == 0:
            return f"header column {col + 1}"
        return header[col] if col < ncols else f"column {col + 1} (beyond the header's {ncols})"

    while True:
        j = text.find(quote, pos)
        if j < 0:
            return None, warnings
        walk.advance(pos, j)
        if j > 0 and text[j - 1] not in (delimiter, "\n", "\r"):
            pos = j + 1  # a quote inside an unquoted field is kept as a character (csv's default)
            continue
        open_line, record, col = walk.line, walk.record, walk.col
        where = dict(file=file, row=record - 1 if record else None, line=open_line, field=name(col, record))
        k = j + 1
        while True:
            end = text.find(quote, k)
            if end < 0:
                err = DataError(
                    "unclosed quote: the quoted field opened on this line runs to the end of the file; close "
                    f"it (a quote inside a quoted field is written twice: {quote}{quote})",
                    reason="unclosed quote",
                    **where,
                )
                return err, warnings
            if text.startswith(quote, end + 1):
                k = end + 2  # a doubled quote: a literal quote character
                continue
            break
        spanned = _newlines(text, j, end)
        nxt = text[end + 1] if end + 1 < n else ""
        if nxt and nxt not in (delimiter, "\n", "\r"):
            if spanned:
                msg = (
                    f"unclosed quote: the quoted field opened on this line runs over {spanned} line(s) to a quote "
                    f"at line {open_line + spanned} that is followed by more text; close the quote on its own "
                    f"line (a literal quote is written twice: {quote}{quote})"
                )
            else:
                msg = f"text after a closing quote ({quote}...{quote}{nxt}...); quote the whole field"
            return DataError(msg, reason="unclosed quote" if spanned else "bad CSV", **where), warnings
        if spanned and ncols >= 2:
            lines = [(i, ln) for i, ln in enumerate(_NEWLINE.split(text[j + 1 : end])[1:], 1) if ln.strip()]
            like = _record_like(lines, delimiter, ncols)
            if lines and len(like) == len(lines) and ncols >= 3:
                err = DataError(
                    f"unclosed quote: the quoted field opened on this line spans the next {spanned} line(s), "
                    f"each of which reads as a record of {ncols} cells; close the quote where the field ends "
                    f"(a literal quote is written twice: {quote}{quote})",
                    reason="unclosed quote",
                    **where,
                )
                return err, warnings
            if like:
                warnings.append(
                    f"{file}, line {open_line}, field '{where['field']}': a quoted field spans {spanned} line(s), "
                    f"and line {open_line + like[0]} inside it reads like a record of {ncols} cells; if a "
                    "quote was left unclosed, records were merged into this field"
                )
        walk.line += spanned
        pos = end + 1


def check_header(header: list[str], file: str, delimiter: str) -> None:
    """Column names that a table reader would silently mangle: none, empty, duplicated, wrong delimiter."""

    def bad(message: str) -> DataError:
        return DataError(message, file=file, line=1, field="header", reason="bad CSV")

    if len(header) == 1:
        for other, name in ((";", "';'"), ("\t", "tabs"), (",", "','"), ("|", "'|'")):
            if other != delimiter and other in header[0]:
                raise bad(f"the header has one column ({header[0]!r}); is the file delimited by {name}?")
    seen = set()
    for i, col in enumerate(header):
        if not col.strip():
            raise bad(f"header column {i + 1} has no name")
        if col in seen:
            raise bad(f"the header names column {col!r} twice")
        seen.add(col)
