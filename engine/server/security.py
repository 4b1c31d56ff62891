"""Who may talk to the server: the ``Host`` a request names and the ``Origin`` a browser sends.

A server on 127.0.0.1 with no API key (the default) is reachable by every web page its user opens: a page on
``evil.example`` can POST a form to ``http://127.0.0.1:8000/v1/images/generations`` (a "simple" cross-origin request
needs no CORS preflight), and with DNS rebinding (``evil.example`` re-resolving to 127.0.0.1) even read the answers.
Local servers that were bitten by this (Jupyter, the Docker daemon, Ollama) check both headers; so does this guard,
a pure ASGI middleware in front of everything else:

* **Host.** An IP literal (``127.0.0.1:8000``, ``[::1]``, ``10.0.0.5``) is always accepted: rebinding needs a name.
  A name must be ``localhost`` or one of ``allowed_hosts`` (``dreamfuse serve --allowed-host NAME``; ``*`` accepts
  any). Anything else is answered 421 (misdirected request) before any route runs.
* **Origin.** A browser names the page's origin on every cross-origin request and on same-origin POSTs. A request
  with an ``Origin`` is accepted when it is the server's own (same scheme-less host and port as ``Host``: the page at
  ``/`` keeps working) or one of ``allowed_origins`` (``--allow-origin https://app.example``, ``*`` for any; those
  also get CORS headers). Anything else, ``Origin: null`` included, is answered 403. Requests without ``Origin``
  (curl, SDKs, the OpenAI client, server-to-server) are not browsers' cross-origin requests and pass.
"""

from __future__ import annotations

import ipaddress
import json
from urllib.parse import urlsplit

LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def split_host(value: str) -> tuple[str, int | None] | None:
    """``"Example.com:8000"`` -> ``("example.com", 8000)``, ``"[::1]"`` -> ``("::1", None)``; None when malformed."""
    value = value.strip().lower()
    if not value or any(c.isspace() for c in value) or "/" in value or "@" in value:
        return None
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            host, port = value, None
        elif ":" in host:  # a bare IPv6 address without brackets is not a valid Host
            return None
    if port is not None and (not port.isdigit() or not 0 < int(port) < 65536 or len(port) > 5):
        return None
    return (host.rstrip("."), int(port) if port is not None else None) if host else None


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _origin(value: str) -> tuple[str, str, int] | None:
    """``"https://App.example"`` -> ``("https", "app.example", 443)``; None when not a http(s) origin."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        return None
    return parts.scheme, parts.hostname.rstrip("."), port or (443 if parts.scheme == "https" else 80)


class HostOriginGuard:
    """Pure ASGI middleware refusing requests whose ``Host`` is an unknown name (421) or whose ``Origin`` is a
    foreign page (403); see the module docs."""

    def __init__(self, app, *, allowed_hosts=(), allowed_origins=()):
        self.app = app
        hosts = {h.strip().lower().rstrip(".") for h in allowed_hosts if h and h.strip()}
        self.any_host = "*" in hosts
        self.hosts = (hosts - {"*"}) | LOCAL_NAMES
        origins = {o.strip() for o in allowed_origins if o and o.strip()}
        self.any_origin = "*" in origins
        self.origins = {_origin(o) for o in origins - {"*"}} - {None}
        self.null_origin = "null" in origins

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope.get("headers") or ():
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        problem = self.check(headers, scope)
        if problem is not None:
            status, message = problem
            return await _refuse(send, status, message)
        return await self.app(scope, receive, send)

    def check(self, headers: dict, scope) -> tuple[int, str] | None:
        """None when the request may pass, else ``(status, message)``."""
        host_header = headers.get("host")
        host = None
        if host_header is not None:
            host = split_host(host_header)
            if host is None:
                return 400, f"host: malformed Host header {host_header[:100]!r}"
            if not (self.any_host or is_ip(host[0]) or host[0] in self.hosts):
                return 421, (f"host: this server does not answer to {host[0]!r} (a DNS-rebinding page?); start it "
                             "with --allowed-host NAME to allow that name")
        origin = headers.get("origin")
        if origin is None or self.any_origin:
            return None
        if origin.strip() == "null":
            return None if self.null_origin else (403, "origin: requests from opaque origins ('null') are refused")
        parsed = _origin(origin)
        if parsed is None:
            return 403, f"origin: malformed Origin header {origin[:100]!r}"
        if parsed in self.origins:
            return None
        if host is not None:
            scheme = scope.get("scheme", "http")
            own_port = host[1] or (443 if scheme in ("https", "wss") else 80)
            if (parsed[1], parsed[2]) == (host[0], own_port):
                return None
        return 403, (f"origin: cross-origin requests from {origin[:100]!r} are refused (start the server with "
                     "--allow-origin ORIGIN to allow a web app)")


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": message.split(":", 1)[0], "code": "forbidden_origin" if status == 403
                                 else "misdirected_request" if status == 421 else "bad_request"},
                       "detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"x-should-retry", b"false"), (b"vary", b"Origin")]})
    await send({"type": "http.response.body", "body": body})


__all__ = ["HostOriginGuard", "split_host"]
