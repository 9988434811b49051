"""The Host check that stops DNS rebinding: answer only to this server's own names.

A web page on evil.example can make its own DNS name point at 127.0.0.1 (or at this machine's LAN
address) and then read and drive the server as "same origin". Its requests still carry
``Host: evil.example``, so any request whose Host is not one of this server's names is refused
(HTTP 400; a websocket is closed) before anything else looks at it.

Allowed names:

- always: ``localhost`` and every loopback address (127.x, ::1);
- the exact ``--server-name``;
- with ``--listen`` (or ``--server-name 0.0.0.0``/``::``): any IP address literal (rebinding needs a
  DNS name) and this machine's host name (``socket.gethostname()``, with and without ``.local``);
- the names in ``--allowed-hosts`` (comma-separated; ``*`` turns the check off).
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from modules.api.asgi_reply import send_text


def split_host(host_header: str) -> tuple[str, int | None] | None:
    """'name:port' / '[v6]:port' / 'name' -> (lower-case name without trailing dot, port or None); None if malformed."""
    value = host_header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1:]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        return (name, int(rest[1:]) if rest else None) if name else None
    if value.count(":") > 1:  # a bare IPv6 address (not valid in Host, but unambiguous)
        return value, None
    name, sep, port = value.partition(":")
    if sep and not port.isdigit():
        return None
    name = name.rstrip(".")
    return (name, int(port) if sep else None) if name else None


def host_name(host_header: str) -> str | None:
    """The name part of a Host header (see split_host); None if malformed."""
    split = split_host(host_header)
    return split[0] if split else None


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


@dataclass(frozen=True)
class HostPolicy:
    names: frozenset[str] = frozenset({"localhost"})
    any_ip: bool = False            # any IP literal (with --listen)
    allow_all: bool = False         # --allowed-hosts '*'

    def allows(self, host_header: str | None) -> bool:
        if self.allow_all:
            return True
        if not host_header:
            return False
        name = host_name(host_header)
        if name is None:
            return False
        if name in self.names:
            return True
        ip = _ip(name)
        if ip is None:
            return False
        return ip.is_loopback or self.any_ip

    @classmethod
    def from_opts(cls, opts: Any, *, hostname: str | None = None) -> "HostPolicy":
        names = {"localhost"}
        server_name = (getattr(opts, "server_name", None) or "").strip()
        listen_all = (bool(getattr(opts, "listen", False)) and not server_name) or server_name in ("0.0.0.0", "::")
        if server_name:
            names.add(host_name(server_name) or server_name.lower())
        if listen_all:
            own = (hostname if hostname is not None else socket.gethostname()).lower().rstrip(".")
            if own:
                short = own.split(".")[0]
                names |= {own, short, f"{short}.local"}
        extra = [h.strip() for h in (getattr(opts, "allowed_hosts", None) or "").split(",") if h.strip()]
        allow_all = "*" in extra
        names |= {host_name(h) or h.lower() for h in extra if h != "*"}
        return cls(names=frozenset(names), any_ip=listen_all, allow_all=allow_all)


def _header(scope: dict, wanted: bytes) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == wanted:
            return value.decode("latin-1")
    return None


class HostCheckMiddleware:
    """Pure ASGI, outermost: a request for another Host never reaches auth, CORS or a route."""

    def __init__(self, app: Any, *, policy: HostPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = _header(scope, b"host")
        if self.policy.allows(host):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        shown = repr((host or "")[:100]) if host else "(none)"
        name = (host_name(host or "") or "NAME")[:100]
        await send_text(send, 400, f"Invalid Host header {shown}: this server does not answer to that name "
                                   f"(a DNS rebinding guard). If it is this server's name, start it with "
                                   f"--allowed-hosts {name}\n")


def install(app: Any, opts: Any) -> HostPolicy:
    """Add the Host check; call it last, so it is the outermost middleware."""
    policy = HostPolicy.from_opts(opts)
    app.add_middleware(HostCheckMiddleware, policy=policy)
    return policy
