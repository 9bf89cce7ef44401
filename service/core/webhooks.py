"""Webhook rules that the API and the sender share: secrets, the event body, Standard Webhooks
signatures and the target-URL policy. Pure (no HTTP client, no DB)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from service.core.domain import WebhookEventType
from service.core.errors import InvalidInput

SECRET_PREFIX = "whsec_"
MAX_URL_LENGTH = 2048


def new_secret() -> str:
    """`whsec_<base64 of 32 random bytes>`: the form the `openai` SDK's verifier decodes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def secret_hint(secret: str) -> str:
    """What GET shows of a secret (it is returned in full only by create and rotate)."""
    return f"{SECRET_PREFIX}…{secret[-4:]}"


def event_id() -> str:
    return f"evt_{secrets.token_hex(12)}"


def delivery_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


def event_body(event_id: str, event_type: WebhookEventType, created_at: int, object_id: str) -> str:
    """The body as OpenAI sends it. Serialized once, stored, and sent byte-identical on retries."""
    return json.dumps({"id": event_id, "object": "event", "created_at": int(created_at),
                       "type": WebhookEventType(event_type).value, "data": {"id": object_id}},
                      separators=(",", ":"))


def _key(secret: str) -> bytes:
    if secret.startswith(SECRET_PREFIX):
        return base64.b64decode(secret[len(SECRET_PREFIX):])
    return secret.encode("utf-8")


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    """`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`."""
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode("ascii")


def signed_headers(secrets_: Iterable[str], msg_id: str, timestamp: int, body: str) -> dict[str, str]:
    """One signature per active secret, space-separated (a receiver accepts any that matches)."""
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(timestamp)),
            "webhook-signature": " ".join(sign(s, msg_id, timestamp, body) for s in secrets_)}


# ---------------------------------------------------------------------------------------
# Target URLs
# ---------------------------------------------------------------------------------------
Resolver = Callable[[str], list[str]]


def resolve_host(host: str) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)})


def is_public_address(address: str) -> bool:
    """False for loopback, private, link-local, shared, reserved, multicast and unspecified."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_url_shape(url: str, *, param: str = "url") -> str:
    """http(s), a host, no credentials. Returns the host."""
    if len(url) > MAX_URL_LENGTH:
        raise InvalidInput(f"{param} is longer than {MAX_URL_LENGTH} characters", param=param)
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidInput(f"{param} must not contain spaces or control characters", param=param)
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a malformed port
    except ValueError as exc:
        raise InvalidInput(f"{param} is not a valid URL: {exc}", param=param) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"{param} must be an http:// or https:// URL with a host (got {url!r})", param=param)
    if parts.username is not None or parts.password is not None:
        raise InvalidInput(f"{param} must not carry credentials", param=param)
    return parts.hostname


def check_target_url(url: str, *, allow_private: bool, resolve: Resolver = resolve_host,
                     param: str = "url") -> str:
    """Refuse URLs whose host is (or resolves to) a non-public address unless `allow_private`.
    Checked when an endpoint is saved and again before every delivery (DNS may change)."""
    host = check_url_shape(url, param=param)
    if allow_private:
        return url
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            addresses = resolve(host)
        except OSError as exc:
            raise InvalidInput(f"{param}: host {host!r} does not resolve ({exc})", param=param) from None
    blocked = [a for a in addresses if not is_public_address(a)]
    if blocked or not addresses:
        raise InvalidInput(
            f"{param}: {host!r} is a loopback, private or link-local address ({', '.join(blocked) or 'none'}); "
            "such targets are refused in production (TUNESERVE_WEBHOOK_ALLOW_PRIVATE_URLS=true allows them)",
            param=param, code="url_not_allowed")
    return url
