"""Who the caller is, as established once from verified token claims."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified user. Made only by the auth layer; every other layer takes it as given.

    `namespace` says which identity system `user_id` belongs to (for example `local` for users of
    this agent, `google` for Google subjects); `(namespace, user_id)` is what credits are keyed on,
    so two systems that reuse a subject id never share an account.
    """

    user_id: str
    namespace: str
    role: str
    email: str | None = None
    tenant: str | None = None
    expires_at: float = 0.0
    #: What credits are keyed on: a tuple, so no choice of characters in either part can collide.
    #: Stored once rather than derived on each use, as the hot path reads it on every request.
    key: tuple[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.namespace, self.user_id))
