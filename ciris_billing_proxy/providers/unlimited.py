"""The `unlimited` provider: every user has credit and nothing is charged, for agents whose users bring
their own LLM keys (the CIRIS apps' "bring your own key" mode).

It reports what CIRIS reports for such an agent, `plan_name: "unlimited"` with 999 paid and 999 free
uses, which the apps read as "nothing to buy" (they hide buying). Purchases and app stores are off,
and the gate only checks credit (`gate_charges` false): a use is never taken, so none is given back.
"""

from __future__ import annotations

from typing import Final

from ..identity import Identity
from ..models import CreditStatus
from .base import CreditProvider

PLAN_NAME: Final = "unlimited"
#: What CIRIS shows for an agent with no billing: a count, so the seed's rules hold (`has_credit`
#: true needs a use left), that never goes down.
SHOWN_USES: Final = 999
STATUS: Final = CreditStatus(
    has_credit=True,
    credits_remaining=SHOWN_USES,
    free_uses_remaining=SHOWN_USES,
    total_uses=0,
    plan_name=PLAN_NAME,
    purchase_required=False,
    purchase_options=None,
)


class UnlimitedProvider(CreditProvider):
    name = "unlimited"

    @property
    def gate_charges(self) -> bool:
        return False

    async def credit_status(self, identity: Identity) -> CreditStatus:
        return STATUS

    async def spend(self, identity: Identity, idempotency_key: str) -> None:
        """Takes nothing: every user has credit."""

    async def give_back(self, identity: Identity, idempotency_key: str) -> None:
        """Nothing was taken."""
