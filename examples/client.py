"""Drive an agent's billing from Python: `python examples/client.py URL USERNAME PASSWORD`.

Shows the credit status, and when a purchase is needed (and the agent sells credits) starts one,
prints what a UI would hand to Stripe, and waits for it to settle. Try it against
`ciris-billing-proxy serve --fake-backend`, confirming the payment with the curl line it prints.
"""

import asyncio
import sys

from ciris_billing_proxy.client import BillingClient, BillingNotEnabled, PurchaseFailed, PurchaseTimeout


async def main(url: str, username: str, password: str, *, interval: float = 2.0) -> str:
    async with BillingClient(url) as client:
        await client.login(username, password)
        credits = await client.get_credits()
        # The account's plan is a name, not a pool: a "free" plan can hold paid credits.
        total = credits.credits_remaining + credits.free_uses_remaining
        print(
            f"{total} uses left: {credits.free_uses_remaining} free, {credits.credits_remaining} paid "
            f"(plan: {credits.plan_name})"
        )
        if not credits.purchase_required:
            return "no purchase needed"
        try:
            purchase = await client.initiate_purchase(return_url="https://example.com/done")
        except BillingNotEnabled:
            return "this agent sells no credits"
        # A UI passes client_secret and publishable_key to Stripe.js; never log the secret.
        print(
            f"pay {purchase.amount_minor / 100:.2f} {purchase.currency} for {purchase.uses_purchased} uses:"
        )
        print(f"  payment {purchase.payment_id}")
        try:
            done = await client.wait_for_purchase(purchase.payment_id, interval=interval)
        except (PurchaseFailed, PurchaseTimeout) as exc:
            return f"purchase did not complete: {exc}"
        # balance_after counts the paid credits only (1 credit = 1 use), not the free uses.
        return f"{done.credits_added} uses added; {done.balance_after} paid uses left"


if __name__ == "__main__":
    print(asyncio.run(main(*sys.argv[1:4])))
