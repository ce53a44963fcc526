"""Which client a request comes from, for counting its failed logins.

By default that is the connection's peer address: `X-Forwarded-For` is written by whoever sends the
request, so believing it would let a client pick a fresh address per guess. Behind reverse proxies
listed in `trusted_proxies`, the header is read from the right (each proxy appends the address it
received the request from) and the first address that is not a trusted proxy is the client.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Final

from aiohttp import web

Network = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address

#: IPv6 clients are counted per /64: one subscriber usually holds a whole /64.
IPV6_PREFIX: Final = 64
_MAX_OPAQUE = 64


def client_address(request: web.Request, trusted_proxies: Sequence[Network]) -> str:
    """The key that the client's failed logins are counted under: an IPv4 address, an IPv6 /64, or
    (for a peer or forwarded entry that is no IP address, such as a Unix socket) its text."""
    peer = request.remote or ""
    if not trusted_proxies:
        return _key(peer, _parse(peer))
    hops = [peer, *_forwarded_right_to_left(request)]
    for hop in hops:
        address = _parse(hop)
        if address is None or not any(address in network for network in trusted_proxies):
            return _key(hop, address)
    # Every hop is a trusted proxy: the farthest one known is the best guess of the client.
    return _key(hops[-1], _parse(hops[-1]))


def _forwarded_right_to_left(request: web.Request) -> list[str]:
    # Repeated headers are one list, in order (RFC 9110 5.3).
    entries = [
        part.strip() for header in request.headers.getall("X-Forwarded-For", []) for part in header.split(",")
    ]
    return [entry for entry in reversed(entries) if entry]


def _parse(text: str) -> IPAddress | None:
    """An address as proxies write it: bare, `[v6]`, `[v6]:port` or `v4:port`."""
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ip_address(text)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _key(text: str, address: IPAddress | None) -> str:
    if address is None:
        return text[:_MAX_OPAQUE]
    if isinstance(address, IPv6Address):
        return str(IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)
