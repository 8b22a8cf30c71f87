"""The app's two pure-ASGI layers: the API key, checked before a request's body is read, and
unexpected errors answered in OpenAI's shape without dropping the connection.

Pure ASGI rather than Starlette's `@app.middleware("http")`: those wrap every streamed
response's sends in a task of their own.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medha.log import get_logger
from medha.server.streaming import error_body

_log = get_logger(__name__)


class ApiKeyGuard:
    """`paths` answer 401 unless the request has `Authorization: Bearer KEY`. Checked before
    anything reads the body: a client without the key cannot make the server read (and parse,
    on the event loop) a body of any size. OPTIONS requests pass, as vLLM lets them by: a
    browser's preflight carries no key (with CORS on, CORSMiddleware, outside this layer,
    answers it first)."""

    def __init__(self, app: ASGIApp, key: str, paths: Collection[str]) -> None:
        self.app = app
        self.key = key.encode()
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not self._guards(scope):
            await self.app(scope, receive, send)
            return
        scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), self.key):
            await self.app(scope, receive, send)
            return
        message = "a valid API key is needed (Authorization: Bearer KEY)"
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": 401}
        await JSONResponse({"error": error}, status_code=401)(scope, receive, send)

    def _guards(self, scope: Scope) -> bool:
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        # Starlette's path includes a proxy's root path, which its router strips only where a
        # "/" follows it (root "/v" is not a prefix of "/v1/models"): the same rule here.
        if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
            path = path[len(root) :]
        return path in self.paths


class UnexpectedErrors:
    """An exception no handler took (a bug) becomes a 500 in OpenAI's shape, logged with its
    traceback. Starlette's own last resort answers too but then raises the error again, and
    the server closes the connection: a keep-alive client's next request on it fails. Once a
    response has started there is nothing to answer: the error goes on up."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            if started:
                raise
            _log.exception("unexpected error answered with a 500", path=scope["path"])
            await JSONResponse(error_body(exc), status_code=500)(scope, receive, send)
