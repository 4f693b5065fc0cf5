"""Bearer-key authentication. Keys are compared as SHA-256 digests; plain keys are never kept."""

from __future__ import annotations

import hmac

from fastapi import Request

from serve_app.config import AuthConfig, hash_key
from serve_app.errors import ApiError


class KeyRing:
    def __init__(self, auth: AuthConfig):
        self._users = {k.key_sha256: k.user for k in auth.api_keys}

    def user_for(self, request: Request) -> str:
        """The user a request authenticates as, or a 401."""
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        digest = hash_key(key.strip())
        for known, user in self._users.items():
            if hmac.compare_digest(known, digest):
                return user
        raise _unauthorized("invalid API key")


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})
