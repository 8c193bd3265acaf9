"""An ASGI layer that refuses requests before their body is read: a missing or wrong token (401)
and a body larger than the server ever needs (413).

FastAPI reads and parses a request's body before it runs the endpoint's dependencies, so a token
checked by a dependency comes too late: a stranger's gigabyte would be read into memory first,
and malformed JSON would get 422 instead of 401. This layer answers from the headers alone and
counts the bytes of a body sent without a length, so nothing past the limit is ever read.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TOKEN_MISSING = (
    "Missing or wrong token: send 'Authorization: Bearer <token>' with the token the "
    "server was started with (--token or MENNY_TOKEN)."
)


async def _answer(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),  # the unread body must not be taken for the next request
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Wraps the app: `token` (None: none needed) for every path but `public_paths`;
    bodies of at most `max_body_bytes`."""

    def __init__(self, app: ASGIApp, *, token: str | None, public_paths: Collection[str], max_body_bytes: int) -> None:
        self.app = app
        self.token = token
        self.public_paths = frozenset(public_paths)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.lower(): value for name, value in scope["headers"]}
        if self.token is not None and scope["method"] != "OPTIONS" and scope["path"] not in self.public_paths:
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, b"Bearer " + self.token.encode()):
                await _answer(send, 401, TOKEN_MISSING, [(b"www-authenticate", b"Bearer")])
                return
        too_large = (
            f"The request body is larger than {self.max_body_bytes} bytes; "
            "the server's requests carry at most a small JSON object."
        )
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await _answer(send, 413, too_large)
            return

        received = 0

        async def counted_receive() -> Message:
            # Raised inside the app, where FastAPI turns it into its JSON error like any other.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, counted_receive, send)
