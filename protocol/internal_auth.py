"""Workers' internal API answers only callers holding the cluster's internal token (header
`x-pdserve-token`); probes and metrics stay open. Plain ASGI middleware: no per-request task."""

import hmac
import json

from protocol.asgi import send_bytes
from protocol.http_client import TOKEN_HEADER

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
_HEADER = TOKEN_HEADER.encode()


class RequireInternalToken:
    def __init__(self, app, token: str):
        if not token:
            raise ValueError("an empty internal token would let anyone in")
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or holds_token(scope, self.token):
            return await self.app(scope, receive, send)
        await refuse(send)


def holds_token(scope: dict, token: bytes) -> bool:
    given = next((v for k, v in scope["headers"] if k == _HEADER), b"")
    return hmac.compare_digest(given, token)


async def refuse(send) -> None:
    await send_bytes(send, 401, _REFUSAL, [(b"content-type", b"application/json")])


_REFUSAL = json.dumps({"error": {"message": "this is a pdserve worker's internal API: a caller needs the cluster's "
                                            "internal token", "type": "authentication_error", "param": None,
                                 "code": "invalid_internal_token"}}).encode()
