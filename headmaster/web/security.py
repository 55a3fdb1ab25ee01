"""Who may talk to the review page, and how: a page that moves files must not be a door.

- Loopback by default; any other address needs a token, and then every request carries it
  (`?token=` once, which sets a cookie, or `Authorization: Bearer ...`).
- The Host header must name the address we listen on, so a rebound DNS name cannot reach us.
- Every state change is a POST carrying the per-process CSRF token the page was rendered with
  (the X-CSRF-Token header from the script, or the `csrf` field of a plain form).

Plain ASGI and the standard library only. The listen-address rules themselves are plain data that
`headmaster.config` checks `[web] listen` with (`check_listen`); this module applies them to requests.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs

from headmaster.config import WILDCARDS, is_loopback

TOKEN_COOKIE = "hm_token"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"  # the hidden field of the page's plain forms
FORM_TYPE = "application/x-www-form-urlencoded"
MAX_FORM_BYTES = 64 * 1024  # a form of the page is a few short fields
SAFE_METHODS = ("GET", "HEAD")


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass
class Guard:
    """The rules of one running server; `port` is set once the socket is bound (it may be 0 in config)."""

    host: str
    port: int
    token: str = ""
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))  # new for every process

    def allowed_hosts(self) -> set[str]:
        names = {self.host} | ({"localhost", "127.0.0.1", "::1"} if is_loopback(self.host) else set())
        hosts = {f"{url_host(n)}:{self.port}".lower() for n in names}
        if self.port == 80:  # browsers leave the default port out
            hosts |= {url_host(n).lower() for n in names}
        return hosts

    def host_ok(self, host_header: str) -> bool:
        if self.host in WILDCARDS:  # bound to every address: the token (required there) is the guard
            return True
        return host_header.lower() in self.allowed_hosts()

    def token_ok(self, presented: str | None) -> bool:
        return not self.token or (presented is not None and hmac.compare_digest(presented.encode(),
                                                                                 self.token.encode()))

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf.encode())


Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class GuardMiddleware:
    """Host check, token check and CSRF check in front of every HTTP request (plain ASGI)."""

    def __init__(self, app: Callable, guard: Guard):
        self.app, self.guard = app, guard

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not self.guard.host_ok(headers.get("host", "")):
            return await _deny(send, 421, "Misdirected request: this server does not answer to that Host name")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        from_query = query.get("token", [None])[0]
        if self.guard.token:
            presented = from_query or _bearer(headers) or _cookie(headers, TOKEN_COOKIE)
            if not self.guard.token_ok(presented):
                return await _deny(send, 401, "This page needs its token: open it with ?token=... once")
        if scope["method"] not in SAFE_METHODS:
            origin = headers.get("origin")
            if origin and origin != "null" and origin.split("://", 1)[-1].lower() != headers.get("host", "").lower():
                return await _deny(send, 403, "Cross-origin request refused")
            presented = headers.get(CSRF_HEADER)
            if presented is None and headers.get("content-type", "").split(";")[0].strip() == FORM_TYPE:
                body = await _read_body(receive, MAX_FORM_BYTES)
                if body is None:
                    return await _deny(send, 413, "Form too large")
                presented = parse_qs(body.decode("latin-1")).get(CSRF_FIELD, [None])[0]
                receive = _replay(body, receive)
            if not self.guard.csrf_ok(presented):
                return await _deny(send, 403, "Missing or wrong CSRF token: reload the page")
        if self.guard.token and from_query:  # remember the token in a cookie, so links need not carry it
            send = _with_cookie(send, self.guard.token)
        await self.app(scope, receive, send)


SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; script-src 'self'; "
                                 b"style-src 'self'; connect-src 'self'; frame-ancestors 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None past `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, then: Receive) -> Receive:
    """A `receive` that hands the app the body already read, then whatever the client sends next."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await then()

    return receive


def _bearer(headers: dict[str, str]) -> str | None:
    value = headers.get("authorization", "")
    return value[7:] if value.lower().startswith("bearer ") else None


def _cookie(headers: dict[str, str], name: str) -> str | None:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(headers.get("cookie", ""))
    except Exception:
        return None
    return jar[name].value if name in jar else None


def _with_cookie(send: Send, token: str) -> Send:
    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            cookie = f"{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/".encode()
            message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
        await send(message)

    return wrapped


async def _deny(send: Send, status: int, text: str) -> None:
    body = (text + "\n").encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": body})
