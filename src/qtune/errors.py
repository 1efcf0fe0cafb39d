"""Errors a user can act on. The CLI prints them without a traceback."""

from __future__ import annotations

import contextlib
import logging


class QtuneError(Exception):
    """A problem with the user's input or setup (not a bug in qtune)."""


class RegressionError(QtuneError):
    """A run asked to fail on a regression (`--fail-on-regression`) ended no better than its base;
    the CLI exits with `exit_code`, distinct from a user error's 2."""

    exit_code = 3


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


# The JSON error `type` of each HTTP status (OpenAI's names).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               408: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable"}


class RequestError(QtuneError):
    """A request the client got wrong (or a state it must wait out): an HTTP status and the JSON
    error shape `{"error": {message, type, param, code}}`. Raised by the tasks' request handlers,
    answered by the server."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.message, ERROR_TYPES.get(self.status, "server_error"), self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@contextlib.contextmanager
def held_logs(*names: str):
    """Hold back what the loggers `names` log during the block (from any thread), and yield the
    records as a list. Whatever is left in the list when the block ends is logged as it would have
    been; a caller that turns a library failure into one QtuneError clears it first, so the user
    sees that line instead of the library's tracebacks. A logger's filter sees only records logged
    on that very logger (not those its children pass up), so `names` are the exact loggers."""
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addFilter(hold)
    try:
        yield held
    finally:
        for logger in loggers:
            logger.removeFilter(hold)
        for record in held:
            logging.getLogger(record.name).handle(record)
