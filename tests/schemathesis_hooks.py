"""Loaded by schemathesis (`SCHEMATHESIS_HOOKS`) in tests/test_schemathesis.py: log in through the
demo's login route and send the token with every request. Schemathesis fetches a new one whenever a
request is answered 401, which is how the run survives its own calls to logout and refresh (each
revokes the token it was sent with)."""

from __future__ import annotations

import os
from typing import Any

import requests
import schemathesis


@schemathesis.auth()
class DemoLogin:
    def get(self, case: Any, context: Any) -> str:
        reply = requests.post(
            os.environ["BILLING_DEMO_URL"] + "/v1/auth/login",
            json={
                "username": os.environ["BILLING_DEMO_USER"],
                "password": os.environ["BILLING_DEMO_PASSWORD"],
            },
            timeout=30,
        )
        reply.raise_for_status()
        token: str = reply.json()["access_token"]
        return token

    def set(self, case: Any, data: str, context: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}
