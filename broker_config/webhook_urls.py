"""Webhook URLs we are willing to POST to: no server-side request forgery.

A URL is refused unless every address its host resolves to is globally routable (``ipaddress``'s
``is_global``: not private, loopback, link-local, shared 100.64.0.0/10 with its cloud metadata
address 100.100.100.200, reserved, documentation or unspecified) and not multicast, unless the
operator lists the host or a network holding the address in ``HEADRACE_WEBHOOK_ALLOW_HOSTS``.
Refused outright, whatever they point at: IPv4-mapped IPv6 (``::ffff:127.0.0.1``), IPv4 written
any way but four decimal numbers (``2130706433``, ``0177.0.0.1``, ``0x7f.0.0.1``: resolvers
accept them, and they exist only to slip past checks), and IPv6 that embeds a non-global IPv4
(6to4, Teredo, NAT64).

``resolve_webhook_target`` returns the addresses it checked, and the sender connects to one of
those (``workers/webhooks.py``): resolving the name a second time to connect would let a DNS
answer that changed in between (rebinding) pick the address.

Messages name the URL by scheme and host only (``redact_url``): webhook URLs carry tokens, and
these messages end up in logs and in delivery records.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_ADDRESSES = 8  # a name with more addresses is tried on its first few only
# NAT64 prefixes (RFC 6052, RFC 8215): the low 32 bits are an IPv4 address reached through a gateway.
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


class UnsafeWebhookUrl(ValueError):
    """The URL may not be used as a webhook; the message says why (without the URL's secrets)."""


@dataclass(frozen=True)
class WebhookTarget:
    """A checked URL and the addresses that passed: connect to these, not to the name."""

    url: str
    scheme: str
    host: str  # lower-case name or address literal, as in the URL (no brackets)
    port: int
    addresses: tuple[Address, ...]


def redact_url(url: str) -> str:
    """``https://hooks.example.com:8443/t/SECRET?k=v`` -> ``https://hooks.example.com:8443/...``:
    the scheme and host alone, for logs and messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    port = _port_text(parts)
    netloc = f"{host}:{port}" if port else host
    tail = "/..." if (parts.path not in ("", "/") or parts.query or parts.fragment) else ""
    return f"{parts.scheme}://{netloc}{tail}" if parts.scheme else "<URL without a scheme>"


def _port_text(parts: SplitResult) -> str:
    """The port as written (``parts.port`` raises for one out of range)."""
    after = parts.netloc.rpartition("@")[2]
    return after.rpartition(":")[2] if ":" in after.rpartition("]")[2] else ""


def parse_allow_list(raw: str | None) -> tuple[set[str], list[Network]]:
    """``"127.0.0.1,hooks.internal,10.0.0.0/8"`` -> (host names, networks)."""
    hosts: set[str] = set()
    networks: list[Network] = []
    for item in (raw or "").split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            hosts.add(item)
    return hosts, networks


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # the client's address, the one a relay would reach
    if any(address in net for net in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal(address: Address) -> str | None:
    """Why ``address`` may not be a webhook's, or None when it may."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6 address"
        embedded = _embedded_ipv4(address)
        if embedded is not None and refusal(embedded) is not None:
            return f"an IPv6 address embedding the non-public {embedded}"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if not address.is_global:
        return "a non-public address"
    return None


def _split(url: str) -> tuple[SplitResult, str, int]:
    safe = redact_url(url)
    try:
        parts = urlsplit(url)
    except ValueError:  # a bad IPv6 literal
        raise UnsafeWebhookUrl(f"webhook URL {safe}: its host cannot be read") from None
    try:
        port = parts.port
    except ValueError:  # out of range (":99999") or not a number
        raise UnsafeWebhookUrl(
            f"webhook URL {safe}: port {_port_text(parts)!r} is not a number from 1 to 65535"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeWebhookUrl(f"webhook URL must be http(s)://host/..., not {safe}")
    if parts.username or parts.password:
        raise UnsafeWebhookUrl("webhook URL must not carry credentials")
    if port == 0:
        raise UnsafeWebhookUrl(f"webhook URL {safe}: port 0 is not a number from 1 to 65535")
    host = parts.hostname.lower()
    if not host.isascii():
        raise UnsafeWebhookUrl("webhook host must be ASCII: write an international name in its xn-- form")
    return parts, host, port or (443 if parts.scheme == "https" else 80)


def _literal(host: str) -> Address | None:
    """The address a host names by itself; ``UnsafeWebhookUrl`` for odd IPv4 spellings."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        socket.inet_aton(host)  # what resolvers accept as IPv4: 2130706433, 0x7f.1, 0177.0.0.1
    except OSError:
        return None
    raise UnsafeWebhookUrl(f"webhook host {host!r}: write an IPv4 address as four decimal numbers")


def _resolve(host: str, port: int) -> list[Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else "not a valid name"
        raise UnsafeWebhookUrl(f"webhook host {host!r} does not resolve: {reason}") from None
    found: list[Address] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if address not in found:
            found.append(address)
    return found


def resolve_webhook_target(url: str, allow: str | None) -> WebhookTarget:
    """The URL's target with the addresses that passed; ``UnsafeWebhookUrl`` naming the reason."""
    parts, host, port = _split(url)
    allowed_hosts, allowed_networks = parse_allow_list(allow)
    literal = _literal(host)
    addresses: Sequence[Address] = [literal] if literal is not None else _resolve(host, port)
    if host not in allowed_hosts:
        for address in addresses:
            if any(address in network for network in allowed_networks):
                continue
            reason = refusal(address)
            if reason is not None:
                raise UnsafeWebhookUrl(
                    f"webhook URL {redact_url(url)} points at {reason} ({address}); an operator may "
                    "allow it with HEADRACE_WEBHOOK_ALLOW_HOSTS"
                )
    return WebhookTarget(url, parts.scheme, host, port, tuple(addresses[:MAX_ADDRESSES]))


def check_webhook_url(url: str, allow: str | None) -> str:
    """The URL, if it may be used; else ``UnsafeWebhookUrl`` naming the reason."""
    return resolve_webhook_target(url, allow).url
