"""Webhook URLs we are willing to POST to: no server-side request forgery.

A URL is refused when its host is, or resolves to, a private, loopback, link-local (the cloud
metadata address 169.254.169.254 among them), multicast, reserved or unspecified address, unless
the operator lists the host or a network containing it in ``HEADRACE_WEBHOOK_ALLOW_HOSTS``. The
check runs when a URL is given and again before every delivery, because a name may be pointed
elsewhere in between (DNS rebinding). Hand-written: the rule is ten lines over ``ipaddress``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class UnsafeWebhookUrl(ValueError):
    """The URL may not be used as a webhook; the message says why."""


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


def _public(address: Address) -> bool:
    return not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def _resolve(host: str, port: int) -> Sequence[Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UnsafeWebhookUrl(f"webhook host {host!r} does not resolve: {exc.strerror}") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def check_webhook_url(url: str, allow: str | None) -> str:
    """The URL, if it may be used; else ``UnsafeWebhookUrl`` naming the reason."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeWebhookUrl(f"webhook URL must be http(s)://host/..., not {url!r}")
    if parts.username or parts.password:
        raise UnsafeWebhookUrl("webhook URL must not carry credentials")
    host = parts.hostname.lower()
    allowed_hosts, allowed_networks = parse_allow_list(allow)
    if host in allowed_hosts:
        return url
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for address in _resolve(host, port):
        if any(address in network for network in allowed_networks):
            continue
        if not _public(address):
            raise UnsafeWebhookUrl(
                f"webhook URL {url!r} points at a non-public address ({address}); an operator may "
                "allow it with HEADRACE_WEBHOOK_ALLOW_HOSTS"
            )
    return url
