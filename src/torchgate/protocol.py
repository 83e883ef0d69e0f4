"""`BoundedHttpTools`: uvicorn's httptools protocol with a bound on each request's head,
and the cheapest possible refusal under overload.

uvicorn with httptools reads a request line and headers of any size (a 16 MB header was
accepted) and any number of headers; h11 has a bound but is slower. Here the head is
counted as it is parsed, and also while it is still incomplete (every byte received then
belongs to it), so that no head past `max_head_bytes` or with more than `max_headers`
fields is held in memory or reaches the app: it is answered 431 and the connection closed.
The ingress bounds heads too; this holds when torchgate is exposed directly.

Under overload a refusal must cost far less than serving, or refusals crowd out the work.
When the app has a `shed(method, path)` (the edge's `Shedder`) and it says the request's
model has no room, the 503 is written here, as soon as the head is parsed: no ASGI task,
no edge, no body kept. Such refusals are counted, not logged one by one. And the
connection is not read again for `SHED_PAUSE_S`: a client that sends again at once, as
a closed loop does, waits in its socket buffer, as its Retry-After asked, instead of
taking the event loop from the requests it is serving: refusing clients as fast as they
come back would leave the loop little time for the work.
"""

from __future__ import annotations

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
SHED_PAUSE_S = 0.5  # well under a deadline, so the next request still has time


class HeadTooLarge(Exception):
    """Raised from a parser callback: httptools stops parsing, uvicorn answers 'invalid'."""


class BoundedHttpTools(HttpToolsProtocol):
    max_head_bytes = MAX_HEAD_BYTES
    max_headers = MAX_HEADERS

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._in_head = False  # a request has begun and its headers are not complete
        self._buffered = 0  # bytes received since the head began, while it is incomplete
        self._parsed = 0  # bytes of the request line and headers parsed
        self._fields = 0
        self._refused = False
        self._shedding = False  # this message was answered here: its body is dropped

    @classmethod
    def limited(cls, *, max_head_bytes: int, max_headers: int) -> type[BoundedHttpTools]:
        """This protocol with other limits (uvicorn takes a class, not an instance)."""
        return type(
            cls.__name__, (cls,), {"max_head_bytes": max_head_bytes, "max_headers": max_headers}
        )

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self._in_head and not self._refused and not self.transport.is_closing():
            self._buffered += len(data)
            if self._buffered > self.max_head_bytes:
                self._refuse()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._buffered = self._parsed = self._fields = 0

    def on_url(self, url: bytes) -> None:
        self._parsed += len(url)
        if self._parsed > self.max_head_bytes:
            raise HeadTooLarge
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._parsed += len(name) + len(value) + 4
        self._fields += 1
        if self._parsed > self.max_head_bytes or self._fields > self.max_headers:
            raise HeadTooLarge
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        shed = getattr(self.app, "shed", None)
        if shed is not None and (self.cycle is None or self.cycle.response_complete):
            path = httptools.parse_url(self.url).path.decode("latin-1")
            answer = shed(self.parser.get_method().decode("ascii"), path)
            if answer is not None:
                self._shedding = True
                self.transport.write(answer)
                self.on_response_complete()
                self.flow.pause_reading()
                self.loop.call_later(SHED_PAUSE_S, self._resume)
                return
        super().on_headers_complete()

    def _resume(self) -> None:
        if not self.transport.is_closing():
            self.flow.resume_reading()

    def on_body(self, body: bytes) -> None:
        if not self._shedding:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._shedding:
            self._shedding = False
            return
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers a parser callback's exception as an invalid request
        if self._parsed > self.max_head_bytes or self._fields > self.max_headers:
            self._refuse()
            return
        super().send_400_response(msg)

    def _refuse(self) -> None:
        self._refused = True
        body = orjson.dumps(
            {
                "error": f"request headers too large: at most {self.max_head_bytes} bytes "
                f"and {self.max_headers} fields"
            }
        )
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.transport.close()
