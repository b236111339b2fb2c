"""The request body limit, enforced while the body streams in (a lying or absent
``Content-Length`` changes nothing)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]


class _BodyTooLargeError(Exception):
    """Raised inside the app when the body passes the limit."""


class BodyLimitMiddleware:
    """An ASGI middleware answering 413 once a request body passes ``max_bytes``.

    A declared ``Content-Length`` over the limit is refused before any byte is read;
    otherwise the bytes are counted as they arrive and the request is cut off at the
    first chunk past the limit, whatever the header said.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        """Run the app with a counting ``receive``; answer 413 past the limit."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        state = {"received": 0, "exceeded": False, "started": False}

        async def counting_receive() -> Message:
            message: Message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["exceeded"] = True
                    raise _BodyTooLargeError
            return message

        async def guarded_send(message: Message) -> None:
            if state["exceeded"]:
                return  # the app's answer to the cut-off body is replaced by the 413
            state["started"] = True
            await send(message)

        with contextlib.suppress(_BodyTooLargeError):
            await self.app(scope, counting_receive, guarded_send)
        if state["exceeded"] and not state["started"]:
            await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        megabytes = self.max_bytes / (1024 * 1024)
        body = json.dumps(
            {
                "detail": f"request body over the {megabytes:g} MB limit: send fewer or "
                "smaller images per request"
            }
        ).encode("utf-8")
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode("ascii")),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
