"""JSON syntax help: what a syntax error most likely is, and warnings for the JSON Python reads beyond the standard.

Python's json accepts NaN, Infinity and -Infinity; `Lenient` reads them and warns once per file naming the line.
Anything else non-standard (comments, single quotes, trailing commas inside objects) is an error whose message
`json_error` locates (line and column) and explains (`hint`).
"""

from __future__ import annotations

import json

from jaxtune.data.errors import log


def hint(text: str, pos: int) -> str:
    """What a JSON syntax error at `pos` most likely is, for the usual non-JSON habits."""
    ch = text[pos : pos + 1]
    before = text[:pos].rstrip()[-1:]
    if before == "," and ch in "}]":
        return "; a trailing comma is not JSON"
    if ch == "/" or ch == "#":
        return "; comments are not JSON"
    if ch == "'":
        return "; JSON strings and keys need double quotes"
    return ""


class Lenient:
    """Warns once per file about JSON that Python reads but the standard does not allow (NaN, Infinity)."""

    def __init__(self, file: str):
        self.file, self.warned, self.line = file, False, None
        self.decoder = json.JSONDecoder(parse_constant=self._constant)

    def _constant(self, name: str) -> float:
        if not self.warned:
            self.warned = True
            log.warning(
                "%s, line %s: non-standard JSON constant %s read as a float (strict JSON has no NaN or "
                "Infinity; further ones in this file are not reported)",
                self.file,
                self.line,
                name,
            )
        return float(name)

    def loads(self, text: str, line: int):
        self.line = line
        return self.decoder.decode(text)


def json_error(text: str, e: json.JSONDecodeError, what: str = "malformed JSON") -> str:
    at_end = not text[e.pos :].strip()
    tail = "; the file may be truncated" if at_end else ""
    return f"{what} ({e.msg} at line {e.lineno} column {e.colno}{hint(text, e.pos)}){tail}"
