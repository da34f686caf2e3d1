"""The body limit in Ray Serve's HTTP proxy, where a request body first arrives.

Ray Serve's proxy reads a request's body from the client into a queue as fast as the client
sends it, whatever the replica has read; a replica that refuses a body past
`limits.max_body_bytes` answers only after the proxy has taken in megabytes more (a chunked
body has no Content-Length to refuse it by). This middleware runs in the proxy: past the limit
it answers 413 with `Connection: close` at once, tells the replica's side the client has gone,
and the connection closes, so nothing more is read.

Ray loads it through RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, which must be in the environment
of every node's Ray processes (`noiseclr serve` sets it before it starts a local Ray; on a cluster
it belongs in the nodes' environment: cluster/kuberay). One proxy serves every application of a
cluster, so its limit is the largest body any route accepts; each route keeps its own, smaller
limit in the replica (`serving.app.read_body`).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
LIMIT_ENV = "NOISECLR_PROXY_MAX_BODY_BYTES"
CALLBACK = "noiseclr.serving.proxy.middlewares"


def proxy_env(max_body_bytes: int) -> dict[str, str]:
    """The environment Ray's processes need for the proxy to hold the body limit."""
    return {CALLBACK_ENV: CALLBACK, LIMIT_ENV: str(max_body_bytes)}


def middlewares() -> list:
    """Ray Serve's proxy callback: the middlewares its HTTP app runs under."""
    from starlette.middleware import Middleware

    from noiseclr.serving.config import Limits

    limit = int(os.environ.get(LIMIT_ENV) or Limits().max_body_bytes)
    return [Middleware(BusyGate), Middleware(BodyLimit, limit=limit)]


SHED_HEADER = "x-noiseclr-shed"  # on a replica's 503 for a request it expects to answer too late


class BusyGate:
    """Refusals by expected wait, repeated in the proxy: after a replica answers a route's request
    503 because its backlog alone is past the latency bound (`SHED_HEADER`, with Retry-After:
    any request would be refused), the proxy answers that route's requests 503 itself for
    min(Retry-After, `hold_s`) seconds, with the Retry-After the replica gave, counted down.

    A refusal in the replica costs it CPU that its model needs: under clients that retry at once
    (a load generator, a naive client) those refusals took most of a 2-core replica's time. Here
    the burst costs the proxy alone, and the replica hears again within `hold_s`."""

    def __init__(self, app: Any, hold_s: float = 1.0) -> None:
        self.app, self.hold_s = app, hold_s
        self.closed_until: dict[str, tuple[float, float]] = {}  # route -> (closed until, retry at)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        route, now = scope.get("path", ""), time.monotonic()
        until, retry_at = self.closed_until.get(route, (0.0, 0.0))
        if now < until:
            retry = str(max(1, math.ceil(retry_at - now))).encode()
            text = "busy: the server expects to answer past its latency bound"
            await answer(send, 503, text, [(b"retry-after", retry), (SHED_HEADER.encode(), b"proxy")])
            return

        async def watched(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] == 503:
                headers = dict(message.get("headers") or ())
                retry = headers.get(b"retry-after", b"")
                if SHED_HEADER.encode() in headers and retry.isdigit():
                    at = time.monotonic()
                    self.closed_until[route] = (at + min(int(retry), self.hold_s), at + int(retry))
            await send(message)

        await self.app(scope, receive, watched)


class BodyLimit:
    """ASGI middleware: a request body past `limit` bytes gets 413 as soon as the limit is passed,
    declared (Content-Length) or counted as it arrives (chunked), and its connection is closed."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await answer(send, 413, f"body of {int(declared)} bytes; at most {self.limit}")
            return
        seen, refused, started, ended = 0, False, False, False

        async def counted() -> dict:
            nonlocal seen, refused, ended
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                ended = not message.get("more_body", False)
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    refused = True
                    if not started:  # the replica has not answered yet: the proxy does
                        await answer(send, 413, f"body over {self.limit} bytes")
                    return {"type": "http.disconnect"}  # the replica's side sees the client go
            return message

        async def sent(message: dict) -> None:
            nonlocal started
            if refused and not started:
                return  # the 413 is the answer; the replica's, if any, is dropped
            if message["type"] == "http.response.start":
                started = True
                if not ended:  # answered before the body ended (401, 415...): none of it is read on
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, counted, sent)


async def answer(send: Any, status: int, text: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """The proxy's own answer: the endpoint's JSON error, and `Connection: close`, so that the
    server closes the connection instead of reading the rest of the body."""
    body = json.dumps({"error": text}).encode()
    head = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})
