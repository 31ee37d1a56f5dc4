"""uvicorn's httptools protocol with each request head (request line + headers) bounded in size
and in time, and each worker's connections kept to its share of the server's.

httptools buffers a head of any size, and uvicorn waits for one without a deadline: one client
could make the server hold hundreds of MB (a huge header), or hold a connection forever by never
finishing its head (slowloris). Past the bounds the connection gets a JSON 431 or 408 and is
closed. The body is bounded by the routes (service.http.read_body).

A worker holding more than its share of the server's connections (service/cpu_share.py) answers
the next request with `connection: close` and closes that connection after the answer; the
client's next connection lands where the kernel puts it afresh.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from mmoe.service.cpu_share import CpuShare

MAX_HEAD_BYTES = 64 * 1024


class BoundedHttpProtocol(HttpToolsProtocol):
    max_head_bytes = MAX_HEAD_BYTES
    head_timeout_s = 10.0
    share: CpuShare | None = None  # the workers' connection counts; None: not kept

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._ends = 0  # heads and messages completed on this connection
        self._head_timer: asyncio.TimerHandle | None = None
        self._counted = False  # in this worker's connection count

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # An answer is written as its head and its body: without TCP_NODELAY the body waits
        # for the client's (delayed, up to 40 ms) acknowledgement of the head. asyncio sets it
        # only on sockets made with IPPROTO_TCP, which a listening socket from socket.socket()
        # is not.
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm_head_timer()
        if self.share is not None:
            self.share.connection_opened()
            self._counted = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        self._uncount()
        super().connection_lost(exc)

    def _uncount(self) -> None:
        if self._counted and self.share is not None:
            self.share.connection_closed()
            self._counted = False

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._arm_head_timer()
        ends = self._ends
        super().data_received(data)
        # In a head before and after this chunk, with no head or message ending within it: all
        # of it was head bytes.
        if self._in_head and self._ends == ends and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse(
                    431,
                    "request_head_too_large",
                    f"request line and headers are over the {self.max_head_bytes}-byte limit",
                )

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._ends += 1
        self._disarm_head_timer()
        super().on_headers_complete()
        if self._counted and self.share is not None and self.share.over_share():
            # This answer ends the connection: no longer counted here from now on, so that
            # the next request does not close another for the same excess.
            self.cycle.keep_alive = False
            self._uncount()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._ends += 1
        self._in_head = True  # the next request's head, if the client keeps the connection

    def _arm_head_timer(self) -> None:
        # Armed when a connection opens or a head starts arriving, not while idle between
        # requests: uvicorn's keep-alive timeout closes idle connections.
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self._refuse(
                408,
                "request_timeout",
                f"request line and headers not received within {self.head_timeout_s:g} s",
            )

    def _refuse(self, status: int, code: str, reason: str) -> None:
        self._disarm_head_timer()
        body = orjson.dumps({"error": {"code": code, "field": None, "reason": reason}})
        head = (
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % len(body)
        )
        self.transport.write(STATUS_LINE[status] + head + body)
        self.transport.close()


def bounded_http_protocol(
    head_timeout_s: float, share: CpuShare | None = None
) -> type[BoundedHttpProtocol]:
    """The protocol class for uvicorn.run(http=...), with the configured head timeout and, in a
    worker of a multi-process server, its siblings' connection counts."""
    attributes = {"head_timeout_s": head_timeout_s, "share": share}
    return type("BoundedHttpProtocol", (BoundedHttpProtocol,), attributes)
