"""Connection-level protection uvicorn lacks: a header timeout (a connection that has not sent a complete
request head within `seconds` of opening, or of its last response, is closed: idle and slowloris
connections; uvicorn's own keep-alive timer stops as soon as any byte arrives), HTTP framing errors answered
in the API's JSON error shape (uvicorn answers them in plain text), and a file-descriptor limit raised to its
hard bound so thousands of idle sockets do not starve `accept`; and a shutdown that ends the requests still
running at its deadline with a proper error instead of letting uvicorn cancel their tasks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any


def guarded_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, closing connections that send no complete request head within `seconds` of
    opening or of their last response (a new head starts a new request cycle; none means the client stalled),
    and answering requests h11 cannot parse (a bad Content-Length, a malformed chunk, an oversized head) with a
    JSON 400 before it closes them."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from mulfree.infer.protocol import error_body

    class GuardedH11(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps(error_body(msg, code="bad_http_request")).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()

        def _arm_head_deadline(self) -> None:
            cycle = self.cycle
            self.loop.call_later(seconds, self._head_deadline, cycle)

        def _head_deadline(self, cycle: object) -> None:
            if self.cycle is cycle and not self.transport.is_closing() and (cycle is None or cycle.response_complete):
                self.transport.close()  # no request head since the deadline was armed

    return GuardedH11


def serve_draining(config: Any, drain: Callable[[], None], grace_s: float) -> None:
    """Run uvicorn with `config` until SIGTERM / SIGINT. Running requests then have `grace_s` seconds to finish;
    after that `drain` ends them (the batcher aborts its sequences: a 503 JSON, or an error event and [DONE] in a
    stream), a few seconds before uvicorn's own deadline, which cancels the tasks left (a plain-text 500 and a
    traceback each)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(grace_s, lambda: loop.run_in_executor(None, drain))
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    config.timeout_graceful_shutdown = grace_s + 5.0
    DrainingServer(config).run()


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one (where the platform has it); returns the soft limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536),
                                                        hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
