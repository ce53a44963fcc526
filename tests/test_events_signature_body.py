"""`verify_signature` takes the body as bytes or as the text a receiver read it as (UTF-8), and
names the mistake when given anything else (the parsed JSON)."""

from __future__ import annotations

import json
import time

import pytest

from ciris_billing_proxy.events import SignatureVerificationError, sign, verify_signature

SECRET = "a-webhook-secret-0123456789"
BODY = b'{"data":{"balance_after":3},"id":"evt_1","type":"balance.low"}'


def test_a_body_read_as_text_verifies_as_its_bytes() -> None:
    header = sign(BODY, SECRET)
    signed_at = int(header.split(",")[0][2:])
    for body in (BODY, BODY.decode(), bytearray(BODY), memoryview(BODY)):
        assert verify_signature(body, header, SECRET) == signed_at
    # UTF-8 text beyond ASCII: the bytes it encodes to are what was signed.
    accented = '{"reason":"café"}'
    assert verify_signature(accented, sign(accented.encode(), SECRET), SECRET)
    with pytest.raises(SignatureVerificationError, match="does not match"):
        verify_signature(BODY.decode() + " ", header, SECRET)
    with pytest.raises(SignatureVerificationError, match="does not match"):
        verify_signature(accented, sign(accented.encode("latin-1"), SECRET), SECRET)


def test_a_parsed_body_is_named_as_the_mistake() -> None:
    header = sign(BODY, SECRET, int(time.time()))
    for body in (json.loads(BODY), None, 42):
        with pytest.raises(TypeError, match=rf"raw request body as bytes or str, not {type(body).__name__}"):
            verify_signature(body, header, SECRET)  # type: ignore[arg-type]
