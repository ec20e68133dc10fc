"""uvicorn for a proxy in front of production traffic: header, body and idle timeouts on every connection.

uvicorn (0.54, httptools) times out only the idle gap between two keep-alive requests: a connection
that sends half a request line, or a body one byte a minute, is held forever, and a few thousand of
them exhaust the file descriptors. `guarded_protocol(...)` is uvicorn's own HttpToolsProtocol with two
timers added (the class is what uvicorn's `http=` setting takes):

- headers: from the connection's start (and from the first byte of each later request on a kept-alive
  connection) to the end of the request's headers; past it the client gets a 408 (a connection that
  sent nothing is just closed).
- body: from the end of the headers to the end of the body; past it the connection is closed (the
  handler sees a disconnect and nothing is forwarded).

Idle keep-alive connections are closed by uvicorn's `timeout_keep_alive`. Measured in
tests/test_capture_chaos.py: 300 half-sent request lines, all closed within the header timeout while
good calls are answered. Kept on uvicorn rather than moving to hypercorn or granian: the proxy's
per-request CPU was measured on uvicorn+httptools (benchmarks/capture.py), and the two timers are
all that was missing.

Also here: the listening socket (`bind_socket`) and the uvicorn settings (`uvicorn_config_kwargs`) that
the proxy and the stand-in upstream (kolm_ray.demo.simulate) share.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kolm_ray.errors import KolmError


def _408(seconds: float) -> bytes:
    body = json.dumps({"error": f"request headers not received within {seconds:g} s"}).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def guarded_protocol(header_timeout_s: float = 10.0, body_timeout_s: float = 60.0) -> type[asyncio.Protocol]:
    """An HttpToolsProtocol subclass enforcing the header and body timeouts (seconds)."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _body_timer: asyncio.TimerHandle | None = None
        _started = False  # some bytes of the next request have arrived

        def data_received(self, data: bytes) -> None:
            if not self._started:  # the first bytes of a request on a kept-alive connection start its clock
                self._started = True
                if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                    self._arm_headers()
            super().data_received(data)

        def _cancel(self, name: str) -> None:
            timer = getattr(self, name)
            if timer is not None:
                timer.cancel()
                setattr(self, name, None)

        def _arm_headers(self) -> None:
            self._cancel("_header_timer")
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _headers_late(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                try:
                    if self._started:  # an idle kept-alive connection is closed without an answer
                        self.transport.write(_408(header_timeout_s))
                finally:
                    self.transport.close()

        def _body_late(self) -> None:
            self._body_timer = None
            if not self.transport.is_closing():
                self.transport.close()  # the handler's receive() sees http.disconnect

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_headers()

        def on_headers_complete(self) -> None:
            self._cancel("_header_timer")
            self._body_timer = self.loop.call_later(body_timeout_s, self._body_late)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._cancel("_body_timer")
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Idle keep-alive time is uvicorn's timeout_keep_alive; the next request's first byte
            # starts its header clock (data_received).
            self._started = False

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel("_header_timer")
            self._cancel("_body_timer")
            super().connection_lost(exc)

    return GuardedHttpToolsProtocol


def bind_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening socket on host:port (SO_REUSEPORT for one of --workers N); KolmError when it cannot bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # one of --workers N: the kernel spreads connections over the workers' sockets
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise KolmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_config_kwargs() -> dict[str, Any]:
    """uvloop + httptools when installed (both are: uvicorn[standard]); one worker, no access log."""
    import importlib.util

    return {
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
        "access_log": False,
        "log_level": "warning",
        "timeout_graceful_shutdown": 60,  # in-flight streams get a minute to finish on SIGTERM
    }
