"""Mint bearer tokens the proxy will accept (or, deliberately, reject) in tests."""

from __future__ import annotations

import time
from typing import Any

import jwt

from ..config import BillingConfig


class TokenFactory:
    """Signs tokens with the HMAC secret of a config, the way a login service would."""

    def __init__(self, config: BillingConfig) -> None:
        if config.jwt.secret is None:
            raise ValueError("TokenFactory needs a config with an HMAC JWT secret")
        self._secret = config.jwt.secret.get_secret_value()
        self._algorithm = config.jwt.algorithms[0]
        self._issuer = config.jwt.issuer
        self._audience = config.jwt.audience

    def claims(self, user_id: str = "user-1", *, ttl: float = 3600, **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": int(now + ttl)}
        if self._issuer:
            claims["iss"] = self._issuer
        if self._audience:
            claims["aud"] = self._audience
        claims.update(extra)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, user_id: str = "user-1", *, ttl: float = 3600, **extra: Any) -> str:
        """A valid token for `user_id`. Extra claims (`email=`, `role=`...) are added; `None` drops one."""
        return jwt.encode(self.claims(user_id, ttl=ttl, **extra), self._secret, algorithm=self._algorithm)

    def headers(self, user_id: str = "user-1", **extra: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user_id, **extra)}"}
