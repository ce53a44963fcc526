"""Purchase replies at rest: AES-256-GCM, with a key derived (HKDF-SHA256) from a secret, so a dump
of the database alone reveals no Stripe client secret.

The secret is the `replay_secret` setting, else the agent's billing API key. Why the API key by
default: every process of one agent already shares it, the `ciris` provider needs it anyway (also
where tokens are verified with a public key only, and no JWT secret exists), and it adds no
exposure: with that key the backend hands out any payment's client secret (docs/billing-backend.md
3.6). But replicas mid-rotation hold different API keys, so a dedicated replay secret, or the other
keys as `accepted_replay_secrets`, lets each open what the others sealed (docs/operations.md).
Each reply is bound to its row (user, kind, key), so a reply copied to another row does not open.
A reply sealed under a secret no longer known does not open either: it counts as absent.
"""

from __future__ import annotations

import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: Names this use of the API key: a key derived for anything else differs.
PURPOSE: Final = b"ciris-billing-proxy purchase replays v1"
NONCE_BYTES: Final = 12


class ReplySeal:
    """Seals with the first secret; opens with any of them, in order (the first is the usual one)."""

    def __init__(self, secret: str, *accepted: str) -> None:
        self._aeads = [AESGCM(_derive(s)) for s in (secret, *accepted)]

    def seal(self, plaintext: bytes, bound_to: bytes) -> bytes:
        # Random 96-bit nonces: safe far beyond the number of purchases one key will ever seal.
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aeads[0].encrypt(nonce, plaintext, bound_to)

    def open(self, sealed: bytes, bound_to: bytes) -> bytes | None:
        for aead in self._aeads:
            try:
                return aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], bound_to)
            except InvalidTag:
                continue
        return None


def _derive(secret: str) -> bytes:
    return HKDF(algorithm=SHA256(), length=32, salt=None, info=PURPOSE).derive(secret.encode())
