"""Readers: files on disk -> raw rows (dicts), each tagged with its file, row and line.

Supported: JSON (a list of objects; a `.json` file holding JSON lines is read as JSONL), JSONL, CSV, Parquet,
TXT (one document per line, or per blank-line-separated block), `.gz` of the text formats, directories of
these, and anything else through `datasets` (`save_to_disk` folders, Arrow files), imported lazily because
some machines lack it. Readers are generators so that streaming never holds a file's records in memory
(except JSON arrays, which are parsed whole: use JSONL for larger-than-memory data).

A file with nothing to read (empty, only whitespace, `[]`, `{}`, a CSV header alone, a Parquet file with no
rows) is an error naming it: a source that reads as nothing is almost always a failed export. In a directory,
such a file among others is an error too with `on_error: raise` (the message says how to skip it), and a
counted, logged skip ("empty file") with `on_error: skip`; a directory whose files are all empty is an error.
JSON is read strictly, except that a trailing comma before an array's closing `]` and the constants NaN and
Infinity (which Python's json accepts) are read with a warning naming the file and line, once per file.

Bad bytes are found by decoding with `surrogateescape`: a non-UTF-8 byte becomes a lone surrogate that
survives JSON parsing, so the error can name the field that holds it, not just the line.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

from jaxtune.data import csv_checks
from jaxtune.data.errors import DataError, ErrorPolicy, log
from jaxtune.data.json_text import Lenient, hint, json_error

TEXT_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt")
SUFFIXES = TEXT_SUFFIXES + (".parquet",)
_BAD_BYTE = re.compile("[\udc80-\udcff]")
_WS = re.compile(r"[ \t\n\r]*")
_MESSAGE_COLUMNS = ("messages", "conversations", "chosen", "rejected", "prompt", "completion")


@dataclasses.dataclass(frozen=True)
class RawRow:
    file: str
    row: int  # 0-based index of the record in its file
    line: int | None  # 1-based line for line-based files
    data: dict


def suffix_of(path: Path) -> str:
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    return Path(name).suffix


def read_rows(path: str | Path, policy: ErrorPolicy | None = None, split: str = "train") -> Iterator[RawRow]:
    """Yield the raw rows of a file or directory; bad rows go through `policy` (default: raise)."""
    policy = policy or ErrorPolicy("raise")
    path = Path(path)
    if not path.exists():
        raise DataError("no such file or directory", file=str(path), reason="missing file")
    if path.is_dir():
        yield from _read_dir(path, policy, split)
        return
    reader = _READERS.get(suffix_of(path))
    if reader is None:
        yield from _read_with_datasets(path, split)
    else:
        yield from reader(path, policy)


def _read_dir(path: Path, policy: ErrorPolicy, split: str) -> Iterator[RawRow]:
    if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
        yield from _read_with_datasets(path, split)  # a `datasets.save_to_disk` folder
        return
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and not p.name.startswith(".")
        and suffix_of(p) in SUFFIXES
        and p.name != "dataset_info.json"
    )
    if not files:
        raise DataError(
            f"directory holds no {'/'.join(SUFFIXES)} files", file=str(path), reason="empty directory"
        )
    empty: list[str] = []
    for f in files:
        try:
            yield from read_rows(f, policy, split)
        except DataError as err:
            if err.reason != EMPTY or err.file != str(f):
                raise
            empty.append(f.name)
            if len(empty) == len(files):
                raise DataError(
                    f"the directory holds no rows: all its {len(files)} data files are empty "
                    f"({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''})",
                    file=str(path),
                    reason=EMPTY,
                ) from None
            policy.handle(
                DataError(
                    f"{err.message} (in the directory {path}, among {len(files)} data files: remove it, or set "
                    "data.on_error: skip to skip empty files)"
                    if policy.on_error == "raise"
                    else f"{err.message}; skipped (in the directory {path})",
                    file=err.file,
                    reason=EMPTY,
                )
            )


EMPTY = "empty file"


def _empty(path, text: str | None = None, what: str | None = None) -> DataError:
    """The error for a file with no rows: empty, only whitespace, or `what` (e.g. "an empty JSON list")."""
    if what is None:
        what = "the file is empty" if not text else "the file holds only whitespace"
    return DataError(f"{what}: no rows to read", file=str(path), reason=EMPTY)


def _open_bytes(path: Path) -> bytes:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        return f.read()


def _decode(raw: bytes) -> tuple[str, bool]:
    """Text and whether it held non-UTF-8 bytes (kept as lone surrogates to be located later)."""
    try:
        return raw.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="surrogateescape").lstrip("\ufeff"), True


def _bad_field(value, path: str = "") -> str | None:
    """Dotted path of the first string holding a non-UTF-8 byte, e.g. `conversations[1].value`."""
    if isinstance(value, str):
        return path or "<value>" if _BAD_BYTE.search(value) else None
    if isinstance(value, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub, v in items:
        found = _bad_field(v, sub)
        if found:
            return found
    return None


def _utf8_error(file: str, row: int, line: int | None, data) -> DataError:
    field = _bad_field(data)
    return DataError(
        "text is not valid UTF-8; re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
        file=file,
        row=row,
        line=line,
        field=field,
        reason="non-UTF-8 bytes",
    )


def _object_or_error(obj, file: str, row: int, line: int | None) -> dict:
    if not isinstance(obj, dict):
        raise DataError(
            f"expected a JSON object per record, got {type(obj).__name__}",
            file=file,
            row=row,
            line=line,
            reason="record is not an object",
        )
    return obj


def _parse_line(line: str, bad: bool, file: str, row: int, lineno: int, lenient: Lenient) -> dict:
    try:
        obj = lenient.loads(line, lineno)
    except json.JSONDecodeError as e:
        raise DataError(
            f"malformed JSON line ({e.msg} at column {e.colno}{hint(line, e.pos)})",
            file=file,
            row=row,
            line=lineno,
            reason="malformed JSON",
        ) from None
    obj = _object_or_error(obj, file, row, lineno)
    if bad and _BAD_BYTE.search(line):
        raise _utf8_error(file, row, lineno, obj)
    return obj


def _jsonl_rows(lines, file: str, policy: ErrorPolicy) -> Iterator[RawRow]:
    """`lines` yields (lineno, text, had_bad_bytes); blank lines are not rows."""
    row, seen_text, lenient = 0, False, Lenient(file)
    for lineno, line, bad in lines:
        seen_text = seen_text or bool(line)
        if not line.strip():
            continue
        try:
            yield RawRow(file, row, lineno, _parse_line(line, bad, file, row, lineno, lenient))
        except DataError as err:
            policy.handle(err)
        row += 1
    if not row:
        raise _empty(file, " " if seen_text else "")


def _read_jsonl(path: Path, policy: ErrorPolicy) -> Iterator[RawRow]:
    # Line by line, so that streaming never reads the whole file.
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        lines = ((i, *_decode(raw)) for i, raw in enumerate(f, start=1))
        yield from _jsonl_rows(lines, str(path), policy)


def _read_json(path: Path, policy: ErrorPolicy) -> Iterator[RawRow]:
    text, bad = _decode(_open_bytes(path))
    file = str(path)
    pos = _WS.match(text).end()
    if pos == len(text):
        raise _empty(file, text)
    lenient = Lenient(file)
    if text[pos] == "{":
        yield from _read_json_object(text, bad, file, policy, lenient)
        return
    if text[pos] != "[":
        raise DataError(
            "expected a JSON list of records (or JSON lines)",
            file=file,
            line=text.count("\n", 0, pos) + 1,
            reason="malformed JSON",
        )
    pos = _WS.match(text, pos + 1).end()
    if text.startswith("]", pos):
        raise _empty(file, what="the file holds an empty JSON list")
    row, line, counted = 0, 1, 0
    while pos < len(text) and text[pos] != "]":
        line, counted = line + text.count("\n", counted, pos), pos  # incremental: O(file), not O(rows x file)
        try:
            lenient.line = line
            obj, end = lenient.decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            # The rest of a broken array cannot be re-synchronised: report it and stop reading this file.
            policy.handle(DataError(json_error(text, e), file=file, row=row, line=line, reason="malformed JSON"))
            return
        try:
            obj = _object_or_error(obj, file, row, line)
            if bad and _BAD_BYTE.search(text, pos, end):
                raise _utf8_error(file, row, line, obj)
            yield RawRow(file, row, line, obj)
        except DataError as err:
            policy.handle(err)
        row += 1
        pos = _WS.match(text, end).end()
        if pos < len(text) and text[pos] == ",":
            comma = pos
            pos = _WS.match(text, pos + 1).end()
            if text.startswith("]", pos):  # `[..., ]`: unambiguous, read with a warning
                log.warning(
                    "%s, line %d: trailing comma before the closing ']' (not strict JSON; read as if absent)",
                    file,
                    text.count("\n", 0, comma) + 1,
                )
        elif pos >= len(text) or text[pos] != "]":
            found = "the end of the file" if pos >= len(text) else repr(text[pos])
            policy.handle(
                DataError(
                    f"malformed JSON (expected ',' or ']' after the record, found {found} at column "
                    f"{pos - text.rfind(chr(10), 0, pos)}){'; the file may be truncated' if pos >= len(text) else ''}",
                    file=file,
                    row=row,
                    line=text.count("\n", 0, pos) + 1,
                    reason="malformed JSON",
                )
            )
            return
    rest = _WS.match(text, pos + 1).end()
    if pos < len(text) and rest < len(text):
        # e.g. two lists written one after the other, or a stray bracket: not silently ignored
        line = text.count("\n", 0, rest) + 1
        policy.handle(
            DataError(
                f"malformed JSON (more text after the list's closing ']' at line {line} column "
                f"{rest - text.rfind(chr(10), 0, rest)}: {text[rest : rest + 20]!r})",
                file=file,
                line=line,
                reason="malformed JSON",
            )
        )


def _read_json_object(text: str, bad: bool, file: str, policy: ErrorPolicy, lenient: Lenient):
    """A `.json` file starting with `{`: one record, or JSON lines saved with a .json suffix (common)."""
    try:
        lenient.line = 1
        whole = lenient.decoder.decode(text)
    except json.JSONDecodeError as e:
        first = next((i for i, ln in enumerate(text.splitlines(), start=1) if ln.strip()), 1)
        try:
            json.loads(text.splitlines()[first - 1])
        except json.JSONDecodeError:  # the first line is no record alone: one (multi-line) broken object
            raise DataError(json_error(text, e), file=file, row=0, line=first, reason="malformed JSON") from None
        lines = ((i, ln, bad) for i, ln in enumerate(text.splitlines(), start=1))
        yield from _jsonl_rows(lines, file, policy)
        return
    if not whole:
        raise _empty(file, what="the file holds an empty JSON object")
    lists = [k for k, v in whole.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    if len(whole) == 1 and lists and lists[0] not in _MESSAGE_COLUMNS:  # {"data": [...]}: a wrapper
        raise DataError(
            f"the file holds one object with a list of records under '{lists[0]}'; save the list itself "
            "(or JSON lines)",
            file=file,
            reason="malformed JSON",
        )
    if bad and _BAD_BYTE.search(text):
        raise _utf8_error(file, 0, 1, whole)
    yield RawRow(file, 0, 1, whole)  # a single record


def _read_csv(path: Path, policy: ErrorPolicy, delimiter: str = ",") -> Iterator[RawRow]:
    text, bad = _decode(_open_bytes(path))
    file = str(path)
    if not text.strip():
        raise _empty(file, text)
    header = next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), [])
    quote_error, warnings = None, []
    if csv_checks.suspicious(text, delimiter, len(header)):
        quote_error, warnings = csv_checks.check_quotes(text, file, header, delimiter)
    for w in warnings[:1]:  # once per file: the first is the pattern
        log.warning("%s", w)
    if quote_error is not None and quote_error.row is None:  # in the header: nothing can be read
        raise quote_error
    csv_checks.check_header(header, file, delimiter)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    _ = reader.fieldnames  # reads the header
    end, row = reader.line_num, -1
    for row, obj in enumerate(reader):
        start, end = end + 1, reader.line_num  # a record may span lines: the first one is where it starts
        if quote_error is not None and row >= quote_error.row:
            policy.handle(quote_error)  # the rest of the file cannot be re-synchronised
            return
        try:
            if None in obj:
                raise DataError(
                    f"more cells than header columns ({len(header) + len(obj[None])} cells, {len(header)} "
                    "columns); quote cells that hold the delimiter",
                    file=file, row=row, line=start, reason="bad CSV",
                )  # fmt: skip
            short = [k for k, v in obj.items() if v is None]
            if short:
                raise DataError(
                    f"fewer cells than header columns ({len(header) - len(short)} of {len(header)}; missing: "
                    f"{', '.join(short)})",
                    file=file, row=row, line=start, field=short[0], reason="bad CSV",
                )  # fmt: skip
            if bad and any(isinstance(v, str) and _BAD_BYTE.search(v) for v in obj.values()):
                raise _utf8_error(file, row, start, obj)
            yield RawRow(file, row, start, obj)
        except DataError as err:
            policy.handle(err)
    if quote_error is not None:
        policy.handle(quote_error)
    elif row < 0:
        raise _empty(file, what=f"the file holds only a header row ({', '.join(header)})")


def _read_tsv(path: Path, policy: ErrorPolicy) -> Iterator[RawRow]:
    yield from _read_csv(path, policy, "\t")


def _read_txt(path: Path, policy: ErrorPolicy) -> Iterator[RawRow]:
    """One document per line; or per block when the file has blank lines separating paragraphs."""
    text, bad = _decode(_open_bytes(path))
    if not text.strip():
        raise _empty(path, text)
    lines = text.splitlines()
    filled = [i for i, ln in enumerate(lines) if ln.strip()]
    # Blocks only when a blank line separates text (trailing blank lines do not count).
    by_block = bool(filled) and any(not ln.strip() for ln in lines[filled[0] : filled[-1]])
    docs: list[tuple[int, str]] = []
    if by_block:
        start, buf = None, []
        for i, ln in enumerate(lines + [""], start=1):
            if ln.strip():
                start = start or i
                buf.append(ln)
            elif buf:
                docs.append((start, "\n".join(buf)))
                start, buf = None, []
    else:
        docs = [(i, ln) for i, ln in enumerate(lines, start=1) if ln.strip()]
    for row, (line, doc) in enumerate(docs):
        if bad and _BAD_BYTE.search(doc):
            policy.handle(_utf8_error(str(path), row, line, {"text": doc}))
            continue
        yield RawRow(str(path), row, line, {"text": doc})


def _read_parquet(path: Path, policy: ErrorPolicy) -> Iterator[RawRow]:
    import pyarrow.parquet as pq  # lazily: only parquet users need pyarrow

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            yield RawRow(str(path), row, None, obj)
            row += 1
    if not row:
        raise _empty(path, what="the file holds no rows (a Parquet table of 0 rows)")


def _read_with_datasets(path: Path, split: str) -> Iterator[RawRow]:
    try:
        import datasets  # lazily: optional, heavy, absent on some machines
    except ImportError:
        raise DataError(
            f"unsupported file type (supported: {', '.join(SUFFIXES)}); other types need `pip install datasets`",
            file=str(path),
            reason="unsupported file",
        ) from None
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
    elif path.is_dir():
        ds = datasets.load_dataset(str(path), split=split)
    else:
        builder = {".arrow": "arrow"}.get(suffix_of(path))
        if builder is None:
            raise DataError(
                f"unsupported file type '{path.suffix}' (supported: {', '.join(SUFFIXES)}, .arrow, dataset folders)",
                file=str(path),
                reason="unsupported file",
            )
        ds = datasets.load_dataset(builder, data_files=str(path), split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"no split '{split}' (has {sorted(ds)})", file=str(path), reason="missing split")
        ds = ds[split]
    if len(ds) == 0:
        raise _empty(path, what=f"the dataset holds no rows (split '{split}')")
    for row, obj in enumerate(ds):
        yield RawRow(str(path), row, None, dict(obj))


_READERS = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".csv": _read_csv,
    ".tsv": _read_tsv,
    ".txt": _read_txt,
    ".parquet": _read_parquet,
}
