"""Which Host headers the service answers: a defence against DNS rebinding.

A page on any web site can make a browser send requests to a service on localhost by pointing
its own domain name at 127.0.0.1 ("DNS rebinding"); the browser then sends that foreign name in
the Host header. The service therefore answers only Host names it is reachable under: for a
loopback bind, 127.0.0.1, localhost and ::1; for a wildcard bind (0.0.0.0, ::), any IP literal
and localhost; for any other bind, the bound address itself; plus every `--allowed-host` (an exact
name, `*.example.com` for its subdomains, or `*` for any). The port is not compared.

Why not Starlette's TrustedHostMiddleware: it cannot express "any IP literal" and answers in
plain text, while every error of this service is JSON.
"""
from __future__ import annotations

import ipaddress

from starlette.responses import JSONResponse

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")


def host_name(header: str | None) -> str | None:
    """The host part of a Host header, lower-cased, without port or brackets; None if malformed."""
    if not header:
        return None
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        rest = header[end + 1:]
        if end < 0 or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return header[1:end] or None
    name, _, port = header.partition(":")
    if port and not port.isdigit():
        return None
    return name.rstrip(".") or None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    return host == "localhost" or (_is_ip(host) and ipaddress.ip_address(host).is_loopback)


class HostPolicy:
    def __init__(self, names=(), suffixes=(), any_ip: bool = False, any_host: bool = False):
        self.names = frozenset(name.lower() for name in names)
        self.suffixes = tuple(suffix.lower() for suffix in suffixes)
        self.any_ip, self.any_host = any_ip, any_host

    @classmethod
    def for_bind(cls, bind_host: str, allowed_hosts=()) -> "HostPolicy":
        bind = bind_host.strip("[]").lower()
        names, any_ip = {bind}, False
        if bind in WILDCARD_BINDS:
            names, any_ip = {"localhost"}, True
        elif _is_loopback(bind):
            names |= set(LOOPBACK_NAMES)
        exact = [host for host in allowed_hosts if not host.startswith("*")]
        suffixes = [host[1:] for host in allowed_hosts if host.startswith("*.")]
        return cls(names | {host.strip("[]") for host in exact}, suffixes, any_ip, "*" in allowed_hosts)

    def allows(self, header: str | None) -> bool:
        if self.any_host:
            return True
        name = host_name(header)
        if name is None:
            return False
        return (name in self.names or (self.any_ip and _is_ip(name))
                or any(name.endswith(suffix) for suffix in self.suffixes))


class HostCheckMiddleware:
    """ASGI middleware: 421 JSON for a Host the policy refuses, 400 when there is none."""

    def __init__(self, app, policy: HostPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            values = [value.decode("latin-1") for name, value in scope["headers"] if name == b"host"]
            if len(values) != 1:
                response = JSONResponse({"error": "a request needs exactly one Host header"}, status_code=400)
                return await response(scope, receive, send)
            if not self.policy.allows(values[0]):
                response = JSONResponse({"error": f"Host {values[0]!r} is not allowed: this service answers "
                                                  "to the address it listens on (add names with --allowed-host)"},
                                        status_code=421)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
