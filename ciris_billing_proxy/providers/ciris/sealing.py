"""Purchase replies at rest: AES-256-GCM, with a key derived (HKDF-SHA256) from the agent's billing
API key, so a dump of the database alone reveals no Stripe client secret.

Why the API key: every process of one agent already shares it, the `ciris` provider needs it anyway
(also where tokens are verified with a public key only, and no JWT secret exists), and it adds no
exposure: with that key the backend hands out any payment's client secret (docs/billing-backend.md
3.6). Each reply is bound to its row (user, kind, key), so a reply copied to another row does not
open. A reply sealed under a previous API key does not open either: it counts as absent.
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
    def __init__(self, secret: str) -> None:
        key = HKDF(algorithm=SHA256(), length=32, salt=None, info=PURPOSE).derive(secret.encode())
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, bound_to: bytes) -> bytes:
        # Random 96-bit nonces: safe far beyond the number of purchases one key will ever seal.
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, bound_to)

    def open(self, sealed: bytes, bound_to: bytes) -> bytes | None:
        try:
            return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], bound_to)
        except InvalidTag:
            return None
