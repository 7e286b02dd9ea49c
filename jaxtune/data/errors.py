"""Data errors that say where the problem is, and the raise-or-skip policy that handles them.

Every problem found in user data is a `DataError` naming the file, the row (0-based index of the record in
its file; line-based files also give the 1-based line an editor shows) and the field. With
`on_error="skip"` the record is dropped, counted by reason and logged: never silent.
"""

from __future__ import annotations

import collections
import logging

from jaxtune.errors import JaxtuneError, RunError

log = logging.getLogger("jaxtune.data")

# Logging every skipped row of a million-row file would drown the log; the first few show the pattern and
# the summary carries the counts.
_LOGGED_PER_REASON = 5


class DataError(JaxtuneError, ValueError):
    """A problem in user data, located by file, row and field."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        row: int | None = None,
        field: str | None = None,
        line: int | None = None,
        reason: str | None = None,
    ):
        self.message, self.file, self.row, self.field, self.line = message, file, row, field, line
        # A short stable key used to count skips ("missing field", "bad json", ...).
        self.reason = reason or message.split(":")[0]
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.file is not None:
            where.append(str(self.file))
        if self.row is not None:
            where.append(f"row {self.row}" + (f" (line {self.line})" if self.line is not None else ""))
        elif self.line is not None:
            where.append(f"line {self.line}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return (", ".join(where) + ": " if where else "") + self.message

    def at(self, *, file=None, row=None, field=None, line=None) -> DataError:
        """The same error with missing location parts filled in by an outer caller."""
        return DataError(
            self.message,
            file=self.file if self.file is not None else file,
            row=self.row if self.row is not None else row,
            field=self.field if self.field is not None else field,
            line=self.line if self.line is not None else line,
            reason=self.reason,
        )


class ErrorPolicy:
    """`on_error`: "raise" stops at the first bad record; "skip" drops it, counts it and logs it."""

    def __init__(self, on_error: str = "raise"):
        if on_error not in ("raise", "skip"):
            raise RunError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.skipped: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}

    def handle(self, err: DataError) -> None:
        if self.on_error == "raise":
            raise err
        self.skipped[err.reason] += 1
        self.examples.setdefault(err.reason, str(err))
        if self.skipped[err.reason] <= _LOGGED_PER_REASON:
            self.tell(err)

    def tell(self, err: DataError) -> None:
        """One of the first few skips of its reason: logged."""
        log.warning("skipping bad record: %s", err)

    @property
    def total(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        if not self.skipped:
            return "no records skipped"
        parts = [f"{n} x {reason}" for reason, n in self.skipped.most_common()]
        return f"skipped {self.total} records: " + ", ".join(parts)

    def log_summary(self) -> None:
        if self.skipped:
            log.warning(self.summary())
