"""Who a user is to the shared billing backend: one canonical identity, and keys that are unique to it."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Final

from ...identity import Identity

LOCAL_NAMESPACE: Final = "local"
MAX_EXTERNAL_ID: Final = 255


class BackendAccounts:
    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id

    def of(self, identity: Identity) -> dict[str, Any]:
        """The one canonical backend identity of a user (plus metadata the backend stores).

        Federated namespaces (`google`, `apple`, ...) name the same person on every agent, so they
        go as they are. The agent's own users (namespace `local`) are only unique within this agent,
        and the backend is shared by many agents: their `external_id` carries the agent's id, so
        "admin" on two agents is two accounts.
        """
        external_id = identity.user_id
        if identity.namespace == LOCAL_NAMESPACE:
            external_id = f"{self.agent_id}:{identity.user_id}"
            if len(external_id) > MAX_EXTERNAL_ID:
                external_id = (
                    f"{self.agent_id}:sha256:{hashlib.sha256(identity.user_id.encode()).hexdigest()}"
                )
        body: dict[str, Any] = {
            "oauth_provider": f"oauth:{identity.namespace}",
            "external_id": external_id,
            "agent_id": self.agent_id,
        }
        if identity.email:
            body["customer_email"] = identity.email
        return body

    def key(self, kind: str, identity: Identity, request_key: str) -> str:
        """A backend idempotency key. The backend's keys are global across users and agents, so
        they are namespaced, deterministically (a retry must send the same one)."""
        parts = (identity.namespace, identity.user_id, request_key)
        digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:40]
        return f"{self.agent_id}-{kind}-{digest}"
