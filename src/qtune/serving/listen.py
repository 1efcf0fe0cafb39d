"""How the server listens: the port is checked before any model loads, and a connection whose
request headers do not arrive in time is closed (uvicorn times out idle keep-alive connections and,
in qtune, request bodies, but not headers: clients trickling header lines held connections open
for as long as they liked).

Only the socket module is imported here; uvicorn loads when the protocol is built.
"""

from __future__ import annotations

import errno
import json
import socket

from qtune.errors import QtuneError, error_body


def check_port(host: str, port: int) -> None:
    """Raise QtuneError unless `host`:`port` can be listened on now, as uvicorn will listen (the
    address family from the host, SO_REUSEADDR): a server whose port is taken fails before it
    spends minutes loading models."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as error:
        reason = error.strerror or str(error)
        if error.errno == errno.EADDRINUSE:
            raise QtuneError(f"port {port} on {host} is in use ({reason}); stop what listens there or pick "
                             "another --port") from None
        raise QtuneError(f"cannot listen on {host} port {port} ({reason})") from None


def header_timeout_protocol(timeout_s: float):
    """uvicorn's h11 HTTP protocol, closing a connection whose request headers are not complete
    `timeout_s` seconds after it opened or after its previous answer was sent. A client that sent
    part of a request gets a 408 first; one that sent nothing is just closed (as uvicorn closes an
    idle keep-alive connection). Pass it as `uvicorn.Config(http=...)`."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json.dumps(error_body(f"the request headers did not arrive within {timeout_s:g} s", "invalid_request_error",
                                 code="header_timeout")).encode()
    timed_out = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                 b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    class HeaderTimeoutProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_deadline = None
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            self._cancel_header_deadline()
            self._header_deadline = self.loop.call_later(timeout_s, self._headers_late)

        def _cancel_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _headers_late(self) -> None:
            self._header_deadline = None
            # Still waiting for a request's head: h11 leaves IDLE once a whole head is parsed, and a
            # request being answered is never IDLE on both sides.
            waiting = self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
            if not waiting or self.transport.is_closing():
                return
            if self.conn.trailing_data[0]:  # part of a request arrived: say why it ends
                self.transport.write(timed_out)
            self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_deadline()  # the next request on this connection gets as long

        def connection_lost(self, exc) -> None:
            self._cancel_header_deadline()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
