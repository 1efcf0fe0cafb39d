"""Helpers for tests that talk to a server (or start processes that listen)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a test server or a torchrun rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_api_error(response, status: int, *parts: str, code: str | None = None, param: str | None = None) -> dict:
    """The serving contract's error: this status, `{"error": {message, type, param, code}}`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for part in parts:
        assert part in error["message"], error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error
