"""Errors a user can act on. The CLI prints them without a traceback."""

from __future__ import annotations


class QtuneError(Exception):
    """A problem with the user's input or setup (not a bug in qtune)."""


class DataError(QtuneError):
    """Bad input data, located by file, line and field."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.path, self.line, self.field, self.reason = path, line, field, message
        where = []
        if path is not None:
            where.append(str(path) if line is None else f"{path}:{line}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
