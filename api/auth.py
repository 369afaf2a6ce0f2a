"""API-key authentication.

With keys configured, every route except `GET/HEAD /`, `/health`, `/metrics` and `/v1/loads`
needs one, sent as `Authorization: Bearer <key>` or `x-api-key: <key>`. `/metrics` is open as
in vLLM, so a copied scrape config works; `--metrics-require-key` protects it and `/v1/loads`
(the same numbers as JSON) together (Prometheus and smg can send a bearer token). `/health`
stays open so load balancers can probe without a secret; it says only "up" or "down".
"""

from __future__ import annotations

import hmac

from fastapi import Request

from shoal.api.errors import APIError


def presented_key(request: Request) -> str | None:
    """The key from `Authorization: Bearer ...` or `x-api-key`, if any."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key")


def key_matches(presented: str, keys: tuple[str, ...]) -> bool:
    """Constant-time comparison against every key (no early exit on the first match)."""
    given = presented.encode()
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]
    return any(matches)


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: 401 unless auth is off or a valid key was presented."""
    keys: tuple[str, ...] = request.app.state.server.config.api_keys
    if not keys:
        return
    presented = presented_key(request)
    if presented is None:
        raise unauthorized("Missing API key: send `Authorization: Bearer <key>` or `x-api-key`.")
    if not key_matches(presented, keys):
        raise unauthorized("Incorrect API key provided.")


def unauthorized(message: str) -> APIError:
    return APIError(401, message, headers={"WWW-Authenticate": "Bearer"})
